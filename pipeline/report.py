"""Reports written next to results.json: the comparison table and a plot of where selected features come from."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from hydra.experimental.callback import Callback

from .errors import H2TError


def pct(x) -> str:
    return "  n/a" if x is None else f"{100 * x:5.1f}"


def format_table(results: list[dict], chosen: bool = False) -> str:
    """One line per result; with `chosen`, the tuned values and the selection score instead of val."""
    if chosen:
        lines = [f"{'method':10s} {'T':>6s} {'lam':>8s} {'F':>6s} {'lr':>6s} {'steps':>6s} {'features':>17s} "
                 f"{'sel. %':>6s} {'test %':>6s}"]
        for r in results:
            c = r["chosen"]
            lam = "-" if c["lam"] is None else f"{c['lam']:.0e}"
            fraction = "-" if c["fraction"] is None else f"{c['fraction']:g}"
            feats = f"{r['n_features_selected']}/{r['n_features_total']}"
            lines.append(f"{r['method']:10s} {c['target_size']:6d} {lam:>8s} {fraction:>6s} {c['head_lr']:6g} "
                         f"{c['head_steps']:6d} {feats:>17s} {pct(r['selection_score']):>6s} {pct(r['test_accuracy']):>6s}")
        return "\n".join(lines)
    lines = [f"{'method':10s} {'features':>17s} {'val %':>6s} {'test %':>6s}"]
    for r in results:
        feats = f"{r['n_features_selected']}/{r['n_features_total']}"
        lines.append(f"{r['method']:10s} {feats:>17s} {pct(r['val_accuracy']):>6s} {pct(r['test_accuracy']):>6s}")
    return "\n".join(lines)


def plot_selection(result: dict, layer_names: list[str], path: Path) -> Path:
    """Bar chart: how many features each tap contributes to the selection, in network order; one panel per
    backbone when the store is a union of several (layers named `<backbone>/<tap>`)."""
    backbones = list(result.get("selected_per_backbone") or [""])
    fig = new_figure((max(6, 0.18 * len(layer_names) / len(backbones)), 3.2 * len(backbones)))
    axes = fig.subplots(len(backbones), 1, squeeze=False)[:, 0]
    for ax, backbone in zip(axes, backbones):
        prefix = f"{backbone}/" if backbone else ""
        names = [name for name in layer_names if name.startswith(prefix)]
        counts = [result["selected_per_layer"].get(name, 0) for name in names]
        ax.bar(range(len(counts)), counts, color="tab:blue")
        ax.set_xticks(range(len(counts)), [name[len(prefix):] for name in names], rotation=90, fontsize=6)
        ax.set_ylabel("selected features")
        if backbone:
            ax.set_title(f"{backbone}: {sum(counts)} selected", fontsize=8)
    fig.suptitle(f"{result['model']} on {result['task']}: {result['n_features_selected']} of "
                 f"{result['n_features_total']} features (test {pct(result['test_accuracy']).strip()} %)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_per_layer(result: dict, others: list[dict], path: Path) -> Path:
    """Validation and test accuracy of the linear head on each tap alone, against depth, with Head2Toe's and
    the linear probe's test accuracy (when in `others`) as horizontal lines."""
    rows = result["per_layer"]
    fig, ax = _figure((max(6, 0.18 * len(rows)), 3.6))
    depth = range(len(rows))
    if rows[0]["val_accuracy"] is not None:
        ax.plot(depth, [100 * r["val_accuracy"] for r in rows], "-o", markersize=3, label="per tap: val")
    ax.plot(depth, [100 * r["test_accuracy"] for r in rows], "--x", markersize=3, label="per tap: test")
    for other, colour in zip(others, ("tab:green", "tab:red")):
        ax.axhline(100 * other["test_accuracy"], color=colour, linestyle=":",
                   label=f"{other['method']}: test ({other['n_features_selected']} features)")
    ax.set_xticks(list(depth), [r["layer"] for r in rows], rotation=90, fontsize=6)
    ax.set_title(f"{result['model']} on {result['task']}: best tap {result['best_layer']}", fontsize=9)
    return _finish(fig, ax, "tap (network depth)", "accuracy %", path)


# --- sweep reports: `h2t report DIR` and the Hydra callback ------------------------------------------------
COLUMNS = ("job", "method", "task", "model", "target_size", "lam", "fraction", "head_lr", "head_steps",
           "n_features_selected", "per_backbone", "val_accuracy", "test_accuracy", "best")
FAILED_FILE = "failed.json"


