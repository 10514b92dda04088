"""Extraction on a CUDA device against the bare bf16 forward on the same batches (goal: >= 0.9).

    python benchmarks/gpu_extract.py [--images 2048] [--model resnet50] [--target-size 8192]

Generates a folder of JPEG images (procedural shapes, 256 px, ten classes), then measures on the same
batches: (a) the bare forward, bf16 autocast, channels-last, on batches already on the device (the GPU's
own speed, nothing else), (b) JPEG decode alone through the loader (what the CPUs can feed), (c) `h2t
extract` of every tap at T into a fresh local store (decode, pinned copies, bf16 forward with taps, pooling,
checks, float16 cast, one device-to-host copy per batch, parallel sharded writes). Prints images/s and
extraction / bare forward. benchmarks/gpu_check.sh runs it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from PIL import Image, ImageDraw

from pipeline.backbone import build_model
from pipeline.cli import CONF_DIR
from pipeline.extract import extract, plan_store
from pipeline.stages import Loader, Shard


def write_images(args) -> None:
    root, split, start, stop = args
    rng = np.random.default_rng(start)
    for i in range(start, stop):
        label = i % 10
        img = Image.new("RGB", (256, 256), tuple(int(v) for v in rng.integers(0, 255, 3)))
        draw = ImageDraw.Draw(img)
        for _ in range(label + 1):
            x, y = (int(v) for v in rng.integers(0, 220, 2))
            draw.ellipse([x, y, x + 36, y + 36], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        folder = os.path.join(root, split, f"class{label}")
        os.makedirs(folder, exist_ok=True)
        img.save(os.path.join(folder, f"{i:06d}.jpg"), quality=90)


def make_folder(root: str, n: int) -> None:
    jobs = [(root, split, s, min(s + 128, stop)) for split, (lo, stop) in
            {"train": (0, n // 2), "test": (n // 2, n)}.items() for s in range(lo, stop, 128)]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(write_images, jobs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--target-size", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=max(2, (os.cpu_count() or 4) - 4))
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--device", default="cuda", help="cpu only to try the script out")
    args = parser.parse_args()
    device = torch.device(args.device)
    assert device.type == "cpu" or torch.cuda.is_available(), "needs a CUDA device"
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    tmp = tempfile.mkdtemp(prefix="h2t-gpu-")
    data, stores = os.path.join(tmp, "images"), os.path.join(tmp, "stores")
    t = time.perf_counter()
    make_folder(data, args.images)
    print(f"generated {args.images} JPEGs in {time.perf_counter() - t:.1f} s; {os.cpu_count()} CPUs, "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}", flush=True)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="extract", overrides=[
            "model=timm", f"model.name={args.model}", "model.pretrained=false", "model.input_size=224",
            "model.precision=bfloat16", f"pooling.target_size={args.target_size}", "data=folder",
            f"data.root={data}", f"store.root={stores}", f"extract.device={device}",
            "extract.channels_last=true", f"extract.batch_size={args.batch}", f"extract.workers={args.workers}",
            f"extract.writers={args.writers}", "extract.progress=false"])
    plan = plan_store(cfg)
    D = sum(layer["dim"] for layer in plan.layers)
    shards = [Shard(name, s, min(s + args.batch, len(split)), i) for name, split in plan.dataset.splits.items()
              for i, s in enumerate(range(0, len(split), args.batch))]
    n = sum(s.stop - s.start for s in shards)

    if device.type == "cuda":
        torch.zeros(1, device=device)  # the CUDA context, before anything is timed
        torch.empty(1, pin_memory=True)
    loader = Loader(plan.dataset, args.workers, pin=device.type == "cuda")
    t = time.perf_counter()
    futures = [loader.submit(s) for s in shards]
    host = [f.result() for f in futures]
    t_decode = time.perf_counter() - t
    loader.close()
    batches = [plan.preprocess(images, device).contiguous(memory_format=torch.channels_last) for images in host]
    del host
    model = build_model(cfg.model).to(device).to(memory_format=torch.channels_last)

    def bare() -> float:
        sync()
        start = time.perf_counter()
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            for x in batches:
                model(x)
        sync()
        return time.perf_counter() - start

    def stored() -> float:
        shutil.rmtree(stores, ignore_errors=True)
        result = extract(cfg, plan)
        assert result.backbone_images == n, result.backbone_images
        return result.seconds

    bare()
    t_bare = min(bare() for _ in range(3))
    batches.clear()  # free the device memory before extraction
    if device.type == "cuda":
        torch.cuda.empty_cache()
    stored()
    t_store = min(stored() for _ in range(2))
    store_bytes = sum(f.stat().st_size for f in __import__("pathlib").Path(stores).rglob("*") if f.is_file())
    print(f"{args.model} @ 224, bf16, {len(plan.layers)} taps, T={args.target_size}, D={D:,}, {n} images, "
          f"batch {args.batch}, {args.workers} decode threads, {args.writers} writers")
    print(f"bare bf16 forward (batches on the device) {n / t_bare:8.0f} img/s")
    print(f"JPEG decode through the loader            {n / t_decode:8.0f} img/s")
    print(f"h2t extract into the store                {n / t_store:8.0f} img/s  "
          f"({n * D * 2 / t_store / 2**20:,.0f} MiB/s of float16; {store_bytes / 2**20:,.0f} MiB on disk)")
    print(f"ratio extraction / bare forward throughput = {t_bare / t_store:.3f}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
