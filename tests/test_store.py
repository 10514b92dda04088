import shutil
from collections import namedtuple
from dataclasses import replace

import numpy as np
import pytest
import torch
from omegaconf.errors import ValidationError

import pipeline.extract as extract_module
from pipeline.backbone import build_model
from pipeline.config import OnIncomplete
from pipeline.errors import H2TError
from pipeline.extract import extract, plan_store, planned_bytes, wait_for_store
from pipeline.head import read_columns
from pipeline.score.matrix import FeatureMatrix
from pipeline.storage.catalog import verify
from pipeline.storage.store import STATUS_WRITING, create_store, from_bfloat16_bits, open_store, to_bfloat16_bits
from pipeline.taps import TappedForward, select_taps
from tests.conftest import make_store, tiny_cfg, tiny_job


def test_extract_fills_every_split_then_reuses_the_store(tmp_path):
    cfg = tiny_cfg(tmp_path)
    first = extract(cfg.extract_job())
    store = first.store
    assert first.backbone_images == 68 and store.complete
    assert store.splits() == {"train": 40, "val": 8, "test": 20}
    assert store.shards_done("train").all()
    for layer in store.layers:
        arr = store.features("test", layer["name"])
        assert arr.shape == (20, layer["dim"]) and arr.dtype == np.float16
        assert np.abs(arr[:]).sum() > 0, layer["name"]
    np.testing.assert_array_equal(store.labels("train"), plan_store(cfg.extract_job()).dataset.splits["train"].labels)
    again = extract(cfg.extract_job())
    assert again.backbone_images == 0 and again.store.id == store.id