def _job_dirs(root: Path) -> list[Path]:
    """The root itself when it holds a job's output, else its job subfolders in job-number order."""
    if (root / "results.json").is_file() or (root / FAILED_FILE).is_file():
        return [root]
    jobs = [d for d in root.iterdir() if d.is_dir() and ((d / "results.json").is_file() or (d / FAILED_FILE).is_file())]
    return sorted(jobs, key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0, d.name))


def _failed_jobs(root: Path) -> list[dict]:
    return [{"job": "." if job == root else job.name, **json.loads((job / FAILED_FILE).read_text())}
            for job in _job_dirs(root) if (job / FAILED_FILE).is_file()]


def collect(root: str | Path) -> tuple[list[dict], list[dict]]:
    """(one row per result of every job, one entry per failed job) under a sweep or tune folder.

    A tune folder (candidates.csv beside results.json) contributes its candidates, averaged over rounds
    (job `tune`, no test accuracy: test is evaluated once, on the refitted winner, which is also a row)."""
    root = Path(root)
    if not root.is_dir():
        raise H2TError(f"report: {root} is not a directory")
    jobs = _job_dirs(root)
    if not jobs:
        raise H2TError(f"report: {root} holds no results.json (a job folder, a -m sweep folder or a tune folder)")
    rows, failed = [], _failed_jobs(root)
    for job in jobs:
        name = "." if job == root else job.name
        if (job / FAILED_FILE).is_file():
            continue
        results = json.loads((job / "results.json").read_text())["results"]
        if (job / "candidates.csv").is_file():
            task, model = (results[0]["task"], results[0]["model"]) if results else ("", "")
            with open(job / "candidates.csv", newline="") as f:
                groups: dict[tuple, list[dict]] = {}
                for c in csv.DictReader(f):
                    key = tuple(c[k] for k in ("method", "target_size", "lam", "fraction", "head_lr", "head_steps"))
                    groups.setdefault(key, []).append(c)
            for (method, T, lam, fraction, lr, steps), members in groups.items():
                rows.append({"job": f"{name}:candidate", "method": method, "task": task, "model": model,
                             "target_size": int(T), "lam": float(lam) if lam else None,
                             "fraction": float(fraction) if fraction else None, "head_lr": float(lr),
                             "head_steps": int(steps), "n_features_selected": int(members[0]["n_features_selected"]),
                             "val_accuracy": sum(float(m["val_accuracy"]) for m in members) / len(members),
                             "test_accuracy": None, "rounds": len(members)})
        for r in results:
            chosen = r.get("chosen") or {}
            rows.append({"job": name if not chosen else f"{name}:refit", "method": r["method"], "task": r["task"],
                         "model": r["model"], "target_size": r["target_size"], "lam": r.get("lam"),
                         "fraction": r.get("fraction"), "head_lr": r.get("head_lr"), "head_steps": r.get("head_steps"),
                         "n_features_selected": r["n_features_selected"],
                         "val_accuracy": r.get("selection_score") if chosen else r.get("val_accuracy"),
                         "test_accuracy": r["test_accuracy"], "selected_per_layer": r.get("selected_per_layer", {}),
                         "per_backbone": r.get("selected_per_backbone")})
    for group in {(r["method"], r["task"], r["model"]) for r in rows}:  # best by validation, per method and task
        scored = [r for r in rows if (r["method"], r["task"], r["model"]) == group and r["val_accuracy"] is not None
                  and not r["job"].endswith(":refit")]
        if scored:
            max(scored, key=lambda r: r["val_accuracy"])["best"] = True
    return rows, failed


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "*" if value else ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):  # selected features per backbone of a union
        return " ".join(f"{k}:{v}" for k, v in value.items())
    return str(value)


