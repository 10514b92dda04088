"""An open store's shared state: its zarr group, its parsed attributes, and the arrays opened from it.

The store's jobs (reading: store.py, shard writing: writer.py, widening: widening.py, the relevance cache:
relevance.py) all work on one `StoreHandle`, so that an array opened by one is not opened again by
another, and a re-read of the attributes is seen by all of them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import zarr

from . import location, shards
from .meta import StoreMeta
from .schema import WRITE_EMPTY


class StoreHandle:
    """The group of one store and what this process has read from it. Opening an array reads and parses
    its metadata, which cost more than writing its shard: opened arrays (and their shard encoders) are
    kept until the group is opened again."""

    def __init__(self, path: str, group: zarr.Group, read_only: bool = False, options: dict | None = None):
        self.path, self.read_only = path, read_only
        self.options = options  # storage options it was opened with (credentials): others can reopen it
        self.arrays: dict = {}  # key -> opened zarr array (or an int8 tap's DequantizedArray)
        self.encoders: dict = {}  # array path -> shards.ShardEncoder, or None for layouts left to zarr
        self.group = group
        self.info = StoreMeta.parse(h2t_attrs(group))

    @property
    def attrs(self) -> dict[str, Any]:
        """attrs["h2t"] as read or last written by this process (the raw form of `info`)."""
        return h2t_attrs(self.group)

    def array(self, key: str) -> zarr.Array:
        array = self.arrays.get(key)
        if array is None:
            array = self.arrays[key] = array_at(self.group, key).with_config(WRITE_EMPTY)
        return array

    def encoder(self, array: zarr.Array) -> shards.ShardEncoder | None:
        if array.path not in self.encoders:
            self.encoders[array.path] = shards.encoder_for(array)
        return self.encoders[array.path]

    def forget_arrays(self) -> None:
        self.arrays.clear()
        self.encoders.clear()

    def write_attrs(self, **changes) -> None:
        """Change keys of attrs["h2t"] (one write of the group's metadata); others are kept as they are."""
        meta = dict(self.attrs)
        meta.update(changes)
        self.group.attrs["h2t"] = meta
        self.info = StoreMeta.parse(meta)

    def fresh_group(self) -> zarr.Group:
        """The group read again from storage (another process may have changed its attributes)."""
        return zarr.open_group(store=self.group.store, path=self.group.path, mode="r+", zarr_format=3)

    def adopt(self, group: zarr.Group) -> None:
        """Use a group read again from storage: its attributes parsed, every opened array forgotten."""
        self.group = group
        self.info = StoreMeta.parse(h2t_attrs(group))
        self.forget_arrays()

    def local_root(self) -> Path | None:
        """The store's directory on a local disk; None for remote roots."""
        return None if location.is_remote(self.path) else location.local_path(self.path)


# zarr types `group[key]` as an array or a group, and attribute values as any JSON: these say which one the
# store's layout (schema.py) puts there.
def array_at(group: zarr.Group, key: str) -> zarr.Array:
    """The array at `key` of a group."""
    node = group[key]
    assert isinstance(node, zarr.Array), f"{key} is a group, not an array"
    return node


def group_at(group: zarr.Group, key: str) -> zarr.Group:
    """The group at `key` of a group."""
    node = group[key]
    assert isinstance(node, zarr.Group), f"{key} is an array, not a group"
    return node


def read_all(array: zarr.Array) -> np.ndarray:
    """Every value of an array (zarr types a read as an array or a scalar)."""
    return cast(np.ndarray, array[:])


def h2t_attrs(group: zarr.Group) -> dict[str, Any]:
    """A store group's attrs["h2t"]: a JSON object (schema.py's ATTRS)."""
    return cast("dict[str, Any]", group.attrs["h2t"])
