"""The 19 VTAB-1k tasks as named datasets, read from whatever local copy the user has.

VTAB-1k splits, applied to a seeded shuffle of the local copy's training pool (tfds's own order is not
available offline, so the 1,000 samples are VTAB-1k-sized and deterministic, not sample-identical):
train800 = [0, 800) is the store's `train` split, val200 = [800, 1000) its `val` split, test = the local
test pool. Each sample is stored once: the protocol is chosen at probe time (pipeline/rows.py):
train800 fits on `train` and validates on `val`, train800val200 (the final run) is `probe.fit_on=[train,val]`,
and `h2t tune tune.folds=5` cross-validates over both. docs/VTAB.md says what each task needs on disk.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import H2TError
from .base import Dataset, Pool, Split, register
from .files import folder, npz
from .torchvision_sources import torchvision_dataset


@dataclass(frozen=True)
class VtabTask:
    num_classes: int
    label: str  # what the label means
    group: str  # natural | specialized | structured
    torchvision: str | None = None  # torchvision dataset class, when torchvision reads the original files


VTAB_TASKS = {
    "caltech101": VtabTask(102, "object category", "natural", "Caltech101"),
    "cifar100": VtabTask(100, "object category", "natural", "CIFAR100"),
    "dtd": VtabTask(47, "texture category", "natural", "DTD"),
    "oxford_flowers102": VtabTask(102, "flower species", "natural", "Flowers102"),
    "oxford_iiit_pet": VtabTask(37, "pet breed", "natural", "OxfordIIITPet"),
    "sun397": VtabTask(397, "scene category", "natural"),
    "svhn": VtabTask(10, "house-number digit", "natural", "SVHN"),
    "patch_camelyon": VtabTask(2, "metastatic tissue present", "specialized"),
    "eurosat": VtabTask(10, "land-use class", "specialized", "EuroSAT"),
    "resisc45": VtabTask(45, "scene class", "specialized"),
    "diabetic_retinopathy": VtabTask(5, "retinopathy grade 0-4", "specialized"),
    "clevr_count": VtabTask(8, "number of objects minus 3 (3..10 objects)", "structured"),
    "clevr_distance": VtabTask(6, "binned depth of the closest object", "structured"),
    "dmlab": VtabTask(6, "distance/reward class of the scene", "structured"),
    "dsprites_location": VtabTask(16, "x-position bin of the sprite (32 positions // 2)", "structured"),
    "dsprites_orientation": VtabTask(16, "orientation bin of the sprite (40 angles * 16 // 40)", "structured"),
    "kitti_distance": VtabTask(4, "binned distance to the closest vehicle", "structured"),
    "smallnorb_azimuth": VtabTask(18, "camera azimuth (18 values)", "structured"),
    "smallnorb_elevation": VtabTask(9, "camera elevation (9 values)", "structured"),
}
N_TRAIN, N_VAL = 800, 200


def _dsprites_pools(path: Path, task: str, seed: int) -> dict[str, Pool]:
    """DeepMind's dsprites_ndarray_*.npz (imgs, latents_classes): VTAB's labels and its 80/10/10 split."""
    data = np.load(path)
    images, latents = data["imgs"], data["latents_classes"]
    labels = latents[:, 4] // 2 if task == "dsprites_location" else latents[:, 3] * 16 // 40
    order = np.random.default_rng(0).permutation(len(labels))  # VTAB's 80 / 10 / 10 split of one shuffle
    n_train = int(0.8 * len(order))
    train_idx = order[:n_train][np.random.default_rng([seed, 0]).permutation(n_train)]
    pools = {}
    for split, idx in (("train", train_idx), ("test", order[int(0.9 * len(order)):])):
        pools[split] = Pool([f"{split}/{i}" for i in idx], labels[idx].astype(np.int64),
                            lambda i, idx=idx: np.repeat(images[idx[i]][..., None] * 255, 3, axis=-1).astype(np.uint8))  # type: ignore[misc]
    return pools


def _source_pools(task: str, spec: VtabTask, format: str, root: str | None, path: str | None,
                  seed: int, on_error: str) -> tuple[dict, dict]:
    """Pools from the user's local copy, and the source description for the dataset id."""
    if format == "torchvision":
        if spec.torchvision is None:
            raise H2TError(f"data=vtab/{task}: torchvision does not read {task}; use data.format=npz or folder")
        inner = torchvision_dataset(dataset=spec.torchvision, root=root, sizes={"val": 0}, seed=seed, on_error=on_error)
    elif format == "folder":
        inner = folder(root=root, sizes={"val": 0}, seed=seed, on_error=on_error)
    elif format == "npz":
        inner = npz(path=path, num_classes=spec.num_classes, sizes={"val": 0}, seed=seed, on_error=on_error)
    elif format == "dsprites_npz":
        if not task.startswith("dsprites"):
            raise H2TError(f"data.format=dsprites_npz reads only the dsprites tasks, not {task}")
        file = Path(str(path or "")).expanduser()
        if not file.is_file():
            raise H2TError(f"data.path={file}: no such file (expected dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz)")
        return _dsprites_pools(file, task, seed), {"source": "dsprites_npz", "path": str(file.resolve()),
                                             "size": file.stat().st_size}
    else:
        raise H2TError(f"data.format must be torchvision, folder, npz or dsprites_npz, got {format!r}")
    if inner.num_classes > spec.num_classes:
        raise H2TError(f"data=vtab/{task}: the local copy has {inner.num_classes} classes, the task has "
                       f"{spec.num_classes}")
    return {name: _split_to_pool(split) for name, split in inner.splits.items()}, inner.source