def test_extracted_features_equal_a_direct_forward(tmp_path):
    cfg = tiny_cfg(tmp_path, **{"store.dtype": "float32"})
    plan = plan_store(cfg.extract_job())
    store = extract(cfg.extract_job(), plan).store
    model = build_model(cfg.model)
    runner = TappedForward(model, select_taps(model), 128)
    x = plan.preprocess(plan.dataset.splits["val"].load(0, 8), torch.device("cpu"))
    with torch.inference_mode():
        direct = runner(x)
    for layer, expected in zip(store.layers, direct):
        np.testing.assert_allclose(store.features("val", layer["name"])[:], expected.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("knob,value", [
    ("pooling.target_size", 256), ("store.dtype", "float32"), ("store.dtype", "bfloat16"), ("model.input_size", 48),
    ("model.seed", 1), ("data.seed", 1), ("model.resize", "squash"), ("model.interpolation", "nearest"),
    ("pooling.cls_token", "only"), ("model.crop_pct", 0.5), ("model.kwargs", {"drop_rate": 0.5}), ("taps.include", ["act1", "logits"]), ("model.mean", [0.4, 0.4, 0.4]),
])
def test_every_knob_that_changes_numbers_changes_the_id(tmp_path, knob, value):
    base = plan_store(tiny_job(tmp_path))
    changed = plan_store(tiny_job(tmp_path, **{knob: value}))
    assert changed.path != base.path


def test_file_url_root_is_the_local_directory(tmp_path):
    plain = plan_store(tiny_job(tmp_path))
    as_url = plan_store(tiny_job(tmp_path, **{"store.root": f"file://{tmp_path / 'stores'}"}))
    assert as_url.path == plain.path


def test_layout_knobs_do_not_change_the_id(tmp_path):
    base = plan_store(tiny_job(tmp_path))
    assert plan_store(tiny_job(tmp_path, **{"extract.batch_size": 8, "store.col_chunk": 64})).path == base.path


def test_store_with_other_provenance_is_refused(tmp_path, rng):
    store = make_store(tmp_path / "s.zarr", {"train": rng.random((8, 4)), "test": rng.random((4, 4))},
                       {"train": np.zeros(8, int), "test": np.zeros(4, int)}, 2)
    assert open_store(store.path, store.meta["spec"]).id == store.id
    with pytest.raises(H2TError, match="provenance differs"):
        open_store(store.path, {**store.meta["spec"], "dtype": "float16"})


def test_complete_store_refuses_writes_and_incomplete_cannot_complete(tmp_path, rng):
    store = make_store(tmp_path / "s.zarr", {"train": rng.random((8, 4)), "test": rng.random((4, 4))},
                       {"train": np.zeros(8, int), "test": np.zeros(4, int)}, 2)
    with pytest.raises(H2TError, match="immutable"):
        store.write_rows("train", 0, [np.zeros((8, 4), np.float32)])
    layers = [{"name": "l", "role": "t", "raw_shape": [4], "dim": 4, "offset": 0}]
    partial = create_store(str(tmp_path / "p.zarr"), {"model": {"name": "m"}, "dataset": {"name": "d"}}, layers,
                           {"train": 32}, 2, ["a", "b"], 16, "float32", 4, "none")
    partial.write_rows("train", 0, [np.ones((16, 4), np.float32)])
    assert partial.meta["status"] == STATUS_WRITING
    with pytest.raises(H2TError, match="1 unwritten shards"):
        partial.mark_complete()


def test_non_finite_activations_are_never_stored(tmp_path):
    cfg = tiny_cfg(tmp_path, **{"model.mean": [1e30, 1e30, 1e30], "model.std": [1e-30, 1e-30, 1e-30]})
    with pytest.raises(H2TError, match="tap act1"):
        extract(cfg.extract_job())
    store = open_store(plan_store(cfg.extract_job()).path)
    assert store is not None and not store.complete


def test_interrupted_extraction_resumes_from_the_ledger(tmp_path):
    cfg = tiny_cfg(tmp_path)
    plan = plan_store(cfg.extract_job())
    reference = extract(tiny_job(tmp_path / "ref")).store
    store = create_store(plan.path, plan.spec, plan.layers, {s: len(v) for s, v in plan.dataset.splits.items()},
                         plan.dataset.num_classes, plan.dataset.class_names, 16, "float16", 32, "zstd")
    for name, split in plan.dataset.splits.items():
        store.group[f"{name}/labels"][:] = split.labels
        store.group[f"{name}/sample_ids"][:] = split.ids
    first_shard = [reference.features("train", l["name"])[:16] for l in reference.layers]
    store.write_rows("train", 0, first_shard)
    resumed = extract(cfg.extract_job(), plan)
    assert resumed.backbone_images == 68 - 16
    for layer in reference.layers:
        np.testing.assert_array_equal(resumed.store.features("train", layer["name"])[:],
                                      reference.features("train", layer["name"])[:])


def test_preflight_refuses_a_destination_without_space(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path)
    plan = plan_store(cfg.extract_job())
    need = sum(sum(t.values()) for t in planned_bytes(plan).values())
    assert need == sum(n for n in plan.spec["dataset"]["splits"].values()) * sum(l["dim"] for l in plan.layers) * 2
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(need, need, need // 2))
    with pytest.raises(H2TError, match="not enough space"):
        extract(cfg.extract_job())
    assert open_store(plan.path) is None  # nothing was laid out


def test_float16_overflow_is_named_or_widened(tmp_path):
    # a huge std makes the stem activations exceed float16's range (65504) without being inf in float32
    cfg = tiny_cfg(tmp_path, **{"model.mean": [0.0, 0.0, 0.0], "model.std": [1.5e-6, 1.5e-6, 1.5e-6]})
    with pytest.raises(H2TError, match="beyond float16.*store.on_overflow=widen"):
        extract(cfg.extract_job())
    widened = extract(tiny_job(tmp_path, **{"model.mean": [0.0, 0.0, 0.0], "model.std": [1.5e-6, 1.5e-6, 1.5e-6],
                                          "store.on_overflow": "widen"}))
    store = widened.store
    assert store.complete and store.meta["widened"]
    for name in store.meta["widened"]:
        arr = store.features("train", name)
        assert arr.dtype == np.float32 and np.abs(arr[:]).max() > 65504
    untouched = [l["name"] for l in store.layers if l["name"] not in store.meta["widened"]]
    assert untouched and all(store.features("test", n).dtype == np.float16 for n in untouched)
    assert widened.backbone_images == 68


def test_probe_policy_on_a_store_being_written(tmp_path):
    job = tiny_job(tmp_path, **{"probe.on_incomplete": "error", "probe.wait_s": 1})
    plan = plan_store(job)
    store = create_store(plan.path, plan.spec, plan.layers, {s: len(v) for s, v in plan.dataset.splits.items()},
                         plan.dataset.num_classes, plan.dataset.class_names, 16, "float16", 32, "zstd")
    with pytest.raises(H2TError, match=r"being written \(0 of 6 shards\)"):
        wait_for_store(job, plan)
    waiting = replace(job, on_incomplete=OnIncomplete.wait)
    ticks = iter(range(100))
    with pytest.raises(H2TError, match="being written"):  # waited past wait_s
        wait_for_store(waiting, plan, clock=lambda: next(ticks), sleep=lambda _s: None)
    extract(tiny_job(tmp_path), plan)  # someone finishes it
    wait_for_store(waiting, plan)  # returns at once: complete
    with pytest.raises(ValidationError, match="expected one of \\[extract, wait, error\\]"):
        tiny_cfg(tmp_path, **{"probe.on_incomplete": "maybe"})  # the schema refuses it
    assert store.path == plan.path


def test_bfloat16_bits_round_to_nearest_even_like_torch():
    rng = np.random.default_rng(0)
    values = np.concatenate([
        rng.standard_normal(10_000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 10_000),
        np.array([0.0, -0.0, 1.0, 1.00390625, 1.01171875, 65504.0, 3.0e38, -3.0e38, 1e-40], np.float32),
    ]).astype(np.float32)
    expected = torch.from_numpy(values).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(from_bfloat16_bits(to_bfloat16_bits(values)), expected)


def test_bfloat16_store_holds_the_rounded_float32_values(tmp_path):
    exact = extract(tiny_job(tmp_path, **{"store.dtype": "float32"})).store
    store = extract(tiny_job(tmp_path, **{"store.dtype": "bfloat16"})).store
    assert store.id != exact.id and store.complete and verify(store) == []
    for layer in store.layers:
        raw = store.features("test", layer["name"])
        assert raw.dtype == np.uint16 and raw.attrs["h2t_encoding"] == "bfloat16"
        expected = torch.from_numpy(exact.features("test", layer["name"])[:]).to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(store.decode(layer["name"], raw[:]), expected)
    # readers see numbers, not bit patterns: the scoring matrix and the head's columns match float32's closely
    dense, rounded = FeatureMatrix(exact, "train", 2**30), FeatureMatrix(store, "train", 2**30)
    np.testing.assert_allclose(rounded.columns(np.arange(rounded.D)), dense.columns(np.arange(dense.D)), atol=2e-2)
    plan = {layer["name"]: np.arange(min(3, layer["dim"])) for layer in store.layers[:4]}
    np.testing.assert_allclose(read_columns(store, "val", plan), read_columns(exact, "val", plan), rtol=1e-2, atol=1e-2)


def test_code_schema_version_is_in_the_id_and_other_versions_are_refused(tmp_path, monkeypatch):
    store = extract(tiny_job(tmp_path)).store
    monkeypatch.setattr(extract_module, "SCHEMA_VERSION", 2)  # what the next schema's code would plan
    assert plan_store(tiny_job(tmp_path)).spec["schema_version"] == 2
    assert plan_store(tiny_job(tmp_path)).path != store.path
    store.handle.write_attrs(schema_version=0)  # a store written by another version of the code
    with pytest.raises(H2TError, match="schema version 0, this h2t reads version 1"):
        open_store(store.path)


@pytest.mark.parametrize("key", ["workers", "prefetch", "writers", "batch_size"])
def test_bad_extract_settings_are_named_before_anything_is_written(tmp_path, key):
    cfg = tiny_cfg(tmp_path, **{f"extract.{key}": 0})
    with pytest.raises(H2TError, match=f"extract.{key} must be >= 1, got 0"):
        extract(cfg.extract_job())
    assert open_store(plan_store(cfg.extract_job()).path) is None
