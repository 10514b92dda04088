"""Probing a complete store: score -> select -> head, for Head2Toe or the linear-probe baseline."""
from __future__ import annotations

import time
import warnings
from collections import deque
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import HeadConfig, Method, ProbeJob, ScoreConfig, SelectConfig, TieRule
from .devices import native_bfloat16, resolve_device
from .errors import H2TError
from .head import (
    accuracy,
    evaluate,
    head_workers,
    read_columns,
    save_head,
    stack_heads,
    train_linear_head,
    train_stacked_heads,
    training_pool,
)
from .rows import Rows
from .score.cluster import ScoreRuntime
from .score.relevance import CLUSTER_UNION, score_params, score_path
from .select import column_plan, kept, linear_plan, ranking, whole_layers
from .storage import views
from .storage.union import StoreUnion


def check_settings(job: ProbeJob) -> None:
    """Every probe setting that can be checked without data, before any extraction or scoring."""
    check_head(job.head)
    if job.method == Method.head2toe:
        score_params(job.score, {})
        kept(1, job.select.fraction)
        if job.select.tie_rule == TieRule.entry and job.select.entry_steps < 1:
            raise H2TError(f"select.entry_steps must be >= 1, got {job.select.entry_steps}")
        if job.score.cluster and len(job.models()) > 1:
            raise H2TError(CLUSTER_UNION)
    fit_on = list(job.fit_on)
    if not fit_on or "test" in fit_on or len(set(fit_on)) != len(fit_on):
        raise H2TError(f"probe.fit_on must list distinct splits other than test, e.g. [train] or [train, val]; "
                       f"got {fit_on}")
    if job.column_views:
        view_fraction(job)


def view_fraction(job: ProbeJob) -> float:
    fraction = float(job.view_fraction)
    if not 0.0 < fraction <= 1.0:
        raise H2TError(f"store.view_fraction must be in (0, 1], got {job.view_fraction!r}")
    return fraction


def fit_rows(store, fit_on: list[str]) -> tuple[Rows, Rows | None]:
    """The rows a probe fits on (`probe.fit_on`: [train] for train800, [train, val] for the final run of the
    protocol, train800val200) and the rows it validates on: the store's `val` split unless it is fitted on."""
    names = list(fit_on)
    unknown = [n for n in names if n not in store.splits()]
    if not names or unknown or "test" in names:
        raise H2TError(f"probe.fit_on must name splits of the store other than test "
                       f"({', '.join(s for s in store.splits() if s != 'test')}), got {names}")
    rows = Rows.of(store, names)
    validate = Rows.of(store, "val") if "val" in store.splits() and "val" not in names else None
    return rows, validate


def check_head(head: HeadConfig) -> None:
    for key in ("lr", "steps", "batch_size"):
        if not getattr(head, key) > 0:
            raise H2TError(f"head.{key} must be > 0, got {getattr(head, key)!r}")
    if head.workers is not None and not head.workers >= 1:
        raise H2TError(f"head.workers must be >= 1 or null, got {head.workers!r}")
    device = resolve_device(head.device, "head.device")  # a device this machine lacks is named before any work
    if str(head.precision) == "bfloat16" and native_bfloat16(device) is False:
        warnings.warn(f"head.precision=bfloat16: {device} has no bfloat16 dot products, so the heads' products are "
                      "emulated (slower than float32)", stacklevel=2)


