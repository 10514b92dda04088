"""h2t tune (pipeline/tune.py): every grid point of every round is a real probe of those rows, the winner is
the best mean validation accuracy, and the refit is the probe `h2t probe probe.fit_on=[train,val]` runs."""
import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch
from omegaconf.errors import ValidationError

from pipeline.config import HeadConfig, Method
from pipeline.errors import H2TError
from pipeline.probe import probe_store
from pipeline.rows import Rows
from pipeline.score.relevance import score_path
from pipeline.tune import (
    CSV_FIELDS,
    TunePlan,
    _fit_and_val,
    _fit_and_val_on,
    candidates_for_store,
    check_job,
    estimate_heads,
    head_phases,
    refit_job,
    rounds,
    tune,
)
from tests.conftest import make_store, schema_cfg, score_cfg

WIDTHS = [40, 24, 64, 8]


@pytest.fixture
def store(tmp_path, rng):
    n = {"train": 96, "val": 32, "test": 40}
    X = {s: np.abs(rng.standard_normal((m, sum(WIDTHS)))).astype(np.float32) for s, m in n.items()}
    y = {s: (x[:, 3] + x[:, 50] > x[:, 70] + x[:, 100]).astype(np.int64) for s, x in X.items()}
    return make_store(tmp_path / "s.zarr", X, y, 2, dtype="float16",
                      spec={"widths": WIDTHS, "pooling": {"target_size": 64}})


SETTINGS = {"methods": ["head2toe", "linear"], "pooling.target_size": 64, "score.lam": 2e-3, "score.tol": 1e-3,
            "score.memory_budget_mb": 512, "select.fraction": 0.2, "select.entry_steps": 2, "head.lr": 0.05,
            "head.steps": 60, "head.batch_size": 32, "linear.layer": "layer3", "store.view_fraction": 0.5,
            "probe.fit_on": ["train"], "tune.folds": 0, "tune.grid.target_size": [None],
            "tune.grid.lam": [2e-3, 2e-2], "tune.grid.fraction": [0.05, 0.3], "tune.grid.head_lr": [0.05],
            "tune.grid.head_steps": [30, 60]}


def tune_cfg(**over):
    """The tune job of these tests: the schema's defaults, SETTINGS, then `over` (dotted keys)."""
    return schema_cfg(**{**SETTINGS, **over}).tune_job()


def run(store, job):
    return tune(job, lambda _job: (store, 0))


def test_each_candidate_is_the_probe_of_its_setting_on_its_rows(store):
    cfg = tune_cfg()
    results, candidates = run(store, cfg)
    assert len(candidates) == 2 * 2 * 2 + 2  # head2toe: lam x fraction x steps; linear: steps
    for c in [c for c in candidates if c["method"] == "head2toe"][::3] + [candidates[0]]:
        probe = cfg.probe
        one = replace(probe, method=Method(c["method"]), fit_on=["train"],
                      head=replace(probe.head, lr=c["head_lr"], steps=c["head_steps"]))
        if c["method"] == "head2toe":
            one = replace(one, score=replace(probe.score, lam=c["lam"]),
                          select=replace(probe.select, fraction=c["fraction"]))
        probed = probe_store(store, one)
        assert probed["val_accuracy"] == pytest.approx(c["val_accuracy"], abs=1e-9), c
        assert probed["n_features_selected"] == c["n_features_selected"]


@pytest.mark.parametrize("folds", [0, 3])
def test_the_winner_has_the_best_mean_validation_accuracy_and_is_refitted_on_train_and_val(store, folds):
    cfg = tune_cfg(**{"tune.folds": folds})
    results, candidates = run(store, cfg)
    assert len({c["round"] for c in candidates}) == max(folds, 1)
    for result in results:
        method = result["method"]
        mine = [c for c in candidates if c["method"] == method]
        means = {}
        for c in mine:
            means.setdefault((c["lam"], c["fraction"], c["head_lr"], c["head_steps"]), []).append(c["val_accuracy"])
        best = max(np.mean(v) for v in means.values())
        chosen = result["chosen"]
        assert result["selection_score"] == pytest.approx(best)
        assert np.mean(means[(chosen["lam"], chosen["fraction"], chosen["head_lr"], chosen["head_steps"])]) == pytest.approx(best)
        assert result["n_candidates"] == len(means) and result["folds"] == folds
        assert result["fit_on"]["rows"] == {"train": 96, "val": 32} and result["val_accuracy"] is None
        refit = probe_store(store, refit_job(cfg, Method(method), chosen))
        assert refit["test_accuracy"] == result["test_accuracy"]


