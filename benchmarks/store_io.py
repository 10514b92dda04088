"""Store I/O: (1) write throughput against raw numpy files of the same bytes, (2) bytes read to fetch k
selected columns against the bytes of those columns, directly from the feature arrays and through a
column view (pipeline/storage/views.py).

    python benchmarks/store_io.py [--rows 1024] [--shard-rows 64] [--repeats 3]

The layer widths are the embedded default's (EfficientNet-Lite0, T = 1024: 51 taps, 42,488 features);
values are ReLU'd normals (about half zeros) like pooled activations. Writes and raw files are timed
interleaved, fastest of `repeats` each. Reads are counted at the zarr store interface (every byte a `get`
returns: zarr's own codec pipeline, as the Rust one reads files itself), so the page cache does not hide
them; the view is built once (its cost printed), then every fraction is a prefix of it.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from zarr.storage import LocalStore, WrapperStore

from pipeline.config import register, settings
from pipeline.head import read_columns
from pipeline.select import column_plan
from pipeline.storage import CODEC_PIPELINES, configure_io
from pipeline.storage.store import FeatureStore, create_store, open_store
from pipeline.storage.views import build_view, find_view

FALLBACK_DIMS = [1024] * 40 + [1280] * 10 + [1000]  # used only if the default model's table cannot be built


def default_layer_dims() -> list[int]:
    try:
        from hydra import compose, initialize_config_dir

        from pipeline.config import CONF_DIR
        from pipeline.extract import plan_store

        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="extract", overrides=["data.sizes.train=1", "data.sizes.val=0", "data.sizes.test=1"])
        return [layer["dim"] for layer in plan_store(settings(cfg).extract_job()).layers]
    except Exception:  # noqa: BLE001 - the benchmark still runs with a synthetic table
        return FALLBACK_DIMS


class CountingStore(WrapperStore):
    """Counts the bytes every read returns."""
    bytes_read = 0

    async def get(self, key, prototype, byte_range=None):
        buf = await self._store.get(key, prototype, byte_range)
        if buf is not None:
            CountingStore.bytes_read += len(buf)
        return buf

    async def get_partial_values(self, prototype, key_ranges):
        out = await self._store.get_partial_values(prototype, key_ranges)
        CountingStore.bytes_read += sum(len(b) for b in out if b is not None)
        return out


def layers_for(dims):
    table, offset = [], 0
    for i, d in enumerate(dims):
        table.append({"name": f"tap{i:02d}", "role": "bench", "raw_shape": [d], "dim": d, "offset": offset})
        offset += d
    return table


def write_benchmark(tmp: Path, dims, rows: int, shard_rows: int, compression: str, blocks) -> tuple[float, int]:
    path = tmp / f"store-{compression}.zarr"
    shutil.rmtree(path, ignore_errors=True)
    store = create_store(str(path), {"model": {"name": "b"}, "dataset": {"name": "b"}}, layers_for(dims),
                         {"train": rows}, 10, [str(i) for i in range(10)], shard_rows, "float16", 256, compression)
    start = time.perf_counter()
    for s0 in range(0, rows, shard_rows):
        store.write_rows("train", s0, blocks[s0 // shard_rows])
    elapsed = time.perf_counter() - start
    store.mark_complete()
    return elapsed, sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def raw_benchmark(tmp: Path, blocks) -> float:
    out = tmp / "raw"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    start = time.perf_counter()
    for i, shard in enumerate(blocks):
        for t, block in enumerate(shard):
            np.save(out / f"tap{t:02d}-{i:05d}.npy", block)
    return time.perf_counter() - start


def main() -> None:
    configure_io()  # as the h2t command does: zarr's codec pipeline and I/O threads (pipeline/storage)
    register()  # the schema conf/ starts from (pipeline/config.py)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--shard-rows", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    dims = default_layer_dims()
    rng = np.random.default_rng(0)
    blocks = [[np.maximum(rng.standard_normal((min(args.shard_rows, args.rows - s0), d)), 0).astype(np.float16)
               for d in dims] for s0 in range(0, args.rows, args.shard_rows)]
    payload = sum(b.nbytes for shard in blocks for b in shard)
    tmp = Path(tempfile.mkdtemp(prefix="h2t-bench-"))
    try:
        print(f"{len(dims)} taps, {sum(dims)} features, {args.rows} rows: {payload / 2**20:.0f} MiB of float16")
        compressions = ("none", "lz4", "zstd")
        times = {c: [] for c in ("raw", *compressions)}
        disk = {}
        for _ in range(args.repeats):  # interleaved: drift in the machine's speed hits every variant
            times["raw"].append(raw_benchmark(tmp, blocks))
            for compression in compressions:
                t, disk[compression] = write_benchmark(tmp, dims, args.rows, args.shard_rows, compression, blocks)
                times[compression].append(t)
        t_raw = min(times["raw"])
        print(f"raw numpy files      {t_raw:6.2f} s  {payload / t_raw / 2**20:7.1f} MiB/s")
        for compression in compressions:
            t = min(times[compression])
            print(f"store ({compression:4s})         {t:6.2f} s  {payload / t / 2**20:7.1f} MiB/s  "
                  f"on disk {disk[compression] / payload:.2f} x payload  ratio store / raw time = {t / t_raw:.2f}")

        path = tmp / "store-lz4.zarr"
        D = sum(dims)
        ranking = rng.permutation(D)  # relevance order: any order of the columns will do here
        start = time.perf_counter()
        build_view(open_store(str(path)), "bench", ranking, int(np.ceil(0.2 * D)))
        print(f"column view of the top 20 % built in {time.perf_counter() - start:.2f} s (once per scores)")
        group = zarr.open_group(store=CountingStore(LocalStore(str(path), read_only=True)), mode="r")
        store = FeatureStore(str(path), group)
        with zarr.config.set({"codec_pipeline.path": CODEC_PIPELINES["zarr"]}):
            view = find_view(store, "bench", 1)
            for fraction in (0.001, 0.01, 0.1):
                k = max(1, int(D * fraction))
                plan = column_plan(ranking[:k], store.layers)
                wanted = args.rows * k * 2
                for label, through in (("direct", None), ("view", view)):
                    CountingStore.bytes_read = 0
                    start = time.perf_counter()
                    read_columns(store, "train", plan, through)
                    elapsed = time.perf_counter() - start
                    print(f"read k={k:6d} columns ({fraction:5.1%}) {label:6s}: {CountingStore.bytes_read / 2**20:8.2f} MiB "
                          f"for {wanted / 2**20:6.2f} MiB of columns: ratio {CountingStore.bytes_read / wanted:7.2f}  "
                          f"({elapsed:.2f} s)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