def rankings(store, score: ScoreConfig, select: SelectConfig, rows: Rows, lams, progress: bool = False,
             runtime: ScoreRuntime | None = None) -> list[tuple[np.ndarray, dict]]:
    """For each λ of `lams`: every feature, most relevant first, by the group lasso at λ fitted on `rows`,
    and the scoring info. All the λ (and the entry paths below them) are solved on one path, from the
    largest down, warm-started (pipeline/score/relevance.py).

    Exact zeros are ordered by `select.tie_rule`: `gradient` (how far each zero row is from entering: its
    gradient norm at the solution) or `entry` (the largest λ of the path λ/2, λ/4, ... (`select.entry_steps`
    points) at which the row is non-zero, then the gradient norm)."""
    steps = int(select.entry_steps) if select.tie_rule == TieRule.entry else 0
    if select.tie_rule == TieRule.entry and steps < 1:
        raise H2TError(f"select.entry_steps must be >= 1, got {steps}")
    paths = {float(lam): [float(lam) * 0.5**j for j in range(steps + 1)] for lam in lams}
    points = sorted({point for path in paths.values() for point in path}, reverse=True)
    solved = dict(zip(points, score_path(store, score, rows, points, progress, runtime=runtime)))
    out = []
    for lam in lams:
        path = paths[float(lam)]
        relevance, info = solved[path[0]]
        info = {**info, "ranking_key": info["key"]}
        entry = None
        if steps:
            entry = np.zeros(len(relevance["weight_sq"]))
            for point in reversed(path[1:]):  # smallest λ first: larger ones overwrite
                entry[solved[point][0]["weight_sq"] > 0] = point
            info["ranking_key"] = f"{info['key']}-entry{steps}"
            info["entry_path"] = path[1:]
        out.append((ranking(relevance["weight_sq"], relevance["grad_norm"], entry), info))
    return out


def per_backbone(store, selected: dict[str, int]) -> dict[str, int] | None:
    """How many selected features come from each backbone of a union (None for one store)."""
    if not isinstance(store, StoreUnion):
        return None
    counts = dict.fromkeys(store.names, 0)
    for layer in store.layers:
        counts[layer["member"]] += int(selected.get(layer["name"], 0))
    return counts


