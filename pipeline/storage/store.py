"""The feature store: one Zarr v3 group per (backbone + weights + preprocessing + pooling, dataset).

The layout is declared in pipeline/storage/schema.py; this module creates, opens and writes it.
"""
from __future__ import annotations

import asyncio
import re
import time
import datetime as _dt
import getpass
import os
import shutil
import socket
from dataclasses import dataclass, field

import numpy as np
import zarr
from zarr.core.buffer import cpu, default_buffer_prototype
from zarr.core.sync import sync as zarr_sync

from . import location, shards
from ..errors import H2TError
from .quant import DequantizedArray, QuantizedBlock, quantize
from .schema import (COMPRESSIONS, DTYPES, FEATURES, LABELS, LEDGER, QUANT, SAMPLE_IDS, SCHEMA_VERSION, STATUS_COMPLETE,
                     STATUS_CREATING, STATUS_WRITING, WRITE_EMPTY, canonical_json, check_attrs, feature_codecs, quant_codecs,
                     from_bfloat16_bits, storage_dtype, store_id, to_bfloat16_bits)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text))


def store_path(root: str, spec: dict) -> str:
    return location.join(str(root), _slug(spec["model"]["name"]), _slug(spec["dataset"]["name"]),
                         f"{store_id(spec)}.zarr")


SHARD_CLAIM = re.compile(r"^(?!views/|relevance/)[^/]+/\d+$")  # claims/<split>/<shard>


class StaleShard(Exception):
    """A shard written across another writer's widening of a tap: not marked done, it is computed again."""


