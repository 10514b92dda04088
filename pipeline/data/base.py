"""The dataset contract shared by every source, and the registry that builds one from config."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ..errors import H2TError

SPLITS = ("train", "val", "test")

# (start, stop) -> uint8 images: an (B, H, W, 3) array, or a list of (H, W, 3) arrays of varying size.
ImageLoader = Callable[[int, int], "np.ndarray | list[np.ndarray]"]


@dataclass
class Split:
    name: str
    labels: np.ndarray  # int64 (n,)
    ids: np.ndarray  # str (n,): stable sample identifiers (index in the source, or file path)
    load: ImageLoader
    content_digest: str = ""  # hash of the pixels when they are in memory (files are fingerprinted by stat)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    name: str
    num_classes: int
    splits: dict[str, Split]
    source: dict  # what was read and how: enters the store id
    class_names: list[str] = field(default_factory=list)

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


def build_dataset(cfg) -> Dataset:
    """Build the dataset named by `cfg.source` with the remaining keys as arguments."""
    from . import sources  # noqa: F401  (registers the built-in sources)

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
