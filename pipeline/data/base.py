"""The dataset contract shared by every source, and the registry that builds one from config."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..decode import read_file
from ..errors import H2TError

SPLITS = ("train", "val", "test")

# (start, stop) -> uint8 images: an (B, H, W, 3) array, or a list of (H, W, 3) arrays of varying size.
ImageLoader = Callable[[int, int], "np.ndarray | list[np.ndarray]"]
# (start, stop) -> (path, encoded bytes) of each file, undecoded: for decoders elsewhere (pipeline/decode.py)
BytesReader = Callable[[int, int], "list[tuple[str, bytes]]"]


@dataclass
class Split:
    name: str
    labels: np.ndarray  # int64 (n,)
    ids: np.ndarray  # str (n,): stable sample identifiers (index in the source, or file path)
    load: ImageLoader
    content_digest: str = ""  # hash of the pixels when they are in memory (files are fingerprinted by stat)
    read_bytes: BytesReader | None = None  # set when the samples are image files

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    name: str
    num_classes: int
    splits: dict[str, Split]
    source: dict  # what was read and how: enters the store id
    class_names: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"id", "split", "reason"} of unreadable samples

    def fingerprint(self) -> str:
        """Content hash of the split definitions: sample ids and labels per split plus the source spec."""
        h = hashlib.sha256(json.dumps(self.source, sort_keys=True, default=str).encode())
        for name in sorted(self.splits):
            split = self.splits[name]
            h.update(name.encode())
            h.update(np.ascontiguousarray(split.labels, dtype=np.int64).tobytes())
            h.update("\n".join(map(str, split.ids)).encode())
            h.update(split.content_digest.encode())
        return h.hexdigest()


@dataclass
class Pool:
    """One split as a source provides it: ids, labels and a way to read sample i (or many, from an array)."""
    ids: list[str]
    labels: np.ndarray
    read: Callable[[int], np.ndarray]  # index -> uint8 (H, W, 3)
    array: np.ndarray | None = None  # set when all images are one in-memory (n, H, W, 3) array
    path_of: Callable[[int], Path] | None = None  # set when sample i is an image file: its path

    def __len__(self) -> int:
        return len(self.ids)


def assemble(name: str, pools: dict[str, Pool], num_classes: int, class_names: list[str], source: dict,
             sizes: dict | None = None, seed: int = 0, val_fraction: float = 0.2, on_error: str = "error") -> Dataset:
    """Splits from a source's pools: carve val from train when missing, subsample to `sizes`, skip broken files.

    Carving and subsampling use one seeded permutation per pool, so the same config always selects the same
    samples; `sizes.<split>: null` keeps the whole split.
    """
    if on_error not in ("error", "skip"):
        raise H2TError(f"data.on_error must be error or skip, got {on_error!r}")
    sizes = dict(sizes or {})
    for split, n in sizes.items():
        if split not in SPLITS:
            raise H2TError(f"unknown split data.sizes.{split}; splits are {', '.join(SPLITS)}")
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
            raise H2TError(f"data.sizes.{split} must be a non-negative integer or null, got {n!r}")
    for required in ("train", "test"):
        if required not in pools or len(pools[required]) == 0:
            raise H2TError(f"dataset {name!r} has no {required} samples")
    chosen: dict[str, tuple[Pool, np.ndarray]] = {}
    train_order = np.random.default_rng([seed, 0]).permutation(len(pools["train"]))
    if "val" in pools:
        chosen["val"] = (pools["val"], np.random.default_rng([seed, 1]).permutation(len(pools["val"])))
    else:
        if not 0.0 < float(val_fraction) < 1.0:
            raise H2TError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        n_val = sizes.get("val")
        n_val = int(round(len(train_order) * float(val_fraction))) if n_val is None else n_val
        if n_val >= len(train_order):
            raise H2TError(f"data.sizes.val={n_val} leaves no training samples out of {len(train_order)}")
        chosen["val"] = (pools["train"], train_order[:n_val])
        train_order = train_order[n_val:]
    chosen["train"] = (pools["train"], train_order)
    chosen["test"] = (pools["test"], np.random.default_rng([seed, 2]).permutation(len(pools["test"])))
    splits, skipped = {}, []
    for split in SPLITS:
        pool, order = chosen[split]
        want = sizes.get(split)
        if want is not None:
            if want > len(order):
                raise H2TError(f"data.sizes.{split}={want} but {name} has {len(order)} {split} samples")
            order = order[:want]
        if len(order) == 0:
            if split == "val":
                continue
            raise H2TError(f"data.sizes.{split} must be >= 1")
        if on_error == "skip" and pool.array is None:
            good = []
            for i in order:
                try:
                    pool.read(int(i))
                    good.append(i)
                except H2TError as exc:
                    skipped.append({"id": pool.ids[i], "split": split, "reason": str(exc)})
            order = np.asarray(good, dtype=np.int64)
            if len(order) == 0:
                raise H2TError(f"dataset {name!r}: every {split} sample is unreadable")
        splits[split] = _pool_split(split, pool, np.asarray(order, dtype=np.int64))
    source = {**source, "seed": seed, "val_fraction": val_fraction, "sizes": sizes, "on_error": on_error}
    return Dataset(name, num_classes, splits, source, class_names, skipped)


def _pool_split(name: str, pool: Pool, order: np.ndarray) -> Split:
    labels = np.asarray(pool.labels, dtype=np.int64)[order]
    ids = np.asarray([pool.ids[i] for i in order], dtype=str)
    if pool.array is not None:
        images = np.ascontiguousarray(pool.array[order])
        return Split(name, labels, ids, lambda start, stop: images[start:stop], hashlib.sha256(images.data).hexdigest())
    read_bytes = None
    path_of = pool.path_of
    if path_of is not None:
        def read_bytes(start: int, stop: int) -> list[tuple[str, bytes]]:
            paths = [path_of(int(i)) for i in order[start:stop]]
            return [(str(path), read_file(path)) for path in paths]
    return Split(name, labels, ids, lambda start, stop: [pool.read(int(i)) for i in order[start:stop]],
                 read_bytes=read_bytes)


def in_memory_split(name: str, images: np.ndarray, labels: np.ndarray, ids: Sequence[str]) -> Split:
    """A split over an in-memory uint8 (n, H, W, 3) array."""
    images = np.ascontiguousarray(to_rgb_uint8(images))
    return Split(name, np.asarray(labels, dtype=np.int64), np.asarray(ids, dtype=str),
                 lambda start, stop: images[start:stop], hashlib.sha256(images.data).hexdigest())


def to_rgb_uint8(images: np.ndarray) -> np.ndarray:
    """(n, H, W) or (n, H, W, 1|3) uint8 -> (n, H, W, 3) uint8."""
    if images.dtype != np.uint8:
        raise H2TError(f"images must be uint8, got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise H2TError(f"images must be (n, H, W[, 1|3]), got shape {images.shape}")
    return images


def split_indices(n_total: int, sizes: dict, seed: int, what: str) -> dict[str, np.ndarray]:
    """Deterministic disjoint train/val/test index sets drawn from a shuffled range."""
    want = {s: int(sizes.get(s, 0)) for s in SPLITS}
    for s, v in want.items():
        if v < 0:
            raise H2TError(f"data.sizes.{s} must be >= 0, got {v}")
    if want["train"] < 1 or want["test"] < 1:
        raise H2TError(f"data.sizes.train and data.sizes.test must be >= 1 for {what}")
    if sum(want.values()) > n_total:
        raise H2TError(f"data.sizes ask for {sum(want.values())} samples but {what} has {n_total}")
    order = np.random.default_rng(seed).permutation(n_total)
    out, start = {}, 0
    for s in SPLITS:
        if want[s]:
            out[s] = order[start:start + want[s]]
            start += want[s]
    return out


DATA_SOURCES: dict[str, Callable[..., Dataset]] = {}


def register(name: str):
    def deco(fn):
        DATA_SOURCES[name] = fn
        return fn
    return deco


def known_sources() -> dict[str, Callable[..., Dataset]]:
    """Every registered source (the package's import registers them all)."""
    return DATA_SOURCES


def build_dataset(cfg) -> Dataset:
    """Build the dataset named by `cfg.source` with the remaining keys as arguments."""
    params = dict(cfg)
    source = params.pop("source", None)
    if source not in DATA_SOURCES:
        raise H2TError(f"unknown data.source={source!r}; known: {', '.join(sorted(DATA_SOURCES))}")
    dataset = DATA_SOURCES[source](**params)
    if "train" not in dataset.splits or "test" not in dataset.splits:
        raise H2TError(f"dataset {dataset.name!r} needs at least a train and a test split")
    for split in dataset.splits.values():
        bad = (split.labels < 0) | (split.labels >= dataset.num_classes)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise H2TError(f"dataset {dataset.name!r}: label {split.labels[i]} of sample {split.ids[i]!r} "
                           f"is outside 0..{dataset.num_classes - 1}")
    return dataset