@dataclass
class FeatureStore:
    """An open store. `layers` is the layer table; column offsets index the concatenated feature axis."""
    path: str
    group: zarr.Group
    read_only: bool = False
    options: dict | None = None  # storage options it was opened with (credentials): others can reopen it
    # opened arrays: opening one reads and parses its metadata, which cost more than writing its shard
    _arrays: dict = field(default_factory=dict, repr=False, compare=False)
    _encoders: dict = field(default_factory=dict, repr=False, compare=False)  # array path -> ShardEncoder
    _attrs_stat: tuple = field(default=(), repr=False, compare=False)  # (inode, mtime, size) of the attributes file last followed

    def _array(self, key: str) -> zarr.Array:
        array = self._arrays.get(key)
        if array is None:
            array = self._arrays[key] = self.group[key].with_config(WRITE_EMPTY)
        return array

    @property
    def meta(self) -> dict:
        return self.group.attrs["h2t"]

    @property
    def id(self) -> str:
        return self.meta["store_id"]

    @property
    def layers(self) -> list[dict]:
        return self.meta["layers"]

    @property
    def computed_layers(self) -> list[dict]:
        """The layers extraction writes: all but those copied from another store (pipeline/reuse.py)."""
        return [layer for layer in self.layers if "reused_from" not in layer]

    @property
    def n_features(self) -> int:
        return sum(layer["dim"] for layer in self.layers)

    @property
    def complete(self) -> bool:
        return self.meta["status"] == STATUS_COMPLETE

    def splits(self) -> dict[str, int]:
        return dict(self.meta["splits"])

    def features(self, split: str, layer: str):
        """A tap's values: its zarr array, or for an int8 tap the codes read as float32 (quant.py)."""
        if self.layer_dtypes()[layer] != "int8":
            return self._array(FEATURES.key(split, layer))
        key = f"{FEATURES.key(split, layer)}#values"
        if key not in self._arrays:
            self._arrays[key] = DequantizedArray(self._array(FEATURES.key(split, layer)),
                                                 self._array(QUANT.key(split, layer)), self.meta["shard_rows"])
        return self._arrays[key]

    def stored_features(self, split: str, layer: str) -> zarr.Array:
        """A tap's array as stored (int8 codes for an int8 tap)."""
        return self._array(FEATURES.key(split, layer))

    def labels(self, split: str) -> np.ndarray:
        return self.group[LABELS.key(split)][:]

    def sample_ids(self, split: str) -> np.ndarray:
        return np.array(self.group[SAMPLE_IDS.key(split)][:].tolist(), dtype=str)  # numpy's StringDType -> str

    def shards_done(self, split: str) -> np.ndarray:
        return self._array(LEDGER.key(split))[:]

    def ledger_entry(self, split: str, shard: int) -> bool:
        """Whether one shard is marked written (one chunk read)."""
        array = self._array(LEDGER.key(split))
        root = self._local_root()
        encoder = self._encoder(array)
        if root is not None and encoder and not encoder.steps:  # one raw byte per entry: read in this thread
            try:
                return (root / array.path / array.metadata.encode_chunk_key((shard,))).read_bytes() != b"\x00"
            except FileNotFoundError:
                return bool(array.fill_value)
        return bool(array[shard])

    def _local_root(self):
        return None if location.is_remote(self.path) else location.local_path(self.path)

    def shard_exists(self, split: str, layer: str, shard: int) -> bool:
        """Whether the shard's objects are on storage (a missing one would read as zeros)."""
        return not self.missing_objects(split, layer, shard)

    def missing_objects(self, split: str, layer: str, shard: int) -> list[str]:
        """The arrays (features, and an int8 tap's quant) whose object for this shard is not on storage."""
        arrays = [self.stored_features(split, layer)]
        if self.layer_dtypes()[layer] == "int8":
            arrays.append(self._array(QUANT.key(split, layer)))
        return [array.path for array in arrays
                if not zarr_sync(self.group.store.exists(f"{array.path}/{array.metadata.encode_chunk_key((shard, 0))}"))]

    def _update_meta(self, **changes) -> None:
        meta = dict(self.meta)
        meta.update(changes)
        self.group.attrs["h2t"] = meta

    def layer_dtypes(self) -> dict[str, str]:
        """Each tap's stored dtype: the store's, or float32 where a tap was widened."""
        meta = self.meta
        dtype = meta.get("dtype") or meta["spec"]["dtype"]
        return {layer["name"]: layer.get("dtype") or dtype for layer in meta["layers"]}

    def encode(self, layer: str, block: np.ndarray, dtype: str | None = None) -> np.ndarray:
        """A float32 block as the tap's array stores it."""
        dtype = dtype or self.layer_dtypes()[layer]
        if dtype == "int8":
            return quantize(block)
        return to_bfloat16_bits(block) if dtype == "bfloat16" else block.astype(dtype, copy=False)

    def decode(self, layer: str, block: np.ndarray, dtype: str | None = None) -> np.ndarray:
        """Values read from the tap's array as numbers (bfloat16 bits become float32; others as stored; an int8
        tap's `features` are already float32)."""
        dtype = dtype or self.layer_dtypes()[layer]
        return from_bfloat16_bits(block) if dtype == "bfloat16" else block

    # --- writing ---------------------------------------------------------------------------------------
    def widen_layer(self, layer: str, claims=None, poll_s: float = 0.2) -> None:
        """Re-create one tap's arrays as float32 (its activations overflow float16), keeping written rows.

        Safe under concurrent writers: the widening runs under the store's `widen` claim (one at a time, and
        the attributes' read-modify-write is only ever done under it); it first announces itself
        (attrs["widening"]), after which no writer claims a shard, waits until no other process holds a
        shard claim, then copies the tap's arrays and records the new dtype. A shard whose write overlapped
        the widening, or that was cast with the old dtypes, is not marked done (`StaleShard`) and is
        computed again. The layer table records the dtype and attrs["widened"] the tap; the spec (and so the
        id) keeps the store dtype asked for."""
        from .claims import Claims

        claims = claims or Claims(self.group.store, ttl_s=3600)
        while not claims.try_claim("widen"):
            time.sleep(poll_s)
        try:
            self._refresh()
            if self.layer_dtypes()[layer] == "float32":
                return  # another writer widened it meanwhile
            self._update_meta(widening=layer)
            while claims.held_by_others(SHARD_CLAIM):
                time.sleep(poll_s)  # writes in flight elsewhere finish (and are found stale) first
            for split in self.splits():
                old = self.features(split, layer)
                data = self.decode(layer, old[:]).astype(np.float32)
                new = self.group.create_array(old.path, shape=old.shape, dtype="float32", chunks=old.chunks,
                                              shards=old.shards, compressors=old.compressors, fill_value=0,
                                              overwrite=True)
                self._forget_arrays()  # the encoder of the old dtype
                rows, done = old.chunks[0], self.shards_done(split)
                for shard, r0 in enumerate(range(0, len(data), rows)):
                    if done[shard]:  # shards not yet written stay absent
                        self.write_shard(new, shard, data[r0:r0 + rows])
            self._forget_arrays()
            layers = [dict(l, dtype="float32") if l["name"] == layer else l for l in self.layers]
            self._update_meta(layers=layers, widened=sorted(set(self.meta.get("widened", [])) | {layer}),
                              widening=None)
        finally:
            claims.release("widen")

    def widening(self) -> bool:
        """True while another writer widens a tap (fresh attributes: one small read)."""
        self._follow_widening()
        return bool(self.meta.get("widening"))

    def write_rows(self, split: str, start: int, blocks: list[np.ndarray], dtypes: dict | None = None) -> None:
        """Write one shard of rows for every computed layer, then mark the shard done in the ledger.

        `dtypes`: the storage dtype each block was cast to; when a tap was widened since (or is being
        widened while this shard is written), `StaleShard` is raised and the shard is not marked done."""
        if self.complete:
            raise H2TError(f"store {self.path} is complete and immutable")
        self._check_current(split, start, dtypes)
        shard = start // self.meta["shard_rows"]
        for layer, block in zip(self.computed_layers, blocks):
            array = self.stored_features(split, layer["name"])
            if isinstance(block, QuantizedBlock):  # its scales and offsets first: codes never lack them
                self.write_shard(self._array(QUANT.key(split, layer["name"])), shard, block.params[None])
                block = block.codes
            self.write_shard(array, shard, _as_stored(block, array.dtype))
        self._check_current(split, start, dtypes)  # a widening began or ended while this shard was written
        # The ledger entry is written last: a shard marked done is fully on storage.
        self.write_shard(self._array(LEDGER.key(split)), shard, np.ones(1, np.uint8))

    def _check_current(self, split: str, start: int, dtypes: dict | None) -> None:
        self._follow_widening()
        current = self.layer_dtypes()
        if self.meta.get("widening") or (dtypes is not None and any(
                dtypes.get(layer["name"], current[layer["name"]]) != current[layer["name"]]
                for layer in self.computed_layers)):
            raise StaleShard(f"{split} rows {start}..: a tap is being or was widened; computed again")

    def _encoder(self, array: zarr.Array) -> shards.ShardEncoder | None:
        if array.path not in self._encoders:
            self._encoders[array.path] = shards.encoder_for(array)
        return self._encoders[array.path]

    def write_shard(self, array: zarr.Array, shard: int, block: np.ndarray) -> None:
        """Rows [shard * shard_rows, ...) of `array`, every column, as one object (pipeline/storage/shards.py):
        encoded in this thread with the array's codecs, all-zero blocks included; arrays of another layout
        go through zarr (and its codec pipeline's handling of empty chunks)."""
        key = array.path
        encoder = self._encoder(array)
        if encoder is None:
            rows = array.chunks[0]
            array[shard * rows:shard * rows + len(block)] = block
            return
        chunk_key, parts = encoder.encode(shard, block)
        if location.is_remote(self.path):
            zarr_sync(self.group.store.set(f"{key}/{chunk_key}", cpu.Buffer.from_bytes(shards.as_bytes(parts))))
        else:
            shards.write_local(str(location.local_path(self.path)), f"{key}/{chunk_key}", parts)

    def _follow_widening(self) -> None:
        """Another writer may be widening, or have widened, a tap since this store was opened: one read of
        the group's attributes tells, and then the arrays are opened again."""
        root = self._local_root()
        if root is not None:  # the attributes' file unchanged since it was read: nothing to follow
            stat = os.stat(root / self.group.path / "zarr.json")
            if (stat.st_ino, stat.st_mtime_ns, stat.st_size) == self._attrs_stat:
                return
            self._attrs_stat = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        fresh = zarr.open_group(store=self.group.store, path=self.group.path, mode="r+", zarr_format=3)
        meta = fresh.attrs["h2t"]
        if (meta.get("widened"), meta.get("widening")) != (self.meta.get("widened"), self.meta.get("widening")):
            self.group = fresh
            self._forget_arrays()

    def _forget_arrays(self) -> None:
        self._arrays.clear()
        self._encoders.clear()

    def _refresh(self) -> None:
        self.group = zarr.open_group(store=self.group.store, path=self.group.path, mode="r+", zarr_format=3)
        self._forget_arrays()

    def mark_complete(self) -> None:
        for split in self.splits():
            done = self.shards_done(split)
            if not done.all():
                raise H2TError(f"store {self.path}: split {split} has {int((done == 0).sum())} unwritten shards")
        self._update_meta(status=STATUS_COMPLETE,
                          completed_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    # --- derived artefacts -----------------------------------------------------------------------------
    def save_relevance(self, key: str, arrays: dict[str, np.ndarray], attrs: dict) -> None:
        """Write derived/relevance/<key>/{name} arrays; attrs (parameters, certificate) go last = committed.
        Written once per key: under a claim, and only when not already committed (jobs of a parallel sweep
        may race to compute the same scores; the loser keeps its own copy in memory).

        A read-only store (an http root) keeps nothing: the scores are recomputed next time."""
        if self.read_only:
            return
        from .claims import Claims

        claims = Claims(self.group.store, ttl_s=3600)
        unit = f"relevance/{key}"
        if not claims.try_claim(unit):
            return  # another job is writing these scores now: written once, by it
        try:
            if self.load_relevance(key) is None:  # nobody committed them meanwhile
                self._write_relevance(key, arrays, attrs)
        finally:
            claims.release(unit)

    def _write_relevance(self, key: str, arrays: dict[str, np.ndarray], attrs: dict) -> None:
        group = self.group.require_group(f"derived/relevance/{key}")
        for name, values in arrays.items():
            arr = group.create_array(name, shape=values.shape, dtype="float32", chunks=values.shape, overwrite=True)
            arr[:] = values.astype(np.float32)
        group.attrs.update(attrs)

    def load_relevance(self, key: str) -> tuple[dict[str, np.ndarray], dict] | None:
        try:
            group = self.group[f"derived/relevance/{key}"]
        except KeyError:
            return None
        if "params" not in group.attrs:  # an interrupted write: recompute
            return None
        return {name: arr[:] for name, arr in group.arrays()}, dict(group.attrs)


def _as_stored(block: np.ndarray, dtype) -> np.ndarray:
    """A block encoded for a narrower dtype than its array now has (widened meanwhile), as that dtype."""
    if block.dtype == dtype:
        return block
    if block.dtype == np.uint16:  # bfloat16 bit patterns
        return from_bfloat16_bits(block).astype(dtype)
    return block.astype(dtype)


def create_store(path: str, spec: dict, layers: list[dict], split_sizes: dict[str, int], num_classes: int,
                 class_names: list[str], shard_rows: int, dtype: str, col_chunk: int,
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
    compressors = feature_codecs(compression, np.dtype(storage_dtype(dtype)).itemsize)
    meta = {
        "schema_version": SCHEMA_VERSION, "store_id": store_id(spec), "spec": spec, "layers": layers,
        "splits": dict(split_sizes), "num_classes": int(num_classes), "class_names": list(class_names),
        "shard_rows": int(shard_rows), "dtype": dtype, "status": STATUS_CREATING, "skipped": list(skipped or []),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "created_by": f"{_user()}@{socket.gethostname()}",
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
                attributes={"h2t_encoding": "bfloat16"} if dtype == "bfloat16" else None)))
            if dtype == "int8":  # one row of scales and offsets per shard, one chunk each
                to_create.append((QUANT.key(split, layer["name"]), dict(
                    shape=(n_shards, 2 * layer["dim"]), dtype="float32", chunks=(1, 2 * layer["dim"]),
                    compressors=quant_codecs(), fill_value=0)))
        label_array = group.create_array(LABELS.key(split), shape=(n,), dtype="int64", chunks=(n,),
                                         compressors=None, overwrite=True)
        id_array = group.create_array(SAMPLE_IDS.key(split), shape=(n,), dtype=str, chunks=(n,), overwrite=True)
        if labels is not None:
            label_array[:] = labels[split]
        if sample_ids is not None:
            id_array[:] = sample_ids[split]
        group.create_array(LEDGER.key(split), shape=(n_shards,), dtype="uint8", chunks=(1,),
                           fill_value=int(all_reused), compressors=None, overwrite=True)

    async def create_all():  # concurrently: one metadata write each, ~4 ms apiece one after another
        return await asyncio.gather(*(group._async_group.create_array(key, overwrite=True, **kwargs)
                                      for key, kwargs in to_create))

    for (key, _kwargs), created in zip(to_create, zarr_sync(create_all())):
        store._arrays[key] = zarr.Array(created)  # extraction writes them next: no need to open them again
    store._update_meta(status=STATUS_WRITING)
    return store


