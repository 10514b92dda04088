"""One tune round's heads at the paper's protocol shapes, stacked as `h2t tune` trains them on a GPU.

    python benchmarks/stacked_round.py [--device auto] [--D 85000] [--turns 3] [--steps 1000] [--profile]

The round of a 5-fold tune of the embedded default on shapes_location at T = 2048 (D ~ 85 k): 800 fit and 200
validation rows, 16 classes, the linear probe's 1,280 columns and the 4 lam x 4 F selections (F = 0.01 ... 0.2 of
D; each lam its own ranking), every set with 4 heads (lr 0.01 / 0.1 x 500 / 1,000 steps). Rows are random:
speed does not depend on their values. Printed, fastest of `--turns` (the two paths in turns), each part and
the whole round of:
  host path    the columns taken and normalised in numpy, each set's rows sent to the device and padded
               there (`head.stack_padded`), the heads trained, each head's fit and validation accuracy on the
               host: a CPU's path (on a GPU before 2026-12-04 the rows were also padded on the host and sent
               whole, which this does not time)
  device path  the round's column arrays sent once (the shared read of every fold's widest selections, as
               tune makes it, and the linear probe's columns), each set's columns taken and normalised
               there, the heads trained, the accuracies there, every head of a set in one product
               (pipeline/tune.py rows_on_device: what `h2t tune` runs on a GPU)
and device / host for the round. `--profile`: torch's profiler tables of the round as tune runs it on --device.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from pipeline.config import HeadConfig
from pipeline.extract import resolve_device
from pipeline.head import accuracy, plan_positions, stacked_accuracies, train_stacked_heads
from pipeline.runtime import freeze_imported
from pipeline.select import column_plan, kept
from pipeline.tune import _fit_and_val, _fit_and_val_on, _heads

FOLDS, LAMS, FRACTIONS, LRS, STEPS = 5, 4, (0.01, 0.03, 0.1, 0.2), (0.01, 0.1), (500, 1000)


def round_sets(D: int, rows: int, rng: np.random.Generator):
    """The round's column sets as tune hands them to `_heads`: (columns, selected) pairs."""
    layers, offset = [], 0
    for i, dim in enumerate(np.full(51, D // 51)):
        layers.append({"name": f"tap{i}", "offset": offset, "dim": int(dim)})
        offset += int(dim)
    D = offset
    # tune reads the widest F of every round's every lam in one pass (5 folds x 4 lams): this round's sets take
    # their columns from that shared read
    orders = [rng.permutation(D) for _ in range(FOLDS * LAMS)]
    widest = kept(D, max(FRACTIONS))
    union = np.unique(np.concatenate([o[:widest] for o in orders]))
    outer = column_plan(union, layers)
    raw = rng.random((rows, len(union)), dtype=np.float32)
    sets = [(rng.random((rows, 1280), dtype=np.float32), None)]  # the linear probe's columns, normalised
    for order in orders[:LAMS]:
        for fraction in FRACTIONS:
            plan = column_plan(order[:kept(D, fraction)], layers)
            sets.append((raw, (plan, plan_positions(outer, plan))))
    return sets


def main() -> None:
    freeze_imported()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--D", type=int, default=85_000)
    parser.add_argument("--steps", type=int, default=1000, help="the longest heads' steps (the grid: half and all)")
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    device = resolve_device(args.device, "--device")
    rng = np.random.default_rng(0)
    rows, fit_n, K = 1000, 800, 16
    sets = round_sets(args.D, rows, rng)
    fit_at, val_at = np.arange(fit_n), np.arange(fit_n, rows)
    y = rng.integers(0, K, rows)
    steps = (args.steps // 2, args.steps)
    values = {"head_lr": list(LRS), "head_steps": list(steps)}
    head = HeadConfig(device=str(device))
    settings = [(lr, s) for lr in LRS for s in steps]
    widths = [len(s[1][1]) if s[1] else s[0].shape[1] for s in sets]
    print(f"{len(sets)} column sets ({min(widths):,}-{max(widths):,} columns, {sum(widths):,} in all) x {len(settings)} heads,"
          f" {fit_n} fit / {rows - fit_n} validation rows, {K} classes, {args.steps} steps, device {device};"
          f" code {Path(_heads.__code__.co_filename).parent}", flush=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def clock(fn):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        return time.perf_counter() - start, out

    # a warm-up of both paths (allocators, CUDA and cuBLAS start-up), not timed
    train_stacked_heads([X for X, _ in [_fit_and_val(c, fit_at, val_at, s) for c, s in sets[:2]]], y[fit_at], K,
                        settings[:1], 128, 0, device)
    _fit_and_val_on(device, sets[:2], fit_at, val_at)
    times: dict[str, list[float]] = {}

    def note(name, t):
        times.setdefault(name, []).append(t)

    for _ in range(args.turns):  # the two paths in turns, so that the machine's drift hits both
        # host path (a CPU's, and a GPU's before 2026-12-04): columns taken and normalised in numpy, padded rows
        # sent to the device, each head's accuracies on the host
        t1, matrices = clock(lambda: [_fit_and_val(c, fit_at, val_at, s) for c, s in sets])
        t2, heads = clock(lambda: train_stacked_heads([X for X, _ in matrices], y[fit_at], K, settings, 128, 0, device))
        t3, _ = clock(lambda: [[(accuracy(h, Xf, y[fit_at]), accuracy(h, Xv, y[val_at])) for h in per]
                               for (Xf, Xv), per in zip(matrices, heads)])
        for name, t in (("take and normalise", t1), ("train", t2), ("accuracies", t3), ("round", t1 + t2 + t3)):
            note(f"host path: {name}", t)
        matrices = heads = None  # freed before the next clock
        # device path (tune._heads on a GPU: pipeline/tune.py rows_on_device), the same parts
        t1, (fits, vals) = clock(lambda: _fit_and_val_on(device, sets, fit_at, val_at))
        t2, heads = clock(lambda: train_stacked_heads(fits, y[fit_at], K, settings, 128, 0, device))
        t3, _ = clock(lambda: (stacked_accuracies(heads, fits, y[fit_at]), stacked_accuracies(heads, vals, y[val_at])))
        for name, t in (("take and normalise", t1), ("train", t2), ("accuracies", t3), ("round", t1 + t2 + t3)):
            note(f"device path: {name}", t)
        fits = vals = heads = None
    for name, ts in times.items():
        print(f"  {name:32s} {min(ts):7.3f} s   (turns: {', '.join(f'{t:.3f}' for t in ts)})")
    print(f"  device path / host path, a round: {min(times['device path: round']) / min(times['host path: round']):.2f}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            _heads(sets, fit_at, val_at, y[fit_at], y[val_at], K, values, head, device)  # the path tune takes here
            sync()
        key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=40))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40))


if __name__ == "__main__":
    main()
