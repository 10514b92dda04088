"""Head2Toe's protocol from one extraction: choose (T, λ, F, head lr, head steps) on validation rows or by
K-fold cross-validation, refit the winner on train + val, test once.

For each target size T (one store each; extracted when missing, grown from sibling stores) and each round
(the validation split, or fold k of K), the group lasso is solved along the λ grid from the largest value
down, warm-started, with the scores of each (rows, λ) cached in the store. The columns of the largest F of
every (round, λ) are read in one pass over all rounds' rows (as few passes as score.memory_budget_mb allows);
every smaller F is a prefix of the same ranking, so its columns are a subset of those, re-normalised per
layer. The heads of one (round, λ, F), one per (lr, steps), are trained together and scored on the round's
validation rows. The linear probe tunes its head's (lr, steps) on the same rounds.

The winner of each method has the best mean validation accuracy over rounds; ties go to the cheaper model:
smaller T, smaller F, larger λ, fewer steps, smaller lr (`TIE_ORDER`). It is refitted on `tune.pool`
(train + val) exactly as `h2t probe probe.fit_on=[train,val]` would, and evaluated on test once.
"""
from __future__ import annotations

import csv
import itertools
import time
from concurrent.futures import Executor, Future, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import ExtractJob, HeadConfig, Method, ProbeJob, TuneConfig, TuneJob
from .devices import resolve_device
from .errors import H2TError
from .head import (
    accuracy,
    head_workers,
    normalise_layers,
    normalise_layers_on,
    plan_positions,
    read_columns,
    stack_heads,
    stacked_accuracies,
    train_stacked_heads,
    training_pool,
)
from .probe import check_settings, probe_store, rankings
from .rows import Rows, kfold, merged
from .score.cluster import ScoreRuntime
from .select import column_plan, kept, linear_plan

GRID_KEYS = ("target_size", "lam", "fraction", "head_lr", "head_steps")
TIE_ORDER = "smaller target_size, smaller fraction, larger lam, fewer head_steps, smaller head_lr"
CSV_FIELDS = ("method", "target_size", "lam", "fraction", "head_lr", "head_steps", "round", "n_features_selected",
              "train_accuracy", "val_accuracy")


def grid(job: TuneJob) -> dict[str, list]:
    """The grid, checked before any extraction or scoring: one line naming the bad key and value."""
    spec = job.tune.grid
    values = {key: list(getattr(spec, key) or ([None] if key == "target_size" else [])) for key in GRID_KEYS}
    default_t = int(job.extract.pooling.target_size)
    values["target_size"] = sorted({default_t if t is None else t for t in values["target_size"]})

    def check(key, ok, what):
        for v in values[key]:
            try:
                good = ok(v)
            except (TypeError, ValueError):
                good = False
            if not good:
                raise H2TError(f"tune.grid.{key} values must be {what}, got {v!r}")

    for key in ("lam", "fraction", "head_lr", "head_steps"):
        if not values[key]:
            raise H2TError(f"tune.grid.{key} is empty")
    check("target_size", lambda v: int(v) == v and int(v) > 0, "positive integers (or null: pooling.target_size)")
    check("lam", lambda v: float(v) > 0, "> 0")
    check("fraction", lambda v: 0 < float(v) <= 1, "in (0, 1]")
    check("head_lr", lambda v: float(v) > 0, "> 0")
    check("head_steps", lambda v: int(v) == v and int(v) >= 1, "integers >= 1")
    values["lam"] = sorted({float(v) for v in values["lam"]}, reverse=True)
    values["fraction"] = sorted({float(v) for v in values["fraction"]})
    values["head_lr"] = sorted({float(v) for v in values["head_lr"]})
    values["head_steps"] = sorted({int(v) for v in values["head_steps"]})
    return values


def check_job(job: TuneJob) -> dict[str, list]:
    """Every tune setting that can be checked without data; returns the grid."""
    for method in job.methods:
        if method == Method.per_layer:
            raise H2TError("tune chooses settings for head2toe and linear; per_layer is a probe: "
                           "h2t probe method=per_layer (or h2t run \"methods=[head2toe,linear,per_layer]\")")
        check_settings(replace(job.probe, method=method))
    folds = job.tune.folds
    if folds < 0 or folds == 1:
        raise H2TError(f"tune.folds must be 0 (the validation split) or an integer >= 2, got {folds!r}")
    return grid(job)


