"""Which order of the group lasso's exact zeros selects better features: `gradient` (the norm of each zero
row's gradient at the solution, the default) or `entry` (the largest λ of the path λ/2, λ/4, λ/8 at which the
row becomes non-zero, then the gradient norm), on the built-in suite.

    python benchmarks/tie_rule.py [--tasks shapes_location,...] [--fractions 0.01,0.1] [overrides ...]

At the default λ only tens to hundreds of rows are non-zero while F = 0.1 keeps thousands of features, so
most of a selection is decided by this order. For each task (one store each, extracted when missing) and F,
both rules are probed on the same store; validation and test accuracy are printed, and the mean over tasks.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hydra import compose, initialize_config_dir

from pipeline.config import CONF_DIR, register, settings
from pipeline.extract import ensure_store
from pipeline.probe import probe_store
from pipeline.storage import configure_io

SUITE = "shapes_location,shapes_orientation,shapes_count,digits,mnist5k"


def main() -> None:
    configure_io()  # as the h2t command does: zarr's codec pipeline and I/O threads (pipeline/storage)
    register()  # the schema conf/ starts from (pipeline/config.py)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=SUITE)
    parser.add_argument("--fractions", default="0.01,0.1")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    rows = []
    print(f"{'task':20s} {'F':>5s} {'rule':9s} {'nonzero':>7s} {'val %':>6s} {'test %':>6s} {'score s':>8s}")
    for task in args.tasks.split(","):
        for fraction in map(float, args.fractions.split(",")):
            for rule in ("gradient", "entry"):
                with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                    cfg = compose(config_name="probe", overrides=[f"data={task}", f"select.fraction={fraction}",
                                                                  f"select.tie_rule={rule}", "extract.progress=false",
                                                                  *args.overrides])
                typed = settings(cfg)
                store = ensure_store(typed.extract_job()).store
                start = time.perf_counter()
                r = probe_store(store, typed.probe_job("head2toe"))
                seconds = time.perf_counter() - start
                rows.append((task, fraction, rule, r))
                print(f"{task:20s} {fraction:5g} {rule:9s} {r['scoring']['nonzero_rows']:7d} "
                      f"{100 * r['val_accuracy']:6.1f} {100 * r['test_accuracy']:6.1f} {seconds:8.1f}", flush=True)
    for fraction in map(float, args.fractions.split(",")):
        for rule in ("gradient", "entry"):
            mine = [r for _t, f, ru, r in rows if f == fraction and ru == rule]
            val = sum(r["val_accuracy"] for r in mine) / len(mine)
            test = sum(r["test_accuracy"] for r in mine) / len(mine)
            print(f"mean over {len(mine)} tasks, F={fraction:g}, {rule:9s}: val {100 * val:.1f}  test {100 * test:.1f}")


if __name__ == "__main__":
    main()