def test_lams_that_select_the_same_columns_share_their_heads(store, monkeypatch):
    """Above lam_max no row is non-zero and every lam ranks alike (the gradient order at W = 0): their
    candidates are the same heads, trained once, and the tie goes to the larger lam as before."""
    import pipeline.tune as tune_module
    widths = []
    train = tune_module.train_stacked_heads
    monkeypatch.setattr(tune_module, "train_stacked_heads",
                        lambda Xs, *a, **k: widths.extend(X.shape[1] for X in Xs) or train(Xs, *a, **k))
    results, candidates = run(store, tune_cfg(**{"methods": ["head2toe"], "tune.grid.lam": [50.0, 10.0, 2e-3]}))
    by = {(c["lam"], c["fraction"], c["head_steps"]): c for c in candidates}
    for fraction in (0.05, 0.3):
        for steps in (30, 60):
            top, next_ = by[50.0, fraction, steps], by[10.0, fraction, steps]
            assert (top["val_accuracy"], top["train_accuracy"]) == (next_["val_accuracy"], next_["train_accuracy"])
    assert len(candidates) == 3 * 2 * 2 and len(widths) == 2 * 2  # lam 50 and 2e-3 trained, lam 10 shared
    if results[0]["chosen"]["lam"] != 2e-3:
        assert results[0]["chosen"]["lam"] == 50.0  # the tie between identical selections: the larger lam


def test_a_trainings_phases_follow_the_heads_that_still_train():
    settings = list(itertools.product([0.01, 0.1], [500, 1000]))
    assert head_phases(settings) == [(500, settings), (500, [(0.01, 1000), (0.1, 1000)])]
    assert head_phases([(0.1, 30)]) == [(30, [(0.1, 30)])]
    three = list(itertools.product([0.1], [10, 40, 100]))
    assert [(steps, len(active)) for steps, active in head_phases(three)] == [(10, 3), (30, 2), (60, 1)]


@pytest.mark.parametrize("stack", [False, True])
def test_the_plan_times_each_phase_with_the_heads_it_trains(monkeypatch, stack):
    """Heads stop at their own step count (the 5-step ones after 5), so the estimate times the steps after that
    with the 10-step heads alone, at both widths (or, stacked, the padded round)."""
    import pipeline.tune as tune_module
    timed = []
    train = tune_module.train_stacked_heads
    monkeypatch.setattr(tune_module, "train_stacked_heads",
                        lambda Xs, y, k, settings, *a, **kw: timed.append((len(Xs), Xs[0].shape[1], len(settings)))
                        or train(Xs, y, k, settings, *a, **kw))
    plan = TunePlan([], 2, 64, {}, [], 0.0, "cpu")
    values = {"head_lr": [0.01, 0.1], "head_steps": [5, 10]}
    plan = estimate_heads(plan, [30, 60], values, 3, HeadConfig(workers=1, stack=stack))
    assert plan.groups == [(30, 4, 10), (60, 4, 10)] * 2 and plan.heads_seconds > 0 and plan.stacked == stack
    expected = {(2, 60, 4), (2, 60, 2)} if stack else {(1, w, h) for w in (30, 60) for h in (4, 2)}
    assert set(timed) == expected


def test_folds_validate_on_disjoint_rows_of_train_and_val(store):
    folds = rounds(store, tune_cfg(**{"tune.folds": 4}).tune)
    sizes = [val.size(store) for _, val in folds]
    assert sum(sizes) == 128 and max(sizes) - min(sizes) <= 1
    (fit, val), = rounds(store, tune_cfg().tune)
    assert fit.counts(store) == {"train": 96} and val.counts(store) == {"val": 32}


def test_the_lam_path_is_warm_started_and_matches_cold_solves(store, tmp_path):
    path = score_path(store, score_cfg(tol=1e-4), Rows.of(store, "train"), [2e-3, 1e-2, 5e-3])
    assert [info["warm_start"] for _, info in path] == [True, False, True]  # solved largest first
    X, y = {"train": store.features("train", "layer0")[:].astype(np.float32)}, {"train": store.labels("train")}
    on_path = make_store(tmp_path / "a.zarr", X, y, 2, spec={"widths": [40]})
    alone = make_store(tmp_path / "b.zarr", X, y, 2, spec={"widths": [40]})
    warm = score_path(on_path, score_cfg(tol=1e-4), "train", [1e-2, 2e-3])[1][0]["weight_sq"]
    cold = score_path(alone, score_cfg(tol=1e-4), "train", [2e-3])[0][0]["weight_sq"]
    assert np.array_equal(warm > 0, cold > 0)
    np.testing.assert_allclose(warm, cold, rtol=2e-2, atol=1e-6)


