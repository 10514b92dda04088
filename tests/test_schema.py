"""The store schema as code (pipeline/storage/schema.py): open checks the attributes, verify the arrays,
and the compute precision is part of a store's identity."""
import shutil

import numpy as np
import pytest
import zarr
from omegaconf.errors import ValidationError

from pipeline.errors import H2TError
from pipeline.extract import extract, plan_store
from pipeline.storage import CODEC_PIPELINES, catalog, zarr_compat
from pipeline.storage.schema import ATTRS, expected_arrays
from pipeline.storage.store import open_store
from tests.conftest import make_store, tiny_cfg, tiny_job


@pytest.fixture
def store(tmp_path, rng):
    X = {"train": rng.random((32, 12)).astype(np.float32), "test": rng.random((16, 12)).astype(np.float32)}
    y = {s: (x[:, 0] > 0.5).astype(np.int64) for s, x in X.items()}
    return make_store(tmp_path / "s.zarr", X, y, 2, spec={"widths": [4, 8]})


def test_every_array_the_attributes_promise_exists_with_its_shape_and_dtype(store):
    promised = expected_arrays(store.meta)
    assert len(promised) == 2 * (2 + 3)  # per split: two taps, labels, ids, ledger
    for key, (shape, dtype) in promised.items():
        assert tuple(store.group[key].shape) == shape
    assert catalog.verify(store) == []


def test_verify_names_a_missing_array(store):
    shutil.rmtree(f"{store.path}/test/features/layer1")
    problems = catalog.verify(open_store(store.path))
    assert problems == ["test/features/layer1: missing array"]


def test_open_refuses_attributes_that_do_not_follow_the_schema(store):
    meta = dict(store.meta)
    del meta["shard_rows"]
    store.group.attrs["h2t"] = meta
    with pytest.raises(H2TError, match=r"does not follow the h2t schema: .*'shard_rows'"):
        open_store(store.path)
    assert set(ATTRS) <= set(store.meta) | {"shard_rows"}


def test_compute_precision_is_in_the_id_only_when_not_float32(tmp_path):
    base = plan_store(tiny_job(tmp_path))
    assert plan_store(tiny_job(tmp_path, **{"model.precision": "float32"})).spec == base.spec
    bf16 = plan_store(tiny_job(tmp_path, **{"model.precision": "bfloat16"}))
    assert bf16.spec["model"]["precision"] == "bfloat16" and bf16.path != base.path
    with pytest.raises(ValidationError, match="expected one of \\[float32, bfloat16, float16\\]"):
        tiny_cfg(tmp_path, **{"model.precision": "int8"})  # refused by the schema, when composed
    result = extract(tiny_job(tmp_path, **{"model.precision": "bfloat16", "data.sizes.train": 16,
                                            "data.sizes.val": 4, "data.sizes.test": 4}))
    assert result.store.complete and result.backbone_images == 24
    values = result.store.features("train", result.store.layers[-1]["name"])[:]
    assert np.isfinite(values.astype(np.float32)).all() and np.abs(values.astype(np.float32)).sum() > 0


def test_a_store_is_standard_zarr_v3_that_zarr_python_alone_reads(tmp_path):
    """Written through the Rust codec pipeline with the default codecs (Blosc lz4 + CRC32C, sharded), read
    back through zarr-python's own pipeline and plain zarr.open_group: the same values."""

    store = extract(tiny_job(tmp_path)).store
    ours = {layer["name"]: store.features("test", layer["name"])[:] for layer in store.layers}
    assert zarr_compat.codec_pipeline() == "zarrs" and any(v.any() for v in ours.values())  # conftest's configure_io
    with zarr.config.set({"codec_pipeline.path": CODEC_PIPELINES["zarr"]}):
        group = zarr.open_group(store.path, mode="r")
        assert group.attrs["h2t"]["store_id"] == store.id
        for name, values in ours.items():
            array = group[f"test/features/{name}"]
            assert array.metadata.zarr_format == 3
            assert np.array_equal(array[:], values), name