def probe_layers(store, job: ProbeJob, progress: bool = False, save_head_to: Path | None = None) -> dict:
    """`method=per_layer`: the linear probe's head (the same lr, steps and rows) trained on each tap alone;
    validation and test accuracy per tap, in network order. The result's own accuracies are those of the
    tap with the best validation accuracy (the earliest on ties), whose head is the one saved.

    The taps' heads share their rows: taps of similar width train as one stacked computation
    (`head.train_stacked_heads`, each tap's columns zero-padded to the widest of its batch: each head is the one
    trained alone up to the order of the products' sums). On a CPU batches of `TAPS_PER_BATCH` train in the
    tune's pool of single-threaded workers (`head.workers`); on a GPU (`head.stack`) as few batches as
    `score.memory_budget_mb` allows. A batch's taps are read in one pass over the fitted rows."""
    head_cfg = job.head
    check_head(head_cfg)
    fit, validate = fit_rows(store, job.fit_on)
    device = resolve_device(head_cfg.device, "head.device")
    y_fit = fit.labels(store)
    start = time.perf_counter()
    workers = head_workers(device, head_cfg.workers)
    per_batch = None if stack_heads(device, head_cfg.stack) else TAPS_PER_BATCH
    budget = float(job.score.memory_budget_mb) * 2**20 / (2 * workers)  # the rows as read and as stacked, per worker
    batches = tap_batches(store.layers, fit.size(store), budget, per_batch)
    setting = [(float(head_cfg.lr), int(head_cfg.steps))]
    trained: dict[str, tuple[dict, torch.nn.Linear, dict]] = {}
    bar = tqdm(total=len(store.layers), unit="tap", desc="per-layer probes", disable=not progress, leave=False)

    def finish(batch, plan, Xs, future) -> None:
        for layer, X_fit, (head,) in zip(batch, Xs, future.result()):
            tap = {layer["name"]: plan[layer["name"]]}
            trained[layer["name"]] = ({
                "layer": layer["name"], "dim": int(layer["dim"]), "train_accuracy": accuracy(head, X_fit, y_fit),
                "val_accuracy": None if validate is None else evaluate(head, store, validate, tap),
                "test_accuracy": evaluate(head, store, "test", tap)}, head, tap)
        bar.update(len(batch))

    with training_pool(workers) as pool:
        in_flight: deque = deque()  # at most `workers` batches' rows in memory
        for batch in batches:
            if len(in_flight) == workers:  # the oldest is scored while the others train
                finish(*in_flight.popleft())
            plan = whole_layers(store.layers, [layer["name"] for layer in batch])
            X_all = read_columns(store, fit, plan)  # each tap L2-normalised per row on its own, as read alone
            bounds = np.cumsum([0] + [int(layer["dim"]) for layer in batch])
            Xs = [X_all[:, a:b] for a, b in zip(bounds[:-1], bounds[1:])]
            in_flight.append((batch, plan, Xs, pool.submit(
                train_stacked_heads, Xs, y_fit, store.info.num_classes, setting, int(head_cfg.batch_size),
                int(head_cfg.seed), device, str(head_cfg.precision))))
        while in_flight:
            finish(*in_flight.popleft())
    bar.close()
    per_layer, best = [], None
    for layer in store.layers:  # network order; ties go to the earliest tap
        entry, head, plan = trained[layer["name"]]
        per_layer.append(entry)
        key = entry["val_accuracy"] if validate is not None else entry["train_accuracy"]
        if best is None or key > best[0]:
            best = (key, entry, head, plan)
    assert best is not None  # a store has at least one tap
    _, chosen, head, plan = best
    spec = store.info.spec
    result = {
        "task": spec["dataset"]["name"], "model": spec["model"]["name"], "store_id": store.id,
        "store_path": str(store.path), "method": str(Method.per_layer), "target_size": spec["pooling"]["target_size"],
        "lam": None, "fraction": None, "head_lr": float(head_cfg.lr), "head_steps": int(head_cfg.steps),
        "head_device": str(device), "head_precision": str(head_cfg.precision), "tie_rule": None,
        "n_features_total": store.n_features,
        "n_features_selected": chosen["dim"], "selected_per_layer": {chosen["layer"]: chosen["dim"]},
        "selected_per_backbone": per_backbone(store, {chosen["layer"]: chosen["dim"]}),
        "best_layer": chosen["layer"], "per_layer": per_layer,
        "fit_on": fit.describe(store), "validate_on": None if validate is None else validate.describe(store),
        "train_accuracy": chosen["train_accuracy"], "val_accuracy": chosen["val_accuracy"],
        "test_accuracy": chosen["test_accuracy"], "skipped_samples": [item["id"] for item in store.info.skipped],
        "scoring": {}, "column_view": None, "timings_s": {"per_layer": round(time.perf_counter() - start, 3)},
    }
    if save_head_to is not None:
        path = save_head(Path(save_head_to) / "per_layer.head.pt", head, store, plan, job.models(), result)
        result["head_file"] = str(path)
    return result


TAPS_PER_BATCH = 8  # per-layer probes on a CPU: 51 taps of <= 1,024 columns in 3.9-4.9 s, against 9.7 s one by one
                    # and 10.6 s all in one stack (1 tap: 7.1 s, 4: 4.7, 16: 5.3; two workers, 800 rows)


def tap_batches(layers: list[dict], rows: int, budget_bytes: float, per_batch: int | None = None) -> list[list[dict]]:
    """The taps in batches of similar width (narrowest first), each of at most `per_batch` taps (None: no limit)
    whose stacked float32 rows, padded to the batch's widest tap, take at most `budget_bytes`; a tap too wide
    for that alone is a batch of its own."""
    batches: list[list[dict]] = []
    for layer in sorted(layers, key=lambda layer: int(layer["dim"])):
        batch = batches[-1] if batches else None
        if (batch is not None and (per_batch is None or len(batch) < per_batch)
                and 4 * rows * int(layer["dim"]) * (len(batch) + 1) <= budget_bytes):
            batch.append(layer)
        else:
            batches.append([layer])
    return batches


