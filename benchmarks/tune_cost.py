"""What `h2t tune` costs, heads trained one at a time against heads that share rows trained together.

    python benchmarks/tune_cost.py [--modes alone,together] [overrides ...]
    python benchmarks/tune_cost.py tune.folds=5 "tune.grid.target_size=[512,2048]"   # the paper's protocol
    python benchmarks/tune_cost.py --modes together --devices cpu,cuda          # heads on the GPU against the CPU
    python benchmarks/tune_cost.py --modes together --precisions float32,bfloat16   # the heads' product dtype
    python benchmarks/tune_cost.py --modes together --precisions float32,bfloat16 --seeds 0,1   # ... against batch order
    python benchmarks/tune_cost.py --modes together --baseline-rev 9620c23 tune.folds=5 "tune.grid.target_size=[512,2048]"

The tune's stores are made first (extraction is not timed). Then, in this run and on the same stores, the
same tune runs once per mode, each from cold scores (the cached relevance and column views are deleted
before each run, so both pay the scoring path):
  alone     every head trained by itself with autograd, torch.optim.Adam and LambdaLR, one after the other
            (the way tune worked before heads were batched; kept here as the baseline)
  serial    the heads of one (round, T, lam, F) as one computation (pipeline/head.py train_linear_heads), one
            such group after the other (head.workers=1)
  together  the same groups, several at once as `h2t tune` runs them on a CPU (head.workers: by default one
            single-threaded group per torch thread on a CPU; pipeline/head.py training_pool)
  stacked   each round's groups zero-padded and stacked into one computation (head.stack=true, pipeline/head.py
            train_stacked_heads), as `h2t tune` runs them on a GPU
Printed per mode (and per `--devices` entry, where the heads train: head.device, and per `--precisions` entry,
the dtype of their matrix products: head.precision, and per `--seeds` entry: head.seed, the order of the
batches, whose effect is the yardstick for any other change of numbers): wall time, candidates/s,
time per stage (the lam paths, column reads, heads) and the chosen settings with their test accuracy; then
whether the choices agree, the speed-up, how many candidates' validation accuracies differ between the modes
(the largest gap) and, where the choices differ, each winner's mean validation accuracy in both modes.

`--baseline-rev REV` also runs the tune of an earlier commit of this repository, in the same run, as that
commit's own `python -m pipeline.cli tune` process (a git worktree of REV; its stores extracted first, untimed):
the code an issue measured, on this machine. `ISSUE_17_CODE` is the last commit whose heads trained one at a
time (issue 17's baseline). Its row shows the tune's own time (results.json: `timings_s.tune`, without the
process's start) and its choices; each mode's wall is then also given as a fraction of it.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from hydra import compose, initialize_config_dir

import pipeline.tune as tune_module
from pipeline.config import CONF_DIR, HeadPrecision, register, settings
from pipeline.extract import ensure_store
from pipeline.head import epoch_batches
from pipeline.runtime import freeze_imported, keep_freed_memory
from pipeline.score.cluster import ScoreRuntime
from pipeline.storage import catalog, configure_io

BATCHED = tune_module.train_stacked_heads
REPO = Path(__file__).resolve().parents[1]
# The last commit whose heads trained one at a time and whose CLI runs (652bae9, right after it, calls a
# storage.configure_io that landed a commit later): the code issue 17 measured its 1,492 s with.
ISSUE_17_CODE = "9620c23"


def heads_alone(X, y, num_classes, settings, batch_size, seed=0, device="cpu"):
    """Each head by itself: autograd, torch.optim.Adam (0.9, 0.999, eps 1e-7) and LambdaLR's cosine decay."""
    heads = []
    Xt, yt = torch.from_numpy(np.ascontiguousarray(X, np.float32)), torch.from_numpy(np.asarray(y, np.int64))
    for lr, steps in settings:
        generator = torch.Generator().manual_seed(seed)
        head = torch.nn.Linear(X.shape[1], num_classes)
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        optimiser = torch.optim.Adam(head.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-7)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimiser, lambda s, steps=steps: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
        for idx in epoch_batches(len(yt), batch_size, steps, generator):
            loss = torch.nn.functional.cross_entropy(head(Xt[idx]), yt[idx])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
        heads.append(head)
    return heads


