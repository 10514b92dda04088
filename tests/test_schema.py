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
from pipeline.storage.store import create_store, open_store
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


@pytest.mark.parametrize("dtype, columns", [("float16", 256), ("bfloat16", 256), ("int8", 512), ("float32", 128)])
def test_inner_chunks_hold_512_bytes_per_row_unless_col_chunk_says_otherwise(tmp_path, dtype, columns):
    layers = [{"name": "wide", "role": "t", "raw_shape": [1500], "dim": 1500, "offset": 0},
              {"name": "narrow", "role": "t", "raw_shape": [40], "dim": 40, "offset": 1500}]
    X = np.random.default_rng(0).random((8, 1540)).astype(np.float32)
    read = []
    for col_chunk, width in ((None, columns), (100, 100)):
        store = create_store(str(tmp_path / f"{col_chunk}.zarr"), {"model": {"name": "m"}, "dataset": {"name": "d"}},
                             layers, {"train": 8}, 2, ["a", "b"], 8, dtype, col_chunk, "auto")
        assert store.stored_features("train", "wide").chunks == (8, width)
        assert store.stored_features("train", "narrow").chunks == (8, 40)  # never wider than the tap
        store.write_rows("train", 0, [store.encode("wide", X[:, :1500], dtype), store.encode("narrow", X[:, 1500:], dtype)])
        read.append([store.features("train", name)[:] for name in ("wide", "narrow")])
    for a, b in zip(*read):  # layout, not numbers
        assert a.dtype == b.dtype and np.array_equal(a, b)


@pytest.mark.parametrize("bad", [0, -256, 2.5, True])
def test_a_bad_col_chunk_is_named(tmp_path, bad):
    layers = [{"name": "t", "role": "t", "raw_shape": [8], "dim": 8, "offset": 0}]
    with pytest.raises(H2TError, match="store.col_chunk"):
        create_store(str(tmp_path / "s.zarr"), {"model": {"name": "m"}, "dataset": {"name": "d"}}, layers,
                     {"train": 8}, 2, ["a", "b"], 8, "int8", bad, "auto")
    assert not (tmp_path / "s.zarr").exists()  # refused before anything is laid out
