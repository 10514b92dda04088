"""Scoring a store larger than the memory budget: the threaded path against a Dask cluster of 1 and 2 local
worker processes (score.cluster=local:N), and the driver's memory as the rows double.

    python benchmarks/score_scale.py [--rows 20000] [--features 200000] [--budget-mb 1024] [--root DIR]

The store (float16, lz4, 64-row shards, 50 taps) holds ReLU'd normals with a class signal planted in 40
columns; it is generated once under --root and reused. Each mode runs in its own process, so each peak RSS is
its own: seconds per pass over the store, passes to KKT <= tol * lam, the driver's peak RSS and (cluster)
each worker's. The cluster is also run on the first half of the rows (a row selection), to show that the
driver's memory does not follow n. Baseline in the same run: the threaded path.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TAPS = 50
CLASSES = 10
SIGNAL = 40


def generate(path: Path, rows: int, features: int, seed: int = 0) -> None:
    from pipeline.storage.store import create_store

    rng = np.random.default_rng(seed)
    width = features // TAPS
    layers = [{"name": f"tap{i:02d}", "role": "bench", "raw_shape": [width], "dim": width, "offset": i * width}
              for i in range(TAPS)]
    n_test = 64
    store = create_store(str(path), {"model": {"name": "bench"}, "dataset": {"name": f"scale{rows}x{features}"},
                                     "pooling": {"target_size": width}}, layers, {"train": rows, "test": n_test},
                         CLASSES, [str(c) for c in range(CLASSES)], 64, "float16", 256, "lz4")
    signal = rng.choice(TAPS * width, SIGNAL, replace=False)
    weights = rng.standard_normal((SIGNAL, CLASSES)).astype(np.float32)
    for split, n in (("train", rows), ("test", n_test)):
        labels = np.empty(n, np.int64)
        for start in range(0, n, 64):
            block = np.maximum(rng.standard_normal((min(64, n - start), TAPS * width), dtype=np.float32), 0)
            scores = block[:, signal] @ weights + 0.5 * rng.standard_normal((len(block), CLASSES), dtype=np.float32)
            labels[start:start + len(block)] = scores.argmax(1)
            store.write_rows(split, start, [block[:, l["offset"]:l["offset"] + width].astype(np.float16) for l in layers])
        store.group[f"{split}/labels"][:] = labels
        store.group[f"{split}/sample_ids"][:] = np.array([str(i) for i in range(n)])
    store.mark_complete()


def score_once(path: str, mode: str, budget_mb: float, lam: float, half: bool) -> dict:
    from pipeline.config import ScoreConfig, Solver
    from pipeline.rows import Rows
    from pipeline.score.cluster import ScoreRuntime
    from pipeline.score.relevance import score_store
    from pipeline.storage import configure_io
    from pipeline.storage.store import open_store

    configure_io()  # as the h2t command does
    store = open_store(path)
    n = store.splits()["train"]
    rows = Rows((("train", np.arange(n // 2)),), "first half") if half else Rows.of(store, "train")
    cfg = ScoreConfig(lam=lam, solver=Solver.working_set, max_iter=30, tol=0.01, memory_budget_mb=budget_mb,
                      cluster=None if mode == "threads" else mode)
    for key in list(store.group["derived/relevance"].group_keys()) if "derived" in store.group else []:
        del store.group[f"derived/relevance/{key}"]  # always solve, never load
    runtime = ScoreRuntime()
    start = time.perf_counter()
    _, info = score_store(store, cfg, rows, runtime=runtime)
    seconds = time.perf_counter() - start
    out = {"mode": mode, "rows": rows.size(store), "seconds": seconds, "passes": info["passes"],
           "kkt_over_lam": info["kkt_violation"] / lam, "converged": info["converged"],
           "nonzero": info["nonzero_rows"], "driver_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if mode != "threads":
        peaks = runtime.client(mode).run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        out["worker_peak_mb"] = sorted(round(v) for v in peaks.values())
    runtime.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--features", type=int, default=200000)
    parser.add_argument("--budget-mb", type=float, default=1024)
    parser.add_argument("--lam", type=float, default=2e-3)
    parser.add_argument("--root", default=str(Path.home() / ".cache" / "h2t" / "bench"))
    parser.add_argument("--modes", default="threads,local:1,local:2")
    parser.add_argument("--score", help=argparse.SUPPRESS)  # internal: one mode in this process
    parser.add_argument("--half", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    path = Path(args.root) / f"scale-{args.rows}x{args.features}.zarr"
    if args.score:
        print(json.dumps(score_once(str(path), args.score, args.budget_mb, args.lam, args.half)))
        return
    if not (path / "zarr.json").is_file() or '"complete"' not in (path / "zarr.json").read_text():
        import shutil

        shutil.rmtree(path, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        generate(path, args.rows, args.features)
        print(f"generated {path} in {time.perf_counter() - start:.0f} s")
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    raw = args.rows * (args.features // TAPS * TAPS) * 2
    print(f"store: {args.rows} x {args.features // TAPS * TAPS} float16 = {raw / 2**30:.2f} GiB raw, "
          f"{size / 2**30:.2f} GiB on disk; budget {args.budget_mb:g} MB; lam {args.lam:g}")
    runs = [(mode, False) for mode in args.modes.split(",")] + [(args.modes.split(",")[-1], True)]
    results = []
    for mode, half in runs:
        cmd = [sys.executable, __file__, "--score", mode, "--rows", str(args.rows), "--features", str(args.features),
               "--budget-mb", str(args.budget_mb), "--lam", str(args.lam), "--root", args.root] + (["--half"] if half else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(r)
        workers = f"  worker peaks {r['worker_peak_mb']} MB" if "worker_peak_mb" in r else ""
        print(f"{r['mode']:8s} rows {r['rows']:6d}: {r['seconds']:7.1f} s, {r['passes']} passes "
              f"({r['seconds'] / r['passes']:.1f} s/pass), KKT {r['kkt_over_lam']:.3f} lam, {r['nonzero']} non-zero, "
              f"driver peak {r['driver_peak_mb']:.0f} MB{workers}", flush=True)
    base = results[0]["seconds"] / results[0]["passes"]
    for r in results[1:]:
        print(f"ratio {r['mode']} (rows {r['rows']}) / threads, seconds per pass: {r['seconds'] / r['passes'] / base:.2f}")


if __name__ == "__main__":
    main()