def sets_alone(Xs, y, num_classes, settings, batch_size, seed=0, device="cpu", precision="float32"):
    """`train_stacked_heads`' signature, every head of every column set trained by itself (`heads_alone`, in
    float32 whatever `precision` says: the textbook baseline)."""
    return [heads_alone(X, y, num_classes, settings, batch_size, seed, device) for X in Xs]


def run(job, stores, mode: str) -> dict:
    for store in stores.values():
        catalog.remove_derived(store.path)  # cold scores: every mode pays the scoring path
    tune_module.train_stacked_heads = sets_alone if mode == "alone" else BATCHED
    head = replace(job.probe.head, stack=mode == "stacked")
    job = replace(job, probe=replace(job.probe, head=replace(head, workers=1) if mode in ("alone", "serial") else head))
    start = time.perf_counter()
    with ScoreRuntime() as runtime:
        results, candidates = tune_module.tune(job, lambda extract_job: (stores[extract_job.pooling.target_size], 0),
                                               runtime=runtime)
    seconds = time.perf_counter() - start
    tune_module.train_stacked_heads = BATCHED
    timings = results[0]["timings_s"]
    return {"seconds": seconds, "candidates": candidates, "results": results,
            "stages": {k.removeprefix("tune_"): timings.get(k, 0.0) for k in ("tune_score", "tune_read", "tune_heads")}}


def baseline_run(rev: str, overrides: list[str], target_sizes: list[int], workdir: Path) -> dict:
    """The tune of commit `rev` as its own CLI process on stores it extracts first (untimed): its time
    (results.json's `timings_s.tune`), its results and the process's wall time."""
    tree, stores, out = workdir / "tree", workdir / "stores", workdir / "run"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--force", str(tree), rev],
                   check=True, capture_output=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(tree)}  # its own package, not this one
    command = [sys.executable, "-m", "pipeline.cli"]
    try:
        extract_overrides = [o for o in overrides if not o.lstrip("+~").startswith(("tune.", "methods"))]
        for T in target_sizes:
            subprocess.run([*command, "extract", f"store.root={stores}", f"pooling.target_size={T}",
                            "extract.progress=false", *extract_overrides],
                           cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
        start = time.perf_counter()
        subprocess.run([*command, "tune", f"store.root={stores}", f"hydra.run.dir={out}", *overrides],
                       cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        results = json.loads((out / "results.json").read_text())["results"]
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], capture_output=True)
    return {"seconds": float(results[0]["timings_s"]["tune"]), "process_seconds": wall, "results": results}


