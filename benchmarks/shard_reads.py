"""Streamed scoring passes reading shard files directly against reading them through zarr, in one run.

    python benchmarks/shard_reads.py STORE [STORE ...] [--budget-mb 512] [--repeats 5] [--in-memory]

For each store (a path printed by `h2t extract`), one datafit pass (loss + gradient: what every solver
iteration costs) over the train split under the budget, in turns: (a) the default, where each row shard of a
local store is read from its file and decoded in the reading thread (pipeline/storage/shards.py), (b) the
same with that reader switched off, so every read goes through zarr's codec pipeline. Prints the fastest and
median wall and process CPU seconds of each and their ratio. `--in-memory` adds one pass over the matrix held
in memory (it must fit: rows x D x 4 bytes) and each streamed path's ratio to it.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from pipeline.runtime import freeze_imported, keep_freed_memory
from pipeline.score import FeatureMatrix, MultinomialLogistic
from pipeline.storage import configure_io, shards
from pipeline.storage.store import open_store


def one_pass(store, budget_bytes: int, matrix: FeatureMatrix | None = None) -> tuple[float, float]:
    """One timed pass; a new streamed matrix unless one is given."""
    matrix = matrix if matrix is not None else FeatureMatrix(store, "train", budget_bytes)
    datafit = MultinomialLogistic(store.labels("train"), store.info.num_classes)
    W = np.zeros((store.n_features, store.info.num_classes), np.float32)
    b = np.zeros(store.info.num_classes, np.float32)
    wall, cpu = time.perf_counter(), time.process_time()
    datafit.value_grad(matrix, W, b)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    keep_freed_memory()  # as the h2t command does (pipeline/runtime.py)
    freeze_imported()  # and its start-up objects out of the collector's scans
    configure_io()  # as the h2t command does: zarr's codec pipeline and I/O threads
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stores", nargs="+")
    parser.add_argument("--budget-mb", type=float, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--in-memory", action="store_true")
    args = parser.parse_args()
    real = shards.reader_for
    for path in args.stores:
        store = open_store(path)
        if store is None:
            parser.error(f"no complete store at {path}")
        runs: dict[str, list[tuple[float, float]]] = {"direct": [], "zarr": []}
        for _ in range(args.repeats):  # in turns: drift in the machine's speed hits both alike
            for mode in runs:
                shards.reader_for = real if mode == "direct" else (lambda array: None)
                try:
                    runs[mode].append(one_pass(store, int(args.budget_mb * 2**20)))
                finally:
                    shards.reader_for = real
        print(f"{path}: {store.splits()['train']} x {store.n_features}, {store.meta['dtype']}, "
              f"{args.budget_mb:g} MiB budget")
        best = {}
        for mode, measured in runs.items():
            wall, cpu = sorted(m[0] for m in measured), sorted(m[1] for m in measured)
            best[mode] = wall[0]
            print(f"  {mode:6s} wall {wall[0]:6.2f} / {wall[len(wall) // 2]:6.2f} s (fastest / median), "
                  f"CPU {cpu[0]:6.2f} / {cpu[len(cpu) // 2]:6.2f} s")
        print(f"  direct / zarr (fastest) = {best['direct'] / best['zarr']:.2f}")
        if args.in_memory:
            matrix = FeatureMatrix(store, "train", 2**62)  # read once here, outside the clock
            resident = min(one_pass(store, 0, matrix)[0] for _ in range(2))
            print(f"  in memory {resident:.2f} s: streamed / in-memory = {best['direct'] / resident:.2f} (direct), "
                  f"{best['zarr'] / resident:.2f} (zarr)")


if __name__ == "__main__":
    main()
