"""Growing stores: more taps, fewer taps or another target size compute only the layers that are new."""
import os

import numpy as np
import pytest
import torch

from pipeline import extract as extract_module
from pipeline.backbone import build_model
from pipeline.extract import extract, format_plan, planned_bytes, planned_reuse
from pipeline.storage.catalog import remove, verify
from pipeline.storage.reuse import find_reuse
from pipeline.taps import TappedForward, select_taps
from tests.conftest import shard_object, tiny_cfg, tiny_job

EARLY_TAPS = ["act1", "layer1.**"]


def assert_same_store(grown, fresh):
    assert grown.id == fresh.id and grown.complete and verify(grown) == []
    assert [l["name"] for l in grown.layers] == [l["name"] for l in fresh.layers]
    for split in fresh.splits():
        np.testing.assert_array_equal(grown.labels(split), fresh.labels(split))
        for layer in fresh.layers:
            assert grown.features(split, layer["name"])[:].tobytes() == \
                fresh.features(split, layer["name"])[:].tobytes(), f"{split}/{layer['name']}"


def reused_from(store) -> dict[str, str]:
    return {l["name"]: l["reused_from"] for l in store.layers if "reused_from" in l}


def tree_bytes(path) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(d, f), path): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(path) for f in files}


def test_more_taps_compute_only_the_new_layers(tmp_path):
    first = extract(tiny_job(tmp_path, **{"taps.include": EARLY_TAPS})).store
    before = tree_bytes(first.path)
    grown = extract(tiny_job(tmp_path))
    # shard files are written in place: growing must never write through a hard link into its source
    assert tree_bytes(first.path) == before
    assert reused_from(grown.store) == {l["name"]: first.id for l in first.layers}
    assert 0 < len(first.layers) < len(grown.store.layers)
    assert grown.backbone_images == 68  # the new layers still need the forward
    assert_same_store(grown.store, extract(tiny_job(tmp_path / "fresh")).store)
    # on a local disk the reused chunks are hard links: no extra space
    name = first.layers[0]["name"]
    key = f"train/features/{name}"
    assert shard_object(first, key, 0).stat().st_ino == shard_object(grown.store, key, 0).stat().st_ino
    remove(first.path)  # the grown store does not depend on its source
    assert verify(grown.store) == [] and grown.store.features("train", name)[:].any()


def test_fewer_taps_never_build_the_backbone(tmp_path, monkeypatch):
    full = extract(tiny_job(tmp_path)).store

    def no_backbone(*_args, **_kwargs):
        raise AssertionError("the backbone was built although every layer is in the store")

    monkeypatch.setattr(extract_module, "build_model", no_backbone)
    subset = extract(tiny_job(tmp_path, **{"taps.include": ["layer2.**", "pre_logits"]}))
    assert subset.backbone_images == 0 and subset.store.complete
    assert set(reused_from(subset.store).values()) == {full.id}
    monkeypatch.undo()
    assert_same_store(subset.store, extract(tiny_job(tmp_path / "fresh", **{"taps.include": ["layer2.**", "pre_logits"]})).store)


def test_another_target_size_reuses_the_layers_it_pools_the_same_way(tmp_path):
    small = extract(tiny_job(tmp_path)).store  # T = 128
    grown = extract(tiny_job(tmp_path, **{"pooling.target_size": 256})).store
    # pooled alike at T=128 and T=256: layers with C >= 256 channels (global mean) and the vectors. layer2
    # (128 x 4 x 4) is a global mean at 128 but a 4 x 4 average pool at 256: same width, recomputed.
    assert reused_from(grown) == {name: small.id for name in ("layer3.0.act1", "layer3.0", "layer4.0.act1",
                                                                "layer4.0", "pre_logits", "logits")}
    assert_same_store(grown, extract(tiny_job(tmp_path / "fresh", **{"pooling.target_size": 256})).store)


@pytest.mark.parametrize("knob,value", [("model.seed", 1), ("store.dtype", "float32"), ("data.seed", 1),
                                        ("model.input_size", 48)])
def test_stores_of_other_weights_data_or_dtype_are_not_reused(tmp_path, knob, value):
    extract(tiny_job(tmp_path))
    cfg = tiny_cfg(tmp_path, **{knob: value, "taps.include": EARLY_TAPS})
    plan = extract_module.plan_store(cfg.extract_job())
    assert find_reuse(plan.spec, plan.path, plan.layers).sources == {}
    assert reused_from(extract(cfg.extract_job(), plan).store) == {}


def test_incomplete_stores_are_not_sources(tmp_path):
    first = extract(tiny_job(tmp_path, **{"taps.include": EARLY_TAPS})).store
    first.handle.write_attrs(status="writing")
    plan = extract_module.plan_store(tiny_job(tmp_path))
    assert find_reuse(plan.spec, plan.path, plan.layers).sources == {}


def test_grown_store_keeps_the_shard_size_of_its_source(tmp_path):
    first = extract(tiny_job(tmp_path, **{"taps.include": EARLY_TAPS, "extract.batch_size": 8})).store
    grown = extract(tiny_job(tmp_path, **{"extract.batch_size": 16})).store
    assert first.meta["shard_rows"] == grown.meta["shard_rows"] == 8
    assert verify(grown) == []


def test_forward_stops_after_the_last_tap(tmp_path):
    cfg = tiny_cfg(tmp_path)
    model = build_model(cfg.model)
    calls = []
    model.layer4.register_forward_hook(lambda *_: calls.append(1))
    early = select_taps(model, EARLY_TAPS)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        partial = TappedForward(model, early, 128)(x)
        assert calls == []  # layer4 never ran
        full = TappedForward(model, select_taps(model), 128)(x)
        assert calls == [1]
    for tap, got in zip(early, partial):
        np.testing.assert_array_equal(got.numpy(), full[[t.name for t in select_taps(model)].index(tap.name)].numpy())


def test_plan_says_what_is_reused_and_counts_only_the_rest(tmp_path):
    first = extract(tiny_job(tmp_path, **{"taps.include": EARLY_TAPS})).store
    cfg = tiny_cfg(tmp_path)
    plan = extract_module.plan_store(cfg.extract_job())
    reuse = planned_reuse(cfg, plan)
    text = format_plan(plan, per_tap=True, reuse=reuse)
    assert f"reused, not computed: {len(first.layers)} taps from {first.id}" in text
    to_compute = planned_bytes(plan, skip=reuse.sources)["train"]
    assert set(to_compute) == {l["name"] for l in plan.layers} - {l["name"] for l in first.layers}
    extract(cfg.extract_job(), plan, reuse)
    assert planned_reuse(cfg, plan).sources == {}  # the store exists now: nothing left to plan
