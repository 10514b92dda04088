"""The (n, D) matrix of per-layer L2-normalised features of one split, read from the store through Dask.

The whole matrix is materialised only when it fits the memory budget; otherwise every pass streams row
blocks (all columns of a few shards) from the store, so peak memory is about two blocks whatever n x D is.
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


class FeatureMatrix:
    def __init__(self, store, split: str, memory_budget_bytes: int, layers: list[dict] | None = None):
        self.layers = layers or store.layers
        self.n = store.splits()[split]
        self.D = sum(layer["dim"] for layer in self.layers)
        if memory_budget_bytes < 1:
            raise H2TError(f"score.memory_budget_mb must be positive, got {memory_budget_bytes}")
        shard_rows = store.meta["shard_rows"]
        row_bytes = self.D * 4
        # A block, its normalised copy and one block being read ahead must fit the budget.
        self.in_memory = self.n * row_bytes * 2 <= memory_budget_bytes
        rows = max(shard_rows, (memory_budget_bytes // (4 * row_bytes)) // shard_rows * shard_rows)
        self.block_rows = min(self.n, rows)
        if not self.in_memory and memory_budget_bytes < 4 * row_bytes * shard_rows:
            need = 4 * row_bytes * shard_rows / 2**20
            raise H2TError(f"score.memory_budget_mb is below one shard of rows ({need:.0f} MB needed)")
        columns = [da.from_zarr(store.features(split, layer["name"]), chunks=(self.block_rows, layer["dim"]))
                   .map_blocks(l2_normalise_rows, dtype=np.float32) for layer in self.layers]
        self.dask = da.concatenate(columns, axis=1)
        self._cache = self.dask.compute(scheduler="threads") if self.in_memory else None
        self.passes = 0  # full reads of the store (or of the cache) made so far

    def blocks(self) -> Iterator[tuple[slice, np.ndarray]]:
        """Yield (row slice, normalised float32 block) covering all rows once."""
        self.passes += 1
        if self._cache is not None:
            for r0 in range(0, self.n, self.block_rows):
                rows = slice(r0, min(r0 + self.block_rows, self.n))
                yield rows, self._cache[rows]
            return
        starts = list(range(0, self.n, self.block_rows))
        with dask.config.set(scheduler="threads"):
            for i, r0 in enumerate(starts):
                rows = slice(r0, min(r0 + self.block_rows, self.n))
                yield rows, self.dask[rows].compute()
