"""Shard writing: one extraction batch of every computed tap as whole shard objects, then its ledger entry.

Each shard is encoded in the calling thread by pipeline/storage/shards.py from the array's own metadata
and written as one object (a temp file renamed into place on a local root, one put elsewhere); the ledger
entry is written last, so a shard marked done is fully on storage.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass

import numpy as np
import zarr

from ..errors import H2TError
from . import location, shards, zarr_compat
from .handle import StoreHandle, read_all
from .quant import QuantizedBlock
from .schema import FEATURES, LEDGER, QUANT, STATUS_COMPLETE, from_bfloat16_bits
from .widening import Widening


@dataclass
class WriterTimes:
    """Where a store's writes spent their time: `cpu_s` / `wall_s` summed over the writer threads' shards (a
    ratio below 1 is time a writer waited: for the GIL, a lock or the disk), and `submit_wait_s`, the main
    thread's wait for a free writer (a stage faster than its writes waits here)."""
    shards: int = 0
    cpu_s: float = 0.0
    wall_s: float = 0.0
    submit_wait_s: float = 0.0

    def add(self, cpu_s: float, wall_s: float) -> None:
        self.shards += 1
        self.cpu_s += cpu_s
        self.wall_s += wall_s


class ShardWriter:
    """Writes rows of one store in whole shards. Many threads may share one writer."""

    def __init__(self, handle: StoreHandle, widening: Widening):
        self.handle, self.widening = handle, widening

    def write_rows(self, split: str, start: int, blocks: list[np.ndarray], dtypes: dict | None = None) -> None:
        """Write one shard of rows for every computed layer, then mark the shard done in the ledger.

        `dtypes`: the storage dtype each block was cast to; when a tap was widened since (or is being
        widened while this shard is written), `StaleShard` is raised and the shard is not marked done."""
        handle = self.handle
        if handle.info.complete:
            raise H2TError(f"store {handle.path} is complete and immutable")
        self.widening.check_current(split, start, dtypes)
        info = handle.info
        shard = start // info.shard_rows
        for layer, block in zip(info.computed_layers, blocks):
            array = handle.array(FEATURES.key(split, layer["name"]))
            if isinstance(block, QuantizedBlock):  # its scales and offsets first: codes never lack them
                self.write_shard(handle.array(QUANT.key(split, layer["name"])), shard, block.params[None])
                block = block.codes
            self.write_shard(array, shard, _as_stored(block, array.dtype))
        self.widening.check_current(split, start, dtypes)  # a widening began or ended while this shard was written
        self.write_shard(handle.array(LEDGER.key(split)), shard, np.ones(1, np.uint8))

    def write_shard(self, array: zarr.Array, shard: int, block: np.ndarray) -> None:
        """Rows [shard * shard_rows, ...) of `array`, every column, as one object (pipeline/storage/shards.py):
        encoded in this thread with the array's codecs, all-zero blocks included; arrays of another layout
        go through zarr (and its codec pipeline's handling of empty chunks)."""
        handle = self.handle
        encoder = handle.encoder(array)
        if encoder is None:
            rows = array.chunks[0]
            array[shard * rows:shard * rows + len(block)] = block
            return
        chunk_key, parts = encoder.encode(shard, block)
        key = f"{array.path}/{chunk_key}"
        if location.is_remote(handle.path):
            zarr_compat.run(zarr_compat.set_bytes(handle.group.store, key, shards.as_bytes(parts)))
        else:
            shards.write_local(str(location.local_path(handle.path)), key, parts)

    def mark_complete(self) -> None:
        """Record the store complete: every shard of every split is marked written, or H2TError."""
        handle = self.handle
        for split in handle.info.splits:
            done = read_all(handle.array(LEDGER.key(split)))
            if not done.all():
                raise H2TError(f"store {handle.path}: split {split} has {int((done == 0).sum())} unwritten shards")
        handle.write_attrs(status=STATUS_COMPLETE,
                           completed_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))


def _as_stored(block: np.ndarray, dtype) -> np.ndarray:
    """A block encoded for a narrower dtype than its array now has (widened meanwhile), as that dtype."""
    if block.dtype == dtype:
        return block
    if block.dtype == np.uint16:  # bfloat16 bit patterns
        return from_bfloat16_bits(block).astype(dtype)
    return block.astype(dtype)
