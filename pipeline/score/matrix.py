"""The (n, D) matrix of per-layer L2-normalised, column-centred features of one split, read through Dask.

Centring is free: with an unpenalised bias, X W + b = (X - mu) W + (b + mu W), so the group-lasso optimum
in W and the objective value are unchanged, while the dominant direction of non-negative activations (their
common mean) is removed from the problem's curvature — proximal steps become ~50x longer.

The whole matrix is materialised only when it fits the memory budget; otherwise every pass streams row
blocks (all columns of a few shards) from the store, so peak memory is a few blocks whatever n x D is.
"""
from __future__ import annotations

from typing import Iterator

import dask
import dask.array as da
import numpy as np

from ..errors import H2TError


def l2_normalise_rows(block: np.ndarray) -> np.ndarray:
    """Divide each row by its L2 norm (zero rows stay zero), in float32."""
    block = np.asarray(block, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", block, block))
    norms[norms == 0] = 1.0
    return block / norms[:, None]


class DenseMatrix:
    """An in-memory matrix with the FeatureMatrix protocol (n, D, blocks(), columns(), passes)."""

    def __init__(self, array: np.ndarray, centered: bool):
        self.array = np.ascontiguousarray(array, dtype=np.float32)
        self.n, self.D = self.array.shape
        self.centered = centered  # columns have zero mean: the bias decouples from W
        self.passes = 0

    def blocks(self) -> Iterator[tuple[slice, np.ndarray]]:
        self.passes += 1
        yield slice(0, self.n), self.array

    def columns(self, idx: np.ndarray) -> np.ndarray:
        return self.array[:, idx]


class FeatureMatrix:
    def __init__(self, store, split: str, memory_budget_bytes: int, layers: list[dict] | None = None,
                 center: bool = True):
        self.layers = layers or store.layers
        self.n = store.splits()[split]
        self.D = sum(layer["dim"] for layer in self.layers)
        if memory_budget_bytes < 1:
            raise H2TError(f"score.memory_budget_mb must be positive, got {memory_budget_bytes}")
        shard_rows = store.meta["shard_rows"]
        row_bytes = self.D * 4
        # In memory when the matrix and one layer in flight fit; streaming blocks leave room for the raw
        # read, the normalised copy, the concatenation and the gradient temporaries (measured: peak RSS of a
        # streamed pass ~ 0.8 x budget + ~30 MB of fixed overhead, benchmarks/score_memory.py).
        self.in_memory = self.n * row_bytes * 1.25 <= memory_budget_bytes
        rows = memory_budget_bytes // (6 * row_bytes)
        if rows < 1:
            raise H2TError(f"score.memory_budget_mb={memory_budget_bytes / 2**20:g} is below one row block "
                           f"({6 * row_bytes / 2**20:.1f} MB for {self.D} features)")
        if rows >= shard_rows:
            rows = rows // shard_rows * shard_rows  # whole shards: no inner chunk is decoded twice
        self.block_rows = min(self.n, rows)
        dtypes = store.layer_dtypes()
        self._columns = [da.from_zarr(store.features(split, layer["name"]), chunks=(self.block_rows, layer["dim"]))
                         .map_blocks(lambda b, name=layer["name"]: l2_normalise_rows(store.decode(name, b, dtypes[name])),
                                     dtype=np.float32) for layer in self.layers]
        self.dask = da.concatenate(self._columns, axis=1)
        self.passes = 0  # full reads of the store (or of the cache) made so far
        self.centered = center
        self.mean = np.zeros(self.D, np.float32)
        self._cache = None
        if self.in_memory:  # filled layer by layer: peak is the matrix plus one layer
            self._cache = np.empty((self.n, self.D), np.float32)
            offset = 0
            for column in self._columns:
                width = column.shape[1]
                self._cache[:, offset:offset + width] = column.compute(scheduler="threads")
                offset += width
            self.passes += 1
            if center:
                self.mean = self._cache.mean(axis=0)
                self._cache -= self.mean
        elif center:
            total = np.zeros(self.D, np.float64)
            for _rows, block in self.blocks():
                total += block.sum(axis=0)
            self.mean = (total / self.n).astype(np.float32)

    def blocks(self) -> Iterator[tuple[slice, np.ndarray]]:
        """Yield (row slice, normalised, centred float32 block) covering all rows once."""
        self.passes += 1
        if self._cache is not None:
            for r0 in range(0, self.n, self.block_rows):
                rows = slice(r0, min(r0 + self.block_rows, self.n))
                yield rows, self._cache[rows]
            return
        with dask.config.set(scheduler="threads"):
            for r0 in range(0, self.n, self.block_rows):
                rows = slice(r0, min(r0 + self.block_rows, self.n))
                block = self.dask[rows].compute()
                block -= self.mean
                yield rows, block

    def columns(self, idx: np.ndarray) -> np.ndarray:
        """The (n, len(idx)) normalised, centred submatrix: only the chunks holding these columns are read."""
        idx = np.asarray(idx, dtype=np.int64)
        if self._cache is not None:
            return self._cache[:, idx]
        with dask.config.set(scheduler="threads"):
            return self.dask[:, idx].compute() - self.mean[idx]