def _split_to_pool(split: Split) -> Pool:
    return Pool([str(i) for i in split.ids], split.labels, lambda i: split.load(i, i + 1)[0])


@register("vtab")
def vtab(task: str | None = None, format: str = "npz", root: str | None = None, path: str | None = None,
         name: str | None = None, seed: int = 0, on_error: str = "error", protocol: str | None = None) -> Dataset:
    if task not in VTAB_TASKS:
        raise H2TError(f"unknown VTAB-1k task {task!r}; tasks: {', '.join(VTAB_TASKS)}")
    if protocol is not None:
        raise H2TError(f"data.protocol={protocol} is chosen at probe time now: the store holds train800, val200 and "
                       f"test once; train800val200 is probe.fit_on=[train,val], cross-validation is h2t tune")
    spec = VTAB_TASKS[task]
    pools, source = _source_pools(task, spec, format, root, path, seed, on_error)
    if "val" in pools:  # VTAB-1k draws train and val from the training pool only
        pools.pop("val")
    train = pools["train"]
    if len(train) < N_TRAIN + N_VAL:
        raise H2TError(f"data=vtab/{task}: the training pool has {len(train)} samples, "
                       f"train800 + val200 need {N_TRAIN + N_VAL}")
    splits = {"train": _take(train, "train", 0, N_TRAIN), "val": _take(train, "val", N_TRAIN, N_TRAIN + N_VAL)}
    splits["test"] = _take(pools["test"], "test", 0, len(pools["test"]))
    for split in splits.values():
        bad = np.flatnonzero((split.labels < 0) | (split.labels >= spec.num_classes))
        if len(bad):
            raise H2TError(f"data=vtab/{task}: sample {split.ids[bad[0]]} has label {split.labels[bad[0]]}, "
                           f"outside 0..{spec.num_classes - 1} ({spec.label})")
    # Every VTAB store now has the layout `protocol=train800` used to give (train800 + val200 + test): the same
    # description keeps the ids of stores extracted that way, so they are found and read, not re-extracted.
    full_source = {"source": "vtab", "task": task, "protocol": "train800", "format": format, "inner": source}
    return Dataset(name or f"vtab_{task}", spec.num_classes, splits, full_source,
                   [str(c) for c in range(spec.num_classes)])


def _take(pool: Pool, name: str, start: int, stop: int) -> Split:
    idx = np.arange(start, stop)
    return Split(name, pool.labels[idx], np.asarray([pool.ids[i] for i in idx], dtype=str),
                 lambda s, e: [pool.read(int(i)) for i in idx[s:e]])
