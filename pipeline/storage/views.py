"""Derived column views: the most relevant columns of every split, copied once in relevance order, so that
the head's read of any kept fraction F is a prefix of one array and costs about the bytes of its columns.

    derived/views/<key>/
        attrs        relevance_key, n_columns, order, dtype, encoding, complete (written last)
        columns      (K,) int64: global feature index of each view column, most relevant first
        <split>      (n, K) the store's raw values (its storage dtype; float32 when taps differ);
                     shard = (rows, K), inner chunk = (rows, COLUMN_CHUNK), lz4 + CRC32C per chunk
        <split>_quant  int8 stores: (n_shards, 2 K) in the store's params dtype, each store shard's scales
                     then offsets of the view's columns (pipeline/storage/quant.py): the view keeps one byte per value too

A view is a cache, never needed for correctness: missing, incomplete, too narrow or on a read-only store,
the head reads the feature arrays directly and gets the same numbers. `key` is a hash of the relevance key,
the width and the ranking rule. `h2t store verify` checks views like features; `h2t store rm --derived`
removes them with the cached scores.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import numpy as np
import zarr
from tqdm.auto import tqdm

from . import shards
from .claims import Claims
from .handle import array_at
from .quant import DequantizedArray
from .schema import QUANT, SAMPLE, SHARD, WRITE_EMPTY, feature_codecs, from_bfloat16_bits, quant_codecs, store_id

COLUMN_CHUNK = 64  # view columns per inner chunk: a prefix of k columns reads at most 63 more
SHARD_BYTES = 64 * 2**20  # raw bytes of one row block of the view, written as one shard
ORDER = "weight_sq desc, grad_norm desc, index asc"
ROOT = "derived/views"


def view_key(relevance_key: str, n_columns: int) -> str:
    return store_id({"relevance": relevance_key, "columns": int(n_columns), "order": ORDER})


@dataclass
class ColumnView:
    key: str
    group: zarr.Group
    columns: np.ndarray  # (K,) global indices, most relevant first
    encoding: str  # "bfloat16" when the values are bfloat16 bit patterns, "int8" for codes, else ""
    shard_rows: int = 0  # int8 views: rows per store shard (the unit of their scales and offsets)

    @property
    def width(self) -> int:
        return len(self.columns)

    def read(self, split: str, k: int, rows: slice = slice(None)) -> np.ndarray:
        """The first k view columns of `rows` as numbers (float32 or the stored float type)."""
        if self.encoding == "int8":
            return DequantizedArray(self.group[split], self.group[f"{split}_quant"], self.shard_rows)[rows, :k]
        block = cast(np.ndarray, array_at(self.group, split)[rows, :k])
        return from_bfloat16_bits(block) if self.encoding == "bfloat16" else block


def find_view(store, relevance_key: str, k: int) -> ColumnView | None:
    """The narrowest complete view of these scores holding at least k columns."""
    try:
        root = store.group[ROOT]
    except KeyError:
        return None
    best = None
    for _name, group in root.groups():
        attrs = group.attrs
        if attrs.get("complete") and attrs.get("relevance_key") == relevance_key and attrs.get("n_columns", 0) >= k:
            if best is None or attrs["n_columns"] < best.attrs["n_columns"]:
                best = group
    if best is None:
        return None
    return ColumnView(best.basename, best, best["columns"][:], best.attrs.get("encoding", ""),
                      best.attrs.get("shard_rows", 0))


def build_view(store, relevance_key: str, ranking: np.ndarray, n_columns: int, budget_bytes: int = SHARD_BYTES,
               progress: bool = False) -> ColumnView:
    """Copy the first n_columns of `ranking` (global indices) from every split into a new view: one pass
    over the store, a row block of whole shards at a time."""
    columns = np.asarray(ranking[:n_columns], dtype=np.int64)
    key = view_key(relevance_key, len(columns))
    layers = store.layers
    starts = np.cumsum([0] + [layer["dim"] for layer in layers])
    layer_of = np.searchsorted(starts, columns, side="right") - 1
    dtypes = store.layer_dtypes()
    stored = {store.stored_features(next(iter(store.splits())), layer["name"]).dtype for layer in layers}
    same = len(stored) == 1 and len(set(dtypes.values())) == 1
    dtype = np.dtype(next(iter(stored))) if same else np.dtype("float32")
    encoding = next(iter(dtypes.values())) if same and next(iter(dtypes.values())) in ("bfloat16", "int8") else ""
    shard_rows = store.info.shard_rows
    rows = max(shard_rows, budget_bytes // max(1, len(columns) * dtype.itemsize) // shard_rows * shard_rows)
    group = store.group.require_group(f"{ROOT}/{key}")
    group.attrs.clear()  # an interrupted build is rebuilt from the start
    col_array = group.create_array("columns", shape=columns.shape, dtype="int64", chunks=columns.shape,
                                   overwrite=True, dimension_names=["view_column"])
    col_array[:] = columns
    inner = min(COLUMN_CHUNK, len(columns))
    total = sum(store.splits().values())
    with tqdm(total=total, unit="row", desc="column view", disable=not progress, leave=False) as bar:
        for split, n in store.splits().items():
            block_rows = min(rows, n)
            arr = group.create_array(split, shape=(n, len(columns)), dtype=dtype, chunks=(block_rows, inner),
                                     shards=(block_rows, math.ceil(len(columns) / inner) * inner),
                                     compressors=feature_codecs("lz4", dtype.itemsize), fill_value=0, overwrite=True,
                                     config=WRITE_EMPTY, dimension_names=[SAMPLE, "view_column"])
            quant, params_dtype = None, np.dtype("float32")
            if encoding == "int8":  # the store's scales and minima, in their dtype
                params_dtype = store.group[QUANT.key(split, layers[0]["name"])].dtype
                quant = group.create_array(f"{split}_quant", shape=(-(-n // shard_rows), 2 * len(columns)),
                                           dtype=params_dtype, chunks=(1, 2 * len(columns)),
                                           compressors=quant_codecs(), fill_value=0, overwrite=True,
                                           dimension_names=[SHARD, "view_column.quant"])
            for r0 in range(0, n, block_rows):
                r1 = min(r0 + block_rows, n)
                out = np.empty((r1 - r0, len(columns)), dtype)
                out_params = np.empty((-(-(r1 - r0) // shard_rows), 2 * len(columns)), params_dtype)
                for i in np.unique(layer_of):
                    where = np.flatnonzero(layer_of == i)
                    name = layers[i]["name"]
                    cols = columns[where] - starts[i]
                    if encoding == "int8":  # codes as stored, and their shards' scales and offsets
                        out[:, where] = shards.read_rows(store.stored_features(split, name), r0, r1)[:, cols]
                        params = store.group[QUANT.key(split, name)][r0 // shard_rows:-(-r1 // shard_rows)]
                        dim = layers[i]["dim"]
                        out_params[:, where] = params[:, cols]
                        out_params[:, len(columns) + where] = params[:, dim + cols]
                        continue
                    raw = shards.read_rows((store.stored_features if same else store.features)(split, name), r0, r1)
                    values = raw if same else store.decode(name, raw, dtypes[name])
                    out[:, where] = values[:, cols]
                if quant is not None:
                    for s, row in enumerate(out_params):
                        store.writer.write_shard(quant, r0 // shard_rows + s, row[None])
                store.writer.write_shard(arr, r0 // block_rows, out)  # all-zero blocks kept too
                bar.update(r1 - r0)
    group.attrs.update({"relevance_key": relevance_key, "n_columns": int(len(columns)), "order": ORDER,
                        "dtype": str(dtype), "encoding": encoding, "shard_rows": shard_rows, "complete": True})
    return ColumnView(key, group, columns, encoding, shard_rows)


def list_views(store) -> list[dict]:
    try:
        root = store.group[ROOT]
    except KeyError:
        return []
    return [{"key": name, **dict(group.attrs)} for name, group in root.groups()]




def view_for(store, relevance_key: str, ranking: np.ndarray, k: int, min_fraction: float = 0.2,
             progress: bool = False) -> ColumnView | None:
    """A complete view holding the top k columns: found, or built now (at least `min_fraction` of the
    features wide, so that larger fractions reuse it). None on a read-only store, or while another process
    builds it: the caller then reads the features directly."""
    found = find_view(store, relevance_key, k)
    if found is not None or store.read_only:
        return found
    width = min(len(ranking), max(k, math.ceil(min_fraction * len(ranking))))
    claims = Claims(store.group.store, ttl_s=3600)
    unit = f"views/{view_key(relevance_key, width)}"
    if not claims.try_claim(unit):
        return None
    try:
        return build_view(store, relevance_key, ranking, width, progress=progress)
    finally:
        claims.release(unit)