def probe_store(store, job: ProbeJob, progress: bool = False, save_head_to: Path | None = None,
                runtime: ScoreRuntime | None = None) -> dict:
    """Fit on `probe.fit_on`, report validation and test accuracy; the backbone is never touched.

    Head2Toe's selected columns are read through a column view of the scores when the store allows one
    (`store.column_views`; pipeline/storage/views.py); validation and test are read and scored in row
    blocks, so memory holds the fitted rows' selected columns and one block of another split. With
    `save_head_to` (a folder), the head and what applying it needs go to <method>.head.pt (pipeline/predict.py)."""
    method = Method(job.method)
    if not store.complete:
        raise H2TError(f"store {store.path} is incomplete (status {store.info.status}): rerun h2t extract")
    if method == Method.per_layer:
        return probe_layers(store, job, progress, save_head_to)
    head_cfg = job.head
    check_head(head_cfg)
    fit, validate = fit_rows(store, job.fit_on)
    fraction_viewed = view_fraction(job) if job.column_views and not isinstance(store, StoreUnion) else None
    timings: dict[str, float] = {}
    info: dict = {}
    view = None
    t = time.perf_counter()
    lam = fraction = None
    if method == Method.head2toe:
        fraction = float(job.select.fraction)
        k = kept(store.n_features, fraction)
        lam = float(job.score.lam)
        (order, info), = rankings(store, job.score, job.select, fit, [lam], progress=progress, runtime=runtime)
        timings["score"] = time.perf_counter() - t
        t = time.perf_counter()
        plan = column_plan(order[:k], store.layers)
        timings["select"] = time.perf_counter() - t
        if fraction_viewed is not None:
            t = time.perf_counter()
            view = views.view_for(store, info["ranking_key"], order, k, fraction_viewed, progress=progress)
            timings["view"] = time.perf_counter() - t
    else:
        plan = linear_plan(store.layers, job.linear_layer)
    t = time.perf_counter()
    n_selected = int(sum(len(c) for c in plan.values()))
    block_rows = max(1, int(float(job.score.memory_budget_mb) * 2**20 // (3 * 4 * n_selected)))
    X_train, y_train = read_columns(store, fit, plan, view), fit.labels(store)
    timings["read"] = time.perf_counter() - t
    t = time.perf_counter()
    device = resolve_device(head_cfg.device, "head.device")
    head = train_linear_head(X_train, y_train, store.info.num_classes, float(head_cfg.lr),
                             int(head_cfg.steps), int(head_cfg.batch_size), int(head_cfg.seed), device,
                             str(head_cfg.precision))
    timings["head"] = time.perf_counter() - t
    t = time.perf_counter()
    train_accuracy = accuracy(head, X_train, y_train)
    del X_train
    val_accuracy = None if validate is None else evaluate(head, store, validate, plan, view, block_rows)
    test_accuracy = evaluate(head, store, "test", plan, view, block_rows)
    timings["evaluate"] = time.perf_counter() - t
    spec = store.info.spec
    result = {
        "task": spec["dataset"]["name"], "model": spec["model"]["name"], "store_id": store.id,
        "store_path": str(store.path), "method": str(method), "target_size": spec["pooling"]["target_size"],
        "lam": lam, "fraction": fraction, "head_lr": float(head_cfg.lr), "head_steps": int(head_cfg.steps),
        "head_device": str(device), "head_precision": str(head_cfg.precision),
        "tie_rule": str(job.select.tie_rule) if method == Method.head2toe else None,
        "n_features_total": store.n_features, "n_features_selected": n_selected,
        "selected_per_layer": ({layer["name"]: int(len(plan.get(layer["name"], ()))) for layer in store.layers}
                               if method == Method.head2toe else {name: int(len(cols)) for name, cols in plan.items()}),
        "selected_per_backbone": per_backbone(store, {name: len(cols) for name, cols in plan.items()}),
        "fit_on": fit.describe(store), "validate_on": None if validate is None else validate.describe(store),
        "train_accuracy": train_accuracy, "val_accuracy": val_accuracy, "test_accuracy": test_accuracy,
        "skipped_samples": [item["id"] for item in store.info.skipped],
        "scoring": {k: v for k, v in info.items()},
        "column_view": None if view is None else {"key": view.key, "width": view.width},
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    if save_head_to is not None:
        path = save_head(Path(save_head_to) / f"{method}.head.pt", head, store, plan, job.models(), result)
        result["head_file"] = str(path)
    return result
