"""Data from disk: folders, CSV manifests, npz arrays, torchvision roots; bad input is named or skipped."""
import os

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from pipeline.data import build_dataset
from pipeline.data.files import load_image
from pipeline.errors import H2TError


def build(**cfg):
    return build_dataset(OmegaConf.create(cfg))


def write_images(root, n=4, classes=("a", "b"), split_dirs=("train", "test"), size=(12, 16)):
    rng = np.random.default_rng(0)
    for split in split_dirs:
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")


# --- image conversion -------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "1", "CMYK", "I;16", "I"])
def test_every_image_mode_becomes_8bit_rgb(tmp_path, mode):
    rng = np.random.default_rng(0)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, (9, 7), dtype=np.uint16))
    elif mode == "I":
        img = Image.fromarray(rng.integers(0, 65535, (9, 7)).astype(np.int32), mode="I")
    else:
        img = Image.fromarray(rng.integers(0, 255, (9, 7, 3), dtype=np.uint8)).convert(mode)
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I") else "x.png")
    img.save(path)
    out = load_image(path)
    assert out.dtype == np.uint8 and out.shape == (9, 7, 3)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(tmp_path / "w.png")
    Image.fromarray(np.full((4, 4), 32768, np.uint16)).save(tmp_path / "g.png")
    assert load_image(tmp_path / "w.png").min() == 255
    assert 126 <= load_image(tmp_path / "g.png").max() <= 129


