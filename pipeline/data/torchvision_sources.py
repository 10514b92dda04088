"""torchvision datasets read from a local root with download=False (this tool never downloads).

`data=torchvision data.dataset=CIFAR10 data.root=DIR`. Splits the dataset does not define (validation,
or every split for single-set datasets such as EuroSAT and Caltech101) are carved deterministically.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torchvision.datasets as tvd

from ..errors import H2TError
from .base import Pool, assemble, register
from .files import to_rgb_array

# name -> (constructor arguments per split, where the files must be under ROOT)
TORCHVISION_DATASETS: dict[str, tuple[dict[str, dict], str]] = {
    "CIFAR10": ({"train": {"train": True}, "test": {"train": False}}, "ROOT/cifar-10-batches-py/ (python version)"),
    "CIFAR100": ({"train": {"train": True}, "test": {"train": False}}, "ROOT/cifar-100-python/"),
    "SVHN": ({"train": {"split": "train"}, "test": {"split": "test"}}, "ROOT/train_32x32.mat, ROOT/test_32x32.mat"),
    "DTD": ({"train": {"split": "train"}, "val": {"split": "val"}, "test": {"split": "test"}},
            "ROOT/dtd/dtd/images/, ROOT/dtd/dtd/labels/"),
    "Flowers102": ({"train": {"split": "train"}, "val": {"split": "val"}, "test": {"split": "test"}},
                   "ROOT/flowers-102/jpg/, imagelabels.mat, setid.mat"),
    "OxfordIIITPet": ({"train": {"split": "trainval"}, "test": {"split": "test"}},
                      "ROOT/oxford-iiit-pet/images/, ROOT/oxford-iiit-pet/annotations/"),
    "EuroSAT": ({"all": {}}, "ROOT/eurosat/2750/<class>/*.jpg"),
    "Caltech101": ({"all": {}}, "ROOT/caltech101/101_ObjectCategories/"),
}


def _labels(ds) -> np.ndarray:
    for attr in ("targets", "labels", "_labels", "y"):
        if hasattr(ds, attr):
            return np.asarray(getattr(ds, attr), dtype=np.int64)
    return np.asarray([ds[i][1] for i in range(len(ds))], dtype=np.int64)


def _reader(ds):
    def read(i: int) -> np.ndarray:
        image = ds[i][0]
        return to_rgb_array(image, f"{type(ds).__name__}[{i}]")
    return read


@register("torchvision")
def torchvision_dataset(dataset: str | None = None, root: str | None = None, val_fraction: float = 0.2,
                        test_fraction: float = 0.2, seed: int = 0, name: str | None = None,
                        sizes: dict | None = None, on_error: str = "error"):
    if dataset not in TORCHVISION_DATASETS:
        raise H2TError(f"unknown data.dataset={dataset!r}; supported: {', '.join(TORCHVISION_DATASETS)}")
    if not root:
        raise H2TError(f"data=torchvision needs data.root=DIR holding {TORCHVISION_DATASETS[dataset][1]}")
    base = Path(str(root)).expanduser()
    split_args, layout = TORCHVISION_DATASETS[dataset]
    pools, classes = {}, None
    for split, kwargs in split_args.items():
        try:
            ds = getattr(tvd, dataset)(root=str(base), download=False, **kwargs)
        except (RuntimeError, FileNotFoundError, OSError) as exc:
            raise H2TError(f"data.root={base}: {dataset} not found or incomplete; expected {layout} "
                           f"({str(exc).splitlines()[0]})") from None
        labels = _labels(ds)
        classes = classes or list(getattr(ds, "classes", getattr(ds, "categories", [])))
        pools[split] = Pool([f"{split}/{i}" for i in range(len(ds))], labels, _reader(ds))
    if "all" in pools:  # single-set datasets: a deterministic test split first
        whole = pools.pop("all")
        order = np.random.default_rng([seed, 3]).permutation(len(whole))
        n_test = max(1, int(round(len(order) * float(test_fraction))))
        for split, idx in (("test", order[:n_test]), ("train", order[n_test:])):
            pools[split] = Pool([whole.ids[i].replace("all/", "", 1) for i in idx], whole.labels[idx],
                                lambda i, idx=idx: whole.read(int(idx[i])))  # type: ignore[misc]
    k = len(classes) if classes else int(max(p.labels.max() for p in pools.values())) + 1
    source = {"source": "torchvision", "dataset": dataset, "root": str(base.resolve()),
              "test_fraction": test_fraction, "files": _stat_tree(base)}
    return assemble(name or dataset.lower(), pools, k, [str(c) for c in classes or range(k)],
                    source, sizes, seed, val_fraction, on_error)


def _stat_tree(base: Path) -> list:
    """(relative path, size) of every file under the root: a changed download changes the dataset id."""
    return sorted((str(p.relative_to(base)), p.stat().st_size) for p in base.rglob("*") if p.is_file())
