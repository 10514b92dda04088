"""Reports (pipeline/report.py): a sweep or tune folder becomes one table with the best by validation marked
per method, failed jobs listed, a CSV beside it and the plots."""
import csv
import json

import pytest
from PIL import Image

from pipeline.errors import H2TError
from pipeline.report import collect, format_table, layer_panels, write_report


def result(method, lam, fraction, val, test, per_layer=None):
    return {"method": method, "task": "t", "model": "m", "target_size": 64, "lam": lam, "fraction": fraction,
            "head_lr": 0.01, "head_steps": 100, "n_features_selected": 10, "n_features_total": 100,
            "val_accuracy": val, "test_accuracy": test, "selected_per_layer": per_layer or {"a": 4, "b": 6}}


def write_job(folder, *results):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps({"results": list(results)}))


def test_a_sweep_folder_becomes_one_table_with_the_best_by_validation_per_method(tmp_path):
    write_job(tmp_path / "0", result("head2toe", 1e-3, 0.1, 0.70, 0.60))
    write_job(tmp_path / "1", result("head2toe", 1e-3, 0.2, 0.80, 0.50))  # best val, not best test
    write_job(tmp_path / "2", result("linear", None, None, 0.40, 0.45))
    (tmp_path / "10").mkdir()
    (tmp_path / "10" / "failed.json").write_text(json.dumps({"error": "select.fraction must be in (0, 1]"}))
    rows, failed = collect(tmp_path)
    assert [r["job"] for r in rows] == ["0", "1", "2"]  # job-number order (10 after 2)
    assert [r.get("best", False) for r in rows] == [False, True, True]
    assert failed == [{"job": "10", "error": "select.fraction must be in (0, 1]"}]
    text, paths, _ = write_report(tmp_path)
    assert "Failed jobs (1)" in text and "job 10: select.fraction" in text
    table = list(csv.DictReader(open(tmp_path / "report.csv")))
    assert len(table) == 3 and table[1]["best"] == "True" and table[1]["val_accuracy"] == "0.8"
    assert {p.name for p in paths} >= {"report.md", "report.csv", "report_accuracy.png", "report_layers.png"}
    assert all(p.stat().st_size > 0 for p in paths)


def test_a_union_sweep_reports_features_per_backbone_and_draws_a_panel_each(tmp_path):
    union = result("head2toe", 1e-3, 0.1, 0.7, 0.6, {"a@32/x": 3, "a@32/y": 1, "b@48/x": 0, "b@48/y": 6})
    union["selected_per_backbone"] = {"a@32": 4, "b@48": 6}
    write_job(tmp_path / "0", union)
    write_job(tmp_path / "1", result("head2toe", 1e-3, 0.2, 0.8, 0.5))  # one store: no split
    text, paths, _ = write_report(tmp_path)
    table = list(csv.DictReader(open(tmp_path / "report.csv")))
    assert [row["per_backbone"] for row in table] == ["a@32:4 b@48:6", ""]
    assert "a@32:4 b@48:6" in text
    layers = next(p for p in paths if p.name == "report_layers.png")
    one = tmp_path / "one"
    write_job(one / "0", result("head2toe", 1e-3, 0.2, 0.8, 0.5))
    _, single, _ = write_report(one)
    tall, short = (Image.open(p).size[1] for p in (layers, next(p for p in single if p.name == "report_layers.png")))
    assert tall > 1.5 * short  # two backbones (and the plain store's run): panels stacked
    rows = [{"job": "0", "lam": 1e-3, "fraction": 0.1, "per_backbone": ["a@32", "b@48"],
             "selected_per_layer": union["selected_per_layer"]},
            {"job": "1", "lam": 1e-3, "fraction": 0.2, "selected_per_layer": {"x": 2, "y": 5}}]
    panels = layer_panels(rows)
    assert {b: [counts for _, counts in lines] for b, lines in panels.items()} == {
        "a@32": [[3, 1]], "b@48": [[0, 6]], "": [[2, 5]]}  # each run in its own backbones' panels only


def test_a_tune_folder_averages_its_candidates_over_rounds(tmp_path):
    tuned = result("head2toe", 1e-3, 0.1, None, 0.66)
    tuned.update({"chosen": {"target_size": 64, "lam": 1e-3, "fraction": 0.1, "head_lr": 0.01, "head_steps": 100},
                  "selection_score": 0.75})
    write_job(tmp_path, tuned)
    with open(tmp_path / "candidates.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "target_size", "lam", "fraction", "head_lr", "head_steps", "round",
                    "n_features_selected", "train_accuracy", "val_accuracy"])
        for rnd, (a, b) in enumerate([(0.7, 0.6), (0.8, 0.5)]):
            w.writerow(["head2toe", 64, 1e-3, 0.1, 0.01, 100, rnd, 10, 1.0, a])
            w.writerow(["head2toe", 64, 1e-3, 0.2, 0.01, 100, rnd, 20, 1.0, b])
    rows, _ = collect(tmp_path)
    candidates = [r for r in rows if r["job"].endswith(":candidate")]
    assert [round(r["val_accuracy"], 3) for r in candidates] == [0.75, 0.55] and candidates[0].get("best")
    refit = next(r for r in rows if r["job"].endswith(":refit"))
    assert refit["val_accuracy"] == 0.75 and refit["test_accuracy"] == 0.66 and not refit.get("best")


def test_nothing_to_report_is_one_line(tmp_path):
    with pytest.raises(H2TError, match="holds no results.json"):
        collect(tmp_path)
    with pytest.raises(H2TError, match="is not a directory"):
        collect(tmp_path / "missing")


def test_the_run_table_lists_each_method():
    text = format_table([result("head2toe", 1e-3, 0.1, 0.7, 0.6), result("linear", None, None, 0.4, None)])
    lines = text.splitlines()
    assert len(lines) == 3 and "70.0" in lines[1] and "n/a" in lines[2]


def test_matplotlib_is_loaded_when_a_plot_is_drawn_not_by_the_modules_every_verb_imports(tmp_path):
    """The sweep callback and the result tables load pipeline.report in every verb; matplotlib (~0.4 s to
    import) comes in only when a figure is made."""
    import subprocess
    import sys

    code = ("import sys\nimport pipeline.jobs, pipeline.report, pipeline.tasks\n"
            "before = 'matplotlib' in sys.modules\n"
            "from pipeline.report import plot_selection\n"
            "result = {'selected_per_layer': {'a': 3, 'b': 1}, 'model': 'm', 'task': 't', 'n_features_selected': 4, "
            "'n_features_total': 9, 'test_accuracy': 0.5}\n"
            f"plot_selection(result, ['a', 'b'], __import__('pathlib').Path({str(tmp_path / 's.png')!r}))\n"
            "print(before, 'matplotlib' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True"]
    assert Image.open(tmp_path / "s.png").size[0] > 0