def test_grayscale_is_replicated_and_small_non_square_images_are_kept(tmp_path):
    Image.fromarray(np.arange(6, dtype=np.uint8).reshape(2, 3) * 40).save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    assert out.shape == (2, 3, 3) and (out[..., 0] == out[..., 2]).all()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_broken_files_are_named(tmp_path, damage):
    path = tmp_path / "bad.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 7).save(path)
    data = path.read_bytes()
    path.write_bytes({"garbage": b"not an image", "truncated": data[: len(data) // 2], "empty": b""}[damage])
    with pytest.raises(H2TError, match="bad.png"):
        load_image(path)
    with pytest.raises(H2TError, match="missing image file .*nothere.png"):
        load_image(tmp_path / "nothere.png")


# --- folder ------------------------------------------------------------------------------------------------

def test_folder_skip_records_broken_files_and_error_names_them(tmp_path):
    write_images(tmp_path)
    (tmp_path / "test" / "a" / "1.png").write_bytes(b"broken")
    data = build(source="folder", root=str(tmp_path), on_error="skip")
    assert [s["id"] for s in data.skipped] == [os.path.join("test", "a", "1.png")]
    assert len(data.splits["test"]) == 7 and "test/a/1.png" not in set(data.splits["test"].ids)
    strict = build(source="folder", root=str(tmp_path))
    with pytest.raises(H2TError, match="1.png"):
        strict.splits["test"].load(0, 8)
    with pytest.raises(H2TError, match="data.on_error"):
        build(source="folder", root=str(tmp_path), on_error="ignore")


def test_folder_sizes_select_a_seeded_subset(tmp_path):
    write_images(tmp_path, n=10)
    a = build(source="folder", root=str(tmp_path), sizes={"train": 8, "val": 4, "test": 6})
    b = build(source="folder", root=str(tmp_path), sizes={"train": 8, "val": 4, "test": 6})
    assert {s: len(v) for s, v in a.splits.items()} == {"train": 8, "val": 4, "test": 6}
    assert list(a.splits["train"].ids) == list(b.splits["train"].ids)
    with pytest.raises(H2TError, match="data.sizes.train=30"):
        build(source="folder", root=str(tmp_path), sizes={"train": 30})


def test_split_path_that_is_not_a_directory_is_named(tmp_path):
    write_images(tmp_path, split_dirs=("test",))
    (tmp_path / "train").write_text("not a directory")
    with pytest.raises(H2TError, match=f"missing directory {tmp_path / 'train'}"):
        build(source="folder", root=str(tmp_path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads unreadable directories")
def test_unreadable_directory_is_named(tmp_path):
    write_images(tmp_path)
    os.chmod(tmp_path / "train" / "a", 0)
    try:
        with pytest.raises(H2TError, match="permission denied"):
            build(source="folder", root=str(tmp_path))
    finally:
        os.chmod(tmp_path / "train" / "a", 0o755)


# --- CSV manifest ------------------------------------------------------------------------------------------

def test_csv_manifest_with_split_column(tmp_path):
    write_images(tmp_path, split_dirs=("imgs",))
    rows = ["path,label,split"] + [f"imgs/{c}/{i}.png,{ci},{'test' if i == 0 else 'train'}"
                                   for ci, c in enumerate("ab") for i in range(4)]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    data = build(source="csv", path=str(tmp_path / "m.csv"), sizes={"val": 2})
    assert data.num_classes == 2 and len(data.splits["test"]) == 2 and len(data.splits["val"]) == 2
    assert data.splits["train"].load(0, 1)[0].shape == (12, 16, 3)


def test_csv_without_split_column_carves_test_and_val(tmp_path):
    write_images(tmp_path, n=10, split_dirs=("imgs",))
    rows = [f"imgs/{c}/{i}.png,{ci}" for ci, c in enumerate("ab") for i in range(10)]
    (tmp_path / "m.csv").write_text("\n".join(rows))
    data = build(source="csv", path=str(tmp_path / "m.csv"), test_fraction=0.25, val_fraction=0.2)
    sizes = {s: len(v) for s, v in data.splits.items()}
    assert sizes == {"test": 5, "val": 3, "train": 12}
    all_ids = [i for s in data.splits.values() for i in s.ids]
    assert len(set(all_ids)) == 20


@pytest.mark.parametrize("row,culprit", [
    ("imgs/a/0.png,cat,train", "line 2: label 'cat' is not an integer"),
    ("imgs/a/0.png,-1,train", "line 2: label -1 is negative"),
    ("imgs/a/0.png,0,holdout", "line 2: split 'holdout'"),
    ("imgs/a/0.png", "line 2: expected path,label"),
])
def test_csv_bad_rows_are_named_by_line(tmp_path, row, culprit):
    write_images(tmp_path, split_dirs=("imgs",))
    (tmp_path / "m.csv").write_text(f"imgs/a/1.png,0,train\n{row}\nimgs/b/0.png,1,test\n")
    with pytest.raises(H2TError, match=culprit):
        build(source="csv", path=str(tmp_path / "m.csv"))


def test_csv_label_out_of_range_with_declared_classes(tmp_path):
    write_images(tmp_path, split_dirs=("imgs",))
    (tmp_path / "m.csv").write_text("imgs/a/1.png,0,train\nimgs/a/2.png,5,train\nimgs/b/0.png,1,test\n")
    with pytest.raises(H2TError, match="line 2: label 5 is outside 0..2"):
        build(source="csv", path=str(tmp_path / "m.csv"), num_classes=3)


def test_csv_missing_file_is_named_or_skipped(tmp_path):
    write_images(tmp_path, split_dirs=("imgs",))
    (tmp_path / "m.csv").write_text("imgs/a/1.png,0,train\nimgs/a/9.png,0,train\nimgs/b/0.png,1,test\n")
    data = build(source="csv", path=str(tmp_path / "m.csv"), sizes={"val": 0})
    with pytest.raises(H2TError, match="missing image file .*9.png"):
        data.splits["train"].load(0, 2)
    data = build(source="csv", path=str(tmp_path / "m.csv"), sizes={"val": 0}, on_error="skip")
    assert [s["id"] for s in data.skipped] == [os.path.join("imgs", "a", "9.png")]


# --- npz ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["nhwc", "nchw", "gray"])
def test_npz_layouts(tmp_path, layout):
    rng = np.random.default_rng(0)
    shape = {"nhwc": (20, 8, 8, 3), "nchw": (20, 3, 8, 8), "gray": (20, 8, 8)}[layout]
    x = rng.integers(0, 255, shape, dtype=np.uint8)
    y = rng.integers(0, 4, 20)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:5], y_test=y[:5])
    data = build(source="npz", path=str(tmp_path / "d.npz"))
    batch = data.splits["train"].load(0, 3)
    assert batch.shape == (3, 8, 8, 3) and data.num_classes == int(y.max()) + 1
    idx = int(data.splits["train"].ids[0].split("/")[1])
    if layout == "nhwc":
        exp = x[idx]
    elif layout == "nchw":
        exp = x[idx].transpose(1, 2, 0)
    else:
        exp = np.repeat(x[idx][..., None], 3, -1)
    np.testing.assert_array_equal(batch[0], exp)


@pytest.mark.parametrize("arrays,culprit", [
    ({"x_train": np.zeros((4, 8, 8, 3), np.float32)}, "x_train: images must be uint8"),
    ({"y_train": np.array([0.5, 1, 0, 1])}, "y_train: labels must be integers"),
    ({"y_train": np.array([0, 1, 0])}, "y_train: expected 4 labels"),
    ({"y_test": np.array([0, 9])}, r"y_test\[1\] = 9 is outside 0..2"),
    ({"x_test": None}, "needs arrays x_test and y_test"),
])
def test_npz_bad_arrays_are_named(tmp_path, arrays, culprit):
    base = {"x_train": np.zeros((4, 8, 8, 3), np.uint8), "y_train": np.array([0, 1, 2, 1]),
            "x_test": np.zeros((2, 8, 8, 3), np.uint8), "y_test": np.array([0, 1])}
    base.update(arrays)
    np.savez(tmp_path / "d.npz", **{k: v for k, v in base.items() if v is not None})
    with pytest.raises(H2TError, match=culprit):
        build(source="npz", path=str(tmp_path / "d.npz"), num_classes=3 if "y_test" in arrays else None)


def test_missing_files_say_where_they_are_expected(tmp_path):
    with pytest.raises(H2TError, match="no such .npz"):
        build(source="npz", path=str(tmp_path / "none.npz"))
    with pytest.raises(H2TError, match="no such CSV"):
        build(source="csv", path=str(tmp_path / "none.csv"))
    with pytest.raises(H2TError, match="cifar-10-batches-py"):
        build(source="torchvision", dataset="CIFAR10", root=str(tmp_path))
    with pytest.raises(H2TError, match="data.dataset='ImageNet'"):
        build(source="torchvision", dataset="ImageNet", root=str(tmp_path))


# --- torchvision -------------------------------------------------------------------------------------------

def test_torchvision_eurosat_from_a_local_root(tmp_path):
    classes = ["AnnualCrop", "Forest", "River"]
    rng = np.random.default_rng(0)
    for c in classes:
        d = tmp_path / "eurosat" / "2750" / c
        d.mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(d / f"{c}_{i}.jpg")
    data = build(source="torchvision", dataset="EuroSAT", root=str(tmp_path), test_fraction=0.2, val_fraction=0.25)
    assert data.num_classes == 3 and data.class_names == classes
    assert {s: len(v) for s, v in data.splits.items()} == {"test": 6, "val": 6, "train": 18}
    images = data.splits["test"].load(0, 2)
    assert images[0].shape == (64, 64, 3) and images[0].dtype == np.uint8
    ids = [i for s in data.splits.values() for i in s.ids]
    assert len(set(ids)) == 30


def test_torchvision_dtd_uses_its_own_train_val_test_splits(tmp_path):
    rng = np.random.default_rng(0)
    base = tmp_path / "dtd" / "dtd"
    (base / "labels").mkdir(parents=True)
    listing = {"train": [], "val": [], "test": []}
    for c in ("banded", "woven"):
        (base / "images" / c).mkdir(parents=True)
        for i in range(9):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(base / "images" / c / f"{c}_{i}.jpg")
            listing[("train", "val", "test")[i % 3]].append(f"{c}/{c}_{i}.jpg")
    for split, lines in listing.items():
        (base / "labels" / f"{split}1.txt").write_text("\n".join(lines) + "\n")
    data = build(source="torchvision", dataset="DTD", root=str(tmp_path))
    assert data.class_names == ["banded", "woven"]
    assert {s: len(v) for s, v in data.splits.items()} == {"train": 6, "val": 6, "test": 6}
    assert sorted(data.splits["test"].labels.tolist()) == [0, 0, 0, 1, 1, 1]
    assert data.splits["val"].load(0, 1)[0].shape == (20, 24, 3)
