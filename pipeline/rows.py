"""Which rows of a store a probe fits on, validates on or tests on: chosen at probe time, never in the store id.

A store holds every sample once, in the splits its source defines (VTAB-1k: train800, val200, test). The
protocol decides how those rows are used: train800 fits on `train` and validates on `val`; the final run
(train800val200) fits on `train` + `val`; K-fold cross-validation fits on K-1 folds of `train` + `val` and
validates on the remaining one. `Rows` names such a selection: parts of splits, read in the store's order.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from .errors import H2TError


@dataclass(frozen=True)
class Segment:
    """Rows [src) of a split, of which `take` (indices within src; None = all) land at rows [dst) of the result."""
    split: str
    src: slice
    take: np.ndarray | None
    dst: slice


@dataclass(frozen=True)
class Rows:
    """Parts of a store's splits, in order: (split, sorted row indices, or None for every row)."""
    parts: tuple[tuple[str, np.ndarray | None], ...]
    name: str

    @staticmethod
    def of(store, splits: str | Sequence[str]) -> "Rows":
        """Every row of the named splits, e.g. Rows.of(store, ["train", "val"]) for train800val200."""
        names = [splits] if isinstance(splits, str) else list(splits)
        available = store.splits()
        for split in names:
            if split not in available:
                raise H2TError(f"split {split!r} is not in store {store.id} (splits: {', '.join(available)})")
        if not names or len(set(names)) != len(names):
            raise H2TError(f"splits must be distinct and not empty, got {names}")
        return Rows(tuple((s, None) for s in names), "+".join(names))

    def counts(self, store) -> dict[str, int]:
        sizes = store.splits()
        return {split: sizes[split] if idx is None else len(idx) for split, idx in self.parts}

    def size(self, store) -> int:
        return sum(self.counts(store).values())

    @property
    def whole_split(self) -> str | None:
        """The split's name when these rows are exactly one whole split."""
        return self.parts[0][0] if len(self.parts) == 1 and self.parts[0][1] is None else None

    def labels(self, store) -> np.ndarray:
        return np.concatenate([store.labels(s) if idx is None else store.labels(s)[idx] for s, idx in self.parts])

    def indices(self, store) -> list[tuple[str, np.ndarray]]:
        """Each part as (split, its row indices as int64), whole splits spelled out."""
        sizes = store.splits()
        return [(split, np.arange(sizes[split], dtype=np.int64) if idx is None else np.asarray(idx, np.int64))
                for split, idx in self.parts]

    def digest(self, store) -> str:
        """Identifies the rows (not their values): split names and row indices."""
        h = hashlib.sha256()
        for split, idx in self.indices(store):
            h.update(split.encode() + b"\0")
            h.update(idx.tobytes())
        return h.hexdigest()[:16]

    def segments(self, store, block_rows: int, align: int = 1, rows: slice = slice(None)) -> Iterator[Segment]:
        """Spans of at most `block_rows` store rows (starting on multiples of `align`, e.g. whole shards)
        covering result rows `rows`, each with the rows to keep and where they go."""
        start, stop, _ = rows.indices(self.size(store))
        sizes = store.splits()
        offset = 0
        for split, idx in self.parts:
            n_part = sizes[split] if idx is None else len(idx)
            lo, hi = max(start - offset, 0), min(stop - offset, n_part)  # part-local rows wanted
            if lo < hi:
                if idx is None:
                    first, last = lo, hi
                else:
                    first, last = int(idx[lo]), int(idx[hi - 1]) + 1
                s0 = first // align * align if align > 1 else first
                while s0 < last:
                    s1 = min(last, s0 + block_rows)
                    if idx is None:  # rows [a, b) of the span [s0, s1) are wanted
                        a, b = max(s0, first), min(s1, last)
                        take = None if (a, b) == (s0, s1) else np.arange(a - s0, b - s0)
                        yield Segment(split, slice(s0, s1), take, slice(offset + a, offset + b))
                    else:
                        a, b = np.searchsorted(idx, [s0, s1])
                        a, b = max(int(a), lo), min(int(b), hi)
                        if a < b:
                            yield Segment(split, slice(s0, s1), np.asarray(idx[a:b]) - s0, slice(offset + a, offset + b))
                    s0 = s1
            offset += n_part

    def describe(self, store) -> dict:
        return {"name": self.name, "rows": self.counts(store)}


def merged(store, *selections: Rows) -> tuple[Rows, list[np.ndarray]]:
    """One selection covering every row of `selections` (splits in the order first seen, rows ascending) and,
    for each selection, where its rows sit in it: a fold's fit and validation rows are read in one pass
    over the spans they share, then taken apart in memory."""
    sizes = store.splits()
    parts = [selection.indices(store) for selection in selections]
    wanted: dict[str, np.ndarray] = {}
    for split, rows in (part for selection in parts for part in selection):
        wanted[split] = np.union1d(wanted[split], rows) if split in wanted else rows
    union = Rows(tuple((split, None if len(rows) == sizes[split] else rows) for split, rows in wanted.items()),
                 "+".join(selection.name for selection in selections))
    offsets = dict(zip(wanted, np.cumsum([0] + [len(rows) for rows in wanted.values()]).tolist()))
    positions = [np.concatenate([offsets[split] + np.searchsorted(wanted[split], rows) for split, rows in selection])
                 for selection in parts]
    return union, positions


def kfold(store, splits: Sequence[str], k: int, seed: int = 0) -> list[tuple[Rows, Rows]]:
    """K stratified folds over the rows of `splits`: [(fit rows, validation rows)] for each fold.

    scikit-learn's StratifiedKFold on a seeded shuffle: every row validates exactly once; the same
    (store, splits, k, seed) always gives the same folds."""
    pool = Rows.of(store, splits)
    n = pool.size(store)
    if int(k) < 2 or int(k) > n:
        raise H2TError(f"tune.folds must be 0 (use the validation split) or in 2..{n}, got {k}")
    labels = pool.labels(store)
    counts = np.bincount(labels)
    smallest = int(counts[counts > 0].min())
    from sklearn.model_selection import KFold, StratifiedKFold  # noqa: PLC0415 - start-up time: scikit-learn (~1 s) for folds only

    splitter = StratifiedKFold(int(k), shuffle=True, random_state=int(seed))
    if smallest < int(k):  # a class rarer than k: plain shuffled folds (StratifiedKFold would warn and skew)
        splitter = KFold(int(k), shuffle=True, random_state=int(seed))
    bounds = np.cumsum([0] + list(pool.counts(store).values()))
    out = []
    for fold, (fit, val) in enumerate(splitter.split(np.zeros(n), labels)):
        out.append((_from_pool_rows(pool, bounds, np.sort(fit), f"fold {fold + 1}/{k} fit"),
                    _from_pool_rows(pool, bounds, np.sort(val), f"fold {fold + 1}/{k} validation")))
    return out


def _from_pool_rows(pool: Rows, bounds: np.ndarray, positions: np.ndarray, name: str) -> Rows:
    parts = []
    for (split, _), lo, hi in zip(pool.parts, bounds[:-1], bounds[1:]):
        inside = positions[(positions >= lo) & (positions < hi)] - lo
        if len(inside):
            parts.append((split, inside.astype(np.int64)))
    return Rows(tuple(parts), name)
