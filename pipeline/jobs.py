"""The Hydra verbs (`h2t extract | probe | run | tune [overrides]`): each composes its primary config from
conf/, checks the overrides in one line, types the config once (`settings`) and hands each stage its job."""
from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import traceback
from contextlib import contextmanager
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from .backbone import check_model_name
from .config import CONF_DIR, H2TConfig, Method, TuneJob, settings
from .errors import H2TError, fail
from .extract import ensure_store, extract, format_plan, plan_store, planned_reuse, store_status
from .probe import check_settings, probe_store
from .report import FAILED_FILE, format_table, pct, plot_per_layer, plot_selection
from .score.cluster import ScoreRuntime
from .select import kept
from .storage.location import CREDENTIAL_SETTINGS, WHERE_CREDENTIALS_GO
from .tune import TunePlan, check_job, estimate_heads, plan_tune, tune, write_candidates

log = logging.getLogger("h2t")  # Hydra sends it to the terminal and to each job's <verb>.log


def _user_config_dirs(args: list[str]) -> list[Path]:
    dirs = [Path(a.split("=", 1)[1]) for a in args if a.startswith("--config-dir=")]
    dirs += [Path(args[i + 1]) for i, a in enumerate(args[:-1]) if a in ("--config-dir", "-cd")]
    return dirs + [CONF_DIR]


def _rewrite_groups(args: list[str]) -> list[str]:
    """`model=NAME` (or a sweep `model=A,B`) for any timm model; a clear one-line error for unknown model /
    data choices."""
    out = []
    search = _user_config_dirs(args)
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key in ("model", "data") and value:
            names = value.split(",")
            files = [any((d / key / f"{name}.yaml").is_file() for d in search) for name in names]
            if all(files):
                out.append(arg)
                continue
            if key == "data":
                known = sorted(p.stem for d in search for p in (d / "data").glob("*.yaml"))
                bad = names[files.index(False)]
                fail(f"unknown dataset data={bad}; built in: {', '.join(known)} (or data=folder data.root=DIR)")
            if any(files):
                fail(f"model={value} mixes config files and timm names: sweep them in separate runs, or write "
                      f"the timm ones as model=timm model.name=NAME,... ")
            for name in names:
                try:
                    check_model_name(name)
                except H2TError as exc:
                    fail(str(exc))
            out += ["model=timm", f"model.name={value}"]
            continue
        out.append(arg)
    return out


_FLAGS_WITH_VALUE = {"--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn", "--cfg", "-c",
                     "--package", "-p"}


def _flags_first(args: list[str]) -> list[str]:
    """Hydra's parser wants its flags before the overrides; users may write them anywhere."""
    flags: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(args):
        if args[i] in _FLAGS_WITH_VALUE and i + 1 < len(args):
            flags += args[i:i + 2]
            i += 2
            continue
        (flags if args[i].startswith("-") else overrides).append(args[i])
        i += 1
    return flags + overrides


def _check_overrides(verb: str, args: list[str]) -> None:
    """Compose the config once so a bad key or value is reported in one line (single runs only). A
    credential given as a setting is refused first, before Hydra saves the command line in .hydra/."""
    for arg in args:
        key = arg.lstrip("+~").partition("=")[0]
        if key.startswith("store.s3.") and key.removeprefix("store.s3.") in CREDENTIAL_SETTINGS:
            fail(f"{key}: {WHERE_CREDENTIALS_GO}")
    if any(a in ("-m", "--multirun") for a in args) or any(a.startswith("-") for a in args):
        return  # sweeps and Hydra flags: Hydra reports its own errors
    overrides = [a for a in args if not a.startswith("hydra.")]
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            compose(config_name=verb, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        message: str = str(exc).strip().splitlines()[0]
        cause = exc.__cause__
        while cause is not None:  # the schema's own words: "Invalid value 'ridge', expected one of [...]"
            if isinstance(cause, OmegaConfBaseException):
                full_key = getattr(cause, "full_key", None)
                message = f"{message}: {str(cause).strip().splitlines()[0]}" + (f" ({full_key})" if full_key else "")
            cause = cause.__cause__
        parser = OverridesParser.create()
        for override in overrides:  # name the argument the parser rejects
            try:
                parser.parse_overrides([override])
            except HydraException:
                message = f"cannot parse override {override!r}: {message}"
                break
        fail(message)


def _output_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def _write_results(results: list[dict]) -> Path:
    path = _output_dir() / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"results": results}, indent=2, default=float))
    return path


def _extract_task(cfg: DictConfig) -> None:
    job = settings(cfg).extract_job()
    plan = plan_store(job)
    reuse = planned_reuse(job, plan)
    log.info(format_plan(plan, per_tap=job.extract.plan_only, reuse=reuse))
    if job.extract.plan_only:
        return
    result = extract(job, plan, reuse)
    store = result.store
    reused = len(store.layers) - len(store.computed_layers)
    log.info(f"store {store.id} complete at {store.path}: {store.n_features} features in {len(store.layers)} taps"
             f"{f' ({reused} copied from other stores)' if reused else ''}, splits {store.splits()}, "
             f"{result.backbone_images} images through the backbone ({result.seconds:.1f} s)")


def _probe_methods(config: H2TConfig, methods: list[Method]) -> tuple[list[dict], list[str]]:
    jobs = [config.probe_job(method) for method in methods]
    for job in jobs:
        check_settings(job)
    extracted = ensure_store(config.extract_job())
    results = []
    with ScoreRuntime() as runtime:
        for i, job in enumerate(jobs):
            result = probe_store(extracted.store, job, progress=config.extract.progress, save_head_to=_output_dir(),
                                 runtime=runtime)
            # Images that went through the backbone in this job are counted once, on the first method.
            result["backbone_images"] = extracted.backbone_images if i == 0 else 0
            result["timings_s"]["extract"] = round(extracted.seconds, 3) if i == 0 else 0.0
            results.append(result)
    return results, [layer["name"] for layer in extracted.store.layers]


