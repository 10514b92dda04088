"""Compact stores: bytes, accuracy and read speed of `store.dtype=int8` against float16, side by side.

    python benchmarks/compact.py [--tasks shapes_location,...] [--skip-tune] [--target-size 1024]
                                 [--variants float16:auto,int8:auto,int8:lz4] [--repeats 3]
                                 [--budget-mb 64] [--root DIR]

For each task of the built-in suite (and a folder of JPEG photos, for bytes only) the embedded default's
model is extracted into a float16 store and an int8 store with the default codecs (`store.compression=auto`:
lz4 for float16, zstd for int8), and an int8 store with lz4 (`store.compression` is layout, not numbers: the
same accuracy); `--variants` names other store.dtype:store.compression[:store.col_chunk] variants (the
codec and the inner chunk's width are layout, not numbers). Printed per task and store:
  bytes/feature  bytes on disk of the feature arrays (and, for int8, their scales and offsets) per stored
                 value (rows x D), every split
  tune test %    `h2t tune` (the default grid, val split) on that store: Head2Toe's test accuracy of the
                 chosen setting, refitted on train + val (the floor: int8 within 0.5 points of float16)
  pass s         one streamed datafit pass (loss + gradient) over the train split under `--budget-mb` (64 MiB:
                 blocks of a few shards at T = 1024; at T = 8192 a block is less than a shard, so raise it)
  read s         the head's read of the top 10 % columns of the train split, directly from the features
Speed figures are the fastest of `--repeats` turns over every store of the task (in turns, so that drift in
the machine's speed hits each store alike).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from hydra import compose, initialize_config_dir

from pipeline.config import CONF_DIR, register, settings
from pipeline.extract import ensure_store
from pipeline.head import read_columns
from pipeline.runtime import freeze_imported, keep_freed_memory
from pipeline.score import FeatureMatrix, MultinomialLogistic
from pipeline.storage import configure_io
from pipeline.tune import tune

SUITE = "shapes_location,shapes_orientation,shapes_count,digits,mnist5k"


def feature_bytes(store) -> int:
    root = Path(store.path)
    return sum(f.stat().st_size for split in store.splits() for part in ("features", "quant")
               for f in (root / split / part).rglob("*") if f.is_file())


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def speeds(store, budget_mb: float) -> tuple[float, float]:
    matrix = FeatureMatrix(store, "train", int(budget_mb * 2**20))
    datafit = MultinomialLogistic(store.labels("train"), store.info.num_classes)
    W = np.zeros((store.n_features, store.info.num_classes), np.float32)
    b = np.zeros(store.info.num_classes, np.float32)
    t_pass = seconds(lambda: datafit.value_grad(matrix, W, b))
    rng = np.random.default_rng(0)
    plan = {}
    for layer in store.layers:  # a top-10 % selection's shape: a sorted subset of every layer
        k = max(1, layer["dim"] // 10)
        plan[layer["name"]] = np.sort(rng.choice(layer["dim"], k, replace=False))
    t_read = seconds(lambda: read_columns(store, "train", plan))
    return t_pass, t_read


def compose_cfg(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def main() -> None:
    keep_freed_memory()  # as the h2t command does (pipeline/runtime.py)
    freeze_imported()  # and its start-up objects out of the collector's scans
    configure_io()  # as the h2t command does: zarr's codec pipeline and I/O threads (pipeline/storage)
    register()  # the schema conf/ starts from (pipeline/config.py)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=SUITE)
    parser.add_argument("--target-size", type=int, default=1024)
    parser.add_argument("--skip-tune", action="store_true", help="bytes and speed only")
    parser.add_argument("--photos", type=int, default=512, help="JPEG photos for the natural-image bytes row")
    parser.add_argument("--repeats", type=int, default=3, help="turns over the stores; the fastest of each is kept")
    parser.add_argument("--variants", default="float16:auto,int8:auto,int8:lz4",
                        help="store.dtype:store.compression[:store.col_chunk], e.g. int8:zstd,int8:zstd:1024")
    parser.add_argument("--budget-mb", type=float, default=64, help="the streamed pass's memory budget")
    parser.add_argument("--root", help="where the stores are kept (reused when present); a fresh folder if unset")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    variants = [(*(variant.split(":") + [""])[:3],) for variant in args.variants.split(",")]
    root = args.root or tempfile.mkdtemp(prefix="h2t-compact-")
    tasks = [[f"data={task}"] for task in args.tasks.split(",")]
    if args.photos:
        from roofline import make_folder

        if not (Path(root) / "photos").exists():
            make_folder(Path(root) / "photos", args.photos)
        tasks.append(["data=folder", f"data.root={Path(root) / 'photos'}"])
    print(f"{'task':20s} {'dtype+codec':14s} {'bytes/feature':>13s} {'tune test %':>11s} {'pass s':>7s} {'read s':>7s}")
    for overrides in tasks:
        task = overrides[0].removeprefix("data=")
        rows = []
        for dtype, compression, col_chunk in variants:
            common = [*overrides, f"store.dtype={dtype}", f"pooling.target_size={args.target_size}",
                      f"store.root={root}/stores-{compression}{col_chunk}", "extract.progress=false",
                      f"store.compression={compression}"]  # its own root: the layout is not in the store id
            if col_chunk:
                common.append(f"store.col_chunk={col_chunk}")
            cfg = settings(compose_cfg("tune", common))
            store = ensure_store(cfg.extract_job()).store
            per_value = feature_bytes(store) / (sum(store.splits().values()) * store.n_features)
            accuracy = "-"
            if not args.skip_tune and task != "folder" and compression == "auto":  # other codecs: the same numbers
                results, _ = tune(cfg.tune_job(), lambda job: (lambda r: (r.store, r.backbone_images))(ensure_store(job)))
                accuracy = f"{100 * next(r for r in results if r['method'] == 'head2toe')['test_accuracy']:.1f}"
            rows.append((dtype, compression + (f":{col_chunk}" if col_chunk else ""), store, per_value, accuracy))
        timings: list[list[tuple[float, float]]] = [[] for _ in rows]
        for _ in range(args.repeats):  # in turns: drift in the machine's speed hits every store alike
            for i, (_, _, store, _, _) in enumerate(rows):
                timings[i].append(speeds(store, args.budget_mb))
        for (dtype, compression, _, per_value, accuracy), measured in zip(rows, timings):
            t_pass, t_read = (min(t[k] for t in measured) for k in (0, 1))
            print(f"{task:20s} {dtype + '+' + compression:14s} {per_value:13.3f} {accuracy:>11s} {t_pass:7.2f} "
                  f"{t_read:7.2f}", flush=True)


if __name__ == "__main__":
    main()
