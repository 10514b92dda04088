"""Reports written next to results.json: the comparison table and a plot of where selected features come from."""
from __future__ import annotations

from pathlib import Path


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
    """Bar chart: how many features each tap contributes to the selection, in network order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [result["selected_per_layer"].get(name, 0) for name in layer_names]
    fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(layer_names)), 3.2))
    ax.bar(range(len(counts)), counts, color="tab:blue")
    ax.set_xticks(range(len(counts)), layer_names, rotation=90, fontsize=6)
    ax.set_ylabel("selected features")
    ax.set_title(f"{result['model']} on {result['task']}: {result['n_features_selected']} of "
                 f"{result['n_features_total']} features (test {pct(result['test_accuracy']).strip()} %)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
