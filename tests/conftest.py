import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from omegaconf import OmegaConf

from pipeline.storage.store import create_store


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
    base = {"lam": 1e-2, "solver": "working_set", "max_iter": 50, "tol": 1e-3, "memory_budget_mb": 512}
    base.update(overrides)
    return OmegaConf.create(base)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
