"""Stores that the Zarr ecosystem opens (pipeline/storage/dataset.py): plain xarray opens a split's groups
by their dimension names, `pipeline.open_dataset` gives the values as numbers with labels and sample ids as
coordinates, stores written before dimension names open the same way, and the names change no store id."""
import json
from pathlib import Path

import numpy as np
import pytest
import xarray

import pipeline
from pipeline.extract import extract
from pipeline.storage.catalog import verify
from pipeline.storage.store import open_store
from tests.conftest import tiny_job


@pytest.fixture(scope="module", params=["float16", "int8", "bfloat16"])
def store(request, tmp_path_factory):
    return extract(tiny_job(tmp_path_factory.mktemp(request.param), **{"store.dtype": request.param})).store


def test_plain_xarray_opens_a_split_without_h2t(store):
    features = xarray.open_zarr(store.path, group="train/features", consolidated=False)
    assert set(features.data_vars) == {layer["name"] for layer in store.layers}
    for layer in store.layers[:3]:
        variable = features[layer["name"]]
        assert variable.dims == ("sample", f"{layer['name']}.feature") and variable.chunks is not None  # Dask-backed
        np.testing.assert_array_equal(variable.values, store.stored_features("train", layer["name"])[:])
    split = xarray.open_zarr(store.path, group="train", consolidated=False)
    np.testing.assert_array_equal(split["labels"].values, store.labels("train"))
    assert list(split["sample_ids"].values) == list(store.sample_ids("train")) and split["shards_done"].dims == ("shard",)


def test_open_dataset_gives_numbers_with_labels_and_ids_as_coordinates(store):
    ds = pipeline.open_dataset(store, "test")
    assert ds.attrs["store_id"] == store.id and json.loads(ds.attrs["layers"]) == json.loads(json.dumps(store.layers))
    np.testing.assert_array_equal(ds["label"].values, store.labels("test"))
    assert list(ds["sample_id"].values) == list(store.sample_ids("test"))
    for layer in store.layers:
        expected = store.decode(layer["name"], np.asarray(store.features("test", layer["name"])[:]))
        values = ds[layer["name"]].values
        assert values.dtype != np.uint16  # bfloat16 bits come back as numbers
        np.testing.assert_array_equal(values, expected)
    by_id = pipeline.open_dataset(store.id[:10], "test", root=str(Path(store.path).parents[2]))
    np.testing.assert_array_equal(by_id[store.layers[0]["name"]].values, ds[store.layers[0]["name"]].values)


def test_a_store_without_dimension_names_opens_the_same_and_verifies(tmp_path):
    job = tiny_job(tmp_path)
    store = extract(job).store
    before = pipeline.open_dataset(store, "train")
    for meta in Path(store.path).rglob("zarr.json"):
        doc = json.loads(meta.read_text())
        if doc.pop("dimension_names", None) is not None:
            meta.write_text(json.dumps(doc))
    old = open_store(store.path)
    assert old.id == store.id and verify(old) == []
    with pytest.raises(KeyError, match="dimension_names"):
        xarray.open_zarr(store.path, group="train/features", consolidated=False)  # what plain xarray said before
    after = pipeline.open_dataset(old, "train")
    for name in before.data_vars:
        np.testing.assert_array_equal(after[name].values, before[name].values)
    assert extract(job).store.id == store.id  # the names are layout: the same store is found again
