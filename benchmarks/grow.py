"""Growing a store against extracting it from scratch, for more taps, fewer taps and another target size.

    python benchmarks/grow.py [--images 256] [--model-config efficientnet_lite0]

For each case, both are measured in this run on the same machine: (a) `extract` of the wanted store into an
empty root, (b) `extract` of the same store into a root that already holds a complete sibling (whose own
extraction is not timed). Also: taps that all sit early in the network against all taps, both from
scratch (the forward stops after the last tap).
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from hydra import compose, initialize_config_dir

from pipeline.config import CONF_DIR, register, settings
from pipeline.extract import extract, plan_store
from pipeline.storage import configure_io


def config(root: str, images: int, model: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return settings(compose(config_name="extract", overrides=[
            f"model={model}", f"store.root={root}", "extract.progress=false", f"data.sizes.train={images // 2}",
            "data.sizes.val=0", f"data.sizes.test={images - images // 2}", *overrides])).extract_job()


def taps_override(names: list[str]) -> str:
    return "taps.include=[" + ",".join(names) + "]"


def main() -> None:
    configure_io()  # as the h2t command does: zarr's codec pipeline and I/O threads (pipeline/storage)
    register()  # the schema conf/ starts from (pipeline/config.py)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--model-config", default="efficientnet_lite0")
    args = parser.parse_args()
    base = tempfile.mkdtemp(prefix="h2t-bench-grow-")
    n, model = args.images, args.model_config
    names = [layer["name"] for layer in plan_store(config(base, 2, model, [])).layers]
    half = len(names) // 2
    cases = [  # (label, source overrides, target overrides)
        ("more taps (first half -> all)", [taps_override(names[:half])], []),
        ("fewer taps (all -> second half)", [], [taps_override(names[half:])]),
        ("another T (1024 -> 2048)", ["pooling.target_size=1024"], ["pooling.target_size=2048"]),
    ]

    def timed(root: str, overrides: list[str]):
        result = extract(config(root, n, model, overrides))
        store = result.store
        return result.seconds, len(store.layers) - len(store.computed_layers), len(store.layers), result.backbone_images

    extract(config(os.path.join(base, "warm"), 32, model, []))  # warm-up: allocator, thread pools, page cache
    print(f"model {model}, {len(names)} taps, {n} images, {torch.get_num_threads()} threads")
    for label, source, target in cases:
        fresh_root, grow_root = os.path.join(base, "fresh"), os.path.join(base, "grow")
        fresh_s, *_ = timed(fresh_root, target)
        extract(config(grow_root, n, model, source))
        grow_s, copied, total, images = timed(grow_root, target)
        print(f"{label:34s} fresh {fresh_s:6.2f} s  grown {grow_s:6.2f} s  ({copied}/{total} taps copied, "
              f"{images} images through the backbone)  ratio grown / fresh = {grow_s / fresh_s:.3f}")
        shutil.rmtree(fresh_root), shutil.rmtree(grow_root)
    third = names[:len(names) // 3]
    early_s, *_ = timed(os.path.join(base, "early"), [taps_override(third)])
    all_s, *_ = timed(os.path.join(base, "all"), [])
    print(f"{'early taps only (first third)':34s} all {all_s:6.2f} s  early {early_s:6.2f} s  "
          f"ratio early / all = {early_s / all_s:.3f}")
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
