"""Probing a complete store: score -> select -> head, for Head2Toe or the linear-probe baseline."""
from __future__ import annotations

import time

from .errors import H2TError
from .head import accuracy, evaluate, read_columns, train_linear_head
from .score import score_store
from .select import column_plan, kept, ranking, whole_layers
from .storage import views

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


def view_fraction(store_cfg) -> float:
    value = store_cfg.get("view_fraction", 0.2)
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        fraction = float("nan")
    if not 0.0 < fraction <= 1.0:
        raise H2TError(f"store.view_fraction must be in (0, 1], got {value!r}")
    return fraction


def probe_store(store, cfg, method: str, progress: bool = False) -> dict:
    """Fit on the train split, report validation and test accuracy; the backbone is never touched.

    Head2Toe's selected columns are read through a column view of the scores when the store allows one
    (`store.column_views`; pipeline/storage/views.py); validation and test are read and scored in row
    blocks, so memory holds the train split's selected columns and one block of another split."""
    if method not in METHODS:
        raise H2TError(f"unknown method={method!r}; known: {', '.join(METHODS)}")
    if not store.complete:
        raise H2TError(f"store {store.path} is incomplete (status {store.meta['status']}): rerun h2t extract")
    head_cfg = cfg.head
    for key in ("lr", "steps", "batch_size"):
        if not float(head_cfg[key]) > 0:
            raise H2TError(f"head.{key} must be > 0, got {head_cfg[key]}")
    fraction_viewed = view_fraction(cfg.store) if cfg.store.get("column_views", True) else None
    timings, info, view = {}, {}, None
    t = time.perf_counter()
    lam = fraction = None
    if method == "head2toe":
        relevance, info = score_store(store, cfg.score, "train", progress=progress)
        timings["score"] = time.perf_counter() - t
        t = time.perf_counter()
        fraction = float(cfg.select.fraction)
        lam = float(cfg.score.lam)
        order = ranking(relevance["weight_sq"], relevance["grad_norm"])
        k = kept(len(order), fraction)
        plan = column_plan(order[:k], store.layers)
        timings["select"] = time.perf_counter() - t
        if fraction_viewed is not None:
            t = time.perf_counter()
            view = views.view_for(store, info["key"], order, k, fraction_viewed, progress=progress)
            timings["view"] = time.perf_counter() - t
    else:
        plan = whole_layers(store.layers, [cfg.linear.layer])
    t = time.perf_counter()
    n_selected = int(sum(len(c) for c in plan.values()))
    block_rows = max(1, int(float(cfg.score.memory_budget_mb) * 2**20 // (3 * 4 * n_selected)))
    X_train, y_train = read_columns(store, "train", plan, view), store.labels("train")
    timings["read"] = time.perf_counter() - t
    t = time.perf_counter()
    head = train_linear_head(X_train, y_train, store.meta["num_classes"], float(head_cfg.lr),
                             int(head_cfg.steps), int(head_cfg.batch_size), int(head_cfg.seed))
    timings["head"] = time.perf_counter() - t
    t = time.perf_counter()
    train_accuracy = accuracy(head, X_train, y_train)
    del X_train
    scores = {split: evaluate(head, store, split, plan, view, block_rows) for split in ("val", "test")
              if split in store.splits()}
    timings["evaluate"] = time.perf_counter() - t
    spec = store.meta["spec"]
    return {
        "task": spec["dataset"]["name"], "model": spec["model"]["name"], "store_id": store.id,
        "store_path": str(store.path), "method": method, "target_size": spec["pooling"]["target_size"],
        "lam": lam, "fraction": fraction, "n_features_total": store.n_features,
        "n_features_selected": n_selected,
        "selected_per_layer": {name: int(len(cols)) for name, cols in plan.items()},
        "train_accuracy": train_accuracy, "val_accuracy": scores.get("val"), "test_accuracy": scores["test"],
        "skipped_samples": [item["id"] for item in store.meta.get("skipped", [])],
        "scoring": {k: v for k, v in info.items()},
        "column_view": None if view is None else {"key": view.key, "width": view.width},
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
