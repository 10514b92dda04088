"""A split of a store as an xarray Dataset backed by Dask arrays: one variable per tap (its values as
numbers: bfloat16 bits decoded, int8 codes dequantised), labels and sample ids as coordinates of `sample`, the
layer table and the spec as attributes.

Stores written with dimension names (schema.py `dimensions`) also open in plain xarray, without h2t:
`xarray.open_zarr(path, group="train/features")` (the taps as stored) and `group="train"` (labels, sample
ids, the ledger). This function adds what only h2t knows: decoding, coordinates, the layer table; it names
the dimensions itself, so stores written before they had names open the same way.
"""
from __future__ import annotations

import json
from typing import Any

import dask.array as da

from ..errors import H2TError
from . import catalog
from .schema import SAMPLE, dimensions
from .store import FeatureStore


def open_dataset(store: FeatureStore | str, split: str, root: str | None = None) -> Any:
    """`store`: an open store, a store path, or an id (or unique id prefix) under `root` (default: the
    default store root). Returns an `xarray.Dataset` (xarray is optional: `pip install xarray`)."""
    try:
        import xarray  # noqa: PLC0415 - optional: only this function needs it
    except ImportError:
        raise H2TError("open_dataset needs xarray: pip install xarray") from None
    if not isinstance(store, FeatureStore):
        store = catalog.open_resolved(catalog.resolve(store, root or catalog.default_root()))
    if split not in store.splits():
        raise H2TError(f"store {store.id} has no split {split!r} (splits: {', '.join(store.splits())})")
    info = store.info
    dtypes = store.layer_dtypes()
    variables = {}
    for layer in store.layers:
        name = layer["name"]
        values = da.from_array(store.features(split, name), chunks=(info.shard_rows, layer["dim"]),
                               name=f"h2t-{store.id}-{split}-{name}")
        if dtypes[name] == "bfloat16":
            values = values.map_blocks(lambda block, name=name: store.decode(name, block), dtype="float32")
        variables[name] = (dimensions("features", name), values)
    coords = {"label": ((SAMPLE,), store.labels(split)), "sample_id": ((SAMPLE,), store.sample_ids(split))}
    attrs = {"store_id": store.id, "split": split, "num_classes": info.num_classes,
             "class_names": list(info.class_names), "layers": json.dumps(list(store.layers)),
             "spec": json.dumps(info.spec, sort_keys=True), "dtype": info.dtype}
    return xarray.Dataset(variables, coords=coords, attrs=attrs)
