"""Probing a complete store: score -> select -> head, for Head2Toe or the linear-probe baseline."""
from __future__ import annotations

import time

from .errors import H2TError
from .head import accuracy, read_columns, train_linear_head
from .score import score_store
from .select import top_fraction, whole_layers

METHODS = ("head2toe", "linear")
ON_INCOMPLETE = ("extract", "wait", "error")


def wait_for_store(cfg, plan, clock=time.monotonic, sleep=time.sleep) -> None:
    """What a probe does when the store exists but is still being written (`probe.on_incomplete`):
    `extract` joins the writers (the default), `wait` polls until it is complete (at most `probe.wait_s`),
    `error` stops with a message. Readers only ever read complete stores."""
    from .storage import location
    from .storage.store import open_store

    policy = cfg.probe.on_incomplete
    if policy not in ON_INCOMPLETE:
        raise H2TError(f"probe.on_incomplete must be one of {', '.join(ON_INCOMPLETE)}, got {policy!r}")
    if policy == "extract":
        return
    options = location.storage_options(cfg.store)
    deadline = clock() + float(cfg.probe.wait_s)
    while True:
        store = open_store(plan.path, plan.spec, options)
        if store is None or store.complete:
            return  # nothing yet (this job extracts it) or ready
        done = sum(int(store.shards_done(s).sum()) for s in store.splits())
        total = sum(len(store.shards_done(s)) for s in store.splits())
        if policy == "error" or clock() > deadline:
            raise H2TError(f"store {store.id} at {plan.path} is being written ({done} of {total} shards): "
                           f"rerun later, or use probe.on_incomplete=wait|extract")
        sleep(float(cfg.extract.poll_s))


def probe_store(store, cfg, method: str, progress: bool = False) -> dict:
    """Fit on the train split, report validation and test accuracy; the backbone is never touched."""
    if method not in METHODS:
        raise H2TError(f"unknown method={method!r}; known: {', '.join(METHODS)}")
    if not store.complete:
        raise H2TError(f"store {store.path} is incomplete (status {store.meta['status']}): rerun h2t extract")
    timings, info = {}, {}
    t = time.perf_counter()
    lam = fraction = None
    if method == "head2toe":
        relevance, info = score_store(store, cfg.score, "train", progress=progress)
        timings["score"] = time.perf_counter() - t
        t = time.perf_counter()
        fraction = float(cfg.select.fraction)
        lam = float(cfg.score.lam)
        plan = top_fraction(relevance["weight_sq"], store.layers, fraction, tiebreak=relevance["grad_norm"])
        timings["select"] = time.perf_counter() - t
    else:
        plan = whole_layers(store.layers, [cfg.linear.layer])
    t = time.perf_counter()
    splits = [s for s in ("train", "val", "test") if s in store.splits()]
    features = {s: read_columns(store, s, plan) for s in splits}
    labels = {s: store.labels(s) for s in splits}
    timings["read"] = time.perf_counter() - t
    t = time.perf_counter()
    head_cfg = cfg.head
    for key in ("lr", "steps", "batch_size"):
        if not float(head_cfg[key]) > 0:
            raise H2TError(f"head.{key} must be > 0, got {head_cfg[key]}")
    head = train_linear_head(features["train"], labels["train"], store.meta["num_classes"], float(head_cfg.lr),
                             int(head_cfg.steps), int(head_cfg.batch_size), int(head_cfg.seed))
    timings["head"] = time.perf_counter() - t
    spec = store.meta["spec"]
    return {
        "task": spec["dataset"]["name"], "model": spec["model"]["name"], "store_id": store.id,
        "store_path": str(store.path), "method": method, "target_size": spec["pooling"]["target_size"],
        "lam": lam, "fraction": fraction, "n_features_total": store.n_features,
        "n_features_selected": int(sum(len(c) for c in plan.values())),
        "selected_per_layer": {name: int(len(cols)) for name, cols in plan.items()},
        "train_accuracy": accuracy(head, features["train"], labels["train"]),
        "val_accuracy": accuracy(head, features["val"], labels["val"]) if "val" in features else None,
        "test_accuracy": accuracy(head, features["test"], labels["test"]),
        "skipped_samples": [item["id"] for item in store.meta.get("skipped", [])],
        "scoring": {k: v for k, v in info.items()},
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
