"""The Hydra verbs' work (`h2t extract | probe | run | tune`): the config typed once (`settings`), each stage
given its job, results.json, tables and plots written into the job's folder. pipeline/jobs.py checks the
command line and imports this module only then (a bad override is reported before torch loads)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from .config import ExtractJob, H2TConfig, Method, TuneJob, settings
from .extract import ensure_store, extract, format_plan, plan_members, planned_reuse, store_status
from .jobs import output_dir
from .probe import check_settings, probe_store
from .report import format_table, pct, plot_per_layer, plot_selection
from .score.cluster import ScoreRuntime
from .select import kept
from .tune import TunePlan, check_job, estimate_heads, plan_tune, tune, write_candidates

log = logging.getLogger("h2t")


def _write_results(results: list[dict]) -> Path:
    path = output_dir() / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"results": results}, indent=2, default=float))
    return path


def _log_extract_plans(job: ExtractJob) -> tuple[list, list]:
    """Every backbone's store planned (and checked) before any is extracted, and the plans logged (per tap
    with extract.plan_only)."""
    plans = plan_members(job)
    reuses = [planned_reuse(member, plan) for member, plan in zip(job.members(), plans)]
    for plan, reuse in zip(plans, reuses):
        log.info(format_plan(plan, per_tap=job.extract.plan_only, reuse=reuse))
    return plans, reuses


def _extract_task(cfg: DictConfig) -> None:
    job = settings(cfg).extract_job()
    plans, reuses = _log_extract_plans(job)
    if job.extract.plan_only:
        return
    for member, plan, reuse in zip(job.members(), plans, reuses):
        result = extract(member, plan, reuse)
        store = result.store
        reused = len(store.layers) - len(store.computed_layers)
        log.info(f"store {store.id} complete at {store.path}: {store.n_features} features in {len(store.layers)} "
                 f"taps{f' ({reused} copied from other stores)' if reused else ''}, splits {store.splits()}, "
                 f"{result.backbone_images} images through the backbone ({result.seconds:.1f} s)")


def _probe_methods(config: H2TConfig, methods: list[Method]) -> tuple[list[dict], list[str]] | None:
    """The results of each method and the store's layer names; None with extract.plan_only, which logs the
    store's plan once the settings are checked and stops there."""
    jobs = [config.probe_job(method) for method in methods]
    for job in jobs:
        check_settings(job)
    if config.extract.plan_only:
        _log_extract_plans(config.extract_job())
        return None
    extracted = ensure_store(config.extract_job())
    results = []
    with ScoreRuntime() as runtime:
        for i, job in enumerate(jobs):
            result = probe_store(extracted.store, job, progress=config.extract.progress, save_head_to=output_dir(),
                                 runtime=runtime)
            # Images that went through the backbone in this job are counted once, on the first method.
            result["backbone_images"] = extracted.backbone_images if i == 0 else 0
            result["timings_s"]["extract"] = round(extracted.seconds, 3) if i == 0 else 0.0
            results.append(result)
    return results, [layer["name"] for layer in extracted.store.layers]


def _plot(results: list[dict], layers: list[str]) -> None:
    for r in results:
        if r["method"] == "head2toe":
            plot_selection(r, layers, output_dir() / "selection.png")
        if r["method"] == "per_layer":
            others = [o for o in results if o["method"] in ("head2toe", "linear")]
            plot_per_layer(r, others, output_dir() / "per_layer.png")


def _probe_task(cfg: DictConfig) -> float:
    config = settings(cfg)
    probed = _probe_methods(config, [config.method])
    if probed is None:
        return float("nan")
    results, layers = probed
    path = _write_results(results)
    _plot(results, layers)
    r = results[0]
    log.info(f"{r['method']}: val {pct(r['val_accuracy'])}  test {pct(r['test_accuracy'])}  "
             f"({r['n_features_selected']}/{r['n_features_total']} features)  -> {path}")
    return r["val_accuracy"]  # what a sweeper (hydra/sweeper=optuna) maximises


def _run_task(cfg: DictConfig) -> None:
    config = settings(cfg)
    probed = _probe_methods(config, list(config.methods))
    if probed is None:
        return
    results, layers = probed
    path = _write_results(results)
    _plot(results, layers)
    first = results[0]
    log.info(f"\n{first['model']} on {first['task']} (T={first['target_size']}, store {first['store_id']})")
    log.info(format_table(results))
    by = {r["method"]: r for r in results}
    if "head2toe" in by and "linear" in by:
        gain = 100 * (by["head2toe"]["test_accuracy"] - by["linear"]["test_accuracy"])
        log.info(f"head2toe - linear: {gain:+.1f} test points")
    log.info(f"results: {path}")


def _tune_plan(job: TuneJob, values: dict[str, list]) -> TunePlan:
    """What the tune will do, with the heads' time estimated on this machine (before any store is made)."""
    plans = {T: plan_members(job.extract.with_target_size(T)) for T in values["target_size"]}

    def status_of(extract_job):
        members = list(zip(extract_job.members(), plans[extract_job.pooling.target_size]))
        statuses = [store_status(member, plan) for member, plan in members]
        status = statuses[0] + (f", each of {len(statuses)}" if len(statuses) > 1 else "")
        return (" + ".join(plan.path for _, plan in members),
                status if len(set(statuses)) == 1 else " + ".join(statuses),
                members[0][1].spec["dataset"]["splits"])

    widths = []  # the columns of each group of heads trained together in one round
    for members in plans.values():
        layers = [layer for plan in members for layer in plan.layers]
        D = sum(layer["dim"] for layer in layers)
        if Method.head2toe in job.methods:
            widths += [kept(D, f) for _ in values["lam"] for f in values["fraction"]]
        if Method.linear in job.methods:
            widths += [sum(layer["dim"] for layer in layers if layer["name"] == job.probe.linear_layer) or D]
    num_classes = next(iter(plans.values()))[0].dataset.num_classes
    return estimate_heads(plan_tune(job, values, status_of), widths, values, num_classes, job.probe.head)


def _tune_task(cfg: DictConfig) -> float:
    job = settings(cfg).tune_job()
    values = check_job(job)
    log.info(_tune_plan(job, values).describe())
    if job.tune.plan_only or job.extract.extract.plan_only:
        return float("nan")
    stores = {}

    def ensure(extract_job):
        extracted = ensure_store(extract_job)
        stores[extracted.store.id] = extracted.store
        return extracted.store, extracted.backbone_images

    with ScoreRuntime() as runtime:
        results, candidates = tune(job, ensure, progress=job.extract.extract.progress, save_heads_to=output_dir(),
                                   runtime=runtime)
    path = _write_results(results)
    write_candidates(candidates, output_dir() / "candidates.csv")
    for r in results:
        if r["method"] == "head2toe":
            _plot([r], [layer["name"] for layer in stores[r["store_id"]].layers])
    first = results[0]
    folds = first["folds"]
    log.info(f"\n{first['model']} on {first['task']}: {len(candidates)} candidates "
             f"({f'{folds}-fold cross-validation' if folds else 'validation split'}), winners refitted on "
             f"{'+'.join(job.tune.pool)}")
    log.info(format_table(results, chosen=True))
    log.info(f"results: {path}  (every candidate: {path.parent / 'candidates.csv'}, "
             f"{first['timings_s']['tune']:.1f} s)")
    return first["selection_score"]


TASKS = {"extract": _extract_task, "probe": _probe_task, "run": _run_task, "tune": _tune_task}
