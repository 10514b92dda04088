"""Several stores over the same samples read as one: the union of their layers is just more columns.

Stores of several backbones (or of one backbone at several input sizes) over the same dataset are joined by
sample id: every member must hold the same samples in the same splits and order. `StoreUnion` then reads
like one store for everything after extraction (scoring, selection, heads, per-layer probes): its layer
table is the members' tables one after the other, each tap named `<member>/<tap>`, where a member's name
is its backbone (`<model>@<input size>`). Scores are cached in the first member under a key that names
every member's id; column views are not built for unions (the features are read directly).
"""
from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Sequence

import numpy as np

from ..errors import H2TError
from .meta import StoreMeta

SEPARATOR = "/"


def member_name(spec: dict) -> str:
    """A member's name in layer names and reports: its backbone and input size."""
    size = spec.get("preprocess", {}).get("input_size")
    size = size[-1] if isinstance(size, (list, tuple)) else size
    return f"{spec['model']['name']}@{size}" if size else str(spec["model"]["name"])


class StoreUnion:
    """Member stores read as one store (the reading side of FeatureStore)."""

    def __init__(self, members: Sequence):
        if len(members) < 2:
            raise H2TError("a union of stores needs at least two stores")
        self.members = list(members)
        self.names = _unique([member_name(m.info.spec) for m in self.members])
        first = self.members[0]
        for store in self.members[1:]:
            check_same_samples(first, store)
        layers, self._where, offset = [], {}, 0
        for name, store in zip(self.names, self.members):
            for layer in store.layers:
                full = f"{name}{SEPARATOR}{layer['name']}"
                layers.append({**layer, "name": full, "offset": offset, "member": name})
                self._where[full] = (store, layer["name"])
                offset += int(layer["dim"])
        ids = [store.id for store in self.members]
        specs = [store.info.spec for store in self.members]
        sizes = {spec.get("pooling", {}).get("target_size") for spec in specs}
        spec = {"members": specs, "model": {"name": " + ".join(self.names)}, "dataset": specs[0]["dataset"],
                "pooling": {**specs[0].get("pooling", {}),
                            "target_size": sizes.pop() if len(sizes) == 1 else sorted(sizes, key=str)}}
        pending = [store for store in self.members if not store.complete]
        status = pending[0].info.status if pending else "complete"
        self.info: StoreMeta = replace(first.info, id=hashlib.sha256("+".join(ids).encode()).hexdigest()[:16],
                                       spec=spec, layers=tuple(layers), status=status, widened=(), widening=None)
        self._dtypes = {f"{name}{SEPARATOR}{tap}": dtype for name, store in zip(self.names, self.members)
                        for tap, dtype in store.layer_dtypes().items()}

    def __repr__(self) -> str:
        return f"StoreUnion({', '.join(self.names)})"

    # --- what readers of a store use ------------------------------------------------------------------
    @property
    def id(self) -> str:
        return self.info.id

    @property
    def path(self) -> str:
        return " + ".join(str(store.path) for store in self.members)

    @property
    def layers(self) -> list[dict]:
        return list(self.info.layers)

    @property
    def computed_layers(self) -> list[dict]:
        """The members' layers their extraction computed (not copied from other stores)."""
        computed = {(store.id, layer["name"]) for store in self.members for layer in store.computed_layers}
        return [layer for layer in self.layers if (self.member_of(layer["name"])[0].id,
                                                   self.member_of(layer["name"])[1]) in computed]

    @property
    def n_features(self) -> int:
        return self.info.n_features

    @property
    def complete(self) -> bool:
        return self.info.complete

    @property
    def read_only(self) -> bool:
        return True  # nothing is written into a union: no column views (scores go to the first member)

    def splits(self) -> dict[str, int]:
        return dict(self.info.splits)

    def layer_dtypes(self) -> dict[str, str]:
        return dict(self._dtypes)

    def member_of(self, layer: str) -> tuple:
        """(member store, its tap name) of a union layer."""
        try:
            return self._where[layer]
        except KeyError:
            raise H2TError(f"layer {layer!r} is not in the union ({', '.join(self.names)})") from None

    def features(self, split: str, layer: str):
        store, tap = self.member_of(layer)
        return store.features(split, tap)

    def stored_features(self, split: str, layer: str):
        store, tap = self.member_of(layer)
        return store.stored_features(split, tap)

    def decode(self, layer: str, block: np.ndarray, dtype: str | None = None) -> np.ndarray:
        store, tap = self.member_of(layer)
        return store.decode(tap, block, dtype)

    def labels(self, split: str) -> np.ndarray:
        return self.members[0].labels(split)

    def sample_ids(self, split: str) -> np.ndarray:
        return self.members[0].sample_ids(split)

    def cache_key(self, key: str) -> str:
        """Scores of the union are cached in its first member under a key covering every member's id."""
        return hashlib.sha256(f"{key}+{self.id}".encode()).hexdigest()[:16]

    def load_relevance(self, key: str):
        return self.members[0].load_relevance(key)

    def save_relevance(self, key: str, arrays: dict[str, np.ndarray], attrs: dict) -> None:
        self.members[0].save_relevance(key, arrays, {**attrs, "union": self.names,
                                                     "members": [s.id for s in self.members]})


def check_same_samples(a, b) -> None:
    """The two stores hold the same samples in the same splits and order, or one line says where not."""
    missing = sorted(set(a.splits()) ^ set(b.splits()))
    if missing:
        raise H2TError(f"stores {a.path} and {b.path} cannot be joined: split {missing[0]!r} is in only one "
                       "of them")
    for split in a.splits():
        ids_a, ids_b = a.sample_ids(split), b.sample_ids(split)
        n = min(len(ids_a), len(ids_b))
        differ = np.flatnonzero(ids_a[:n] != ids_b[:n])
        if len(differ) or len(ids_a) != len(ids_b):
            i = int(differ[0]) if len(differ) else n

            def row_in(ids) -> str:
                return f"{str(ids[i])!r} in" if i < len(ids) else "missing in"

            sizes = f" ({len(ids_a)} vs {len(ids_b)} {split} samples)" if len(ids_a) != len(ids_b) else ""
            raise H2TError(f"stores {a.path} and {b.path} hold different samples: {split} row {i} is "
                           f"{row_in(ids_a)} one and {row_in(ids_b)} the other{sizes}")
        if not np.array_equal(a.labels(split), b.labels(split)):
            raise H2TError(f"stores {a.path} and {b.path} label the same {split} samples differently")


def _unique(names: list[str]) -> list[str]:
    """Names made distinct with #2, #3 ... (the same backbone twice, e.g. with other weights)."""
    out: list[str] = []
    for name in names:
        out.append(name if name not in out else f"{name}#{sum(n.split('#')[0] == name for n in out) + 1}")
    return out
