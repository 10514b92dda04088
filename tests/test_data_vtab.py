import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from pipeline.data import build_dataset
from pipeline.errors import H2TError


def vtab(**cfg):
    return build_dataset(OmegaConf.create({"source": "vtab", **cfg}))


def write_npz(path, n_train=1100, n_test=40, classes=9, label_offset=0):
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 255, (n_train, 8, 8, 3), dtype=np.uint8),
             y_train=rng.integers(0, classes, n_train) + label_offset,
             x_test=rng.integers(0, 255, (n_test, 8, 8, 3), dtype=np.uint8), y_test=rng.integers(0, classes, n_test))


def test_each_sample_is_held_once_and_the_protocol_is_chosen_at_probe_time(tmp_path):
    write_npz(tmp_path / "norb.npz")
    data = vtab(task="smallnorb_elevation", format="npz", path=str(tmp_path / "norb.npz"))
    assert data.num_classes == 9
    assert {s: len(v) for s, v in data.splits.items()} == {"train": 800, "val": 200, "test": 40}
    assert not set(data.splits["train"].ids) & set(data.splits["val"].ids)
    assert data.splits["train"].load(0, 2)[0].shape == (8, 8, 3)
    # described as `protocol=train800` was: stores extracted before the protocol moved keep their ids
    assert {k: data.source[k] for k in ("source", "task", "protocol", "format")} == {
        "source": "vtab", "task": "smallnorb_elevation", "protocol": "train800", "format": "npz"}
    with pytest.raises(H2TError, match="data.protocol=train800val200 is chosen at probe time.*probe.fit_on=.train,val."):
        vtab(task="smallnorb_elevation", format="npz", path=str(tmp_path / "norb.npz"), protocol="train800val200")


def test_task_label_range_and_pool_size_are_checked(tmp_path):
    write_npz(tmp_path / "bad.npz", classes=10)
    with pytest.raises(H2TError, match="outside 0..8"):
        vtab(task="smallnorb_elevation", format="npz", path=str(tmp_path / "bad.npz"))
    write_npz(tmp_path / "small.npz", n_train=900)
    with pytest.raises(H2TError, match="training pool has 900 samples, train800 \\+ val200 need 1000"):
        vtab(task="smallnorb_elevation", format="npz", path=str(tmp_path / "small.npz"))
    with pytest.raises(H2TError, match="unknown VTAB-1k task 'imagenet'"):
        vtab(task="imagenet", format="npz", path=str(tmp_path / "small.npz"))
    with pytest.raises(H2TError, match="torchvision does not read sun397"):
        vtab(task="sun397", format="torchvision", root=str(tmp_path))


def test_dsprites_from_the_original_npz(tmp_path):
    rng = np.random.default_rng(0)
    n = 2000
    latents = np.zeros((n, 6), np.int64)
    latents[:, 3] = rng.integers(0, 40, n)  # orientation
    latents[:, 4] = rng.integers(0, 32, n)  # x position
    imgs = rng.integers(0, 2, (n, 64, 64), dtype=np.uint8)
    np.savez(tmp_path / "dsprites.npz", imgs=imgs, latents_classes=latents)
    loc = vtab(task="dsprites_location", format="dsprites_npz", path=str(tmp_path / "dsprites.npz"))
    ori = vtab(task="dsprites_orientation", format="dsprites_npz", path=str(tmp_path / "dsprites.npz"))
    assert loc.num_classes == ori.num_classes == 16
    assert {s: len(v) for s, v in loc.splits.items()} == {"train": 800, "val": 200, "test": 200}
    i = int(loc.splits["train"].ids[0].split("/")[1])
    assert loc.splits["train"].labels[0] == latents[i, 4] // 2
    j = int(ori.splits["train"].ids[0].split("/")[1])
    assert ori.splits["train"].labels[0] == latents[j, 3] * 16 // 40
    image = loc.splits["train"].load(0, 1)[0]
    assert image.shape == (64, 64, 3) and set(np.unique(image)) <= {0, 255}


def test_folder_copy_of_a_natural_task(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 110), ("test", 5)):
        for c in range(10):
            d = tmp_path / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).save(d / f"{i}.png")
    data = vtab(task="eurosat", format="folder", root=str(tmp_path))
    assert {s: len(v) for s, v in data.splits.items()} == {"train": 800, "val": 200, "test": 50}
    assert len(set(data.splits["train"].labels)) == 10  # a shuffle, not the first classes in file order
