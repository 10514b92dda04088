"""A store's attributes (attrs["h2t"], declared in schema.py's ATTRS) as a typed, read-only object.

`StoreMeta.parse` is called when a store is opened or created and again whenever this process writes or
re-reads the attributes; readers use its fields instead of looking keys up in the raw dict.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Mapping

from .schema import STATUS_COMPLETE


@dataclass(frozen=True)
class StoreMeta:
    """attrs["h2t"] parsed. Its containers are copies of the attributes: changing them changes nothing
    stored (the attributes are written through `StoreHandle.write_attrs`)."""
    schema_version: int
    id: str
    status: str
    spec: dict
    layers: tuple[dict, ...]
    splits: dict[str, int]
    num_classes: int
    class_names: tuple[str, ...]
    shard_rows: int
    dtype: str  # the store dtype asked for; a widened tap's own dtype is in its layer entry
    skipped: tuple[dict, ...] = ()
    created_at: str | None = None
    created_by: str | None = None
    completed_at: str | None = None
    widened: tuple[str, ...] = ()  # taps re-created as float32 (their values overflowed the store dtype)
    widening: str | None = None  # the tap another writer is widening now
    extra: dict = field(default_factory=dict)  # keys this code does not know (kept when it writes)

    @classmethod
    def parse(cls, attrs: Mapping[str, Any]) -> StoreMeta:
        """The attributes as written (check_attrs has accepted them, or create_store built them)."""
        attrs = copy.deepcopy(dict(attrs))
        known = {"schema_version", "store_id", "status", "spec", "layers", "splits", "num_classes", "class_names",
                 "shard_rows", "dtype", "skipped", "created_at", "created_by", "completed_at", "widened", "widening"}
        return cls(
            schema_version=int(attrs["schema_version"]), id=str(attrs["store_id"]), status=str(attrs["status"]),
            spec=attrs["spec"], layers=tuple(attrs["layers"]),
            splits={str(k): int(v) for k, v in attrs["splits"].items()}, num_classes=int(attrs["num_classes"]),
            class_names=tuple(str(c) for c in attrs["class_names"]), shard_rows=int(attrs["shard_rows"]),
            dtype=str(attrs.get("dtype") or attrs["spec"]["dtype"]),
            skipped=tuple(attrs.get("skipped") or ()),
            created_at=attrs.get("created_at"), created_by=attrs.get("created_by"),
            completed_at=attrs.get("completed_at"), widened=tuple(attrs.get("widened") or ()),
            widening=attrs.get("widening") or None, extra={k: v for k, v in attrs.items() if k not in known})

    @property
    def complete(self) -> bool:
        return self.status == STATUS_COMPLETE

    @cached_property
    def n_features(self) -> int:
        return sum(layer["dim"] for layer in self.layers)

    @cached_property
    def computed_layers(self) -> tuple[dict, ...]:
        """The layers extraction writes: all but those copied from another store (storage/reuse.py)."""
        return tuple(layer for layer in self.layers if "reused_from" not in layer)

    @cached_property
    def _layer_dtypes(self) -> dict[str, str]:
        return {layer["name"]: layer.get("dtype") or self.dtype for layer in self.layers}

    def layer_dtypes(self) -> dict[str, str]:
        """Each tap's stored dtype: the store's, or float32 where a tap was widened."""
        return dict(self._layer_dtypes)

    def n_shards(self, split: str) -> int:
        return -(-self.splits[split] // self.shard_rows)
