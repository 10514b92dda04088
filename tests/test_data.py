import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image
from scipy import ndimage

from pipeline.data import build_dataset
from pipeline.data.base import in_memory_split
from pipeline.errors import H2TError

SMALL = {"train": 40, "val": 10, "test": 30}


def shapes(task, **kw):
    return build_dataset(OmegaConf.create({"source": "shapes", "task": task, "sizes": SMALL, "num_classes": 8, **kw}))


@pytest.mark.parametrize("task", ["location", "orientation", "count"])
def test_shapes_are_deterministic_by_seed(task):
    a, b, c = shapes(task), shapes(task), shapes(task, seed=1)
    for split in SMALL:
        np.testing.assert_array_equal(a.splits[split].load(0, 5), b.splits[split].load(0, 5))
        assert len(a.splits[split]) == SMALL[split]
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert not np.array_equal(a.splits["train"].load(0, 5), c.splits["train"].load(0, 5))


def test_fingerprint_covers_pixels_not_only_labels():
    a = shapes("location")
    b = shapes("location")
    original = b.splits["test"].load(0, 30).copy()
    b.splits["test"] = in_memory_split("test", 255 - original, b.splits["test"].labels, b.splits["test"].ids)
    assert a.fingerprint() != b.fingerprint()


def test_location_label_is_the_x_bin_of_the_object():
    data = shapes("location", image_size=64)
    images, labels = data.splits["train"].load(0, 40), data.splits["train"].labels
    xs = [np.nonzero(img.any(axis=2))[1].mean() for img in images]
    order = np.argsort(xs)
    assert np.all(np.diff(labels[order]) >= -1), "labels must increase with the object's x position"
    assert np.corrcoef(xs, labels)[0, 1] > 0.95


def test_count_label_is_number_of_objects_minus_one():
    data = shapes("count", image_size=96)
    images, labels = data.splits["test"].load(0, 30), data.splits["test"].labels
    counts = [ndimage.label(img.any(axis=2), structure=np.ones((3, 3)))[1] for img in images]
    assert np.mean(np.array(counts) == labels + 1) >= 0.95