def rounds(store, settings: TuneConfig) -> list[tuple[Rows, Rows]]:
    """(fit rows, validation rows) of each round: the validation split, or the K folds of `tune.pool`."""
    pool = list(settings.pool)
    if int(settings.folds) == 0:
        if "val" not in store.splits():
            raise H2TError(f"store {store.id} has no val split: use tune.folds=K (cross-validation over "
                           f"{'+'.join(s for s in pool if s in store.splits())})")
        fit = [s for s in pool if s != "val"]
        return [(Rows.of(store, fit), Rows.of(store, "val"))]
    return kfold(store, [s for s in pool if s in store.splits()], int(settings.folds), int(settings.seed))


@dataclass
class TunePlan:
    """What a tune will do, known before it starts: per T its store and what making it costs, the rounds,
    the candidates and the head trainings, with an estimate of the heads' time on this machine."""
    stores: list[tuple[int, str, str]]  # (T, path, status: complete / to extract ... / to grow ...)
    rounds: int
    fit_rows: int  # rows each round's heads are trained on
    candidates: dict[str, int]  # per method, over every T and round
    groups: list[tuple[int, int, int]]  # heads trained together: (columns, heads, steps of the longest)
    heads_seconds: float  # estimated from a short run of the same computation here
    device: str
    workers: int = 1  # groups of heads trained at once (head.workers)
    stacked: bool = False  # each round's groups as one padded computation (head.stack)
    precision: str = "float32"  # the heads' matrix products (head.precision)

    @property
    def total(self) -> int:
        return sum(self.candidates.values())

    def describe(self) -> str:
        lines = [f"tune plan: {self.total} candidates "
                 f"({', '.join(f'{m} {n}' for m, n in self.candidates.items())}) over {len(self.stores)} store(s) x "
                 f"{self.rounds} round(s) of {self.fit_rows} fitted rows"]
        lines += [f"  T={T:<6d} {status}: {path}" for T, path, status in self.stores]
        where = f"{self.device} ({self.workers} at once)" if self.workers > 1 else self.device
        where += f", {self.precision} products" if self.precision != "float32" else ""
        count = self.rounds if self.stacked else len(self.groups)
        trainings = f"{count} {'stacked' if self.stacked else 'batched'} training{'s' * (count != 1)}"
        lines.append(f"  heads: {trainings} of {sum(h for _, h, _ in self.groups)} heads on "
                     f"{where}, at most ~{self.heads_seconds:.0f} s (fewer where lams select the same columns); "
                     f"scoring: "
                     f"{len(self.stores) * self.rounds} group-lasso paths (cached scores are reused), not estimated")
        return "\n".join(lines)


def plan_tune(job: TuneJob, values: dict[str, list], status_of: Callable[[ExtractJob], tuple[str, str, dict]]) -> TunePlan:
    """The plan of `tune(job)`: `status_of(extract_job)` gives (store path, status, the store's split sizes)."""
    stores: list[tuple[int, str, str]] = []
    splits: dict = {}
    for T in values["target_size"]:
        path, status, splits = status_of(job.extract.with_target_size(T))
        stores.append((int(T), path, status))
    pool = sum(splits.get(s, 0) for s in job.tune.pool)
    folds = int(job.tune.folds)
    rounds = max(folds, 1)
    fit_rows = pool - splits.get("val", 0) if folds == 0 else pool * (folds - 1) // folds
    device = resolve_device(job.probe.head.device, "head.device")
    return TunePlan(stores, rounds, fit_rows, count_candidates(job, values), [], 0.0, str(device),
                    precision=str(job.probe.head.precision))


def count_candidates(job: TuneJob, values: dict[str, list]) -> dict[str, int]:
    """Candidates per method: every grid point of every round and T."""
    per_round = len(values["target_size"]) * max(int(job.tune.folds), 1) * len(values["head_lr"]) * len(values["head_steps"])
    return {str(method): per_round * (len(values["lam"]) * len(values["fraction"]) if method == Method.head2toe else 1)
            for method in job.methods}


