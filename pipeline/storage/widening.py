"""The widening protocol: a tap whose values overflow the store dtype is re-created as float32 while other
writers keep writing the store.

The widening runs under the store's `widen` claim (one at a time; the attributes' read-modify-write is only
ever done under it). It first announces itself (attrs["widening"]), after which no writer claims a shard,
waits until no other process holds a shard claim, copies the tap's arrays as float32 and records the new
dtype in the layer table and the tap in attrs["widened"]; the spec (and so the id) keeps the dtype asked
for. Writers check before and after each shard (`Widening.check_current`): a shard cast with old dtypes,
or whose write overlapped a widening, raises `StaleShard`, is not marked done, and is computed again.
"""
from __future__ import annotations

import os
import re
import time
from typing import TYPE_CHECKING

import numpy as np

from ..errors import H2TError
from .claims import Claims
from .handle import StoreHandle, h2t_attrs, read_all
from .schema import FEATURES, LEDGER, decode_values

if TYPE_CHECKING:  # annotations only: writer.py imports this module
    from .writer import ShardWriter

SHARD_CLAIM = re.compile(r"^(?!views/|relevance/)[^/]+/\d+$")  # claims/<split>/<shard>


class StaleShard(Exception):
    """A shard written across another writer's widening of a tap: not marked done, it is computed again."""


class WideningElsewhere(Exception):
    """Another process holds the store's widening, and it waits until no other process holds a shard: the
    writer that needs a widening too gives its shards up first (`widen_layer(..., wait=False)`)."""


class Widening:
    """Widens taps of one store and tells its writers whether a widening began or ended under them."""

    def __init__(self, handle: StoreHandle):
        self.handle = handle
        self._attrs_stat: tuple = ()  # (inode, mtime, size) of the attributes file last followed

    def widen_layer(self, layer: str, writer: ShardWriter, claims: Claims | None = None,
                    poll_s: float = 0.2, wait: bool = True) -> None:
        """Re-create one tap's arrays as float32 (its activations overflow the store dtype), keeping the
        written rows (rewritten through `writer`); see the module docstring for the protocol.

        While another process widens, this call waits for it (`wait`) or raises `WideningElsewhere`: a
        caller that holds shard claims must not wait here, since that widening waits for its claims."""
        handle = self.handle
        claims = claims or Claims(handle.group.store, ttl_s=3600)
        while not claims.try_claim("widen"):
            if not wait:
                raise WideningElsewhere(f"tap {layer}: another writer is widening a tap of {handle.path}")
            time.sleep(poll_s)
        try:
            with claims.kept("widen"):
                self._widen(layer, writer, claims, poll_s)
        finally:
            claims.release("widen")

    def _widen(self, layer: str, writer: ShardWriter, claims: Claims, poll_s: float) -> None:
        """The widening itself, under the `widen` claim."""
        handle = self.handle
        handle.adopt(handle.fresh_group())
        dtype = handle.info.layer_dtypes()[layer]
        if dtype == "float32":
            return  # another writer widened it meanwhile
        if dtype == "int8":
            raise H2TError(f"tap {layer}: int8 taps are quantised per shard and never widened")
        handle.write_attrs(widening=layer)
        while claims.held_by_others(SHARD_CLAIM):
            time.sleep(poll_s)  # writes in flight elsewhere finish (and are found stale) first
        for split in handle.info.splits:
            old = handle.array(FEATURES.key(split, layer))
            data = decode_values(read_all(old), dtype).astype(np.float32)
            new = handle.group.create_array(old.path, shape=old.shape, dtype="float32", chunks=old.chunks,
                                            shards=old.shards, compressors=old.compressors, fill_value=0,
                                            chunk_key_encoding=getattr(old.metadata, "chunk_key_encoding", None),
                                            dimension_names=getattr(old.metadata, "dimension_names", None),
                                            overwrite=True)
            handle.forget_arrays()  # the encoder of the old dtype
            rows, done = old.chunks[0], read_all(handle.array(LEDGER.key(split)))
            for shard, r0 in enumerate(range(0, len(data), rows)):
                if done[shard]:  # shards not yet written stay absent
                    writer.write_shard(new, shard, data[r0:r0 + rows])
        handle.forget_arrays()
        info = handle.info
        layers = [dict(entry, dtype="float32") if entry["name"] == layer else entry for entry in info.layers]
        handle.write_attrs(layers=layers, widened=sorted(set(info.widened) | {layer}), widening=None)

    def in_progress(self) -> bool:
        """True while another writer widens a tap (fresh attributes: one small read)."""
        self.follow()
        return bool(self.handle.info.widening)

    def check_current(self, split: str, start: int, dtypes: dict | None) -> None:
        """StaleShard when a tap is being widened, or was widened since the shard's blocks were cast with
        `dtypes` (tap -> storage dtype)."""
        self.follow()
        info = self.handle.info
        current = info.layer_dtypes()
        if info.widening or (dtypes is not None and any(
                dtypes.get(layer["name"], current[layer["name"]]) != current[layer["name"]]
                for layer in info.computed_layers)):
            raise StaleShard(f"{split} rows {start}..: a tap is being or was widened; computed again")

    def follow(self) -> None:
        """Another writer may be widening, or have widened, a tap since this store was opened: one read of
        the group's attributes tells, and then the arrays are opened again. On a local root the attributes'
        file is read only when its stat changed."""
        handle = self.handle
        root = handle.local_root()
        if root is not None:
            stat = os.stat(root / handle.group.path / "zarr.json")
            if (stat.st_ino, stat.st_mtime_ns, stat.st_size) == self._attrs_stat:
                return
            self._attrs_stat = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        fresh = handle.fresh_group()
        meta, known = h2t_attrs(fresh), handle.attrs
        if (meta.get("widened"), meta.get("widening")) != (known.get("widened"), known.get("widening")):
            handle.adopt(fresh)
