"""Decoding where it is fastest (pipeline/decode.py): the same pixels as PIL for every kind of file, broken
files named, and the device path (here torchvision's decode_jpeg on the CPU) giving the CPU path's batch."""
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from pipeline import decode
from pipeline.data import build_dataset
from pipeline.decode import decode_file, decode_jpegs, decode_with_pil, device_decodable
from pipeline.errors import H2TError
from pipeline.preprocess import Preprocess
from pipeline.stages import Loader, Shard

CPU = torch.device("cpu")
PRE = Preprocess(24, "bilinear", (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "center_crop", 0.875)


def photo(height=48, width=64, seed=0) -> np.ndarray:
    """Smooth colour gradients with a little noise: JPEG-like content, chroma subsampling matters."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    noise = np.random.default_rng(seed).normal(0, 6, (height, width, 3))
    rgb = np.stack([200 * x + 30, 180 * y + 40, 120 * (x + y) + 20], -1) + noise
    return np.clip(rgb, 0, 255).astype(np.uint8)


def write_jpeg_folder(root, per_class: int) -> None:
    """A `data=folder` tree of JPEG photos: ROOT/{train,test}/{a,b}/<i>.jpg."""
    for split in ("train", "test"):
        for c, seed in (("a", 0), ("b", 1)):
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(photo(40, 56, seed=10 * seed + i)).save(folder / f"{i}.jpg", quality=90)


def write_all(folder, size=(48, 64), seed=0) -> dict:
    """Every kind of file the decoders treat differently, written by PIL."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(photo(*size, seed=seed))
    rotated = Image.Exif()
    rotated[0x0112] = 6  # rotate 90 degrees on display
    upright = Image.Exif()
    upright[0x0112] = 1
    files = {"rgb.jpg": (rgb, {"quality": 90}), "progressive.jpg": (rgb, {"progressive": True}),
             "444.jpg": (rgb, {"subsampling": 0}), "gray.jpg": (rgb.convert("L"), {}),
             "cmyk.jpg": (rgb.convert("CMYK"), {}), "rotated.jpg": (rgb, {"exif": rotated.tobytes()}),
             "upright.jpg": (rgb, {"exif": upright.tobytes()}), "alpha.png": (rgb.convert("RGBA"), {}),
             "wide.png": (Image.fromarray(photo(*size, seed=seed)[..., 0].astype(np.uint16) * 257), {})}
    for name, (image, options) in files.items():
        image.save(folder / name, **options)
    return {name: folder / name for name in files}


def test_every_kind_of_file_decodes_to_pils_pixels(tmp_path, monkeypatch):
    paths = write_all(tmp_path)
    expected = {name: decode_with_pil(path) for name, path in paths.items()}
    assert expected["rotated.jpg"].shape == (64, 48, 3) and expected["wide.png"].shape == (48, 64, 3)
    for name, path in paths.items():  # exactly equal: same libjpeg-turbo settings (accurate DCT, fancy upsampling)
        np.testing.assert_array_equal(decode_file(path), expected[name], err_msg=name)
    fast = {"rgb.jpg", "progressive.jpg", "444.jpg", "gray.jpg", "upright.jpg"}
    assert {name for name, path in paths.items() if device_decodable(path.read_bytes())} == fast
    if decode.simplejpeg is not None:  # the fast ones really skip PIL
        monkeypatch.setattr(decode, "decode_with_pil", lambda path: pytest.fail(f"{path} went through PIL"))
        for name in fast:
            np.testing.assert_array_equal(decode_file(paths[name]), expected[name])


def test_jpegs_the_fast_decoder_warns_about_are_left_to_pil(tmp_path):
    data = (write_all(tmp_path)["rgb.jpg"]).read_bytes()
    damaged = bytearray(data)
    damaged[len(data) // 2:len(data) // 2 + 40] = bytes(40)  # corrupt entropy data: PIL decodes it regardless
    for name, content in {"damaged.jpg": bytes(damaged), "padded.jpg": data + b"\0" * 64}.items():
        (tmp_path / name).write_bytes(content)
        np.testing.assert_array_equal(decode_file(tmp_path / name), decode_with_pil(tmp_path / name))


def test_xmp_orientation_and_odd_exif_go_through_pil(tmp_path):
    data = write_all(tmp_path)["rgb.jpg"].read_bytes()
    xmp = b"http://ns.adobe.com/xap/1.0/\0<x:xmpmeta><rdf:Description tiff:Orientation=\"3\"/></x:xmpmeta>"
    with_xmp = data[:2] + b"\xff\xe1" + (len(xmp) + 2).to_bytes(2, "big") + xmp + data[2:]
    assert not device_decodable(with_xmp)
    (tmp_path / "xmp.jpg").write_bytes(with_xmp)
    out = decode_file(tmp_path / "xmp.jpg")
    np.testing.assert_array_equal(out, decode_with_pil(tmp_path / "xmp.jpg"))
    np.testing.assert_array_equal(out, decode_with_pil(tmp_path / "rgb.jpg")[::-1, ::-1])  # PIL applied it
    odd_exif = b"Exif\0\0" + b"XX*\0" + bytes(8)
    assert not device_decodable(data[:2] + b"\xff\xe1" + (len(odd_exif) + 2).to_bytes(2, "big") + odd_exif + data[2:])


@pytest.mark.parametrize("order", ["little", "big"])
def test_exif_orientation_is_read_in_either_byte_order(order):
    def tiff(*entries):  # (tag, type, count, value) in the first directory
        head = (b"II*\0" if order == "little" else b"MM\0*") + (8).to_bytes(4, order) + len(entries).to_bytes(2, order)
        return head + b"".join(t.to_bytes(2, order) + k.to_bytes(2, order) + n.to_bytes(4, order)
                               + v.to_bytes(2, order) + bytes(2) for t, k, n, v in entries) + bytes(4)
    assert decode._exif_orientation(tiff((0x010F, 2, 1, 0))) == 1  # no orientation: upright
    assert decode._exif_orientation(tiff((0x010F, 2, 1, 0), (0x0112, 3, 1, 1))) == 1
    assert decode._exif_orientation(tiff((0x0112, 3, 1, 6))) == 6
    assert decode._exif_orientation(tiff((0x0112, 4, 1, 1))) is None  # a LONG: unusual, PIL decides
    assert decode._exif_orientation(tiff((0x0112, 3, 1, 1))[:-10]) is None  # cut short


@pytest.mark.parametrize("damage", ["truncated", "garbage", "jpeg-shaped garbage"])
def test_broken_files_are_named_on_both_paths(tmp_path, damage):
    data = write_all(tmp_path)["rgb.jpg"].read_bytes()
    broken = {"truncated": data[:len(data) * 2 // 3], "garbage": b"not an image at all",
              "jpeg-shaped garbage": b"\xff\xd8\xff" + bytes(range(256)) * 4 + b"\xff\xd9"}[damage]
    path = tmp_path / "bad.jpg"
    path.write_bytes(broken)
    with pytest.raises(H2TError, match="cannot read image .*bad.jpg"):
        decode_file(path)
    with pytest.raises(H2TError, match="cannot read image .*bad.jpg: "):
        decode_jpegs([data, broken, data], CPU, ["good1.jpg", str(path), "good2.jpg"])
    with pytest.raises(H2TError, match="missing image file .*nothere.jpg"):
        decode_file(tmp_path / "nothere.jpg")


def test_device_decode_gives_the_cpu_paths_preprocessed_batch(tmp_path):
    paths = write_all(tmp_path)
    names = ["rgb.jpg", "progressive.jpg", "444.jpg", "gray.jpg", "upright.jpg"]
    datas = [paths[name].read_bytes() for name in names]
    tensors = decode_jpegs(datas, CPU, names)
    assert all(t.shape == (3, 48, 64) and t.dtype == torch.uint8 for t in tensors)  # grayscale comes out RGB
    arrays = np.stack([decode_file(paths[name]) for name in names])
    np.testing.assert_array_equal(torch.stack(tensors).permute(0, 2, 3, 1).numpy(), arrays)
    torch.testing.assert_close(PRE(tensors, CPU), PRE(arrays, CPU), rtol=0, atol=0)
    mixed = tensors[:2] + [torch.tensor(decode_file(paths["rotated.jpg"])).permute(2, 0, 1)]
    as_arrays = [t.permute(1, 2, 0).numpy() for t in mixed]  # sizes differ: one resize per image
    torch.testing.assert_close(PRE(mixed, CPU), PRE(as_arrays, CPU), rtol=0, atol=0)


@pytest.mark.filterwarnings("error::UserWarning")  # PIL's read-only arrays made torch warn here
def test_loader_decoding_on_the_device_gives_the_same_batch(tmp_path):
    for split in ("train", "test"):
        for c, seed in (("a", 0), ("b", 1)):
            write_all(tmp_path / split / c, seed=seed)
    data = build_dataset(OmegaConf.create({"source": "folder", "root": str(tmp_path), "val_fraction": 0.25}))
    split = data.splits["train"]
    assert split.read_bytes is not None and split.read_bytes(0, 1)[0][0].endswith(split.ids[0])
    batches = {}
    for device_decode, workers in ((False, 2), (True, 2), (False, 1)):  # 1: one thread, no decode processes
        loader = Loader(data, workers=workers, pin=False, device=CPU, device_decode=device_decode)
        try:
            images = loader.submit(Shard("train", 1, len(split), 0)).result()
        finally:
            loader.close()
        assert isinstance(images, list) and (not device_decode or all(isinstance(i, torch.Tensor) for i in images))
        batches[device_decode, workers] = PRE(images, CPU)
    assert batches[True, 2].shape == (len(split) - 1, 3, 24, 24)
    torch.testing.assert_close(batches[True, 2], batches[False, 2], rtol=0, atol=0)
    torch.testing.assert_close(batches[False, 1], batches[False, 2], rtol=0, atol=0)


def test_extraction_decoding_on_the_device_writes_the_cpu_paths_store(tmp_path):
    """The whole extraction of a JPEG folder with extract.decode=device (torchvision's batched decode, on the
    CPU here) writes the same store, bit for bit, as the CPU path: same id, same values."""
    from pipeline.config import settings
    from pipeline.extract import decodes_on_device, extract, plan_store
    from tests.conftest import TINY_OVERRIDES, compose_cfg

    write_jpeg_folder(tmp_path / "images", per_class=6)
    stores = {}
    for mode in ("cpu", "device"):
        model = [o for o in TINY_OVERRIDES if not o.startswith("data")]
        cfg = settings(compose_cfg("extract", model + ["data=folder", f"data.root={tmp_path / 'images'}", "data.val_fraction=0.25",
                                              f"extract.decode={mode}", "extract.batch_size=4",
                                                       f"store.root={tmp_path / mode}"])).extract_job()
        assert decodes_on_device(cfg.extract, plan_store(cfg).dataset) == (mode == "device")
        stores[mode] = extract(cfg).store
    cpu, device = stores["cpu"], stores["device"]
    assert cpu.id == device.id
    for split in cpu.splits():
        for layer in cpu.layers:
            np.testing.assert_array_equal(cpu.features(split, layer["name"])[:], device.features(split, layer["name"])[:])