def _copy_array(source: FeatureStore, target_path: str, target_group: zarr.Group, key: str) -> None:
    """Copy one array (metadata and every chunk object) of a complete store into a store being laid out:
    hard links on a local disk, server-side copies within one S3 endpoint, else through this process."""
    if not location.is_remote(source.path) and not location.is_remote(target_path):
        _link_tree(location.local_path(source.path) / key, location.local_path(target_path) / key)
        return
    src, dst = source.group.store, target_group.store
    prototype = default_buffer_prototype()
    src_fs, dst_fs = getattr(src, "fs", None), getattr(dst, "fs", None)
    if src_fs is not None and dst_fs is not None and "s3" in src_fs.protocol and \
            src_fs.storage_options == dst_fs.storage_options:
        # one object store: server-side copies (CopyObject), no bytes through this machine
        zarr_sync(src_fs._copy(f"{src.path}/{key}", f"{dst.path}/{key}", recursive=True))
        return

    async def copy_all():
        keys = [k async for k in src.list_prefix(f"{key}/")]

        async def one(k):
            await dst.set(k, await src.get(k, prototype=prototype))
        await asyncio.gather(*(one(k) for k in keys))

    zarr_sync(copy_all())


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


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        return "unknown"


def open_store(path: str, spec: dict | None = None, options: dict | None = None) -> FeatureStore | None:
    """Open an existing store (None if there is none); refuse one whose schema or provenance differs."""
    read_only = location.read_only_scheme(path) or (not location.is_remote(path) and _local_read_only(path))
    try:
        store = location.zarr_store(path, options, read_only=read_only)
        if not zarr_sync(store.exists("zarr.json")):
            return None
        group = zarr.open_group(store=store, mode="r" if read_only else "r+", zarr_format=3)
        meta = group.attrs["h2t"]
    except KeyError:
        if zarr_sync(store.exists("claims/create")):  # being laid out by another writer: not there yet
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
    return FeatureStore(path, group, read_only, options)


def _local_read_only(path: str) -> bool:
    local = location.local_path(path)
    return local.exists() and not os.access(local, os.W_OK)