def main() -> None:
    keep_freed_memory()  # as the h2t command does (pipeline/runtime.py)
    freeze_imported()  # and its start-up objects out of the collector's scans
    configure_io()
    register()  # the schema conf/ starts from (pipeline/config.py)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="alone,together", help="alone, serial, together and/or stacked")
    parser.add_argument("--devices", default=None, help="head.device values to compare, e.g. cpu,cuda")
    parser.add_argument("--precisions", default=None, help="head.precision values to compare: float32,bfloat16")
    parser.add_argument("--seeds", default=None, help="head.seed values to compare, e.g. 0,1")
    parser.add_argument("--baseline-rev", default=None,
                        help=f"also run this commit's tune in the same run, e.g. {ISSUE_17_CODE} (issue 17's code)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="tune", overrides=["extract.progress=false", *args.overrides])
    job = settings(cfg).tune_job()
    values = tune_module.check_job(job)
    stores = {T: ensure_store(job.extract.with_target_size(T)).store for T in values["target_size"]}
    print(f"{job.extract.model.name} on {stores[values['target_size'][0]].info.spec['dataset']['name']}: "
          f"T {values['target_size']}, folds {job.tune.folds}, torch threads {torch.get_num_threads()}")
    print(f"{'mode':24s} {'wall s':>8s} {'cand/s':>7s} {'score s':>8s} {'read s':>7s} {'heads s':>8s}  chosen (test %)")
    devices = args.devices.split(",") if args.devices else [str(job.probe.head.device)]
    precisions = args.precisions.split(",") if args.precisions else [str(job.probe.head.precision)]
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [int(job.probe.head.seed)]
    outcome = {}
    for mode, device, seed, precision in itertools.product(args.modes.split(","), devices, seeds, precisions):
        name = (mode + (f"@{device}" if len(devices) > 1 else "") + (f"/{precision}" if len(precisions) > 1 else "")
                + (f"/seed{seed}" if len(seeds) > 1 else ""))
        head = replace(job.probe.head, device=device, precision=HeadPrecision(precision), seed=seed)
        r = outcome[name] = run(replace(job, probe=replace(job.probe, head=head)), stores, mode)
        chosen = "; ".join(f"{x['method']} {x['chosen']} ({100 * x['test_accuracy']:.1f})" for x in r["results"])
        s = r["stages"]
        print(f"{name:24s} {r['seconds']:8.1f} {len(r['candidates']) / r['seconds']:7.2f} {s['score']:8.1f} "
              f"{s['read']:7.1f} {s['heads']:8.1f}  {chosen}", flush=True)
    names = list(outcome)
    if args.baseline_rev:
        workdir = Path(tempfile.mkdtemp(prefix="h2t-baseline-"))
        try:
            base = baseline_run(args.baseline_rev, args.overrides, values["target_size"], workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        chosen = "; ".join(f"{x['method']} {x['chosen']} ({100 * x['test_accuracy']:.1f})" for x in base["results"])
        print(f"{'rev ' + args.baseline_rev:24s} {base['seconds']:8.1f} {len(outcome[names[0]]['candidates']) / base['seconds']:7.2f} "
              f"{'':8s} {'':7s} {'':8s}  {chosen}  (process {base['process_seconds']:.1f} s)")
        for name in names:
            r = outcome[name]
            same = [x["chosen"] for x in r["results"]] == [x["chosen"] for x in base["results"]]
            print(f"{name} / rev {args.baseline_rev}: wall {r['seconds'] / base['seconds']:.3f}; same choices: {same}")
    for other in names[1:]:
        a, b = outcome[names[0]], outcome[other]
        same = [x["chosen"] for x in a["results"]] == [x["chosen"] for x in b["results"]]
        print(f"{other} / {names[0]}: wall {b['seconds'] / a['seconds']:.2f}, heads "
              f"{b['stages']['heads'] / max(a['stages']['heads'], 1e-9):.3f}; same choices: {same}")
        compare_candidates(names[0], a, other, b)


def compare_candidates(name_a: str, a: dict, name_b: str, b: dict) -> None:
    """How far the two modes' validation accuracies are apart, candidate by candidate, and each mode's
    winner scored by both: a different choice from last-bit differences shows as a near-tie here."""
    key = ("method", "round", *tune_module.GRID_KEYS)
    va = {tuple(c[k] for k in key): c["val_accuracy"] for c in a["candidates"]}
    vb = {tuple(c[k] for k in key): c["val_accuracy"] for c in b["candidates"]}
    if va.keys() != vb.keys():
        print("the two modes ran different candidates")
        return
    gaps = np.array([abs(va[k] - vb[k]) for k in va])
    print(f"candidates with a different validation accuracy: {int((gaps > 0).sum())} of {len(gaps)}, mean gap "
          f"{100 * gaps.mean():.2f}, largest {100 * gaps.max():.2f} points")
    for x, y in zip(a["results"], b["results"]):
        if x["chosen"] != y["chosen"]:
            sa, sb = (tune_module.setting_scores(r["candidates"], x["method"]) for r in (a, b))
            for name, chosen in ((name_a, x["chosen"]), (name_b, y["chosen"])):
                k = tuple(chosen[g] for g in tune_module.GRID_KEYS)
                print(f"  {x['method']} chosen by {name}: {chosen}: mean validation % {100 * sa[k]:.3f} "
                      f"({name_a}) / {100 * sb[k]:.3f} ({name_b})")


if __name__ == "__main__":
    main()