def markdown_table(rows: list[dict], failed: list[dict]) -> str:
    header = [c if c != "best" else "best val" for c in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [_cell(r.get(c)) if c not in ("val_accuracy", "test_accuracy") else
                 ("" if r.get(c) is None else f"{100 * r[c]:.1f}") for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    if failed:
        lines += ["", f"Failed jobs ({len(failed)}):"]
        lines += [f"- job {f['job']}: {f.get('error', '?')}" for f in failed]
    return "\n".join(lines)


def plot_sweep(rows: list[dict], out: Path) -> list[Path]:
    """Validation (solid) and test (dashed) accuracy against F for each λ; selected features per layer
    (network depth on the x axis) for each head2toe result."""
    h2t = [r for r in rows if r["method"] == "head2toe" and r.get("fraction") is not None]
    paths = []
    if h2t:
        fig, ax = _figure((6, 4))
        for lam in sorted({r["lam"] for r in h2t}, reverse=True):
            mine = sorted((r for r in h2t if r["lam"] == lam and not r["job"].endswith(":refit")),
                          key=lambda r: r["fraction"])
            for key, style in (("val_accuracy", "-o"), ("test_accuracy", "--x")):
                points = [(r["fraction"], r[key]) for r in mine if r[key] is not None]
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, [100 * y for y in ys], style, label=f"λ={lam:g} {key.split('_')[0]}")
        ax.set_xscale("log")
        paths.append(_finish(fig, ax, "kept fraction F", "accuracy %", out / "report_accuracy.png"))
    per_layer = [r for r in h2t if r.get("selected_per_layer")][:12]
    if per_layer:
        panels = layer_panels(per_layer)
        fig = new_figure((7, 3.5 * len(panels)))
        axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
        for ax, (backbone, lines) in zip(axes, panels.items()):  # one panel per backbone, in network order
            for label, counts in lines:
                ax.plot(range(len(counts)), counts, marker=".", label=label)
            if backbone:
                ax.set_title(backbone, fontsize=8)
            if ax is not axes[-1]:
                ax.set_xlabel("tap (network depth)")
                ax.set_ylabel("selected features")
                ax.legend(fontsize=6)
        paths.append(_finish(fig, axes[-1], "tap (network depth)", "selected features", out / "report_layers.png"))
    return paths


def layer_panels(rows: list[dict]) -> dict[str, list[tuple[str, list[int]]]]:
    """Selected features per tap, one panel per backbone ("" for runs of one store): each run is drawn in
    the panels of its own backbones only (a sweep may mix unions and single stores)."""
    panels: dict[str, list[tuple[str, list[int]]]] = {}
    for r in rows:
        label = f"job {r['job']}: λ={r['lam']:g} F={r['fraction']:g}"
        for backbone in r.get("per_backbone") or [""]:
            prefix = f"{backbone}/" if backbone else ""
            counts = [n for name, n in r["selected_per_layer"].items() if name.startswith(prefix)]
            panels.setdefault(backbone, []).append((label, counts))
    return panels


def new_figure(size: tuple[float, float]):
    """A figure of its own (no pyplot: nothing process-wide, no backend to switch). matplotlib is imported here,
    when something is drawn: every verb loads this module (the sweep callback, the table), and the import
    costs ~0.4 s."""
    from matplotlib.figure import Figure  # noqa: PLC0415

    return Figure(figsize=size)


def _figure(size: tuple[float, float]):
    fig = new_figure(size)
    return fig, fig.subplots()


def _finish(fig, ax, xlabel: str, ylabel: str, path: Path) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def write_report(root: str | Path) -> tuple[str, list[Path], list[dict]]:
    """report.md, report.csv and the plots in `root`; returns (markdown, files written, failed jobs)."""
    root = Path(root)
    rows, failed = collect(root)
    text = markdown_table(rows, failed)
    (root / "report.md").write_text(text + "\n")
    with open(root / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({c: _cell(r[c]) if isinstance(r.get(c), dict) else r.get(c, "") if r.get(c) is not None
                             else "" for c in COLUMNS})
    return text, [root / "report.md", root / "report.csv", *plot_sweep(rows, root)], failed


class SweepReport(Callback):
    """Hydra callback (hydra.callbacks.sweep_report): the report of every -m sweep, written when it ends.
    With `outcome` (a file path; the h2t command passes one), the sweep's folder and its failed jobs are
    written there as JSON for the command's exit status."""

    def __init__(self, outcome: str | None = None):
        self.outcome = outcome

    def on_multirun_end(self, config, **_) -> None:
        directory = Path(config.hydra.sweep.dir)
        failed: list[dict] = []
        if directory.is_dir() and _job_dirs(directory):  # else a sweep of extractions: nothing to tabulate
            try:
                _text, paths, failed = write_report(directory)
                logging.getLogger("h2t").info(f"sweep report: {paths[0]} ({len(failed)} failed jobs)")
            except Exception as exc:  # noqa: BLE001 - a report must never turn a finished sweep into a crash
                logging.getLogger("h2t").warning(f"no sweep report for {directory}: {exc}")
                failed = _failed_jobs(directory)
        if self.outcome:
            Path(self.outcome).write_text(json.dumps({"directory": str(directory), "failed": failed}, default=str))
