"""End to end through the command line, on a tiny random ResNet and a small procedural task."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

EXTRACT = ["model=resnet_tiny", "data=shapes_location", "data.num_classes=4", "data.image_size=32",
           "data.sizes.train=64", "data.sizes.val=16", "data.sizes.test=32", "pooling.target_size=128",
           "extract.batch_size=32"]
TINY = EXTRACT + ["score.max_iter=50", "head.steps=50"]


def h2t(tmp_path, *args, check=True):
    cmd = [sys.executable, "-m", "pipeline.cli", *args, f"store.root={tmp_path / 'stores'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def results(path: Path) -> list[dict]:
    return json.loads(path.read_text())["results"]


def test_run_extracts_once_then_probes_from_the_store(tmp_path):
    out = tmp_path / "first"
    proc = h2t(tmp_path, "run", *TINY, f"hydra.run.dir={out}")
    assert "head2toe" in proc.stdout and "linear" in proc.stdout
    first = results(out / "results.json")
    assert (out / "selection.png").stat().st_size > 1000
    assert [r["method"] for r in first] == ["head2toe", "linear"]
    required = {"task", "model", "store_id", "store_path", "method", "target_size", "lam", "fraction",
                "n_features_total", "n_features_selected", "selected_per_layer", "val_accuracy", "test_accuracy",
                "backbone_images", "timings_s"}
    for r in first:
        assert required <= set(r)
        assert 0.0 <= r["test_accuracy"] <= 1.0
    h2, lin = first
    assert h2["backbone_images"] == 64 + 16 + 32 and lin["backbone_images"] == 0
    assert h2["n_features_selected"] == int(h2["n_features_total"] * 0.1)
    assert sum(h2["selected_per_layer"].values()) == h2["n_features_selected"]
    assert lin["selected_per_layer"] == {"pre_logits": lin["n_features_selected"]}

    again = tmp_path / "again"
    h2t(tmp_path, "run", *TINY, f"hydra.run.dir={again}")
    second = results(again / "results.json")
    assert all(r["backbone_images"] == 0 for r in second)
    assert second[0]["store_id"] == h2["store_id"]
    assert second[0]["test_accuracy"] == h2["test_accuracy"]  # relevance comes back from the store


def test_probe_multirun_sweeps_from_one_store(tmp_path):
    h2t(tmp_path, "extract", *EXTRACT)
    sweep = tmp_path / "sweep"
    h2t(tmp_path, "probe", "-m", *TINY, "select.fraction=0.05,0.2", "method=head2toe", f"hydra.sweep.dir={sweep}")
    jobs = sorted(sweep.glob("*/results.json"))
    assert len(jobs) == 2
    entries = [results(j)[0] for j in jobs]
    assert sorted(e["fraction"] for e in entries) == [0.05, 0.2]
    assert all(e["backbone_images"] == 0 for e in entries)
    assert len({e["store_id"] for e in entries}) == 1


def test_any_timm_model_by_name(tmp_path):
    out = tmp_path / "out"
    h2t(tmp_path, "probe", *TINY, "model=resnet18", "model.pretrained=false", "model.input_size=32",
        "taps.include=[layer4.*,pre_logits]", "method=linear", f"hydra.run.dir={out}")
    assert results(out / "results.json")[0]["model"] == "resnet18"


@pytest.mark.parametrize("args,culprit", [
    (["model=resnet5O"], "resnet50"),
    (["data=nope"], "data=nope"),
    (["pooling.target_size=0"], "pooling.target_size"),
    (["taps.include=[layer9.*]"], "layer9"),
    (["score.lam=-1", "method=head2toe"], "score.lam"),
    (["method=ridge"], "method"),
    (["store.dtype=float8"], "store.dtype"),
    (["store.on_overflow=clip"], "store.on_overflow"),
    (["model=timm", "model.name=resnet18", "model.pretrained=true"], "model.checkpoint"),
])
def test_bad_input_is_one_line_naming_the_culprit(tmp_path, args, culprit):
    proc = h2t(tmp_path, "probe", *TINY, *args, check=False)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("h2t: error")]
    assert len(lines) == 1 and culprit in lines[0], proc.stderr
    for zarr_json in (tmp_path / "stores").rglob("zarr.json"):
        assert '"complete"' not in zarr_json.read_text() or "score.lam" in culprit or "method" in culprit


@pytest.mark.parametrize("override", ["score.lamm=1", "pooling.target_size=[1"])
def test_bad_override_is_one_line(tmp_path, override):
    proc = h2t(tmp_path, "probe", *TINY, override, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("h2t: error:"), proc.stderr
    assert override.split("=")[0] in proc.stderr


def test_missing_weights_leave_no_store(tmp_path):
    proc = h2t(tmp_path, "extract", *EXTRACT, "model=resnet18", check=False)
    assert proc.returncode == 2 and "model.checkpoint" in proc.stderr
    assert not list((tmp_path / "stores").rglob("zarr.json"))


def test_skipped_images_are_recorded_in_results(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / "imgs" / split / c).mkdir(parents=True)
            for i in range(6):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
                    tmp_path / "imgs" / split / c / f"{i}.png")
    (tmp_path / "imgs" / "train" / "b" / "3.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "out"
    base = [a for a in TINY if not a.startswith("data")]
    h2t(tmp_path, "run", *base, "data=folder", f"data.root={tmp_path / 'imgs'}", "data.on_error=skip",
        f"hydra.run.dir={out}")
    entries = results(out / "results.json")
    assert all(e["skipped_samples"] == ["train/b/3.png"] for e in entries)
    proc = h2t(tmp_path / "imgs", "run", *base, "data=folder", f"data.root={tmp_path / 'imgs'}", check=False)
    assert proc.returncode == 2 and "3.png" in proc.stderr


def test_user_config_dir_adds_datasets(tmp_path):
    conf = tmp_path / "myconf" / "data"
    conf.mkdir(parents=True)
    (conf / "tinycount.yaml").write_text(
        "source: shapes\ntask: count\nnum_classes: 3\nimage_size: 32\nseed: 0\n"
        "sizes: {train: 32, val: 8, test: 16}\n")
    out = tmp_path / "out"
    h2t(tmp_path, "probe", *TINY, "--config-dir", str(tmp_path / "myconf"), "data=tinycount", "method=linear",
        f"hydra.run.dir={out}")
    assert results(out / "results.json")[0]["task"] == "shapes_count"
