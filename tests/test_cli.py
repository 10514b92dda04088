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
    root = [f"store.root={tmp_path / 'stores'}"] if args[0] not in ("report", "store") else []
    cmd = [sys.executable, "-m", "pipeline.cli", *args, *root]
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
    (["select.fraction=1.5"], "select.fraction"),
    (["head.lr=0"], "head.lr"),
    (["probe.fit_on=[train,test]"], "probe.fit_on"),
    (["select.tie_rule=random"], "select.tie_rule"),
    (["store.view_fraction=0"], "store.view_fraction"),
    (["store.dtype=float8"], "store.dtype"),
    (["store.on_overflow=clip"], "store.on_overflow"),
    (["store.col_chunk=0"], "store.col_chunk"),
    (["model=timm", "model.name=resnet18", "model.pretrained=true"], "model.checkpoint"),
])
def test_bad_input_is_one_line_naming_the_culprit(tmp_path, args, culprit):
    proc = h2t(tmp_path, "probe", *TINY, *args, check=False)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("h2t: error")]
    assert len(lines) == 1 and culprit in lines[0], proc.stderr
    probe_setting = culprit.split(".")[0] in ("score", "method", "select", "head", "probe", "store")
    for zarr_json in (tmp_path / "stores").rglob("zarr.json"):
        assert not probe_setting, f"a store was created before {culprit} was checked"
        assert '"complete"' not in zarr_json.read_text()


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


def test_tune_selects_on_folds_from_one_extraction_and_reports(tmp_path):
    out = tmp_path / "tune"
    grid = ["tune.grid.lam=[1e-2,1e-3]", "tune.grid.fraction=[0.05,0.2]", "tune.grid.head_lr=[0.01,0.1]",
            "tune.grid.head_steps=[50]"]
    proc = h2t(tmp_path, "tune", *TINY, *grid, "tune.folds=3", f"hydra.run.dir={out}")
    assert "3-fold cross-validation" in proc.stdout
    h2, lin = results(out / "results.json")
    assert h2["backbone_images"] == 64 + 16 + 32 and lin["backbone_images"] == 0
    assert h2["folds"] == 3 and h2["n_candidates"] == 2 * 2 * 2 and lin["n_candidates"] == 2
    assert h2["fit_on"]["rows"] == {"train": 64, "val": 16} and h2["val_accuracy"] is None
    assert h2["chosen"]["lam"] in (1e-2, 1e-3) and h2["chosen"]["fraction"] in (0.05, 0.2)
    lines = (out / "candidates.csv").read_text().strip().splitlines()
    assert len(lines) == 1 + 3 * (8 + 2)
    # the same store serves a second tune with another grid: no backbone work
    again = tmp_path / "again"
    h2t(tmp_path, "tune", *TINY, *grid[:1], "tune.grid.fraction=[0.1]", "tune.grid.head_steps=[50]",
        f"hydra.run.dir={again}")
    assert all(r["backbone_images"] == 0 for r in results(again / "results.json"))
    report = h2t(tmp_path, "report", str(out))
    assert "| * |" in report.stdout and (out / "report.csv").is_file() and (out / "report_accuracy.png").is_file()


def test_a_failing_sweep_job_is_recorded_the_sweep_goes_on_and_the_command_fails(tmp_path):
    sweep = tmp_path / "sweep"
    proc = h2t(tmp_path, "probe", "-m", *TINY, "select.fraction=0.05,1.5,0.2", f"hydra.sweep.dir={sweep}", check=False)
    assert proc.returncode == 2
    assert "1 job(s) of the sweep" in proc.stderr and "select.fraction must be in (0, 1], got 1.5" in proc.stderr
    assert (sweep / "0" / "results.json").is_file() and (sweep / "2" / "results.json").is_file()
    assert "select.fraction" in json.loads((sweep / "1" / "failed.json").read_text())["error"]
    table = (sweep / "report.md").read_text()
    assert "Failed jobs (1)" in table and table.count("| head2toe |") == 2
    best = [line for line in table.splitlines() if line.endswith("| * |")]
    vals = [results(sweep / j / "results.json")[0]["val_accuracy"] for j in ("0", "2")]
    assert len(best) == 1 and f"{100 * max(vals):.1f}" in best[0]
    assert h2t(tmp_path, "report", str(sweep), check=False).returncode == 2


def test_optuna_preset_maximises_the_validation_accuracy(tmp_path):
    sweep = tmp_path / "optuna"
    h2t(tmp_path, "probe", "-m", "hparams_search=head2toe_optuna", "hydra.sweeper.n_trials=3", *TINY,
        f"hydra.sweep.dir={sweep}")
    import yaml

    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())["best_value"]
    vals = [results(j)[0]["val_accuracy"] for j in sweep.glob("*/results.json")]
    assert len(vals) == 3 and best == max(vals)


def test_a_sweep_over_timm_names(tmp_path):
    sweep = tmp_path / "models"
    h2t(tmp_path, "probe", "-m", *TINY, "model=resnet10t,resnet14t", "model.pretrained=false", "model.input_size=32",
        "taps.include=[layer4.*,pre_logits]", "method=linear", f"hydra.sweep.dir={sweep}")
    assert sorted(results(j)[0]["model"] for j in sweep.glob("*/results.json")) == ["resnet10t", "resnet14t"]