def estimate_heads(plan: TunePlan, widths: list[int], values: dict[str, list], num_classes: int,
                   head: HeadConfig) -> TunePlan:
    """The plan with its head trainings listed (`widths`: the columns of each group of heads of one round,
    over every T) and their time estimated from 20 steps of the same computation at the smallest and
    largest width, as many groups at once as the tune trains (`head.workers`); stacked (`head.stack`), from 20
    steps of one round's groups padded to the largest width. A training's heads stop at their own step count,
    so each phase (the steps until the next heads stop) is timed with the heads it trains."""
    settings = list(itertools.product(values["head_lr"], values["head_steps"]))
    longest = max(values["head_steps"])
    groups = [(w, len(settings), longest) for w in widths] * plan.rounds
    rng = np.random.default_rng(0)
    device = torch.device(plan.device)
    workers = head_workers(device, head.workers)
    phases = head_phases(settings)

    def step_seconds(width: int, active: list, sets: int = 1, at_once: int = workers) -> float:
        """Seconds per step of a training of `sets` groups of this width (one unless stacked) with the `active`
        heads, as the tune trains them: `at_once` trainings at the same time."""
        X = rng.random((max(plan.fit_rows, 1), width), dtype=np.float32)
        y = rng.integers(0, num_classes, len(X))
        short = [(lr, 20) for lr, _ in active]
        with training_pool(workers) as pool:
            for _ in range(2):  # the first round warms every worker up
                start = time.perf_counter()
                for future in [pool.submit(train_stacked_heads, [X] * sets, y, num_classes, short,
                                           int(head.batch_size), 0, device, str(head.precision))
                               for _ in range(at_once)]:
                    future.result()
        return (time.perf_counter() - start) / (20 * at_once)

    low, high = min(widths), max(widths)
    if stack_heads(device, head.stack):  # a round's groups over every T, all padded to the widest: an upper bound
        # one training per round: fewer rounds than workers leave workers idle
        at_once = min(workers, plan.rounds)
        seconds = plan.rounds * sum(steps * step_seconds(high, active, len(widths), at_once) for steps, active in phases)
        return replace(plan, groups=groups, heads_seconds=seconds, workers=workers, stacked=True)
    seconds = 0.0
    for steps, active in phases:
        t_low = step_seconds(low, active)
        t_high = step_seconds(high, active) if high != low else t_low
        seconds += steps * sum(t_low + (t_high - t_low) * (w - low) / max(high - low, 1) for w, _, _ in groups)
    return replace(plan, groups=groups, heads_seconds=seconds, workers=workers)


def head_phases(settings: list[tuple[float, int]]) -> list[tuple[int, list[tuple[float, int]]]]:
    """(steps, the settings still training) of each phase of a training of these (lr, steps) heads: a head
    stops after its own steps, the others go on narrower (pipeline/head.py)."""
    ends = sorted({steps for _, steps in settings})
    return [(end - begin, [s for s in settings if s[1] >= end]) for begin, end in zip([0, *ends[:-1]], ends)]


