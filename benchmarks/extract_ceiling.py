"""The store path's ceiling: images/s that extraction absorbs when the backbone costs nothing.

    python benchmarks/extract_ceiling.py [--images 1024] [--writers 1,2,4] [--device auto] [overrides ...]

The whole pipeline runs (claims, loading, preprocessing on the device, checks, casts, one device-to-host
copy per batch, sharded writes with the store's codec (lz4 unless an override says otherwise) and CRC32C, the
ledger) with the forward replaced by tensors of a real model's pooled tap shapes (ReLU'd normal values, about
half zeros, like activations): ResNet-50 @ 224 at T = 8192 (51 taps, D = 517,160, ~1 MiB of float16 per image;
the store's layout included in the time) and the embedded default
(EfficientNet-Lite0 @ 160, T = 1024). If a GPU's forward is faster than this figure, the store keeps it
fed. Baselines in the same run: the same loop without the store (load + preprocess + the synthetic
tensors), and raw `np.save` of the same float16 blocks (one file per tap and shard, as many threads as
writers): what the disk and page cache take, uncompressed and unchecked.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from pipeline.config import CONF_DIR, register, settings
from pipeline.extract import extract, plan_store, resolve_device
from pipeline.runtime import freeze_imported, keep_freed_memory
from pipeline.storage import configure_io

CASES = {
    "resnet50@224 T=8192": ["model=timm", "model.name=resnet50", "model.pretrained=false", "model.input_size=224",
                            "pooling.target_size=8192", "data.image_size=64"],
    "efficientnet_lite0@160 T=1024 (default)": ["model=efficientnet_lite0", "pooling.target_size=1024"],
}


class SyntheticForward:
    """Stands in for the tapped backbone: each tap's pooled (B, dim) block, made once on the device."""

    def __init__(self, layers: list[dict], rows: int, device: torch.device):
        generator = torch.Generator(device="cpu").manual_seed(0)
        self.blocks = [torch.relu(torch.randn(rows, layer["dim"], generator=generator)).to(device) for layer in layers]

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [block[:x.shape[0]] for block in self.blocks]


def main() -> None:
    keep_freed_memory()  # as the h2t command does (pipeline/runtime.py)
    freeze_imported()  # and its start-up objects out of the collector's scans
    configure_io()  # as the h2t command does: zarr's codec pipeline and I/O threads (pipeline/storage)
    register()  # the schema conf/ starts from (pipeline/config.py)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--writers", default="1,2,4")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--case", default=None, help="run one case (a key of CASES)")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for every case, e.g. store.compression=none")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="h2t-ceiling-")
    device = resolve_device(args.device)
    n = args.images
    try:
        for case, overrides in CASES.items():
            if args.case and args.case != case:
                continue
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = compose(config_name="extract", overrides=[
                    *overrides, f"store.root={root}", "extract.progress=false", f"extract.device={device}",
                    f"extract.workers={args.workers}", "data=shapes_location",
                    f"data.sizes.train={n}", "data.sizes.val=1", "data.sizes.test=1", *args.overrides])
            cfg.data.image_size = cfg.data.get("image_size") or 64
            cfg = settings(cfg).extract_job()
            plan = plan_store(cfg)
            batch = int(cfg.extract.batch_size)
            forward = SyntheticForward(plan.layers, batch, device)
            D = sum(layer["dim"] for layer in plan.layers)
            mib = n * D * 2 / 2**20

            def no_store() -> float:
                split = plan.dataset.splits["train"]
                start = time.perf_counter()
                for s in range(0, len(split), batch):
                    x = plan.preprocess(split.load(s, min(s + batch, len(split))), device)
                    forward(x)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                return time.perf_counter() - start

            def stored(writers: int) -> float:
                shutil.rmtree(root, ignore_errors=True)
                os.sync()  # the previous run's writeback is written before this one starts (roofline.py's settle)
                cfg.extract.writers = writers
                return extract(cfg, plan, forward=forward)

            def raw_files(writers: int) -> float:
                shutil.rmtree(root, ignore_errors=True)
                os.makedirs(root)
                host = [b.to(torch.float16).cpu().numpy() for b in forward.blocks]
                shards = range(-(-n // batch))

                def save(shard: int) -> None:
                    rows = min(batch, n - shard * batch)
                    for t, block in enumerate(host):
                        np.save(os.path.join(root, f"{t}-{shard}.npy"), block[:rows])

                os.sync()
                start = time.perf_counter()
                with ThreadPoolExecutor(writers) as pool:
                    list(pool.map(save, shards))
                return time.perf_counter() - start

            no_store()
            t_base = min(no_store() for _ in range(2))
            print(f"{case}: {len(plan.layers)} taps, D={D:,}, {n} images = {mib:,.0f} MiB of float16, "
                  f"device {device}, {os.cpu_count()} CPUs")
            print(f"  without the store (load + preprocess + tensors): {n / t_base:8.0f} img/s")
            for writers in (int(w) for w in args.writers.split(",")):
                raw_files(writers)
                t_raw = min(raw_files(writers) for _ in range(2))
                print(f"  raw np.save files, {writers} thread(s): {n / t_raw:8.0f} img/s  {mib / t_raw:7.0f} MiB/s")
                stored(writers)  # warm-up
                best = min((stored(writers) for _ in range(2)), key=lambda result: result.seconds)
                t, times = best.seconds, best.writes
                print(f"  store path, {writers} writer(s): {n / t:8.0f} img/s  {mib / t:7.0f} MiB/s  "
                      f"ratio to no store {t / t_base:5.2f}, to raw files {t / t_raw:5.2f}")
                print(f"      writers' CPU / wall of their writes {times.cpu_s / times.wall_s:4.2f} (below 1: waiting for the GIL, a lock, the disk or a core), "
                      f"{times.cpu_s / n * 1e3:5.2f} ms of writer CPU per image; main thread waiting for a free "
                      f"writer {times.submit_wait_s / best.stage_seconds:4.2f} of the clock")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
