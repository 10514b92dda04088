"""Selection across backbones: two stores alone and as one union.

    python benchmarks/across_backbones.py [--pair sizes|networks] [--tasks shapes_location,...] [--root DIR]
                                          [overrides ...]

For each task of the built-in suite, three `h2t tune` runs on the same rows (the default grid and val split
unless overrides say otherwise): each store alone, then both as one union, whose group lasso ranks the layers
of both stores together (one global top-F). `--pair sizes` (default): EfficientNet-Lite0 at 160 px and at
224 px, `backbones=[{input_size:160},{input_size:224}]`; `--pair networks`: two networks with real weights
offline, EfficientNet-Lite0 and EfficientNet-Lite1 at 160 px, `backbones=[efficientnet_lite0,
efficientnet_lite1]`. The stores are extracted first (the union reuses them: it extracts nothing), so the
tune times compare probing only. Printed per task and run:
  head2toe %   test accuracy of the tuned Head2Toe head (refitted on train + val, tested once)
  linear %     the tuned linear probe (for the union: both backbones' last layers side by side)
  chosen       the winning T, lam, F
  from a/b     selected features per backbone (the union's split of one global top-F)
  tune s       wall time of the tune; score s its scoring paths alone (the union's cost is here)
and the mean over tasks of each run.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hydra import compose, initialize_config_dir

from pipeline.config import CONF_DIR, register, settings
from pipeline.extract import ensure_store
from pipeline.runtime import freeze_imported, keep_freed_memory
from pipeline.storage import configure_io
from pipeline.tune import tune

SUITE = "shapes_location,shapes_orientation,shapes_count,digits,mnist5k"
PAIRS = {
    "sizes": {"160 px": ["model=efficientnet_lite0", "model.input_size=160"],
              "224 px": ["model=efficientnet_lite0", "model.input_size=224"],
              "union": ["model=efficientnet_lite0", "backbones=[{input_size:160},{input_size:224}]"]},
    "networks": {"lite0": ["model=efficientnet_lite0"], "lite1": ["model=efficientnet_lite1"],
                 "union": ["backbones=[efficientnet_lite0,efficientnet_lite1]"]},
}


def tuned(overrides: list[str]) -> tuple[dict, dict, float]:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = settings(compose(config_name="tune", overrides=overrides))
    ensure_store(cfg.extract_job())  # extraction (or nothing, when stored) outside the timed tune
    start = time.perf_counter()
    results, _ = tune(cfg.tune_job(), lambda job: (lambda r: (r.store, r.backbone_images))(ensure_store(job)))
    seconds = time.perf_counter() - start
    by_method = {r["method"]: r for r in results}
    return by_method["head2toe"], by_method["linear"], seconds


def main() -> None:
    keep_freed_memory()  # as the h2t command does (pipeline/runtime.py)
    freeze_imported()  # and its start-up objects out of the collector's scans
    configure_io()  # as the h2t command does: zarr's codec pipeline and I/O threads (pipeline/storage)
    register()  # the schema conf/ starts from (pipeline/config.py)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=sorted(PAIRS), default="sizes")
    parser.add_argument("--tasks", default=SUITE)
    parser.add_argument("--root", default=None, help="store root (default: the config's, ./stores)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    runs = PAIRS[args.pair]
    common = ["extract.progress=false", *args.overrides]
    if args.root:
        common.append(f"store.root={args.root}")
    print(f"{'task':20s} {'run':7s} {'head2toe %':>10s} {'linear %':>8s} {'chosen T/lam/F':>20s} "
          f"{'from a/b':>12s} {'tune s':>7s} {'score s':>7s}", flush=True)
    means: dict[str, list[tuple[float, float, float, float]]] = {run: [] for run in runs}
    for task in args.tasks.split(","):
        for run, extra in runs.items():
            h2t, linear, seconds = tuned([f"data={task}", *common, *extra])
            chosen = h2t["chosen"]
            split = h2t.get("selected_per_backbone")
            origin = "/".join(str(n) for n in split.values()) if split else "-"
            score_s = h2t["timings_s"].get("tune_score", 0.0)
            means[run].append((h2t["test_accuracy"], linear["test_accuracy"], seconds, score_s))
            print(f"{task:20s} {run:7s} {100 * h2t['test_accuracy']:10.1f} {100 * linear['test_accuracy']:8.1f} "
                  f"{chosen['target_size']:>6d}/{chosen['lam']:<7g}/{chosen['fraction']:<5g} {origin:>12s} "
                  f"{seconds:7.1f} {score_s:7.1f}", flush=True)
    for run, rows in means.items():
        n = len(rows)
        h2t, linear, seconds, score_s = (sum(column) / n for column in zip(*rows))
        print(f"mean over {n} tasks, {run:7s}: head2toe {100 * h2t:.1f}  linear {100 * linear:.1f}  "
              f"tune {seconds:.1f} s  scoring {score_s:.1f} s")


if __name__ == "__main__":
    main()
