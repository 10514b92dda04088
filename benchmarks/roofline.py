"""Extraction against its roofline: the slowest of the forward, the decode and the disk, all in one run.

    python benchmarks/roofline.py [--images N] [--device auto] [--case NAME] [--writers 1,2] [overrides ...]

On one folder of JPEG photos (256 px, quality 90) and the same feature bytes, for each case it prints:
  forward      the bare backbone forward on batches already on the device (bf16 autocast and channels-last
               on CUDA, as extraction runs there; float32 on a CPU), no taps: what the device can do
  decode       the JPEGs decoded through the loader extraction uses (on the device when it is CUDA)
  raw write    `np.save` of the same feature bytes, one file per tap and shard, `writers` threads
  baseline     the loop without the store (in-memory images, preprocessing, tensors of the real tap shapes)
               plus the store's unavoidable work in the writer threads: cast to float16, each inner chunk
               encoded with the store's codec through numcodecs, CRC32C, one file write per tap and shard of every
               split the store holds
  store path   `extract` with the forward replaced by those tensors (claims, checks, casts, shard writes,
               ledger): the store path's ceiling, and its ratio to the baseline and to the raw write
  extract      the whole `h2t extract` of the folder with the real model, with the writer count whose store
               path was fastest
The store path and the extraction are timed from the first shard claimed to the last one written, so that
what a run does once (building the model, laying out ~150 arrays) is left out.
  roofline     extract / min(forward, decode, raw write)
Cases: ResNet-50 @ 224 at T = 8192 and T = 1024 (random weights: the numbers do not matter here), and the
embedded default (EfficientNet-Lite0 @ 160, T = 1024). On a CPU the forward of a 224 px ResNet-50 takes
~0.1 s an image, so the forward and whole-extraction images there are capped (`--forward-images`).
benchmarks/gpu_check.sh runs it on a CUDA machine; figures in benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import google_crc32c
import numpy as np
import torch
from decode import photos
from extract_ceiling import SyntheticForward
from hydra import compose, initialize_config_dir
from numcodecs import Blosc
from PIL import Image

from pipeline.backbone import build_model
from pipeline.config import CONF_DIR, register, settings
from pipeline.extract import decode_workers, decodes_on_device, extract, plan_store, resolve_device
from pipeline.runtime import freeze_imported, keep_freed_memory
from pipeline.stages import Loader, Shard
from pipeline.storage import configure_io, runs
from pipeline.storage.schema import inner_columns, resolve_compression
from pipeline.storage.shards import write_parts
from pipeline.storage.store import open_store
from pipeline.storage.writer import WriterTimes

RESNET = ["model=timm", "model.name=resnet50", "model.pretrained=false", "model.input_size=224"]
CASES = {
    "resnet50@224 T=8192": [*RESNET, "pooling.target_size=8192"],
    "resnet50@224 T=1024": [*RESNET, "pooling.target_size=1024"],
    "efficientnet_lite0@160 T=1024 (default)": ["model=efficientnet_lite0", "pooling.target_size=1024"],
}


def make_folder(root: Path, n: int, size: int = 256) -> None:
    """n JPEG photos in root/train/<class>/ and a few in root/test/<class>/ (the folder source needs both)."""
    for i, pixels in enumerate(photos(n + 8, size)):
        split = "train" if i < n else "test"
        folder = root / split / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return settings(compose(config_name="extract", overrides=overrides)).extract_job()


def busy(times: WriterTimes) -> float:
    """The writers' CPU over the wall time of their writes: 1 when they never waited."""
    return times.cpu_s / times.wall_s if times.wall_s else float("nan")


def stage_rate(run, cfg, plan, repeats: int = 2) -> float:
    """Images/s of `run(cfg, plan)` (an extraction) once its shards flow: from the first shard claimed to
    the last one written, so that what a run does once (building the model, laying out ~150 arrays) is
    left out."""
    times = []
    for i in range(repeats + (repeats > 1)):
        result = run(cfg, plan)
        if i or repeats == 1:  # the first of several is a warm-up
            times.append(result.stage_seconds)
    return result.backbone_images / min(times)


def timed(fn, repeats: int = 2, fresh: Path | None = None) -> float:
    """The fastest of `repeats` runs after a warm-up (none when repeats is 1: one run, as a user's)."""
    if repeats > 1:
        _clock(fn, fresh)
    return min(_clock(fn, fresh) for _ in range(repeats))


