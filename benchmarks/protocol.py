"""The paper's protocol measured: the val split against K-fold cross-validation, and the lam grid's edge.

    python benchmarks/protocol.py [--tasks ...] [--folds 0,5] [--seeds 0,1] [--lam 1e-1,...] [overrides ...]

For each task of the built-in suite (one store each, the embedded default's model at T = 1024), `h2t tune`
runs once per protocol: the val split (`tune.folds=0`: no seed to vary) and K-fold cross-validation over
train + val for each seed of the fold assignment. The lam grid is `--lam` (wider than the default grid, at
both ends); from the same candidates the script also chooses as the default grid (conf/tune.yaml) would and
refits that choice when it differs. Printed per tune:
  chosen lam/F      the winner over the wide grid, and `edge` when its lam is the grid's largest or smallest
  nonzero/kept      non-zero rows of the refitted group lasso against the features kept: kept > nonzero
                    means part of the selection was ordered by the tie rule (select.tie_rule), and nonzero 0
                    means lam was above lam_max: the ranking is the gradient order at W = 0
  sel. %, test %    the selection score (mean validation accuracy) and the refitted winner's test accuracy
  default grid      the default grid's choice (lam/F) and its test accuracy ("same" when it is the same)
  tune s            wall time of the tune (the store already extracted)
Then, per protocol: mean test accuracy over tasks, the mean spread (max - min) over seeds per task, the
mean wall time, the test accuracy gained per tune-minute over the val split, how often lam sat on the
edge, and how often the tie rule decided part of the selection.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from hydra import compose, initialize_config_dir

from pipeline.config import CONF_DIR, Method, register, settings
from pipeline.extract import ensure_store
from pipeline.probe import probe_store
from pipeline.runtime import freeze_imported, keep_freed_memory
from pipeline.storage import configure_io
from pipeline.tune import choose, refit_job, tune

SUITE = "shapes_location,shapes_orientation,shapes_count,digits,mnist5k"
WIDE = "1e-1,3e-2,1e-2,3e-3,1e-3,3e-4,1e-4"


def composed(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return settings(compose(config_name="tune", overrides=overrides))


def main() -> None:
    keep_freed_memory()  # as the h2t command does (pipeline/runtime.py)
    freeze_imported()  # and its start-up objects out of the collector's scans
    configure_io()  # as the h2t command does: zarr's codec pipeline and I/O threads (pipeline/storage)
    register()  # the schema conf/ starts from (pipeline/config.py)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=SUITE)
    parser.add_argument("--folds", default="0,5", help="0: the val split; K >= 2: K-fold over train + val")
    parser.add_argument("--seeds", default="0,1", help="fold assignments (K-fold only)")
    parser.add_argument("--lam", default=WIDE, help="the wide lam grid the tunes run over")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    default_lams = {float(x) for x in composed([]).tune.grid.lam}
    wide = [float(x) for x in args.lam.split(",")]
    print(f"{'task':19s} {'protocol':9s} {'chosen lam/F':>16s} {'nonzero/kept':>13s} {'sel. %':>6s} {'test %':>6s} "
          f"{'default grid':>20s} {'tune s':>7s}", flush=True)
    rows = []
    for task in args.tasks.split(","):
        for folds in map(int, args.folds.split(",")):
            for seed in (map(int, args.seeds.split(",")) if folds else [0]):
                job = composed([f"data={task}", "extract.progress=false", "methods=[head2toe]",
                                f"tune.folds={folds}", f"tune.seed={seed}",
                                f"tune.grid.lam=[{','.join(map(str, wide))}]", *args.overrides]).tune_job()
                store = ensure_store(job.extract).store  # extraction outside the timed tune
                start = time.perf_counter()
                results, candidates = tune(job, lambda extract_job: (ensure_store(extract_job).store, 0))
                seconds = time.perf_counter() - start
                best = results[0]
                lam, fraction = best["chosen"]["lam"], best["chosen"]["fraction"]
                edge = lam in (max(wide), min(wide))
                nonzero, kept = int(best["scoring"]["nonzero_rows"]), int(best["n_features_selected"])
                setting, _, _ = choose([c for c in candidates if c["lam"] in default_lams], "head2toe")
                if (setting["lam"], setting["fraction"], setting["head_lr"], setting["head_steps"]) == tuple(
                        best["chosen"][k] for k in ("lam", "fraction", "head_lr", "head_steps")):
                    default_test, default_text = best["test_accuracy"], "same"
                else:
                    default_test = probe_store(store, refit_job(job, Method.head2toe, setting))["test_accuracy"]
                    default_text = f"{setting['lam']:g}/{setting['fraction']:g} {100 * default_test:.1f}"
                protocol = f"{folds}-fold/{seed}" if folds else "val"
                rows.append({"task": task, "folds": folds, "seed": seed, "test": best["test_accuracy"],
                             "default_test": default_test, "seconds": seconds, "edge": edge,
                             "tie": kept > nonzero, "above_max": nonzero == 0})
                print(f"{task:19s} {protocol:9s} {f'{lam:g}/{fraction:g}' + (' edge' if edge else ''):>16s} "
                      f"{f'{nonzero}/{kept}':>13s} {100 * best['selection_score']:6.1f} "
                      f"{100 * best['test_accuracy']:6.1f} {default_text:>20s} {seconds:7.1f}", flush=True)
    val_time = np.mean([r["seconds"] for r in rows if r["folds"] == 0]) if any(r["folds"] == 0 for r in rows) else None
    val_test = np.mean([r["test"] for r in rows if r["folds"] == 0]) if val_time else None
    for folds in sorted({r["folds"] for r in rows}):
        mine = [r for r in rows if r["folds"] == folds]
        per_task: dict[str, list[float]] = {}
        for r in mine:
            per_task.setdefault(r["task"], []).append(r["test"])
        spread = np.mean([max(v) - min(v) for v in per_task.values()])
        test, seconds = np.mean([r["test"] for r in mine]), np.mean([r["seconds"] for r in mine])
        gain = "" if not folds or val_time is None else (
            f"  gain over val {100 * (test - val_test):+.1f} points for {(seconds - val_time) / 60:.1f} more min per task")
        print(f"{f'{folds}-fold' if folds else 'val'}: mean test {100 * test:.1f} % (default grid "
              f"{100 * np.mean([r['default_test'] for r in mine]):.1f} %), spread over seeds {100 * spread:.1f} "
              f"points, tune {seconds:.0f} s per task; lam on the edge {sum(r['edge'] for r in mine)}/{len(mine)}, "
              f"tie rule in the selection {sum(r['tie'] for r in mine)}/{len(mine)} "
              f"(lam >= lam_max {sum(r['above_max'] for r in mine)}/{len(mine)}){gain}")


if __name__ == "__main__":
    main()
