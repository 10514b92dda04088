"""Writer threads against writer processes (`extract.writers_in`), alone and beside a thread running Python.

    python benchmarks/writers_in.py [--writers 1,2] [--shards 24] [--root DIR]

The store path's steady state: shards of the ResNet-50 @ 224, T = 8192 layout (51 taps of 10,140 columns,
64 rows, ~63 MiB of float16 per shard, ReLU'd normal values) written into a fresh store by `stages.Writer`
(threads) and `write_processes.ProcessWriter` (processes), in turns, with the workers started and warm before
the clock. Then the same (shards of 4 taps, one per writer) beside one thread that runs pure Python without pause, as an extraction's main
thread and decoders do between their native calls: a writer thread takes the GIL back after each inner
chunk's codec call, hundreds of times per shard, and waits up to the switch interval (5 ms) each time.
Prints MiB/s of each and the ratio processes / threads.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time

import numpy as np

from pipeline.runtime import freeze_imported, keep_freed_memory
from pipeline.stages import Shard, Writer
from pipeline.storage import configure_io
from pipeline.storage.claims import Claims
from pipeline.storage.store import create_store
from pipeline.write_processes import ProcessWriter

ROWS, TAPS, DIM = 64, 51, 10_140  # D = 517,140: ResNet-50 @ 224 at T = 8192 has 517,160 in 51 taps


def rate(kind, root: str, writers: int, shards: int, blocks: list[np.ndarray], beside_python: bool) -> float:
    """MiB/s of shards [writers, shards) written by `kind`, after the first `writers` shards warmed it up."""
    shutil.rmtree(root, ignore_errors=True)
    layers = [{"name": f"t{i}", "role": "t", "raw_shape": [DIM], "dim": DIM, "offset": i * DIM} for i in range(len(blocks))]
    store = create_store(f"{root}/s.zarr", {"model": {"name": "m"}, "dataset": {"name": "d"}}, layers,
                         {"train": ROWS * shards}, 2, ["a", "b"], ROWS, "float16", None, "lz4")
    writer = kind(store, Claims(store.group.store, 300), writers)
    stop = threading.Event()
    spinner = threading.Thread(target=_spin, args=(stop,))
    try:
        for i in range(writers):
            writer.submit(Shard("train", ROWS * i, ROWS * (i + 1), i), blocks)
        writer.drain()
        if beside_python:
            spinner.start()
        start = time.perf_counter()
        for i in range(writers, shards):
            writer.submit(Shard("train", ROWS * i, ROWS * (i + 1), i), blocks)
        writer.drain()
        seconds = time.perf_counter() - start
    finally:
        stop.set()
        if spinner.is_alive():
            spinner.join()
        writer.close()
    return (shards - writers) * sum(b.nbytes for b in blocks) / 2**20 / seconds


def _spin(stop: threading.Event) -> None:
    n = 0
    while not stop.is_set():
        n += 1


def main() -> None:
    keep_freed_memory()  # as the h2t command does
    freeze_imported()
    configure_io()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", default="1,2")
    parser.add_argument("--shards", type=int, default=24)
    parser.add_argument("--turns", type=int, default=2, help="turns of each (the fastest kept)")
    parser.add_argument("--root", default=None, help="where the store goes (default: a temp folder)")
    args = parser.parse_args()
    root = args.root or tempfile.mkdtemp(prefix="h2t-writers-in-")
    rng = np.random.default_rng(0)
    blocks = [np.maximum(rng.standard_normal((ROWS, DIM), dtype=np.float32), 0).astype(np.float16) for _ in range(TAPS)]
    try:
        for beside_python in (False, True):
            for writers in (int(w) for w in args.writers.split(",")):
                best: dict[str, float] = {}
                # beside Python, writer threads crawl: one turn of one shard per writer, of 4 taps (5 MiB)
                shards, turns = (2 * writers, 1) if beside_python else (args.shards, args.turns)
                taps = blocks[:4] if beside_python else blocks
                for _ in range(turns):
                    for name, kind in (("threads", Writer), ("processes", ProcessWriter)):
                        best[name] = max(best.get(name, 0.0), rate(kind, root, writers, shards, taps, beside_python))
                where = "beside a Python thread" if beside_python else "alone"
                print(f"{writers} writer(s), {where:22s}: threads {best['threads']:6.0f} MiB/s, processes "
                      f"{best['processes']:6.0f} MiB/s, processes / threads {best['processes'] / best['threads']:5.2f}",
                      flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
