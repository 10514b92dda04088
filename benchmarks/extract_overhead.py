"""Extraction cost against a bare backbone forward on the same batches (target: ratio <= 1.05).

    python benchmarks/extract_overhead.py [--images 512] [--model-config efficientnet_lite0] [--target-size 1024]
                                          [--writers 1,2] [overrides ...]

Both are measured in this run on the same machine, interleaved (bare, extract, bare, extract, ...) so that
drift in the machine's speed hits both, and the fastest of each is kept: (a) the plain forward of the model
over the batches, loading and preprocessing included, (b) `extract` into a fresh store (laying it out, taps,
pooling, checks, casts, store writes in parallel with the next forward). `--writers 1,2`: (b) once per
`extract.writers` value in each turn, a ratio for each (the default: the device's default writers).

`--breakdown` adds, in each turn, the extraction's parts one after another in one thread, each as a fraction of
the bare forward: the tapped forward with pooling, the store cast and the checks (`DeviceStage`), encoding every
shard as the store does (`ShardEncoder`: codec and CRC32C per inner chunk), and writing those bytes to fresh
files. Where the forward alone keeps every core busy (a CPU run), nothing can overlap it for free: the sum of
the three is what extraction costs when none of them slows the others.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from hydra import compose, initialize_config_dir

from pipeline.backbone import build_model
from pipeline.config import CONF_DIR, register, settings
from pipeline.extract import extract, plan_store
from pipeline.runtime import freeze_imported, keep_freed_memory
from pipeline.stages import DeviceStage
from pipeline.storage import configure_io, shards
from pipeline.storage.schema import FEATURES
from pipeline.storage.store import open_store
from pipeline.taps import TappedForward


def main() -> None:
    keep_freed_memory()  # as the h2t command does (pipeline/runtime.py)
    freeze_imported()  # and its start-up objects out of the collector's scans
    configure_io()  # as the h2t command does: zarr's codec pipeline and I/O threads (pipeline/storage)
    register()  # the schema conf/ starts from (pipeline/config.py)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--model-config", default="efficientnet_lite0")
    parser.add_argument("--target-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--writers", default=None, help="extract.writers values compared in each turn, e.g. 1,2")
    parser.add_argument("--breakdown", action="store_true", help="time the parts in one thread (see above)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. extract.workers=4")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="h2t-bench-")
    n = args.images
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="extract", overrides=[
            f"model={args.model_config}", f"pooling.target_size={args.target_size}", f"store.root={root}",
            "extract.progress=false", f"data.sizes.train={n // 2}", "data.sizes.val=0", f"data.sizes.test={n - n // 2}", *args.overrides])
    cfg = settings(cfg).extract_job()
    plan = plan_store(cfg)
    model = build_model(cfg.model)
    channels_last = bool(cfg.extract.channels_last)  # the bare forward in the extraction's memory format
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    batch = int(cfg.extract.batch_size)
    batches = [(s, st) for s, split in plan.dataset.splits.items() for st in range(0, len(split), batch)]

    def bare() -> float:
        os.sync()  # what earlier runs left to write back is written before the clock starts (roofline.py's settle)
        start = time.perf_counter()
        for name, st in batches:
            split = plan.dataset.splits[name]
            x = plan.preprocess(split.load(st, min(st + batch, len(split))), torch.device("cpu"))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                model(x)
        return time.perf_counter() - start

    writers = [None] if args.writers is None else [int(w) for w in args.writers.split(",")]

    def stored(count: int | None) -> tuple[float, float]:
        shutil.rmtree(root, ignore_errors=True)
        if count is not None:
            cfg.extract.writers = count
        os.sync()  # the previous store's writeback is not this run's (its own is)
        result = extract(cfg, plan)
        assert result.backbone_images == n
        return result.seconds, result.stage_seconds

    bare()  # warm-up: allocator, thread pools, page cache
    stored(writers[0])
    turns = [(bare(), [stored(count) for count in writers], parts(plan, model, batches, batch, root) if args.breakdown else None)
             for _ in range(args.repeats)]
    t_bare = min(t[0] for t in turns)
    shutil.rmtree(root, ignore_errors=True)
    D = sum(layer["dim"] for layer in plan.layers)
    print(f"model {cfg.model.name} @ {plan.preprocess.input_size}px, {len(plan.layers)} taps, D={D}, T={args.target_size}, "
          f"{n} images, {torch.get_num_threads()} threads{', channels_last' if channels_last else ''}")
    print(f"bare forward      {t_bare:7.2f} s  ({n / t_bare:6.1f} img/s)")
    for i, count in enumerate(writers):
        t_store, t_stage = min(t[1][i][0] for t in turns), min(t[1][i][1] for t in turns)
        label = "" if count is None else f", writers={count}"
        print(f"extract to store{label}  {t_store:7.2f} s  ({n / t_store:6.1f} img/s); its images alone (first shard "
              f"claimed to last written) {t_stage:.2f} s")
        print(f"ratio extract / bare forward{label} = {t_store / t_bare:.3f} (whole call), {t_stage / t_bare:.3f} "
              f"(images alone)")
    if args.breakdown:
        best = {key: min(t[2][key] for t in turns) for key in turns[0][2]}
        forward = best["forward"]
        print(f"in one thread, each / the bare forward without loading ({forward:.2f} s): pooling, cast and checks "
              f"{best['device'] / forward - 1:+.3f}, encode {best['encode'] / forward:.3f} "
              f"({best['raw'] / best['encode'] / 2**20:.0f} MiB/s of values), file writes {best['write'] / forward:.3f} "
              f"({best['stored'] / best['write'] / 2**20:.0f} MiB/s); all three in turn: "
              f"{(best['device'] + best['encode'] + best['write']) / forward:.3f}")


def parts(plan, model, batches: list[tuple[str, int]], batch: int, root: str) -> dict[str, float]:
    """Seconds of the parts of an extraction, one after another in this thread (`--breakdown`), over batches
    preprocessed beforehand; `root` holds the store the last `extract` left, whose arrays encode the shards."""
    split_of = plan.dataset.splits
    inputs = [plan.preprocess(split_of[s].load(st, min(st + batch, len(split_of[s]))), torch.device("cpu"))
              for s, st in batches]
    start = time.perf_counter()
    with torch.inference_mode():
        for x in inputs:
            model(x)
    forward = time.perf_counter() - start
    store = open_store(plan.path, plan.spec)
    assert store is not None and store.complete
    runner = TappedForward(model, plan.taps, plan.spec["pooling"]["target_size"], plan.spec["pooling"]["rule"],
                           plan.spec["pooling"]["cls_token"])
    stage = DeviceStage(runner, lambda x, device: x, torch.device("cpu"), store.computed_layers, store.layer_dtypes())
    start = time.perf_counter()
    blocks = [stage.to_host(stage(x)) for x in inputs]
    device = time.perf_counter() - start
    runner.close()
    start = time.perf_counter()
    encoded = []
    for (split, first), shard_blocks in zip(batches, blocks):
        for layer, block in zip(store.computed_layers, shard_blocks):
            array = store.handle.array(FEATURES.key(split, layer["name"]))
            encoded.append(store.handle.encoder(array).encode(first // store.info.shard_rows, block)[1])
    encode = time.perf_counter() - start
    out = tempfile.mkdtemp(prefix="h2t-parts-", dir=root)
    os.sync()
    start = time.perf_counter()
    for i, pieces in enumerate(encoded):
        shards.write_local(out, f"{i}", pieces)
    write = time.perf_counter() - start
    raw = sum(block.nbytes for shard_blocks in blocks for block in shard_blocks)
    stored = sum(len(piece) for pieces in encoded for piece in pieces)
    return {"forward": forward, "device": device, "encode": encode, "write": write, "raw": raw, "stored": stored}


if __name__ == "__main__":
    main()