def test_groups_trained_at_once_give_the_candidates_of_groups_trained_in_turn(store):
    """head.workers=2 trains groups of heads concurrently, the widest first, and head.stack=true each round's groups
    as one padded computation: the same candidates in the same order with the same accuracies as one group after
    the other; the progress bar counts every candidate."""
    class Bar:
        count = 0

        def update(self, n):
            self.count += n

    candidates = {}
    for workers, stack in ((1, False), (2, False), (2, True)):
        job = tune_cfg(**{"tune.folds": 2, "head.workers": workers, "head.stack": stack})
        bar = Bar()
        candidates[workers, stack] = candidates_for_store(store, job, check_job(job), bar=bar)
        assert bar.count == len(candidates[workers, stack]) == 2 * (2 * 2 * 2 + 2)
    for a, b in itertools.chain(zip(candidates[1, False], candidates[2, False]),
                                zip(candidates[1, False], candidates[2, True])):
        assert {k: a[k] for k in CSV_FIELDS if "accuracy" not in k} == {k: b[k] for k in CSV_FIELDS if "accuracy" not in k}
        assert a["val_accuracy"] == pytest.approx(b["val_accuracy"], abs=1e-9)
        assert a["train_accuracy"] == pytest.approx(b["train_accuracy"], abs=1e-9)


def test_rows_taken_normalised_and_evaluated_on_the_device_give_the_hosts_candidates(store, monkeypatch):
    """On a GPU a round's columns are taken, normalised and evaluated where its heads train (rows_on_device); run
    here on the CPU, that path gives the host path's candidates: the same settings, accuracies within one row."""
    import pipeline.tune as tune_module

    job = tune_cfg(**{"tune.folds": 2, "head.stack": True, "tune.grid.head_lr": [0.01, 0.1]})
    host = candidates_for_store(store, job, check_job(job))
    calls = []
    monkeypatch.setattr("pipeline.tune.rows_on_device", lambda device: True)
    monkeypatch.setattr("pipeline.tune._fit_and_val_on", lambda *a: calls.append(a) or _fit_and_val_on(*a))
    assert tune_module._fit_and_val_on is not _fit_and_val_on
    on_device = candidates_for_store(store, job, check_job(job))
    assert len(calls) == 2  # each fold's round took the device path
    assert len(host) == len(on_device) == 2 * (2 * 2 * 4 + 4)
    for a, b in zip(host, on_device):
        assert {k: a[k] for k in CSV_FIELDS if "accuracy" not in k} == {k: b[k] for k in CSV_FIELDS if "accuracy" not in k}
        assert a["val_accuracy"] == pytest.approx(b["val_accuracy"], abs=1 / 64 + 1e-9)  # a fold validates on 64 rows
        assert a["train_accuracy"] == pytest.approx(b["train_accuracy"], abs=1 / 64 + 1e-9)
    assert sum(a["val_accuracy"] == b["val_accuracy"] for a, b in zip(host, on_device)) >= 0.9 * len(host)