def _fit_and_val(columns: np.ndarray, fit_at: np.ndarray, val_at: np.ndarray,
                 selected: tuple[dict, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
    """The fit and validation rows of `columns` (`selected` = (plan, where): its columns at `where`,
    re-normalised per layer)."""
    if selected is None:
        return columns[fit_at], columns[val_at]
    plan, where = selected
    return (normalise_layers(columns[np.ix_(fit_at, where)], plan),
            normalise_layers(columns[np.ix_(val_at, where)], plan))


def _heads(sets: list[tuple[np.ndarray, tuple[dict, np.ndarray] | None]], fit_at: np.ndarray, val_at: np.ndarray,
           y_fit, y_val, num_classes: int, values, head_cfg: HeadConfig, device: torch.device) -> list[list[tuple]]:
    """Per column set (`columns`, `selected`: see `_fit_and_val`), (lr, steps, train accuracy, validation
    accuracy) of a head for every (lr, steps) of the grid. The heads share their rows, so they are trained as one
    computation: one set's as `train_linear_heads` trains it, several sets zero-padded and stacked (`train_stacked_heads`)."""
    settings = list(itertools.product(values["head_lr"], values["head_steps"]))
    on_device = rows_on_device(device) and len(sets) > 1  # one set: only its own columns need to travel
    if on_device:
        fits, vals = _fit_and_val_on(device, sets, fit_at, val_at)
        rows: list = fits
    else:
        matrices = [_fit_and_val(columns, fit_at, val_at, selected) for columns, selected in sets]
        rows = [X_fit for X_fit, _ in matrices]
    heads = train_stacked_heads(rows, y_fit, num_classes, settings,
                                int(head_cfg.batch_size), int(head_cfg.seed), device, str(head_cfg.precision))
    if on_device:
        fit_accs, val_accs = stacked_accuracies(heads, fits, y_fit), stacked_accuracies(heads, vals, y_val)
    else:
        fit_accs = [[accuracy(head, X_fit, y_fit) for head in per_set] for per_set, (X_fit, _) in zip(heads, matrices)]
        val_accs = [[accuracy(head, X_val, y_val) for head in per_set] for per_set, (_, X_val) in zip(heads, matrices)]
    return [[(lr, steps, fit_acc, val_acc) for (lr, steps), fit_acc, val_acc in zip(settings, per_fit, per_val)]
            for per_fit, per_val in zip(fit_accs, val_accs)]


def rows_on_device(device: torch.device) -> bool:
    """Whether a stacked round's rows are taken, normalised and evaluated on the device that trains its heads (any
    but a CPU) rather than in numpy on the host."""
    return device.type != "cpu"


def _fit_and_val_on(device: torch.device, sets: list[tuple[np.ndarray, tuple[dict, np.ndarray] | None]],
                    fit_at: np.ndarray, val_at: np.ndarray) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """`_fit_and_val` of every set, done on `device`: each distinct column array travels there once (a round's
    selections all take their columns from one shared read), and each set's columns, then its rows, are taken
    and normalised there (no full-width copy of the shared array). On the 2-core CPU machine the host's part of
    a T = 2048 protocol round (gathers, per-layer norms, the padded copy, each head's accuracies) took ~2 s
    (benchmarks/stacked_round.py); a GPU's is not measured yet."""
    arrays: dict[int, torch.Tensor] = {}
    rows = torch.as_tensor(np.concatenate([fit_at, val_at])).to(device)
    # every set's column positions in one copy to the device, then split there
    positions = [where for _, selected in sets if selected is not None for where in selected[1:]]
    flat = np.concatenate(positions) if positions else np.empty(0, np.int64)
    wheres = iter(torch.as_tensor(flat).to(device).split([len(where) for where in positions]))
    fits, vals = [], []
    for columns, selected in sets:
        if id(columns) not in arrays:
            arrays[id(columns)] = torch.as_tensor(columns).to(device, torch.float32)
        X = arrays[id(columns)]
        if selected is None:
            X = torch.index_select(X, 0, rows)
        else:
            X = normalise_layers_on(torch.index_select(torch.index_select(X, 1, next(wheres)), 0, rows), selected[0])
        fits.append(X[:len(fit_at)])
        vals.append(X[len(fit_at):])
    return fits, vals


@dataclass
class _Group:
    """Heads that share their rows and columns: `_heads`' arguments for its column set, the candidates that
    read its results."""
    round_index: int
    width: int
    columns: np.ndarray
    selected: tuple[dict, np.ndarray] | None
    common: tuple  # the round's rows, labels and settings: `_heads`' arguments after the sets
    candidates: int = 0
    trained: list | None = None

    def results(self) -> list:
        assert self.trained is not None, "a group is trained before its results are read"
        return self.trained


class _Trainings:
    """The groups of heads of one store, trained in a pool (`head.training_pool`) the widest first: a long group
    started last would run alone at the end, on one worker. With `stack`, each round's groups are one padded
    computation instead (`head.train_stacked_heads`). `bar` advances by each candidate once its group is
    trained; `timed` adds the time spent training or waiting to the heads stage."""

    def __init__(self, pool: Executor, bar, timed: Callable, stack: bool = False):
        self.pool, self.bar, self.timed, self.stack = pool, bar, timed, stack
        self.queued: list[_Group] = []

    def add(self, round_index: int, width: int, columns: np.ndarray, common: tuple,
            selected: tuple[dict, np.ndarray] | None = None) -> _Group:
        group = _Group(round_index, width, columns, selected, common)
        self.queued.append(group)
        return group

    def train(self) -> None:
        """Train every group added so far (before a read replaces the columns they train on)."""
        if self.stack:
            rounds: dict[int, list[_Group]] = {}
            for group in self.queued:
                rounds.setdefault(group.round_index, []).append(group)
            batches = list(rounds.values())
        else:
            batches = [[group] for group in sorted(self.queued, key=lambda g: -g.width)]

        def run():
            pending: dict[Future, list[_Group]] = {}
            for batch in batches:
                future = self.pool.submit(_heads, [(g.columns, g.selected) for g in batch], *batch[0].common)
                pending[future] = batch
                if future.done():  # trained in this thread (one worker), or already
                    self._advance(pending.pop(future), future)
            for future in as_completed(pending):
                self._advance(pending[future], future)
        self.timed("heads", run)
        self.queued = []

    def _advance(self, batch: list[_Group], future: Future) -> None:
        for group, trained in zip(batch, future.result()):  # a failed group stops the tune here
            group.trained = trained
            if self.bar is not None:
                self.bar.update(group.candidates)


def candidates_for_store(store, job: TuneJob, values: dict[str, list], progress: bool = False,
                         runtime: ScoreRuntime | None = None, bar=None,
                         seconds: dict[str, float] | None = None) -> list[dict]:
    """Every grid point of every round on one store (one T); `bar` (a tqdm) advances by each candidate;
    `seconds` adds up the time of each stage: score (the lam paths), read (columns), heads (training, and waiting
    for groups trained in other threads)."""
    seconds = {} if seconds is None else seconds

    def timed(stage, fn, *args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start

    T = int(store.info.spec["pooling"]["target_size"])
    num_classes = store.info.num_classes
    probe = job.probe
    device = resolve_device(probe.head.device, "head.device")
    splits = rounds(store, job.tune)
    # every round's fit and validation rows interleave over the same spans (K folds share one pool): read
    # once, taken apart in memory; at = (fit rows, validation rows) positions of each round in `pool`
    pool, positions = merged(store, *(rows for pair in splits for rows in pair))
    at = list(zip(positions[0::2], positions[1::2]))
    labels = [(fit.labels(store), val.labels(store)) for fit, val in splits]
    linear = None
    if Method.linear in job.methods:
        plan = linear_plan(store.layers, probe.linear_layer)
        linear = timed("read", read_columns, store, pool, plan)  # normalised per row: rows can be taken after
    ranked = []
    if Method.head2toe in job.methods:
        ranked = [timed("score", rankings, store, probe.score, probe.select, fit, values["lam"], progress=progress,
                        runtime=runtime) for fit, _ in splits]
    D = store.n_features
    widest = kept(D, max(values["fraction"]))
    budget = float(probe.score.memory_budget_mb) * 2**20

    def shared_read(orders):
        """The widest F's columns of these rankings for every pool row, unnormalised, in one pass when they fit
        score.memory_budget_mb (most inner chunks hold columns of several, so each is decoded once); else None."""
        union = np.unique(np.concatenate([order[:widest] for order in orders]))
        if pool.size(store) * len(union) * 4 > budget:
            return None
        plan = column_plan(union, store.layers)
        return plan, timed("read", read_columns, store, pool, plan, normalise=False)

    every_round = shared_read([order for per_round in ranked for order, _ in per_round]) if ranked else None
    groups: list[tuple[dict, _Group]] = []  # each (round, lam, F)'s fields and its heads, one per (lr, steps)
    per_group = len(values["head_lr"]) * len(values["head_steps"])
    with training_pool(head_workers(device, probe.head.workers)) as executor:
        trainings = _Trainings(executor, bar, timed, stack_heads(device, probe.head.stack))
        for r, ((y_fit, y_val), (fit_at, val_at)) in enumerate(zip(labels, at)):
            base = {"target_size": T, "round": r}
            common = (fit_at, val_at, y_fit, y_val, num_classes, values, probe.head, device)
            if linear is not None:
                group = trainings.add(r, linear.shape[1], linear, common)
                group.candidates += per_group
                groups.append(({"method": "linear", **base, "lam": None, "fraction": None,
                                "n_features_selected": int(linear.shape[1])}, group))
            if not ranked:
                continue
            shared = every_round
            if shared is None:  # this round's columns replace the last round's: its heads go first
                trainings.train()
                shared = shared_read([order for order, _ in ranked[r]])
            trained: dict[bytes, _Group] = {}  # selection -> its heads: lams that select the same columns share them
            for lam, (order, _info) in zip(values["lam"], ranked[r]):
                wide = shared  # (plan, raw columns of the pool rows) holding this lam's widest F
                for fraction in values["fraction"]:
                    chosen = order[:kept(D, fraction)]
                    selection = np.sort(chosen).tobytes()
                    if selection not in trained:  # above lam_max every lam ranks the same (the gradient order at W = 0)
                        if wide is None:
                            trainings.train()
                            plan = column_plan(order[:widest], store.layers)
                            wide = (plan, timed("read", read_columns, store, pool, plan, normalise=False))
                        outer, raw = wide
                        plan = column_plan(chosen, store.layers)
                        trained[selection] = trainings.add(r, len(chosen), raw, common,
                                                           (plan, plan_positions(outer, plan)))
                    trained[selection].candidates += per_group
                    groups.append(({"method": "head2toe", **base, "lam": lam, "fraction": fraction,
                                    "n_features_selected": kept(D, fraction)}, trained[selection]))
        trainings.train()
    return [{**fields, "head_lr": lr, "head_steps": steps, "train_accuracy": train_acc, "val_accuracy": val_acc}
            for fields, group in groups for lr, steps, train_acc, val_acc in group.results()]


def setting_scores(candidates: list[dict], method: str) -> dict[tuple, float]:
    """Each setting of a method (its `GRID_KEYS` values) -> its mean validation accuracy over rounds."""
    accs: dict[tuple, list[float]] = {}
    for c in candidates:
        if c["method"] == method:
            accs.setdefault(tuple(c[k] for k in GRID_KEYS), []).append(c["val_accuracy"])
    return {setting: float(np.mean(values)) for setting, values in accs.items()}


def choose(candidates: list[dict], method: str) -> tuple[dict, float, int]:
    """The best setting of a method by mean validation accuracy over rounds (ties: `TIE_ORDER`); returns
    (setting, its mean validation accuracy, number of settings compared)."""
    scores = setting_scores(candidates, method)
    if not scores:
        raise H2TError(f"tune: no candidate for method {method}")

    def preference(item):
        (T, lam, fraction, lr, steps), mean = item
        return (-mean, T, fraction if fraction is not None else 0.0, -(lam if lam is not None else 0.0), steps, lr)

    setting, mean = min(scores.items(), key=preference)
    return dict(zip(GRID_KEYS, setting)), mean, len(scores)


def refit_job(job: TuneJob, method: Method, setting: dict) -> ProbeJob:
    """The probe of the winner, fitted on `tune.pool`: what `h2t probe` would run."""
    probe = job.probe
    head = replace(probe.head, lr=float(setting["head_lr"]), steps=int(setting["head_steps"]))
    score, select = probe.score, probe.select
    if setting["lam"] is not None:
        score = replace(score, lam=float(setting["lam"]))
        select = replace(select, fraction=float(setting["fraction"]))
    return replace(probe, method=method, head=head, score=score, select=select, fit_on=list(job.tune.pool))


def tune(job: TuneJob, ensure_store: Callable, progress: bool = False, save_heads_to: Path | None = None,
         runtime: ScoreRuntime | None = None) -> tuple[list[dict], list[dict]]:
    """Run the protocol: returns (one result per method, every candidate). `ensure_store(extract_job)` returns
    (a complete store for that job, images that went through the backbone for it); the refitted heads are
    saved in `save_heads_to` when given (pipeline/predict.py)."""
    start = time.perf_counter()
    values = check_job(job)
    stores, backbone_images, candidates = {}, 0, []
    stage_seconds: dict[str, float] = {}
    with tqdm(total=sum(count_candidates(job, values).values()), unit="candidate", desc="tune", disable=not progress) as bar:
        for T in values["target_size"]:
            stores[T], images = ensure_store(job.extract.with_target_size(T))
            backbone_images += images
            # one bar over every candidate: the scoring paths' own bars stay off
            candidates += candidates_for_store(stores[T], job, values, False, runtime, bar, stage_seconds)
    folds = int(job.tune.folds)
    pool = "+".join(job.tune.pool)
    stacked = stack_heads(resolve_device(job.probe.head.device, "head.device"), job.probe.head.stack)
    results: list[dict] = []
    for method in job.methods:
        setting, score, n = choose(candidates, str(method))
        result = probe_store(stores[setting["target_size"]], refit_job(job, method, setting), progress=progress,
                             save_head_to=save_heads_to, runtime=runtime)
        result.update({"chosen": setting, "selection": "mean validation accuracy" + (
            f" over {folds} folds of {pool}" if folds else " on val"), "selection_score": score,
            "folds": folds, "n_candidates": n, "tie_order": TIE_ORDER, "tune_heads_stacked": stacked,
            "backbone_images": backbone_images if not results else 0})
        results.append(result)
    seconds = time.perf_counter() - start
    for r in results:
        r["timings_s"]["tune"] = round(seconds, 3)
        r["timings_s"].update({f"tune_{stage}": round(s, 3) for stage, s in stage_seconds.items()})
    return results, candidates


def write_candidates(candidates: list[dict], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for c in candidates:
            writer.writerow({k: c[k] for k in CSV_FIELDS})
    return path
