"""Probing a complete store: score -> select -> head, for Head2Toe or the linear-probe baseline."""
from __future__ import annotations

import time

import numpy as np

from .errors import H2TError
from .head import accuracy, evaluate, read_columns, train_linear_head
from .rows import Rows
from .score.relevance import score_path
from .select import TIE_RULES, column_plan, kept, ranking, whole_layers
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


def check_settings(cfg, methods) -> None:
    """Every probe setting that can be checked without data, before any extraction or scoring."""
    from .score.relevance import score_params

    for method in methods:
        if method not in METHODS:
            raise H2TError(f"unknown method={method!r}; known: {', '.join(METHODS)}")
    check_head(cfg.head)
    if "head2toe" in methods:
        score_params(cfg.score, {})
        kept(1, cfg.select.fraction)
        if cfg.select.get("tie_rule", "gradient") not in TIE_RULES:
            raise H2TError(f"select.tie_rule must be one of {', '.join(TIE_RULES)}, got {cfg.select.tie_rule!r}")
    fit_on = fit_on_names(cfg.get("probe", {}))
    if not fit_on or "test" in fit_on or len(set(fit_on)) != len(fit_on):
        raise H2TError(f"probe.fit_on must list distinct splits other than test, e.g. [train] or [train, val]; "
                       f"got {fit_on}")
    if cfg.store.get("column_views", True):
        view_fraction(cfg.store)


def view_fraction(store_cfg) -> float:
    value = store_cfg.get("view_fraction", 0.2)
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        fraction = float("nan")
    if not 0.0 < fraction <= 1.0:
        raise H2TError(f"store.view_fraction must be in (0, 1], got {value!r}")
    return fraction


def fit_on_names(probe_cfg) -> list[str]:
    """`probe.fit_on` as a list of split names (a single name is accepted)."""
    value = probe_cfg.get("fit_on", ["train"])
    return [value] if isinstance(value, str) else list(value or [])


def fit_rows(store, probe_cfg) -> tuple[Rows, Rows | None]:
    """The rows a probe fits on (`probe.fit_on`: [train] for train800, [train, val] for the final run of the
    protocol, train800val200) and the rows it validates on: the store's `val` split unless it is fitted on."""
    names = fit_on_names(probe_cfg)
    unknown = [n for n in names if n not in store.splits()]
    if not names or unknown or "test" in names:
        raise H2TError(f"probe.fit_on must name splits of the store other than test "
                       f"({', '.join(s for s in store.splits() if s != 'test')}), got {names}")
    rows = Rows.of(store, names)
    validate = Rows.of(store, "val") if "val" in store.splits() and "val" not in names else None
    return rows, validate


def check_head(head_cfg) -> None:
    for key in ("lr", "steps", "batch_size"):
        try:
            ok = float(head_cfg[key]) > 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise H2TError(f"head.{key} must be > 0, got {head_cfg[key]!r}")


def rankings(store, score_cfg, select_cfg, rows: Rows, lams, progress: bool = False) -> list[tuple[np.ndarray, dict]]:
    """For each λ of `lams`: every feature, most relevant first, by the group lasso at λ fitted on `rows`,
    and the scoring info. All the λ (and the entry paths below them) are solved on one path, from the
    largest down, warm-started (pipeline/score/relevance.py).

    Exact zeros are ordered by `select.tie_rule`: `gradient` (how far each zero row is from entering: its
    gradient norm at the solution) or `entry` (the largest λ of the path λ/2, λ/4, ... (`select.entry_steps`
    points) at which the row is non-zero, then the gradient norm)."""
    rule = select_cfg.get("tie_rule", "gradient")
    if rule not in TIE_RULES:
        raise H2TError(f"select.tie_rule must be one of {', '.join(TIE_RULES)}, got {rule!r}")
    steps = int(select_cfg.get("entry_steps", 3)) if rule == "entry" else 0
    if rule == "entry" and steps < 1:
        raise H2TError(f"select.entry_steps must be >= 1, got {steps}")
    paths = {float(lam): [float(lam) * 0.5**j for j in range(steps + 1)] for lam in lams}
    points = sorted({point for path in paths.values() for point in path}, reverse=True)
    solved = dict(zip(points, score_path(store, score_cfg, rows, points, progress)))
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


