"""The feature store: one Zarr v3 group per (backbone + weights + preprocessing + pooling, dataset).

The layout is declared in pipeline/storage/schema.py. This module creates and opens stores; `FeatureStore`
reads them and hands the other jobs to their modules: shard writing (writer.py), the widening protocol
(widening.py) and the relevance cache (relevance.py), all over one `StoreHandle` (handle.py).
"""
from __future__ import annotations

import asyncio
import datetime as _dt
import os
import shutil
from typing import Any, cast

import numpy as np
import zarr
from zarr.storage import FsspecStore

from ..errors import H2TError
from . import location, zarr_compat
from .handle import StoreHandle, array_at, h2t_attrs, read_all
from .meta import StoreMeta
from .quant import DequantizedArray
from .relevance import RelevanceCache
from .runs import who
from .schema import (
    COMPRESSIONS,
    DTYPES,
    FEATURES,
    FLAT_KEYS,
    LABELS,
    LEDGER,
    QUANT,
    SAMPLE_IDS,
    SCHEMA_VERSION,
    STATUS_COMPLETE,
    STATUS_CREATING,
    STATUS_WRITING,
    canonical_json,
    check_attrs,
    decode_values,
    dimensions,
    encode_values,
    feature_codecs,
    from_bfloat16_bits,
    inner_columns,
    quant_codecs,
    quant_params_dtype,
    resolve_compression,
    storage_dtype,
    store_id,
    to_bfloat16_bits,
)
from .widening import StaleShard, Widening, WideningElsewhere
from .writer import ShardWriter

# names callers import from here
__all__ = ["FeatureStore", "StaleShard", "StoreMeta", "WideningElsewhere", "STATUS_COMPLETE", "STATUS_CREATING",
           "STATUS_WRITING", "create_store", "open_store", "store_path", "from_bfloat16_bits", "to_bfloat16_bits"]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text))


def store_path(root: str, spec: dict) -> str:
    return location.join(str(root), _slug(spec["model"]["name"]), _slug(spec["dataset"]["name"]),
                         f"{store_id(spec)}.zarr")