def test_the_device_path_takes_each_sets_rows_as_the_host_does(rng):
    """_fit_and_val_on: each set's fit and validation rows of its selected columns, normalised per layer (or the
    columns as they are without a selection), as _fit_and_val gives them in numpy."""
    columns = rng.random((20, 30), dtype=np.float32)
    plan = {"a": np.array([1, 4]), "b": np.array([0, 2, 3])}
    sets = [(columns, (plan, np.array([1, 4, 7, 9, 10]))), (columns, None), (rng.random((20, 4), dtype=np.float32), None)]
    fit_at, val_at = np.array([3, 0, 7, 12, 5]), np.array([19, 2])
    fits, vals = _fit_and_val_on(torch.device("cpu"), sets, fit_at, val_at)
    for (cols, selected), fit, val in zip(sets, fits, vals):
        X_fit, X_val = _fit_and_val(cols, fit_at, val_at, selected)
        np.testing.assert_allclose(fit.numpy(), X_fit, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(val.numpy(), X_val, rtol=1e-6, atol=1e-7)


def test_a_second_tune_reuses_every_score(store):
    run(store, tune_cfg(**{"tune.folds": 2}))
    results, _ = run(store, tune_cfg(**{"tune.folds": 2}))
    assert results[0]["scoring"]["cached"]


@pytest.mark.parametrize("key,value,culprit", [
    ("tune.grid.fraction", [0.1, 1.5], "tune.grid.fraction values must be in \\(0, 1\\], got 1.5"),
    ("tune.grid.lam", [0], "tune.grid.lam values must be > 0, got 0"),
    ("tune.grid.head_steps", [0], "tune.grid.head_steps values must be integers >= 1"),
    ("tune.grid.head_lr", [], "tune.grid.head_lr is empty"),
    ("tune.grid.target_size", [-4], "tune.grid.target_size values must be positive integers"),
    ("tune.folds", 1, "tune.folds must be 0 .* or an integer >= 2, got 1"),
    ("select.fraction", 0, "select.fraction"),
    ("head.workers", 0, "head.workers must be >= 1 or null, got 0"),
    ("methods", ["head2toe", "per_layer"], "per_layer is a probe"),
])
def test_bad_settings_are_refused_before_any_work(key, value, culprit):
    cfg = tune_cfg(**{key: value})
    with pytest.raises(H2TError, match=culprit):
        check_job(cfg)
    with pytest.raises(H2TError, match=culprit):
        tune(cfg, lambda _job: pytest.fail("a store was asked for"))


@pytest.mark.parametrize("key,value", [("tune.grid.head_steps", [10.5]), ("methods", ["head2toe", "ridge"]),
                                       ("select.tie_rule", "random"), ("tune.folds", "two")])
def test_a_wrong_type_or_unknown_choice_is_refused_by_the_schema(key, value):
    with pytest.raises(ValidationError, match=key.split(".")[-1]):
        tune_cfg(**{key: value})


def _one_at_a_time(X, y, num_classes, settings, batch_size, seed=0, device="cpu", precision="float32"):
    """Each head alone, the textbook way (autograd, torch.optim.Adam, LambdaLR): what tune did before heads
    that share rows were trained together."""
    from tests.test_head import _alone_with_torch_adam

    return [_alone_with_torch_adam(np.ascontiguousarray(X, np.float32), np.asarray(y, np.int64), num_classes, lr,
                                   steps, batch_size, seed) for lr, steps in settings]


@pytest.mark.parametrize("task,stack", [("sum", False), ("product", False), ("sum", True), ("product", True)])
def test_heads_trained_together_choose_what_heads_trained_alone_choose(tmp_path, rng, monkeypatch, task, stack):
    """Heads batched per group (and, with head.stack, every group of a round in one padded computation) make the
    choices and accuracies of every head trained alone, on two tasks."""
    n = {"train": 96, "val": 32, "test": 40}
    X = {s: np.abs(rng.standard_normal((m, sum(WIDTHS)))).astype(np.float32) for s, m in n.items()}
    rule = (lambda x: x[:, 3] + x[:, 50] > x[:, 70] + x[:, 100]) if task == "sum" else (lambda x: x[:, 5] * x[:, 90] > 0.5)
    store = make_store(tmp_path / f"{task}.zarr", X, {s: rule(x).astype(np.int64) for s, x in X.items()}, 2,
                       dtype="float16", spec={"widths": WIDTHS, "pooling": {"target_size": 64}})
    job = tune_cfg(**{"tune.grid.head_lr": [0.01, 0.1], "head.stack": stack})
    together, candidates = run(store, job)
    assert all(r["tune_heads_stacked"] is stack for r in together)
    monkeypatch.setattr("pipeline.tune.train_stacked_heads", lambda Xs, *a, **k: [_one_at_a_time(X, *a, **k) for X in Xs])
    alone, alone_candidates = run(store, job)
    for a, b in zip(together, alone):
        assert a["chosen"] == b["chosen"] and a["method"] == b["method"]
        assert a["selection_score"] == pytest.approx(b["selection_score"], abs=1 / 32)
    for a, b in zip(candidates, alone_candidates):
        assert a["val_accuracy"] == pytest.approx(b["val_accuracy"], abs=1 / 32 + 1e-9), (a, b)  # one of 32 rows