def _clock(fn, fresh: Path | None = None) -> float:
    """Seconds of fn(), started on an empty `fresh` folder (emptied before the clock, as the store path's
    previous store is) with nothing left to write back."""
    if fresh is not None:
        shutil.rmtree(fresh, ignore_errors=True)
        fresh.mkdir(parents=True)
    settle()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def settle() -> None:
    """Write back what earlier runs left dirty in the page cache before a clock starts: otherwise one run's
    ~100 MB of writeback lands in the next run's file creations (ext4 here: 0.5-1 ms per new file under
    writeback, against 0.05-0.2 ms without), and whichever writer runs second pays for the first."""
    os.sync()


class PlainWriter:
    """The store's unavoidable work and nothing else: float16 blocks, each inner chunk Blosc-lz4 encoded
    (numcodecs, as the store's codec) with its CRC32C, one file per tap and shard; `writers` threads, at
    most writers + 1 batches in flight."""

    def __init__(self, root: str, writers: int, inner: int, compression: str = "lz4"):
        self.root, self.inner, self.limit = root, inner, writers + 1
        if compression not in ("lz4", "none"):
            raise SystemExit(f"roofline.py: the plain baseline writes lz4 or none, not store.compression={compression}")
        # the store's codec (store.compression; `none`: the chunk's own bytes, only checksummed)
        self.codec = Blosc(cname="lz4", clevel=1, shuffle=Blosc.NOSHUFFLE, typesize=2) if compression == "lz4" else None
        self.pool = ThreadPoolExecutor(writers)
        self.inflight: list = []
        self.times = WriterTimes()  # as the store's writer keeps them (pipeline/stages.py)
        self.lock = threading.Lock()

    def submit(self, shard: str, blocks: list[np.ndarray]) -> None:
        waited = time.perf_counter()
        while len(self.inflight) >= self.limit:
            self.inflight.pop(0).result()
        self.times.submit_wait_s += time.perf_counter() - waited
        self.inflight.append(self.pool.submit(self._write, shard, blocks))

    def _write(self, shard: str, blocks: list[np.ndarray]) -> None:
        cpu, wall = time.thread_time(), time.perf_counter()
        for t, block in enumerate(blocks):
            parts = []
            for c0 in range(0, block.shape[1], self.inner):
                chunk = np.ascontiguousarray(block[:, c0:c0 + self.inner])
                encoded = self.codec.encode(chunk) if self.codec is not None else chunk.view(np.uint8).reshape(-1)
                parts += [encoded, np.uint32(google_crc32c.value(encoded)).tobytes()]
            with open(os.path.join(self.root, f"{t}-{shard}"), "wb") as fh:
                write_parts(fh, parts)  # os.writev, as the store writes its pieces
        with self.lock:
            self.times.add(time.thread_time() - cpu, time.perf_counter() - wall)

    def close(self) -> None:
        for future in self.inflight:
            future.result()
        self.pool.shutdown()


