"""Growing stores: a new store takes the taps it shares with complete stores of the same backbone and data.

Stores of one backbone + weights + preprocessing + dataset + dtype differ only in their taps and pooling.
A layer's columns are fixed by its name, raw shape and `column_recipe` (pooling rule, kernel, CLS mode), so
a layer whose key is found in a complete sibling store (same `<root>/<model>/<dataset>/` folder) is copied
from it byte for byte instead of being computed: asking for more taps or another target size computes only
the layers that are new. Copies are hard links on a local disk (no extra space; complete stores are never
written again), server-side copies within one S3 endpoint (no bytes through this machine), and object copies
elsewhere. The new store keeps the siblings' shard size so its ledger and arrays line up, and records
`reused_from` per layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import H2TError
from ..pooling import column_recipe
from . import location, zarr_compat
from .schema import canonical_json
from .store import FeatureStore, open_store

VARIABLE_KEYS = ("taps", "pooling")  # what stores of one family may differ in


@dataclass
class Reuse:
    """Which layers of a planned store come from which complete store, and the shard size they imply."""
    sources: dict[str, FeatureStore] = field(default_factory=dict)
    shard_rows: int | None = None

    def covers(self, layers: list[dict]) -> bool:
        return all(layer["name"] in self.sources for layer in layers)

    def summary(self) -> str:
        by_store: dict[str, int] = {}
        for source in self.sources.values():
            by_store[source.id] = by_store.get(source.id, 0) + 1
        return ", ".join(f"{n} taps from {sid}" for sid, n in by_store.items())


def family(spec: dict) -> str:
    """Everything but taps and pooling: stores with equal families ran the same forward on the same rows."""
    return canonical_json({k: v for k, v in spec.items() if k not in VARIABLE_KEYS})


def layer_key(layer: dict, pooling: dict) -> str:
    recipe = column_recipe(tuple(layer["raw_shape"]), pooling["target_size"], pooling["rule"], pooling["cls_token"])
    return canonical_json([layer["name"], layer["raw_shape"], recipe])


def sibling_paths(path: str, options: dict | None) -> list[str]:
    """Other stores in the folder a store path lives in (none for http roots, which cannot be listed)."""
    if location.read_only_scheme(path):
        return []
    parent, _, own = str(path).rstrip("/").rpartition("/")
    if location.is_remote(path):
        folder = location.zarr_store(parent, options, read_only=True)
        try:
            found = [name.rstrip("/") for name in zarr_compat.collect(folder.list_dir(""))]
        except Exception:  # noqa: BLE001 - nothing listed: nothing reused, the extraction still runs
            return []
    else:
        folder_path = location.local_path(parent)
        found = [p.name for p in folder_path.iterdir()] if folder_path.is_dir() else []
    return sorted(location.join(parent, name) for name in found if name.endswith(".zarr") and name != own)


def find_reuse(spec: dict, path: str, layers: list[dict], options: dict | None = None) -> Reuse:
    """The complete siblings that hold some of `layers` with identical numbers; most-covering store first."""
    wanted = {layer_key(layer, spec["pooling"]): layer["name"] for layer in layers}
    candidates = []
    for sibling in sibling_paths(path, options):
        try:
            store = open_store(sibling, None, options)
        except H2TError:
            continue  # another schema or not a store: not a source
        if store is None or not store.complete or family(store.info.spec) != family(spec):
            continue
        pooling = store.info.spec["pooling"]
        matches = {wanted[key] for key in (layer_key(layer, pooling) for layer in store.layers) if key in wanted}
        if matches:
            candidates.append((len(matches), store.info.completed_at or "", store, matches))
    reuse = Reuse()
    for _n, _at, store, matches in sorted(candidates, key=lambda c: (-c[0], c[1])):
        if reuse.shard_rows is None:
            reuse.shard_rows = store.info.shard_rows
        if store.info.shard_rows != reuse.shard_rows:
            continue  # its shards would not line up with the ledger
        for name in matches:
            reuse.sources.setdefault(name, store)
    return reuse


def reused_layer(layer: dict, source: FeatureStore) -> dict:
    """The layer table entry of a copied layer: the source's stored dtype, and where it came from."""
    entry = dict(layer, reused_from=source.id)
    own = next(l for l in source.layers if l["name"] == layer["name"])
    if "dtype" in own:
        entry["dtype"] = own["dtype"]
    return entry
