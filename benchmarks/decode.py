"""JPEG decoding per core: today's PIL path against simplejpeg, PyTurboJPEG, the chosen `decode_file` and
torchvision's decode_jpeg, on the same files.

    python benchmarks/decode.py [--images 512] [--size 256] [--rounds 7]

Writes `--images` JPEGs (quality 90, 4:2:0) of `--size` px into a temporary folder: random crops of
scikit-image's sample photos, or smooth random textures without scikit-image. Then, in one thread, every
decoder turns every file into uint8 RGB pixels (reading the file included), in `--rounds` interleaved rounds;
it prints the median images per CPU second (process time: per core, and fair on a shared machine), the
largest pixel difference from PIL's, and the median per-round ratio chosen / PIL (the issue's floor: 1.5).
torchvision decodes the whole list in one call on the CPU; `on cuda` (wall time, when a GPU is present) is
`decode.decode_jpegs` there, nvJPEG.

Measured 2026-12-02 on the 2-core CPU machine (shared with other benchmarks: absolute rates swing ~30 %
run to run, the per-round ratio much less), three runs of 512 images of 256 px, then one of 128 of 512 px;
libjpeg-turbo 3.2.0 in Pillow 13.0, 3.1.2 in simplejpeg 1.9.0, 3.1.3 in torchvision 0.29.1:

    img/s per core                       256 px (three runs)       512 px    max |diff| from PIL
    PIL (today's load_image)             1,954 / 1,727 / 1,400       571     -
    simplejpeg                           3,235 / 3,686 / 2,561       995     0
    PyTurboJPEG 2.6.1                    not measurable: it needs a system libturbojpeg >= 3.0; this machine
                                         has none (its apt cache: 2.1.5, refused by PyTurboJPEG 2.x)
    decode_file (chosen: simplejpeg)     2,858 / 3,325 / 2,322       976     0
    torchvision decode_jpeg, CPU batch   3,028 / 3,026 / 2,212       975     0
    chosen / PIL                         1.63 / 1.88 / 1.75          1.67

All three wrap libjpeg-turbo with the same settings (accurate DCT, fancy upsampling): identical pixels, so the
gap lies outside libjpeg, in PIL's own work around it (not broken down further). torchvision is as fast but
its image codecs are deprecated since 0.29 and it decodes corrupt data without telling (simplejpeg's strict
mode raises, and decode_file then lets PIL decide).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.decode import decode_file, decode_jpegs, decode_with_pil


def photos(count: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    try:
        import skimage.data as samples

        sources = [samples.astronaut(), samples.coffee(), samples.chelsea(), samples.rocket()]
    except ImportError:  # smooth random textures: low-resolution noise, upsampled
        sources = [np.asarray(Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).resize(
            (512, 512), Image.BICUBIC)) for _ in range(4)]
    out = []
    for i in range(count):
        source = sources[i % len(sources)]
        side = int(rng.integers(min(source.shape[:2]) // 2, min(source.shape[:2]) + 1))
        top, left = (int(rng.integers(0, n - side + 1)) for n in source.shape[:2])
        crop = Image.fromarray(source[top:top + side, left:left + side])
        out.append(np.asarray(crop.resize((size, size), Image.BICUBIC)))
    return out


def decoders() -> dict:
    """name -> function of the list of paths, decoding every file; unavailable ones -> the reason."""
    import simplejpeg
    from torchvision.io import ImageReadMode, decode_jpeg

    found = {"PIL (today's load_image)": lambda paths: [decode_with_pil(p) for p in paths],
             "simplejpeg": lambda paths: [simplejpeg.decode_jpeg(p.read_bytes(), "RGB") for p in paths]}
    try:
        from turbojpeg import TJPF_RGB, TurboJPEG

        turbo = TurboJPEG()
        found["PyTurboJPEG"] = lambda paths: [turbo.decode(p.read_bytes(), pixel_format=TJPF_RGB) for p in paths]
    except (ImportError, RuntimeError, OSError) as exc:
        found["PyTurboJPEG"] = f"unavailable: {str(exc).splitlines()[0]}"
    found["decode_file (chosen)"] = lambda paths: [decode_file(p) for p in paths]
    found["torchvision decode_jpeg, CPU batch"] = lambda paths: [t.permute(1, 2, 0).numpy() for t in decode_jpeg(
        [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths], mode=ImageReadMode.RGB)]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="h2t-decode-") as folder:
        paths = []
        for i, pixels in enumerate(photos(args.images, args.size)):
            paths.append(Path(folder) / f"{i}.jpg")
            Image.fromarray(pixels).save(paths[-1], quality=90)
        runs = {name: fn for name, fn in decoders().items() if callable(fn)}
        reference = runs["PIL (today's load_image)"](paths)
        diffs = {name: max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(fn(paths), reference))
                 for name, fn in runs.items()}
        seconds = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, fn in runs.items():
                start = time.process_time()
                fn(paths)
                seconds[name].append(time.process_time() - start)
        print(f"{args.images} JPEGs of {args.size} px, quality 90; {args.rounds} rounds, one thread")
        for name, fn in decoders().items():
            if not callable(fn):
                print(f"  {name:38s} {fn}")
                continue
            rate = args.images / statistics.median(seconds[name])
            print(f"  {name:38s} {rate:8,.0f} img/s per core   max |diff| from PIL {diffs[name]}")
        ratios = [p / c for p, c in zip(seconds["PIL (today's load_image)"], seconds["decode_file (chosen)"])]
        print(f"  chosen / PIL: {statistics.median(ratios):.2f} (median of per-round ratios; floor 1.5)")
        if torch.cuda.is_available():
            cuda(paths, reference)


def cuda(paths: list[Path], reference: list[np.ndarray]) -> None:
    device = torch.device("cuda")
    datas, names = [p.read_bytes() for p in paths], [str(p) for p in paths]
    images = decode_jpegs(datas, device, names)  # warm-up: nvJPEG handles, memory
    torch.cuda.synchronize()
    diff = max(int((t.permute(1, 2, 0).cpu().int() - torch.from_numpy(r).int()).abs().max())
               for t, r in zip(images, reference))
    start = time.perf_counter()
    for _ in range(5):
        decode_jpegs(datas, device, names)
    torch.cuda.synchronize()
    rate = 5 * len(paths) / (time.perf_counter() - start)
    print(f"  {'on cuda (decode_jpegs, nvJPEG)':38s} {rate:8,.0f} img/s (wall)   max |diff| from PIL {diff}")


if __name__ == "__main__":
    main()