def run_case(name: str, overrides: list[str], args, folder: Path, work: Path, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    batch = 256 if cuda else 64
    common = [*overrides, *args.overrides, f"store.root={work / 'stores'}", "extract.progress=false", f"extract.device={device}",
              f"extract.batch_size={batch}", f"extract.workers={args.workers}"]
    if cuda:
        common += ["model.precision=bfloat16", "extract.channels_last=true"]
    files_cfg = compose_cfg([*common, "data=folder", f"data.root={folder}", "+data.sizes.val=0"])
    plan = plan_store(files_cfg)
    train = plan.dataset.splits["train"]
    n = len(train)
    D = sum(layer["dim"] for layer in plan.layers)
    mib_per_image = D * 2 / 2**20
    out = {"case": name, "taps": len(plan.layers), "D": D, "images": n, "store_images": args.store_images}

    # decode: the loader extraction uses, over the training files
    shards = [Shard("train", s, min(s + batch, n), i) for i, s in enumerate(range(0, n, batch))]

    def decode() -> None:
        loader = Loader(plan.dataset, args.workers, pin=cuda, device=device,
                        device_decode=decodes_on_device(files_cfg.extract, plan.dataset))
        try:
            for future in [loader.submit(shard) for shard in shards]:
                future.result()
            if cuda:
                torch.cuda.synchronize()
        finally:
            loader.close()

    out["decode"] = n / timed(decode)

    # forward: the bare model on batches already on the device
    forward_n = n if cuda else min(n, args.forward_images)
    model = build_model(files_cfg.model).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    pixels = [train.load(s, min(s + batch, forward_n)) for s in range(0, forward_n, batch)]
    inputs = [plan.preprocess(p, device) for p in pixels]
    if cuda:
        inputs = [x.contiguous(memory_format=torch.channels_last) for x in inputs]

    def forward() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            for x in inputs:
                model(x)
        if cuda:
            torch.cuda.synchronize()

    out["forward"] = forward_n / timed(forward)
    inputs.clear()  # the batches on the device: freed before the store rows
    if cuda:
        torch.cuda.empty_cache()

    # the same feature bytes: raw files, the plain baseline, the store path (in-memory images: no decode)
    synthetic = SyntheticForward(plan.layers, batch, device)
    host = [b.to(torch.float16).cpu().numpy() for b in synthetic.blocks]
    n = args.store_images  # the store path takes many more images per second than the forward on a CPU
    memory_cfg = compose_cfg([*common, "data=shapes_location", f"data.sizes.train={n}", "data.sizes.val=1",
                              "data.sizes.test=1", "data.image_size=64"])
    memory_plan = plan_store(memory_cfg)
    shards = range(-(-n // batch))
    memory_splits = memory_plan.dataset.splits
    raw_root = work / "raw"
    for writers in args.writers:
        def raw() -> None:
            def save(shard: int) -> None:
                rows = min(batch, n - shard * batch)
                for t, block in enumerate(host):
                    np.save(raw_root / f"{t}-{shard}.npy", block[:rows])
            with ThreadPoolExecutor(writers) as pool:
                list(pool.map(save, shards))

        baseline_times: list[WriterTimes] = []

        def baseline() -> None:
            writer = PlainWriter(str(raw_root), writers, inner_columns(memory_cfg.store.col_chunk, "float16"),
                                 resolve_compression(memory_cfg.store.compression, "float16"))
            for name, split in memory_splits.items():  # every shard the store writes (its 1-row val and test too)
                rows = len(split)
                for shard, s in enumerate(range(0, rows, batch)):
                    x = memory_plan.preprocess(split.load(s, min(s + batch, rows)), device)
                    pooled = synthetic(x)
                    flat = torch.cat([p.to(torch.float16).flatten() for p in pooled])
                    flat = flat.cpu().numpy() if cuda else flat.numpy()
                    blocks, offset = [], 0
                    for p in pooled:
                        blocks.append(flat[offset:offset + p.numel()].reshape(p.shape[0], -1))
                        offset += p.numel()
                    writer.submit(f"{name}-{shard}", blocks)
            writer.close()
            baseline_times.append(writer.times)

        def store_path(cfg, plan):
            shutil.rmtree(work / "stores", ignore_errors=True)
            cfg.extract.writers = writers
            settle()
            return extract(cfg, plan, forward=synthetic)

        out[f"raw_w{writers}"] = n / timed(raw, fresh=raw_root)
        # the baseline and the store path take turns (after a warm-up of each), so that the machine's drift
        # hits both; the fastest of each is kept
        _clock(baseline, raw_root)
        store_path(memory_cfg, memory_plan)
        turns = [(_clock(baseline, raw_root), store_path(memory_cfg, memory_plan)) for _ in range(args.turns)]
        fastest_base = min(range(len(turns)), key=lambda i: turns[i][0])
        fastest_store = min((result for _, result in turns), key=lambda result: result.stage_seconds)
        out[f"baseline_w{writers}"] = n / turns[fastest_base][0]
        out[f"store_w{writers}"] = n / fastest_store.stage_seconds
        # whether the writers waited (CPU / wall of their writes below 1) and whether the main thread waited
        # for them (its share of the clock): where a store path that stops scaling spends its time
        out[f"baseline_times_w{writers}"] = (busy(baseline_times[-args.turns + fastest_base]), None)
        out[f"store_times_w{writers}"] = (busy(fastest_store.writes),
                                          fastest_store.writes.submit_wait_s / fastest_store.stage_seconds)
    shutil.rmtree(raw_root, ignore_errors=True)

    # the whole extraction of the files with the real model (fewer images on a CPU), with the writer count
    # whose store path was fastest above (on a CPU: about four seconds of forward, at least --forward-images)
    extract_n = len(train) if cuda else min(len(train), max(args.forward_images, int(4 * out["forward"])))
    out["extract_writers"] = max(args.writers, key=lambda w: out[f"store_w{w}"])
    whole_cfg = compose_cfg([*common, "data=folder", f"data.root={folder}", "+data.sizes.val=0",
                             f"+data.sizes.train={extract_n}", f"extract.writers={out['extract_writers']}"])

    def whole(cfg, plan):
        shutil.rmtree(work / "stores", ignore_errors=True)
        settle()
        return extract(cfg, plan)

    whole_plan = plan_store(whole_cfg)
    out["extract"] = stage_rate(whole, whole_cfg, whole_plan, repeats=2 if cuda else 1)
    made = open_store(whole_plan.path)  # what the store says made its rows (pipeline/storage/runs.py)
    out["run"] = runs.describe(runs.records(made.group)[-1]) if made is not None else "no store"
    shutil.rmtree(work / "stores", ignore_errors=True)
    out["mib_per_image"] = mib_per_image
    return out


def report(r: dict, writers: list[int]) -> None:
    mib = r["mib_per_image"]
    best_raw = max(r[f"raw_w{w}"] for w in writers)
    limit = min(r["forward"], r["decode"], best_raw)
    print(f"{r['case']}: {r['taps']} taps, D = {r['D']:,} ({mib:.2f} MiB of float16 per image), {r['images']} JPEGs, {r['store_images']} images for the store rows")
    print(f"  forward (bare)       {r['forward']:9,.0f} img/s")
    print(f"  decode (loader)      {r['decode']:9,.0f} img/s")
    for w in writers:
        raw, base, store = r[f"raw_w{w}"], r[f"baseline_w{w}"], r[f"store_w{w}"]
        print(f"  {w} writer(s): raw np.save {raw:8,.0f} img/s ({raw * mib:7,.0f} MiB/s)   baseline {base:7,.0f} img/s"
              f"   store path {store:7,.0f} img/s ({store * mib:6,.0f} MiB/s)   store/baseline {store / base:4.2f}"
              f"   store/raw {store / raw:4.2f}")
        (base_busy, _), (store_busy, waited) = r[f"baseline_times_w{w}"], r[f"store_times_w{w}"]
        print(f"      writers' CPU / wall of their writes: baseline {base_busy:4.2f}, store path {store_busy:4.2f}"
              f" (below 1: waiting for the GIL, a lock, the disk or a core); main thread waiting for a free writer: {waited:4.2f} of the store path's clock")
    print(f"  h2t extract          {r['extract']:9,.0f} img/s  ({r['extract_writers']} writer(s): the fastest store path above)")
    print(f"      its store's record of the run: {r['run']}")
    print(f"  roofline: extract / min(forward, decode, raw write) = {r['extract']:,.0f} / {limit:,.0f} = "
          f"{r['extract'] / limit:.2f}", flush=True)


def main() -> None:
    keep_freed_memory()  # as the h2t command does (pipeline/runtime.py)
    freeze_imported()  # and its start-up objects out of the collector's scans
    configure_io()  # as the h2t command does: zarr's codec pipeline and I/O threads (pipeline/storage)
    register()  # the schema conf/ starts from (pipeline/config.py)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=None, help="JPEGs (default: 2048 on CUDA, 256 on a CPU)")
    parser.add_argument("--forward-images", type=int, default=96, help="CPU only: images through the real model")
    parser.add_argument("--store-images", type=int, default=None,
                        help="in-memory images for the raw, baseline and store-path rows (default 2048 / 1024)")
    parser.add_argument("--turns", type=int, default=3, help="baseline / store path turns (fastest of each kept)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--case", action="append", help="a key of CASES (repeatable); default: all")
    parser.add_argument("--writers", default=None, help="comma-separated (default: 4,8 on CUDA, 1,2 on a CPU)")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for every case, e.g. store.compression=none")
    args = parser.parse_args()
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    args.images = args.images or (2048 if cuda else 256)
    args.store_images = args.store_images or (2048 if cuda else 1024)
    args.writers = [int(w) for w in (args.writers or ("4,8" if cuda else "1,2")).split(",")]
    args.workers = args.workers or (max(2, (os.cpu_count() or 2) - 4) if cuda else decode_workers(None, device))
    work = Path(tempfile.mkdtemp(prefix="h2t-roofline-"))
    try:
        folder = work / "images"
        make_folder(folder, args.images)
        print(f"{args.images} JPEGs (256 px), device {device}"
              f"{' (' + torch.cuda.get_device_name() + ')' if cuda else ''}, {os.cpu_count()} CPUs, "
              f"{args.workers} decode workers", flush=True)
        for name, overrides in CASES.items():
            if args.case and name not in args.case:
                continue
            report(run_case(name, overrides, args, folder, work, device), args.writers)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