def _plot(results: list[dict], layers: list[str]) -> None:
    for r in results:
        if r["method"] == "head2toe":
            plot_selection(r, layers, _output_dir() / "selection.png")
        if r["method"] == "per_layer":
            others = [o for o in results if o["method"] in ("head2toe", "linear")]
            plot_per_layer(r, others, _output_dir() / "per_layer.png")


def _probe_task(cfg: DictConfig) -> float:
    config = settings(cfg)
    results, layers = _probe_methods(config, [config.method])
    path = _write_results(results)
    _plot(results, layers)
    r = results[0]
    log.info(f"{r['method']}: val {pct(r['val_accuracy'])}  test {pct(r['test_accuracy'])}  "
             f"({r['n_features_selected']}/{r['n_features_total']} features)  -> {path}")
    return r["val_accuracy"]  # what a sweeper (hydra/sweeper=optuna) maximises


def _run_task(cfg: DictConfig) -> None:
    config = settings(cfg)
    results, layers = _probe_methods(config, list(config.methods))
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
    plans = {T: plan_store(job.extract.with_target_size(T)) for T in values["target_size"]}

    def status_of(extract_job):
        plan = plans[extract_job.pooling.target_size]
        return plan.path, store_status(extract_job, plan), plan.spec["dataset"]["splits"]

    widths = []  # the columns of each group of heads trained together in one round
    for plan in plans.values():
        D = sum(layer["dim"] for layer in plan.layers)
        if Method.head2toe in job.methods:
            widths += [kept(D, f) for _ in values["lam"] for f in values["fraction"]]
        if Method.linear in job.methods:
            widths += [sum(layer["dim"] for layer in plan.layers if layer["name"] == job.probe.linear_layer) or D]
    num_classes = next(iter(plans.values())).dataset.num_classes
    return estimate_heads(plan_tune(job, values, status_of), widths, values, num_classes, job.probe.head)


def _tune_task(cfg: DictConfig) -> float:
    job = settings(cfg).tune_job()
    values = check_job(job)
    log.info(_tune_plan(job, values).describe())
    if job.tune.plan_only:
        return float("nan")
    stores = {}

    def ensure(extract_job):
        extracted = ensure_store(extract_job)
        stores[extracted.store.id] = extracted.store
        return extracted.store, extracted.backbone_images

    with ScoreRuntime() as runtime:
        results, candidates = tune(job, ensure, progress=job.extract.extract.progress, save_heads_to=_output_dir(),
                                   runtime=runtime)
    path = _write_results(results)
    write_candidates(candidates, _output_dir() / "candidates.csv")
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


def _guarded(task):
    """One line and exit status 2 for a user error. In a -m sweep a failing job is recorded instead
    (failed.json in its folder) and the sweep goes on: the command exits non-zero when it ends."""
    def wrapped(cfg):
        multirun = HydraConfig.get().mode == RunMode.MULTIRUN
        try:
            return task(cfg)
        except KeyboardInterrupt:
            print("h2t: interrupted; the store stays incomplete and resumes on the next run", file=sys.stderr)
            sys.exit(130)
        except Exception as exc:  # noqa: BLE001 - recorded per job in a sweep; re-raised otherwise
            if not multirun:
                if isinstance(exc, H2TError):
                    fail(str(exc))
                raise
            _record_failure(exc)
            return float("nan")  # a sweeper (optuna) sees a failed trial
    return wrapped


def _record_failure(exc: Exception) -> None:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if not isinstance(exc, H2TError):
        message = f"{type(exc).__name__}: {message}"
    out = _output_dir()
    out.mkdir(parents=True, exist_ok=True)
    (out / FAILED_FILE).write_text(json.dumps({"error": message, "traceback": traceback.format_exc()}, indent=2))
    print(f"h2t: job failed: {message}", file=sys.stderr)


@contextmanager
def _argv(args: list[str]):
    """Hydra's app reads its command line from sys.argv: set for the app's run only, then restored."""
    saved = sys.argv
    sys.argv = args
    try:
        yield
    finally:
        sys.argv = saved


def run_verb(verb: str, rest: list[str]) -> None:
    """`h2t VERB [overrides] [-m] [-q]` for a Hydra verb; exits non-zero when a job of a sweep failed."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    quiet = [a for a in rest if a in ("-q", "--quiet")]
    rest = [a for a in rest if a not in quiet]
    args = _rewrite_groups(rest)
    if quiet:  # warnings and errors only, no progress bars; the job's log file keeps everything
        args += ["hydra.job_logging.handlers.console.level=WARNING", "extract.progress=false"]
    _check_overrides(verb, args)
    app = hydra.main(config_path=str(CONF_DIR), config_name=verb, version_base="1.3")(_guarded(TASKS[verb]))
    with tempfile.TemporaryDirectory(prefix="h2t-sweep-") as scratch:
        outcome = Path(scratch) / "outcome.json"  # the sweep's failed jobs (pipeline/report.py SweepReport)
        with _argv([f"h2t-{verb}"] + _flags_first(args + [f"hydra.job.name={verb}",
                                                           f"hydra.callbacks.sweep_report.outcome={outcome}"])):
            app()
        sweep = json.loads(outcome.read_text()) if outcome.is_file() else {"failed": []}
    if sweep["failed"]:
        first = sweep["failed"][0]
        fail(f"{len(sweep['failed'])} job(s) of the sweep in {sweep['directory']} failed, "
              f"first: job {first['job']}: {first.get('error')}")


