import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pipeline.cli import CONF_DIR
from pipeline.config import ExtractJob, H2TConfig, ModelConfig, ScoreConfig, register, settings
from pipeline.runtime import keep_freed_memory
from pipeline.storage import configure_io
from pipeline.storage.store import create_store


def pytest_configure(config):
    keep_freed_memory()  # as the h2t command does: in-process forwards without a page fault per activation
    configure_io()  # as the h2t command does: zarr's codec pipeline and I/O thread pool
    register()  # the config schema conf/ starts from (pipeline/config.py)

TINY_OVERRIDES = ["model=resnet_tiny", "data=shapes_location", "data.num_classes=4", "data.image_size=32",
                  "data.sizes.train=40", "data.sizes.val=8", "data.sizes.test=20", "pooling.target_size=128",
                  "store.col_chunk=32", "extract.batch_size=16", "extract.device=cpu", "extract.progress=false",
                  "extract.poll_s=0.1", "extract.workers=2"]


def compose_cfg(verb: str = "extract", overrides=()):
    """A config composed from the shipped conf/ as the CLI composes it (schema and defaults included)."""
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=verb, overrides=list(overrides))


def _typed(cfg, over: dict) -> H2TConfig:
    for key, value in over.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return settings(cfg)


def tiny_cfg(tmp_path, verb: str = "extract", **over) -> H2TConfig:
    """The small random ResNet on a 4-class shapes task, composed from conf/ and typed as the CLI types it;
    `over`: dotted key -> value."""
    return _typed(compose_cfg(verb, TINY_OVERRIDES + [f"store.root={tmp_path / 'stores'}"]), over)


def tiny_job(tmp_path, **over) -> ExtractJob:
    """The extraction of `tiny_cfg`."""
    return tiny_cfg(tmp_path, **over).extract_job()


def schema_cfg(**over) -> H2TConfig:
    """The schema's defaults (pipeline/config.py) with `over` (dotted key -> value): settings for stages that
    never build a model (probes and tunes of hand-made stores)."""
    cfg = OmegaConf.structured(H2TConfig)
    cfg.model.name = "synthetic"
    return _typed(cfg, over)


def make_store(path, features: dict[str, np.ndarray], labels: dict[str, np.ndarray], num_classes: int,
               shard_rows: int = 16, dtype: str = "float32", spec: dict | None = None, complete: bool = True):
    """A complete store holding the given per-split matrices, split into layers of the given widths.

    `features[split]` is (n, D); layer widths come from `spec["widths"]` (default: one layer).
    """
    spec = spec or {}
    widths = spec.get("widths") or [next(iter(features.values())).shape[1]]
    layers, offset = [], 0
    for i, w in enumerate(widths):
        layers.append({"name": f"layer{i}", "role": "test", "raw_shape": [w], "dim": w, "offset": offset})
        offset += w
    full_spec = {"model": {"name": "synthetic"}, "dataset": {"name": "synthetic"}, **spec}
    store = create_store(str(path), full_spec, layers, {s: len(y) for s, y in labels.items()}, num_classes,
                         [str(c) for c in range(num_classes)], shard_rows, dtype, 64, "zstd")
    for split, X in features.items():
        store.group[f"{split}/labels"][:] = labels[split]
        store.group[f"{split}/sample_ids"][:] = np.array([str(i) for i in range(len(X))])
        for start in range(0, len(X), shard_rows):
            rows = X[start:start + shard_rows]
            store.write_rows(split, start, [store.encode(l["name"], rows[:, l["offset"]:l["offset"] + l["dim"]], dtype)
                                            for l in layers])
    if complete:
        store.mark_complete()
    return store


def score_cfg(**overrides):
    """Scoring settings (a ScoreConfig) for the tests' small problems; `overrides`: its fields."""
    return ScoreConfig(**{"lam": 1e-2, "solver": "working_set", "max_iter": 50, "tol": 1e-3, "memory_budget_mb": 512,
                          **overrides})


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def model_cfg(**kw):
    base = {"name": "resnet10t", "pretrained": False, "weights": None, "checkpoint": None, "download": False,
            "seed": 0, "input_size": 32, "interpolation": None, "mean": None, "std": None, "resize": None,
            "crop_pct": None, "use_test_size": False}
    base.update(kw)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), base))


# A store big enough for several writers to share (tests of resume and concurrency).
ARGS = ["model=resnet_tiny", "data=shapes_count", "data.num_classes=4", "data.image_size=48", "model.input_size=48",
        "data.sizes.train=320", "data.sizes.val=32", "data.sizes.test=128", "pooling.target_size=256",
        "extract.batch_size=16", "extract.progress=false"]
OVERRIDES = {"data.task": "count", "data.image_size": 48, "model.input_size": 48, "pooling.target_size": 256,
             "data.sizes": {"train": 320, "val": 32, "test": 128}}


def shard_object(store, key: str, shard: int) -> Path:
    """Where the object holding one row shard of the store's array `key` lies on the local disk (named by the
    array's own chunk-key encoding)."""
    from pipeline.storage.zarr_compat import chunk_key

    array = store.group[key]
    coords = (shard,) if len(array.shape) == 1 else (shard, 0)
    return Path(store.path) / key / chunk_key(array, coords)
