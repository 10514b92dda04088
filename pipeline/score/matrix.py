"""The (n, D) matrix of per-layer L2-normalised, column-centred features of some rows, read from the store.

Centring is free: with an unpenalised bias, X W + b = (X - mu) W + (b + mu W), so the group-lasso optimum
in W and the objective value are unchanged, while the dominant direction of non-negative activations (their
common mean) is removed from the problem's curvature — proximal steps become ~50x longer.

The whole matrix is materialised only when it fits the memory budget. Otherwise every pass streams row
blocks of whole shards: Dask runs one task per layer (a local store's shard files are decoded by the task
itself, pipeline/storage/shards.py, others by zarr's codec pipeline; the task casts them to float32 and
divides each row by its norm in place, into the block's buffer), and the next block is read while the
current one is multiplied. Streamed blocks are not centred in memory: `offset` (the column means) is
subtracted algebraically by the datafit, which saves a pass over every block. Peak memory of a streamed pass: two float32 blocks, the raw values of one, and the per-row
layer norms (n x layers).
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, TypeVar

import dask
import numpy as np
import torch

from ..errors import H2TError
from ..rows import Rows, Segment
from ..storage import shards
from ..storage.quant import DequantizedArray
from .contracts import BlockMatrix

CACHE_BYTES = 2**20  # float32 values cast, measured and scaled at once: they stay in a core's cache


# torch runs an elementwise op over more elements than its grain (at::internal::GRAIN_SIZE, 32,768) in parallel
SERIAL_ELEMENTS = 16384
GATHER_BYTES = 1 << 24  # rows gathered at once by `gather_columns_into` (fewer torch calls: see there)


def cast_into(out: np.ndarray, values: np.ndarray) -> np.ndarray:
    """out[...] = values as float32. torch's vectorised half -> float cast is ~20x numpy's here.

    Off the main thread the cast runs in pieces below torch's parallel grain, inline in the calling thread.
    A torch op run in parallel from another thread gives that thread an OpenMP team of its own, which stays
    as long as the thread; with more OpenMP threads than cores, libgomp stops spin-waiting between parallel
    regions in the whole process, and every small op of the main thread then wakes a sleeping thread (the
    heads of a tune trained 2-3x slower after scoring's Dask threads had cast blocks)."""
    if values.dtype != np.float16:
        out[...] = values
        return out
    source, target = torch.from_numpy(np.ascontiguousarray(values)), torch.from_numpy(out)
    if threading.current_thread() is threading.main_thread() or target.numel() <= SERIAL_ELEMENTS:
        target.copy_(source)
    elif target.dim() == 2:
        cols = min(target.shape[1], SERIAL_ELEMENTS)
        rows = max(1, SERIAL_ELEMENTS // cols)
        for r in range(0, target.shape[0], rows):
            for c in range(0, target.shape[1], cols):
                target[r:r + rows, c:c + cols].copy_(source[r:r + rows, c:c + cols])
    elif target.is_contiguous():
        flat_target, flat_source = target.view(-1), source.view(-1)
        for a in range(0, flat_target.numel(), SERIAL_ELEMENTS):
            flat_target[a:a + SERIAL_ELEMENTS].copy_(flat_source[a:a + SERIAL_ELEMENTS])
    else:  # a strided array of another rank (no call site makes one): numpy's cast
        out[...] = values
    return out


def gather_columns_into(out: np.ndarray, values: np.ndarray, order: np.ndarray) -> np.ndarray:
    """out[...] = values[:, order] as float32 (out: C-contiguous rows). On the main thread torch gathers and casts
    16 MiB of rows at a time (a probe's 5,000 x 39,332 float16 columns in 1.6 s against numpy's 2.9 s; pieces of
    1 MiB took 3.9 s there, each parallel call waking OpenMP threads that had gone to sleep); elsewhere numpy's
    fancy indexing and `cast_into`, which keep the calling thread off OpenMP."""
    main = threading.current_thread() is threading.main_thread()
    if not main or values.dtype not in (np.float16, np.float32) or not out.flags.c_contiguous or len(order) == 0:
        return cast_into(out, values[:, order])
    source, index, target = torch.from_numpy(np.ascontiguousarray(values)), torch.from_numpy(order), torch.from_numpy(out)
    rows = max(1, GATHER_BYTES // (len(order) * values.itemsize))
    for r in range(0, len(values), rows):
        target[r:r + rows].copy_(torch.index_select(source[r:r + rows], 1, index))
    return out


def as_float32(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values)
    if values.dtype == np.float32:
        return values
    return cast_into(np.empty(values.shape, np.float32), values)


def normalise_rows_in_place(block: np.ndarray) -> np.ndarray:
    """Divide each row of a float32 block by its L2 norm (zero rows stay zero); returns the norms used."""
    norms = np.sqrt(np.einsum("ij,ij->i", block, block))
    norms[norms == 0] = 1.0
    block *= (1.0 / norms)[:, None]
    return norms


def l2_normalise_rows(block: np.ndarray) -> np.ndarray:
    """Each row divided by its L2 norm (zero rows stay zero), as a new float32 array."""
    out = as_float32(block)
    if out is block:  # already float32: do not scale the caller's array
        out = out.copy()
    normalise_rows_in_place(out)
    return out


_C = TypeVar("_C", bound="Closing")


class Closing:
    """`with matrix:` closes it on the way out, whether the block raised or not."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class DenseMatrix(Closing):
    """An in-memory matrix with the BlockMatrix protocol (pipeline/score/contracts.py)."""

    in_memory = True

    def __init__(self, array: np.ndarray, centered: bool):
        self.array = np.ascontiguousarray(array, dtype=np.float32)
        self.n, self.D = self.array.shape
        self.centered = centered  # columns have zero mean: the bias decouples from W
        self.offset: np.ndarray | None = None  # blocks are the matrix itself
        self.passes = 0

    def blocks(self) -> Iterator[tuple[slice, np.ndarray]]:
        self.passes += 1
        yield slice(0, self.n), self.array

    def columns(self, idx: np.ndarray) -> np.ndarray:
        return self.array[:, idx]

    def reduce(self, fn: Callable[..., Any], *args: Any) -> Any:
        self.passes += 1
        return fn(self.array, slice(0, self.n), *args)

    def close(self) -> None:
        """Nothing to release: the array is the caller's."""


def block_rows_for(budget_bytes: int, D: int, itemsize: int, shard_rows: int, n: int) -> int:
    """Rows per streamed block: two float32 blocks (multiplied, prefetched) and one block of raw values fit
    the budget; whole shards when at least one fits, so no inner chunk is decoded twice."""
    per_row = D * (2 * 4 + itemsize)
    rows = int(budget_bytes // per_row)
    if rows < 1:
        raise H2TError(f"score.memory_budget_mb={budget_bytes / 2**20:g} is below one row block "
                       f"({per_row / 2**20:.1f} MB for {D} features)")
    if rows >= shard_rows:
        rows = rows // shard_rows * shard_rows
    return min(n, rows)


def chunk_runs(cols: np.ndarray, width: int) -> list[np.ndarray]:
    """Positions in `cols` (ascending column indices) of each run of columns whose inner chunks (`width`
    columns each) are adjacent: a run read as one slice decodes only the chunks holding its columns, through
    the codec pipeline (zarr's orthogonal selection decoded scattered columns chunk by chunk, 7-15x slower)."""
    return np.split(np.arange(len(cols)), np.flatnonzero(np.diff(cols // width) > 1) + 1)


class BlockReader:
    """Reads rows of a store's layers as float32, each layer's part of a row divided by its L2 norm. Shared by
    the in-process matrix and by cluster workers (pipeline/score/cluster.py)."""

    def __init__(self, store, splits, layers: list[dict] | None = None, threads: int | None = None):
        self.store = store
        self.layers = layers or store.layers
        self.threads = threads or min(len(self.layers), os.cpu_count() or 1)
        self.dtypes = store.layer_dtypes()
        self.arrays = {split: [store.features(split, layer["name"]) for layer in self.layers] for split in splits}
        # local shards are read straight from their files (pipeline/storage/shards.py); others through zarr
        self.direct = {split: [shards.reader_for(a.codes if isinstance(a, DequantizedArray) else a) for a in arrays]
                       for split, arrays in self.arrays.items()}
        self.starts = np.cumsum([0] + [layer["dim"] for layer in self.layers])
        self.D = int(self.starts[-1])
        self.itemsize = max(np.dtype(a.dtype).itemsize for arrays in self.arrays.values() for a in arrays)

    def fill(self, out: np.ndarray, segment: Segment, norms: np.ndarray, known: bool) -> None:
        """out[:] = the segment's rows, normalised; `norms` (rows x layers) is written, or read when `known`.
        One Dask task per layer, each decoding its own shards (`shards.ShardReader`, or zarr's pipeline)."""
        tasks = [dask.delayed(self._fill_layer)(out, segment, i, norms, known) for i in range(len(self.layers))]
        dask.compute(*tasks, scheduler="threads", num_workers=self.threads)

    def _fill_layer(self, out: np.ndarray, segment: Segment, i: int, norms: np.ndarray, known: bool) -> None:
        """Decode one layer's rows into its columns of `out` and normalise them in place, a few rows at a time
        so that the cast and the scaling run on values still in cache."""
        name = self.layers[i]["name"]
        seg = out[:, self.starts[i]:self.starts[i + 1]]
        array = self.arrays[segment.split][i]
        reader = self.direct[segment.split][i]
        stored = None if reader is None else reader.read(*segment.src.indices(array.shape[0])[:2])
        codes = None
        if isinstance(array, DequantizedArray):  # an int8 tap: its codes, dequantised a few rows at a time below
            codes = array.codes_of(segment.src, codes=stored)
            if segment.take is not None:  # some of the rows: dequantised, then taken
                raw, codes = codes.fill(np.empty(codes.codes.shape, np.float32))[segment.take], None
        else:
            raw = array[segment.src] if stored is None else stored
            raw = raw if segment.take is None else raw[segment.take]
        step = max(1, CACHE_BYTES // (4 * max(1, seg.shape[1])))
        for r0 in range(0, len(seg), step):
            part = seg[r0:r0 + step]
            if codes is not None:
                codes.fill(part, r0, r0 + len(part))
            else:
                cast_into(part, self.store.decode(name, raw[r0:r0 + step], self.dtypes[name]))
            if known:
                part *= (1.0 / norms[r0:r0 + len(part), i])[:, None]
            else:
                norms[r0:r0 + len(part), i] = normalise_rows_in_place(part)

    def columns(self, out: np.ndarray, segment: Segment, idx: np.ndarray, norms: np.ndarray) -> None:
        """out[:] = columns `idx` (sorted global indices) of the segment's rows, normalised by known norms:
        only the inner chunks holding them are read, adjacent ones as one slice."""
        layer_of = np.searchsorted(self.starts, idx, side="right") - 1
        tasks = []
        for i in np.unique(layer_of):
            where = np.flatnonzero(layer_of == i)
            cols = idx[where] - self.starts[i]
            width = self.arrays[segment.split][i].chunks[1]  # inner chunk: the unit zarr decodes
            for run in chunk_runs(cols, width):
                tasks.append(dask.delayed(self._fill_columns)(out, segment, i, where[run], cols[run], width, norms))
        dask.compute(*tasks, scheduler="threads", num_workers=self.threads)

    def _fill_columns(self, out, segment: Segment, i: int, where, cols, width: int, norms) -> None:
        name = self.layers[i]["name"]
        lo = int(cols[0]) // width * width
        slab = self.arrays[segment.split][i][segment.src, lo:int(cols[-1]) + 1]
        values = slab[:, cols - lo] if segment.take is None else slab[segment.take][:, cols - lo]
        out[:, where] = as_float32(self.store.decode(name, values, self.dtypes[name])) / norms[:, i][:, None]


def add_partials(total, part):
    """total + part for partial sums that are numbers, arrays or tuples of them; total None starts a sum
    (a copy of part, numbers as float64). Shared by the in-process and the cluster reductions."""
    if isinstance(part, tuple):
        return tuple(add_partials(t, p) for t, p in zip(total or (None,) * len(part), part))
    if total is None:
        return np.array(part, dtype=np.float64 if np.ndim(part) == 0 else None, copy=True)
    total += part
    return total


def as_sums(total):
    """A reduction's result with its numbers as Python floats."""
    if isinstance(total, tuple):
        return tuple(as_sums(t) for t in total)
    return float(total) if np.ndim(total) == 0 else total


def reduce_blocks(matrix: BlockMatrix, fn: Callable[..., Any], *args: Any) -> Any:
    """sum over the matrix's blocks of fn(block, rows, *args) (a number, an array or a tuple of them)."""
    total = None
    for rows, X in matrix.blocks():
        total = add_partials(total, fn(X, rows, *args))
    return as_sums(total)


class FeatureMatrix(Closing):
    """The rows `rows` (a split's name, or a Rows selection: folds, train + val) of every layer, read in this
    process (the BlockMatrix protocol, pipeline/score/contracts.py)."""

    def __init__(self, store, rows: Rows | str, memory_budget_bytes: int, layers: list[dict] | None = None,
                 center: bool = True, threads: int | None = None):
        self.rows = Rows.of(store, rows) if isinstance(rows, str) else rows
        self.store = store
        self.reader = BlockReader(store, [split for split, _ in self.rows.parts], layers, threads)
        self.layers = self.reader.layers
        self.n = self.rows.size(store)
        self.D = self.reader.D
        if memory_budget_bytes < 1:
            raise H2TError(f"score.memory_budget_mb must be positive, got {memory_budget_bytes}")
        # In memory when the matrix and one block of raw values in flight fit.
        self.in_memory = self.n * self.D * 4 * 1.25 <= memory_budget_bytes
        self.shard_rows = store.info.shard_rows
        self.block_rows = block_rows_for(memory_budget_bytes, self.D, self.reader.itemsize, self.shard_rows, self.n)
        self.norms = np.ones((self.n, len(self.layers)), np.float32)  # each layer's row norm, from the first pass
        self._norms_known = False
        self.passes = 0  # full reads of the store (or of the cache) made so far
        self.centered = center
        self.mean = np.zeros(self.D, np.float32)
        self.offset: np.ndarray | None = None  # subtracted from streamed blocks by the datafit: X = block - offset
        self._cache = None
        if self.in_memory:
            self._cache = np.empty((self.n, self.D), np.float32)
            for segment in self._row_blocks():
                self._fill(self._cache[segment.dst], segment)
            self.passes += 1
            if center:
                self.mean = self._cache.mean(axis=0)
                self._cache -= self.mean
        else:  # one pass: the means, and the norms that columns() needs
            total = np.zeros(self.D, np.float64)
            for _rows, block in self.blocks():
                total += block.sum(axis=0)
            if center:
                self.mean = (total / self.n).astype(np.float32)
                self.offset = self.mean

    def _row_blocks(self) -> list[Segment]:
        """Whole shards of the store, at most block_rows of them at a time, and the rows kept of each."""
        return list(self.rows.segments(self.store, self.block_rows, align=self.shard_rows))

    def _fill(self, out: np.ndarray, segment: Segment) -> None:
        """The row norms are computed by the first pass and kept: later passes only multiply."""
        self.reader.fill(out, segment, self.norms[segment.dst], self._norms_known)

    def blocks(self) -> Iterator[tuple[slice, np.ndarray]]:
        """Yield (row slice, block) covering all rows once; the matrix is `block - offset` (offset None: 0)."""
        self.passes += 1
        if self._cache is not None:
            for segment in self._row_blocks():
                yield segment.dst, self._cache[segment.dst]
            return
        spans = self._row_blocks()
        buffers = [np.empty((self.block_rows, self.D), np.float32) for _ in range(min(2, len(spans)))]
        with ThreadPoolExecutor(1, thread_name_prefix="h2t-prefetch") as prefetch:
            def read(k):
                out = buffers[k % len(buffers)][:spans[k].dst.stop - spans[k].dst.start]
                self._fill(out, spans[k])
                return out

            pending = prefetch.submit(read, 0)
            for k, segment in enumerate(spans):
                block = pending.result()
                if k + 1 < len(spans):
                    pending = prefetch.submit(read, k + 1)  # the other buffer: read while this one is used
                yield segment.dst, block
        self._norms_known = True

    def reduce(self, fn: Callable[..., Any], *args: Any) -> Any:
        return reduce_blocks(self, fn, *args)

    def columns(self, idx: np.ndarray) -> np.ndarray:
        """The (n, len(idx)) normalised, centred submatrix: only the chunks holding these columns are read
        (each layer's row norms come from the first pass)."""
        idx = np.asarray(idx, dtype=np.int64)
        if self._cache is not None:
            return self._cache[:, idx]
        out = np.empty((self.n, len(idx)), np.float32)
        for segment in self.rows.segments(self.store, max(1, self.n), 1):  # one per part: all its rows at once
            self.reader.columns(out[segment.dst], segment, idx, self.norms[segment.dst])
        if self.centered:
            out -= self.mean[idx]
        return out

    def close(self) -> None:
        """Nothing to release outside this process: the values and norms are freed with the matrix."""