class FeatureStore:
    """An open store: reads it, and delegates writing, widening and the relevance cache to their classes
    (`writer`, `widenings`, `relevance`). `info` is its parsed attributes; `layers` is the layer table,
    whose column offsets index the concatenated feature axis."""

    def __init__(self, path: str, group: zarr.Group, read_only: bool = False, options: dict | None = None):
        self.handle = StoreHandle(path, group, read_only, options)
        self.widenings = Widening(self.handle)
        self.writer = ShardWriter(self.handle, self.widenings)
        self.relevance = RelevanceCache(self.handle)

    def __repr__(self) -> str:
        return f"FeatureStore({self.path!r}, read_only={self.read_only})"

    # --- the open store ---------------------------------------------------------------------------------
    @property
    def path(self) -> str:
        return self.handle.path

    @property
    def group(self) -> zarr.Group:
        return self.handle.group

    @property
    def read_only(self) -> bool:
        return self.handle.read_only

    @property
    def options(self) -> dict | None:
        """Storage options it was opened with (credentials): others can reopen it."""
        return self.handle.options

    @property
    def info(self) -> StoreMeta:
        return self.handle.info

    @property
    def meta(self) -> dict:
        """attrs["h2t"] as a raw dict; `info` is the same parsed (callers are moving to it)."""
        return self.handle.attrs

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def layers(self) -> list[dict]:
        return list(self.info.layers)

    @property
    def computed_layers(self) -> list[dict]:
        """The layers extraction writes: all but those copied from another store (pipeline/reuse.py)."""
        return list(self.info.computed_layers)

    @property
    def n_features(self) -> int:
        return self.info.n_features

    @property
    def complete(self) -> bool:
        return self.info.complete

    def splits(self) -> dict[str, int]:
        return dict(self.info.splits)

    def layer_dtypes(self) -> dict[str, str]:
        """Each tap's stored dtype: the store's, or float32 where a tap was widened."""
        return self.info.layer_dtypes()

    # --- reading ----------------------------------------------------------------------------------------
    def features(self, split: str, layer: str):
        """A tap's values: its zarr array, or for an int8 tap the codes read as float32 (quant.py)."""
        handle = self.handle
        if self.layer_dtypes()[layer] != "int8":
            return handle.array(FEATURES.key(split, layer))
        key = f"{FEATURES.key(split, layer)}#values"
        if key not in handle.arrays:
            handle.arrays[key] = DequantizedArray(handle.array(FEATURES.key(split, layer)),
                                                  handle.array(QUANT.key(split, layer)), self.info.shard_rows)
        return handle.arrays[key]

    def stored_features(self, split: str, layer: str) -> zarr.Array:
        """A tap's array as stored (int8 codes for an int8 tap)."""
        return self.handle.array(FEATURES.key(split, layer))

    def labels(self, split: str) -> np.ndarray:
        return read_all(array_at(self.group, LABELS.key(split)))

    def sample_ids(self, split: str) -> np.ndarray:
        ids = read_all(array_at(self.group, SAMPLE_IDS.key(split)))
        return np.array(ids.tolist(), dtype=str)  # numpy's StringDType -> str

    def shards_done(self, split: str) -> np.ndarray:
        return read_all(self.handle.array(LEDGER.key(split)))

    def ledger_entry(self, split: str, shard: int) -> bool:
        """Whether one shard is marked written (one chunk read)."""
        handle = self.handle
        array = handle.array(LEDGER.key(split))
        root = handle.local_root()
        encoder = handle.encoder(array)
        if root is not None and encoder and not encoder.steps:  # one raw byte per entry: read in this thread
            try:
                return (root / array.path / zarr_compat.chunk_key(array, (shard,))).read_bytes() != b"\x00"
            except FileNotFoundError:
                return bool(array.fill_value)
        return bool(array[shard])

    def shard_exists(self, split: str, layer: str, shard: int) -> bool:
        """Whether the shard's objects are on storage (a missing one would read as zeros)."""
        return not self.missing_objects(split, layer, shard)

    def missing_objects(self, split: str, layer: str, shard: int) -> list[str]:
        """The arrays (features, and an int8 tap's quant) whose object for this shard is not on storage."""
        arrays = [self.stored_features(split, layer)]
        if self.layer_dtypes()[layer] == "int8":
            arrays.append(self.handle.array(QUANT.key(split, layer)))
        store = self.group.store
        return [array.path for array in arrays
                if not zarr_compat.run(store.exists(f"{array.path}/{zarr_compat.chunk_key(array, (shard, 0))}"))]

    def encode(self, layer: str, block: np.ndarray, dtype: str | None = None):
        """A float32 block as the tap's array stores it."""
        return encode_values(block, dtype or self.layer_dtypes()[layer])

    def decode(self, layer: str, block: np.ndarray, dtype: str | None = None) -> np.ndarray:
        """Values read from the tap's array as numbers (bfloat16 bits become float32; others as stored; an int8
        tap's `features` are already float32)."""
        return decode_values(block, dtype or self.layer_dtypes()[layer])

    # --- the other jobs, by name (writer.py, widening.py, relevance.py) ---------------------------------
    def write_rows(self, split: str, start: int, blocks: list[np.ndarray], dtypes: dict | None = None) -> None:
        self.writer.write_rows(split, start, blocks, dtypes)

    def write_shard(self, array: zarr.Array, shard: int, block: np.ndarray) -> None:
        self.writer.write_shard(array, shard, block)

    def mark_complete(self) -> None:
        self.writer.mark_complete()

    def widen_layer(self, layer: str, claims=None, poll_s: float = 0.2, wait: bool = True) -> None:
        self.widenings.widen_layer(layer, self.writer, claims, poll_s, wait)

    def widening(self) -> bool:
        """True while another writer widens a tap (fresh attributes: one small read)."""
        return self.widenings.in_progress()

    def cache_key(self, key: str) -> str:
        """The key scores of these settings are cached under (a union's covers its members: storage/union.py)."""
        return key

    def save_relevance(self, key: str, arrays: dict[str, np.ndarray], attrs: dict) -> None:
        self.relevance.save(key, arrays, attrs)

    def load_relevance(self, key: str) -> tuple[dict[str, np.ndarray], dict] | None:
        return self.relevance.load(key)