def test_orientation_classes_differ_in_angle():
    """The label is the bin of the arrow's direction: read back from the pixels (centroid -> tip, the mask
    pixel farthest from the centroid), it gives the label for (nearly) every image."""
    data = shapes("orientation", num_classes=4)
    split = data.splits["train"]
    images, labels = split.load(0, len(split)), split.labels
    assert set(labels) == {0, 1, 2, 3}
    hits = 0
    for image, label in zip(images, labels):
        ys, xs = np.nonzero(image.max(axis=2) > 0)
        cy, cx = ys.mean(), xs.mean()
        far = np.argmax((ys - cy) ** 2 + (xs - cx) ** 2)
        angle = np.arctan2(xs[far] - cx, -(ys[far] - cy)) % (2 * np.pi)  # tip direction (sin a, -cos a)
        hits += int(angle // (np.pi / 2)) == label
    assert hits / len(labels) >= 0.9


@pytest.mark.parametrize("source,total", [("digits", 1797), ("mnist5k", 5000)])
def test_packaged_digits_have_disjoint_splits(source, total):
    data = build_dataset(OmegaConf.create({"source": source, "sizes": {"train": 100, "val": 20, "test": 50}}))
    ids = [set(data.splits[s].ids) for s in ("train", "val", "test")]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    img = data.splits["train"].load(0, 4)
    assert img.dtype == np.uint8 and img.shape[-1] == 3 and img.max() > 100
    assert set(np.unique(data.splits["train"].labels)) == set(range(10))  # every class present, none invented
    everything = build_dataset(OmegaConf.create({"source": source, "sizes": {"train": total - 1, "test": 1}}))
    counts = np.bincount(np.concatenate([s.labels for s in everything.splits.values()]), minlength=10)
    assert counts.sum() == total and counts.min() >= 170 and counts.max() <= 500
    with pytest.raises(H2TError, match="data.sizes"):
        build_dataset(OmegaConf.create({"source": source, "sizes": {"train": total, "val": 0, "test": 1}}))


def test_digits_are_sklearns_load_digits_read_without_importing_it(monkeypatch):
    """The digits table comes from scikit-learn's package data without importing scikit-learn; it is exactly
    what load_digits gives, and load_digits itself is used when that file is missing."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from pipeline.data import builtin

    images, labels = builtin._sklearn_digits()
    bunch = load_digits()
    np.testing.assert_array_equal(images, bunch.images)
    np.testing.assert_array_equal(labels, bunch.target)
    code = ("import sys; from pipeline.data.builtin import _sklearn_digits; _sklearn_digits(); "
            "print('sklearn' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
    monkeypatch.setattr(builtin.Path, "is_file", lambda self: False)  # not where scikit-learn ships it
    fallback_images, fallback_labels = builtin._sklearn_digits()
    np.testing.assert_array_equal(fallback_images, bunch.images)
    np.testing.assert_array_equal(fallback_labels, bunch.target)


def _write_folder(root, classes=("cat", "dog"), per_class=5, splits=("train", "test")):
    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")


def test_folder_carves_validation_from_train(tmp_path):
    _write_folder(tmp_path)
    data = build_dataset(OmegaConf.create({"source": "folder", "root": str(tmp_path), "val_fraction": 0.2}))
    assert data.num_classes == 2 and data.class_names == ["cat", "dog"]
    assert len(data.splits["train"]) == 8 and len(data.splits["val"]) == 2 and len(data.splits["test"]) == 10
    assert not set(data.splits["train"].ids) & set(data.splits["val"].ids)
    assert data.splits["test"].load(0, 2)[0].shape == (20, 30, 3)


def test_folder_uses_val_directory_when_present(tmp_path):
    _write_folder(tmp_path, splits=("train", "val", "test"))
    data = build_dataset(OmegaConf.create({"source": "folder", "root": str(tmp_path)}))
    assert len(data.splits["val"]) == 10 and all(i.startswith("val/") for i in data.splits["val"].ids)


def test_folder_fingerprint_changes_with_files(tmp_path):
    _write_folder(tmp_path)
    cfg = OmegaConf.create({"source": "folder", "root": str(tmp_path)})
    before = build_dataset(cfg).fingerprint()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "test" / "cat" / "0.png")
    assert build_dataset(cfg).fingerprint() != before


def test_folder_errors_name_the_culprit(tmp_path):
    with pytest.raises(H2TError, match="data.root"):
        build_dataset(OmegaConf.create({"source": "folder", "root": None}))
    with pytest.raises(H2TError, match=str(tmp_path / "train")):
        build_dataset(OmegaConf.create({"source": "folder", "root": str(tmp_path)}))
    _write_folder(tmp_path)
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(H2TError, match="empty"):
        build_dataset(OmegaConf.create({"source": "folder", "root": str(tmp_path)}))
    (tmp_path / "train" / "empty").rmdir()
    (tmp_path / "test" / "cat" / "1.png").write_bytes(b"not a png")
    data = build_dataset(OmegaConf.create({"source": "folder", "root": str(tmp_path)}))
    with pytest.raises(H2TError, match="1.png"):
        data.splits["test"].load(0, 10)
    (tmp_path / "test" / "bird").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "test" / "bird" / "0.png")
    with pytest.raises(H2TError, match="bird"):
        build_dataset(OmegaConf.create({"source": "folder", "root": str(tmp_path)}))


def test_unknown_source_is_named():
    with pytest.raises(H2TError, match="data.source='nope'"):
        build_dataset(OmegaConf.create({"source": "nope"}))


def test_every_source_is_registered_when_the_package_is_imported():
    import subprocess
    import sys

    code = "import pipeline.data as d; print(' '.join(sorted(d.DATA_SOURCES)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == sorted(["csv", "digits", "folder", "mnist5k", "npz", "shapes", "torchvision", "vtab"])
    import typing

    from pipeline.data import files

    for fn in (files.folder, files.csv_manifest, files.npz):  # annotations name real types
        assert typing.get_type_hints(fn)["return"].__name__ == "Dataset"