def probe_store(store, cfg, method: str, progress: bool = False, save_head_to=None) -> dict:
    """Fit on `probe.fit_on`, report validation and test accuracy; the backbone is never touched.

    Head2Toe's selected columns are read through a column view of the scores when the store allows one
    (`store.column_views`; pipeline/storage/views.py); validation and test are read and scored in row
    blocks, so memory holds the fitted rows' selected columns and one block of another split. With
    `save_head_to` (a folder), the head and what applying it needs go to <method>.head.pt (pipeline/predict.py)."""
    method = str(method)  # a schema enum or a plain string
    if method not in METHODS:
        raise H2TError(f"unknown method={method!r}; known: {', '.join(METHODS)}")
    if not store.complete:
        raise H2TError(f"store {store.path} is incomplete (status {store.meta['status']}): rerun h2t extract")
    head_cfg = cfg.head
    check_head(head_cfg)
    fit, validate = fit_rows(store, cfg.get("probe", {}))
    fraction_viewed = view_fraction(cfg.store) if cfg.store.get("column_views", True) else None
    timings, info, view = {}, {}, None
    t = time.perf_counter()
    lam = fraction = None
    if method == "head2toe":
        fraction = float(cfg.select.fraction)
        k = kept(store.n_features, fraction)
        lam = float(cfg.score.lam)
        (order, info), = rankings(store, cfg.score, cfg.select, fit, [lam], progress=progress)
        timings["score"] = time.perf_counter() - t
        t = time.perf_counter()
        plan = column_plan(order[:k], store.layers)
        timings["select"] = time.perf_counter() - t
        if fraction_viewed is not None:
            t = time.perf_counter()
            view = views.view_for(store, info["ranking_key"], order, k, fraction_viewed, progress=progress)
            timings["view"] = time.perf_counter() - t
    else:
        plan = whole_layers(store.layers, [cfg.linear.layer])
    t = time.perf_counter()
    n_selected = int(sum(len(c) for c in plan.values()))
    block_rows = max(1, int(float(cfg.score.memory_budget_mb) * 2**20 // (3 * 4 * n_selected)))
    X_train, y_train = read_columns(store, fit, plan, view), fit.labels(store)
    timings["read"] = time.perf_counter() - t
    t = time.perf_counter()
    head = train_linear_head(X_train, y_train, store.meta["num_classes"], float(head_cfg.lr),
                             int(head_cfg.steps), int(head_cfg.batch_size), int(head_cfg.seed))
    timings["head"] = time.perf_counter() - t
    t = time.perf_counter()
    train_accuracy = accuracy(head, X_train, y_train)
    del X_train
    val_accuracy = None if validate is None else evaluate(head, store, validate, plan, view, block_rows)
    test_accuracy = evaluate(head, store, "test", plan, view, block_rows)
    timings["evaluate"] = time.perf_counter() - t
    spec = store.meta["spec"]
    result = {
        "task": spec["dataset"]["name"], "model": spec["model"]["name"], "store_id": store.id,
        "store_path": str(store.path), "method": method, "target_size": spec["pooling"]["target_size"],
        "lam": lam, "fraction": fraction, "head_lr": float(head_cfg.lr), "head_steps": int(head_cfg.steps),
        "tie_rule": str(cfg.select.get("tie_rule", "gradient")) if method == "head2toe" else None,
        "n_features_total": store.n_features, "n_features_selected": n_selected,
        "selected_per_layer": ({layer["name"]: int(len(plan.get(layer["name"], ()))) for layer in store.layers}
                               if method == "head2toe" else {name: int(len(cols)) for name, cols in plan.items()}),
        "fit_on": fit.describe(store), "validate_on": None if validate is None else validate.describe(store),
        "train_accuracy": train_accuracy, "val_accuracy": val_accuracy, "test_accuracy": test_accuracy,
        "skipped_samples": [item["id"] for item in store.meta.get("skipped", [])],
        "scoring": {k: v for k, v in info.items()},
        "column_view": None if view is None else {"key": view.key, "width": view.width},
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    if save_head_to is not None:
        from pathlib import Path

        from .predict import save_head

        path = save_head(Path(save_head_to) / f"{method}.head.pt", head, store, plan, cfg.model, result)
        result["head_file"] = str(path)
    return result