def create_store(path: str, spec: dict, layers: list[dict], split_sizes: dict[str, int], num_classes: int,
                 class_names: list[str], shard_rows: int, dtype: str, col_chunk: int | None,
                 compression: str, skipped: list[dict] | None = None, options: dict | None = None,
                 labels: dict | None = None, sample_ids: dict | None = None,
                 reused: dict[str, FeatureStore] | None = None) -> FeatureStore:
    """Lay out an empty store (status `writing`): every array exists, the ledger is all zeros.

    Layers named in `reused` are copied whole from that complete store (same shard size) instead; when
    every layer is, the ledger starts all ones: nothing is left to compute."""
    reused = reused or {}
    if dtype not in DTYPES:
        raise H2TError(f"store.dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if compression not in COMPRESSIONS:
        raise H2TError(f"store.compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
    compressors = feature_codecs(resolve_compression(compression, dtype), np.dtype(storage_dtype(dtype)).itemsize)
    col_chunk = inner_columns(col_chunk, dtype)
    meta: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "store_id": store_id(spec), "spec": spec, "layers": layers,
        "splits": dict(split_sizes), "num_classes": int(num_classes), "class_names": list(class_names),
        "shard_rows": int(shard_rows), "dtype": dtype, "status": STATUS_CREATING, "skipped": list(skipped or []),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "created_by": who(),
    }
    widened = sorted(layer["name"] for layer in layers if layer["name"] in reused and layer.get("dtype") == "float32")
    if widened:
        meta["widened"] = widened
    location.ensure_writable_root(path)
    try:  # status `creating` until every array exists: a crash here leaves a store that is simply recreated
        # mode "a": a half-made store is laid out again in place, keeping the claims of concurrent writers
        # a new group is written with its attributes in one object: a concurrent reader never sees a group
        # without them
        group = zarr.open_group(store=location.zarr_store(path, options), mode="a", zarr_format=3,
                                attributes={"h2t": meta})
        if group.attrs.get("h2t") != meta:  # a half-made store opened again: its attributes are the old ones
            group.attrs["h2t"] = meta
    except Exception as exc:  # noqa: BLE001 - local and remote backends fail in many ways
        if location.is_remote(path):
            raise H2TError(location.describe_failure(path, exc)) from None
        raise H2TError(f"cannot create store at {path}: {getattr(exc, 'strerror', None) or exc}") from None
    all_reused = all(layer["name"] in reused for layer in layers)
    store = FeatureStore(path, group, options=options)
    to_create = []
    for split, n in split_sizes.items():
        n_shards = -(-n // shard_rows)
        group.require_group(f"{split}/features")
        if dtype == "int8":
            group.require_group(f"{split}/quant")
        for layer in layers:
            if layer["name"] in reused:
                _copy_array(reused[layer["name"]], path, group, FEATURES.key(split, layer["name"]))
                if dtype == "int8":
                    _copy_array(reused[layer["name"]], path, group, QUANT.key(split, layer["name"]))
                continue
            inner = min(col_chunk, layer["dim"])
            to_create.append((FEATURES.key(split, layer["name"]), dict(
                shape=(n, layer["dim"]), dtype=storage_dtype(dtype), chunks=(shard_rows, inner),
                shards=(shard_rows, -(-layer["dim"] // inner) * inner), compressors=compressors, fill_value=0,
                chunk_key_encoding=FLAT_KEYS, dimension_names=dimensions("features", layer["name"]),
                attributes={"h2t_encoding": "bfloat16"} if dtype == "bfloat16" else None)))
            if dtype == "int8":  # one row of scales and offsets per shard, one chunk each
                to_create.append((QUANT.key(split, layer["name"]), dict(
                    shape=(n_shards, 2 * layer["dim"]), dtype=quant_params_dtype(spec), chunks=(1, 2 * layer["dim"]),
                    compressors=quant_codecs(), fill_value=0, chunk_key_encoding=FLAT_KEYS,
                    dimension_names=dimensions("quant", layer["name"]))))
        label_array = group.create_array(LABELS.key(split), shape=(n,), dtype="int64", chunks=(n,),
                                         compressors=None, overwrite=True, dimension_names=dimensions("labels"))
        id_array = group.create_array(SAMPLE_IDS.key(split), shape=(n,), dtype=str, chunks=(n,), overwrite=True,
                                      dimension_names=dimensions("sample_ids"))
        if labels is not None:
            label_array[:] = labels[split]
        if sample_ids is not None:
            id_array[:] = sample_ids[split]
        group.create_array(LEDGER.key(split), shape=(n_shards,), dtype="uint8", chunks=(1,),
                           fill_value=int(all_reused), compressors=None, overwrite=True,
                           dimension_names=dimensions("ledger"))

    # concurrently: one metadata write each, ~4 ms apiece one after another
    created = zarr_compat.create_arrays(group, [(key, dict(kwargs, overwrite=True)) for key, kwargs in to_create])
    for (key, _kwargs), array in zip(to_create, created):
        store.handle.arrays[key] = array  # extraction writes them next: no need to open them again
    store.handle.write_attrs(status=STATUS_WRITING)
    return store


def _copy_array(source: FeatureStore, target_path: str, target_group: zarr.Group, key: str) -> None:
    """Copy one array (metadata and every chunk object) of a complete store into a store being laid out:
    hard links on a local disk, server-side copies within one S3 endpoint, else through this process."""
    if not location.is_remote(source.path) and not location.is_remote(target_path):
        _link_tree(location.local_path(source.path) / key, location.local_path(target_path) / key)
        return
    src, dst = source.group.store, target_group.store
    src_fs, dst_fs = getattr(src, "fs", None), getattr(dst, "fs", None)
    if src_fs is not None and dst_fs is not None and "s3" in src_fs.protocol and \
            src_fs.storage_options == dst_fs.storage_options:
        # one object store: server-side copies (CopyObject), no bytes through this machine
        src_path, dst_path = cast(FsspecStore, src).path, cast(FsspecStore, dst).path  # stores with an `fs`
        zarr_compat.run(zarr_compat.copy_tree(src_fs, f"{src_path}/{key}", f"{dst_path}/{key}"))
        return
    keys = zarr_compat.collect(src.list_prefix(f"{key}/"))

    async def copy_all():
        await asyncio.gather(*(zarr_compat.copy_object(src, dst, k) for k in keys))
    zarr_compat.run(copy_all())


def _link_tree(src, dst) -> None:
    """Hard-link every file of src under dst: no extra space, and safe because complete stores are never
    written again and a store being written writes only its computed layers (the Rust pipeline writes files
    in place, so a write through a link would change both stores). Copies where links fail."""
    if dst.exists():
        shutil.rmtree(dst)
    for folder, _dirs, files in os.walk(src):
        target = dst / os.path.relpath(folder, src)
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            try:
                os.link(os.path.join(folder, name), target / name)
            except OSError:
                shutil.copy2(os.path.join(folder, name), target / name)


def open_store(path: str, spec: dict | None = None, options: dict | None = None) -> FeatureStore | None:
    """Open an existing store (None if there is none); refuse one whose schema or provenance differs."""
    read_only = location.read_only_scheme(path) or (not location.is_remote(path) and _local_read_only(path))
    try:
        store = location.zarr_store(path, options, read_only=read_only)
        if not zarr_compat.run(store.exists("zarr.json")):
            return None
        group = zarr.open_group(store=store, mode="r" if read_only else "r+", zarr_format=3)
        meta = h2t_attrs(group)
    except KeyError:
        if zarr_compat.run(store.exists("claims/create")):  # being laid out by another writer: not there yet
            return None
        raise H2TError(f"{path} is a zarr group but not an h2t store") from None
    except H2TError:
        raise
    except Exception as exc:  # noqa: BLE001 - local and remote backends fail in many ways
        if location.is_remote(path):
            raise H2TError(location.describe_failure(path, exc)) from None
        raise H2TError(f"{path} is not an h2t store ({type(exc).__name__}: {exc})") from None
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise H2TError(f"store {path} has schema version {meta.get('schema_version')}, "
                       f"this h2t reads version {SCHEMA_VERSION}")
    problems = check_attrs(meta)
    if problems:
        raise H2TError(f"store {path} does not follow the h2t schema: {problems[0]}")
    if spec is not None and canonical_json(meta["spec"]) != canonical_json(spec):
        raise H2TError(f"store {path} was extracted with other settings (provenance differs): not reused")
    try:
        return FeatureStore(path, group, read_only, options)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a key of the wrong kind
        raise H2TError(f"store {path} does not follow the h2t schema: attrs['h2t'] cannot be read "
                       f"({type(exc).__name__}: {exc})") from None


def _local_read_only(path: str) -> bool:
    local = location.local_path(path)
    return local.exists() and not os.access(local, os.W_OK)
