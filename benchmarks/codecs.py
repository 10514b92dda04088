"""Codecs on real pooled activations: bytes kept and single-core encode / decode speed of each candidate.

    python benchmarks/codecs.py [--images 256] [--target-size 1024] [--data shapes_location]

Extracts a small store of the embedded default model (EfficientNet-Lite0 with its ImageNet weights, over
`--data`, float16, no compression) into a temporary root, takes one inner chunk (64 rows x 256 columns)
of every tap, and compresses those chunks with each codec one after another in one thread (numcodecs, the
same C libraries the Rust pipeline links). The store's `store.compression` choices are `lz4` (Blosc lz4,
level 1, no shuffle: the default), `zstd` (level 1) and `none`; the other rows are what was weighed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numcodecs.blosc
import numpy as np
from hydra import compose, initialize_config_dir
from numcodecs import LZ4, Blosc, Zstd

from pipeline.config import CONF_DIR, register, settings
from pipeline.extract import extract
from pipeline.storage import configure_io

CODECS = {
    "zstd level 1 (store.compression=zstd)": Zstd(level=1),
    "zstd level -3": Zstd(level=-3),
    "lz4": LZ4(),
    "blosc lz4 level 1, no shuffle (store.compression=lz4)": Blosc("lz4", 1, Blosc.NOSHUFFLE),
    "blosc lz4 level 5, no shuffle": Blosc("lz4", 5, Blosc.NOSHUFFLE),
    "blosc lz4 level 1, byte shuffle": Blosc("lz4", 1, Blosc.SHUFFLE),
    "blosc lz4 level 1, bit shuffle": Blosc("lz4", 1, Blosc.BITSHUFFLE),
    "blosc zstd level 1, byte shuffle": Blosc("zstd", 1, Blosc.SHUFFLE),
}


def timed(fn, items, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    configure_io()  # as the h2t command does: zarr's codec pipeline and I/O threads (pipeline/storage)
    register()  # the schema conf/ starts from (pipeline/config.py)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--target-size", type=int, default=1024)
    parser.add_argument("--data", default="shapes_location", help="a built-in task: shapes_location, mnist5k, ...")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    numcodecs.blosc.set_nthreads(1)
    root = tempfile.mkdtemp(prefix="h2t-codecs-")
    try:
        n = args.images
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="extract", overrides=[
                f"data={args.data}", f"pooling.target_size={args.target_size}", f"store.root={root}",
                "store.compression=none",
                "extract.progress=false", f"data.sizes.train={n}", "data.sizes.val=1", "data.sizes.test=1"])
        store = extract(settings(cfg).extract_job()).store
        chunks = [np.ascontiguousarray(store.features("train", layer["name"])[:64, :256]) for layer in store.layers]
        raw = sum(c.nbytes for c in chunks)
        mib = raw / 2**20
        print(f"{len(chunks)} chunks of real float16 activations ({args.data}, T={args.target_size}), {mib:.1f} MiB; "
              f"one thread")
        for name, codec in CODECS.items():
            encoded = [codec.encode(c) for c in chunks]
            size = sum(len(e) for e in encoded)
            t_enc = timed(codec.encode, chunks, args.repeats)
            t_dec = timed(codec.decode, encoded, args.repeats)
            print(f"  {name:55s} {size / raw:5.3f} x the bytes  encode {mib / t_enc:6.0f} MiB/s  "
                  f"decode {mib / t_dec:6.0f} MiB/s")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