def test_tune_over_target_sizes_uses_one_store_per_T_grown_from_its_sibling(tmp_path):
    out = tmp_path / "tune"
    h2t(tmp_path, "tune", *TINY, "tune.grid.target_size=[128,64]", "tune.grid.lam=[1e-3]",
        "tune.grid.fraction=[0.1]", "tune.grid.head_lr=[0.05]", "tune.grid.head_steps=[50]", "methods=[head2toe]",
        f"hydra.run.dir={out}")
    lines = (out / "candidates.csv").read_text().strip().splitlines()[1:]
    assert sorted(int(line.split(",")[1]) for line in lines) == [64, 128]
    (result,) = results(out / "results.json")
    assert result["chosen"]["target_size"] in (64, 128) and result["target_size"] == result["chosen"]["target_size"]
    stores = sorted((tmp_path / "stores").rglob("*.zarr"))
    assert len(stores) == 2
    layers = [json.loads((s / "zarr.json").read_text())["attributes"]["h2t"]["layers"] for s in stores]
    assert any("reused_from" in layer for table in layers for layer in table)  # the second T copied layers


def test_a_parallel_sweep_on_one_store_matches_the_sequential_one(tmp_path):
    grid = ["select.fraction=0.05,0.2", "score.lam=1e-3,3e-3", "method=head2toe"]
    runs = {}
    for name, launcher in (("parallel", ["hydra/launcher=parallel"]), ("sequential", [])):
        home = tmp_path / name
        home.mkdir()
        # the parallel jobs start on a fresh store: they race to extract it and to write the same scores
        h2t(home, "probe", "-m", *TINY, *grid, *launcher, f"hydra.sweep.dir={home / 'sweep'}")
        runs[name] = {(r["lam"], r["fraction"]): r for j in (home / "sweep").glob("*/results.json") for r in results(j)}
    assert len(runs["parallel"]) == 4 and runs["parallel"].keys() == runs["sequential"].keys()
    for key, r in runs["parallel"].items():
        s = runs["sequential"][key]
        for field in ("store_id", "n_features_selected", "selected_per_layer", "train_accuracy", "val_accuracy",
                      "test_accuracy"):
            assert r[field] == s[field], (key, field)
    assert sum(r["backbone_images"] for r in runs["parallel"].values()) == 64 + 16 + 32  # extracted once


def test_extraction_fans_out_over_parallel_jobs(tmp_path):
    proc = h2t(tmp_path, "extract", "-m", *EXTRACT, "extract.batch_size=16", "extract.replica=0,1",
               "hydra/launcher=parallel", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    done = [line for line in proc.stdout.splitlines() if line.startswith("store ") and " complete at " in line]
    assert len(done) == 2 and len({line.split()[1] for line in done}) == 1  # one store, both jobs saw it complete
    import re

    assert sum(int(re.search(r"(\d+) images through the backbone", line).group(1)) for line in done) == 112
    verify = h2t(tmp_path, "store", "verify", done[0].split()[1], "--root", str(tmp_path / "stores"))
    assert verify.returncode == 0, verify.stderr


def test_messages_go_to_the_job_log_and_quiet_silences_the_terminal(tmp_path):
    loud, quiet = tmp_path / "loud", tmp_path / "quiet"
    shown = h2t(tmp_path, "probe", *TINY, f"hydra.run.dir={loud}")
    assert "head2toe: val" in shown.stdout
    assert "head2toe: val" in (loud / "probe.log").read_text()  # with time and level in the job's log file
    assert "[INFO]" in (loud / "probe.log").read_text()
    silent = h2t(tmp_path, "probe", *TINY, "-q", f"hydra.run.dir={quiet}")
    assert silent.stdout.strip() == "" and "score (working set)" not in silent.stderr  # no messages, no bars
    assert "head2toe: val" in (quiet / "probe.log").read_text()


def test_a_verb_run_in_process_leaves_argv_and_the_environment_as_they_were(tmp_path, monkeypatch):
    from pipeline.jobs import run_verb

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.chdir(tmp_path)
    argv = list(sys.argv)
    with pytest.raises(SystemExit) as exit_info:  # a bad setting found inside the job: exit 2, one line
        run_verb("extract", [*EXTRACT, "extract.batch_size=0", f"store.root={tmp_path / 'stores'}"])
    assert exit_info.value.code == 2
    assert sys.argv == argv and "HYDRA_FULL_ERROR" not in __import__("os").environ


@pytest.mark.parametrize("verb,extra", [("probe", []), ("tune", []), ("tune", ["head.stack=true", "head.precision=bfloat16"])])
def test_extract_plan_only_prints_the_plan_and_makes_nothing(tmp_path, verb, extra):  # run: probe's path
    proc = h2t(tmp_path, verb, *TINY, "extract.plan_only=true", *extra)
    said = proc.stdout + proc.stderr
    assert ("tune plan: " in said and "to extract" in said) if verb == "tune" else ("plan: " in said and "taps," in said)
    if verb == "tune":  # one round (the val split): one stacked training, else one per group
        assert ("heads: 1 stacked training of" in said) == bool(extra) and ("batched trainings" in said) != bool(extra)
        assert ("cpu, bfloat16 products" in said) == bool(extra)
    assert not (tmp_path / "stores").exists() or not any((tmp_path / "stores").rglob("zarr.json"))
    assert not list(tmp_path.rglob("results.json"))


def test_store_verbs_load_neither_torch_nor_matplotlib(tmp_path):
    """`h2t store ...` starts fast: the CLI imports what a verb uses, and listing stores uses neither the
    backbone nor the plots."""
    code = ("import sys; from pipeline import cli; sys.argv = ['h2t', 'store', 'ls', sys.argv[1]]\n"
            "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
