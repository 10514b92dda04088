"""Out-of-core scoring: peak memory of one group-lasso gradient pass over a store larger than the budget.

    python benchmarks/score_memory.py [--rows 4096] [--features 65536] [--budget-mb 64]

Builds a float16 store of rows x features in the default layout (lz4 + CRC32C; 1 GiB as float32), then
runs datafit passes (loss + gradient: what every solver iteration costs) (a) streamed from the store under
the budget and (b) over the matrix held in memory, sampling the process RSS in a thread. Prints the peak
RSS increase of each and the time ratio streamed pass / in-memory pass (fastest of three each; the
one-time reads that build each matrix are not in either).
"""
from __future__ import annotations

import argparse
import tempfile
import threading
import time

import numpy as np
import psutil

from pipeline.score import FeatureMatrix, MultinomialLogistic
from pipeline.storage import configure_io
from pipeline.storage.store import create_store


class PeakRSS:
    def __init__(self):
        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()

    def __enter__(self):
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def increase(self) -> int:
        return self.peak - self.base


def build(path: str, rows: int, features: int, layers: int = 8, shard_rows: int = 64, compression: str = "lz4"):
    width = features // layers
    table = [{"name": f"layer{i}", "role": "bench", "raw_shape": [width], "dim": width, "offset": i * width}
             for i in range(layers)]
    store = create_store(path, {"model": {"name": "bench"}, "dataset": {"name": "bench"}}, table,
                         {"train": rows}, 10, [str(i) for i in range(10)], shard_rows, "float16", 256, compression)
    rng = np.random.default_rng(0)
    store.group["train/labels"][:] = rng.integers(0, 10, rows)
    store.group["train/sample_ids"][:] = np.arange(rows).astype(str)
    for start in range(0, rows, shard_rows):
        n = min(shard_rows, rows - start)
        store.write_rows("train", start, [rng.random((n, width), dtype=np.float32).astype(np.float16) for _ in table])
    store.mark_complete()
    return store


def main() -> None:
    configure_io()  # as the h2t command does: zarr's codec pipeline and I/O threads (pipeline/storage)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--features", type=int, default=65536)
    parser.add_argument("--budget-mb", type=float, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compression", default="lz4", help="lz4 (the default layout) | zstd | none")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="h2t-bench-") as tmp:
        store = build(f"{tmp}/s.zarr", args.rows, args.features, compression=args.compression)
        datafit = MultinomialLogistic(store.labels("train"), 10)
        W = np.zeros((store.n_features, 10), np.float32)
        b = np.zeros(10, np.float32)
        matrix_bytes = args.rows * store.n_features * 4
        def fastest_pass(matrix) -> float:
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                datafit.value_grad(matrix, W, b)
                times.append(time.perf_counter() - t)
            return min(times)

        with PeakRSS() as streamed_mem:
            streamed = FeatureMatrix(store, "train", int(args.budget_mb * 2**20))
            t_streamed = fastest_pass(streamed)
        assert not streamed.in_memory
        block_rows = streamed.block_rows
        del streamed
        with PeakRSS() as memory_mem:
            in_memory = FeatureMatrix(store, "train", 4 * matrix_bytes)
            t_memory = fastest_pass(in_memory)
        mib = 2**20
        print(f"matrix {args.rows} x {store.n_features} = {matrix_bytes / mib:.0f} MiB as float32; "
              f"budget {args.budget_mb:.0f} MiB; block {block_rows} rows")
        print(f"streamed pass : peak RSS +{streamed_mem.increase / mib:7.1f} MiB "
              f"({streamed_mem.increase / matrix_bytes:.3f} x matrix), {t_streamed:.2f} s")
        print(f"in-memory pass: peak RSS +{memory_mem.increase / mib:7.1f} MiB "
              f"({memory_mem.increase / matrix_bytes:.3f} x matrix), {t_memory:.2f} s")
        print(f"ratio streamed peak / budget = {streamed_mem.increase / (args.budget_mb * mib):.2f}; "
              f"ratio streamed pass / in-memory pass = {t_streamed / t_memory:.2f}")


if __name__ == "__main__":
    main()
