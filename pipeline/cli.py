"""`h2t VERB [hydra overrides]`: extract, probe, run. Each verb is a Hydra app with its own primary config."""
from __future__ import annotations

import argparse
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

from . import storage
from .backbone import check_model_name
from .config import H2TConfig, Method, settings
from .config import register as register_schema
from .errors import H2TError
from .extract import ensure_store, extract, format_plan, plan_store, planned_reuse
from .predict import predict_files
from .probe import check_settings, probe_store
from .report import FAILED_FILE, format_table, pct, plot_selection, write_report
from .runtime import keep_freed_memory
from .score.cluster import ScoreRuntime
from .storage import catalog
from .storage.location import CREDENTIAL_SETTINGS, WHERE_CREDENTIALS_GO
from .tune import check_job, tune, write_candidates

register_schema()  # conf/<verb>.yaml start from the schema (pipeline/config.py)
log = logging.getLogger("h2t")  # Hydra sends it to the terminal and to each job's <verb>.log

CONF_DIR = Path(os.environ.get("H2T_CONF_DIR", Path(__file__).resolve().parent / "conf"))  # shipped in the package
VERBS = {
    "extract": "run the backbone over a dataset once and fill the store",
    "probe": "score, select and train a head from the store (method=head2toe|linear); -m for sweeps",
    "run": "extract if needed, probe head2toe and linear, print the comparison",
    "tune": "choose T, lam, F and the head's lr / steps on val or by K folds, refit on train+val, test once",
    "predict": "apply a saved head to images: h2t predict HEAD.pt IMAGES_OR_FOLDERS... [--out predictions.csv]",
    "report": "one table (markdown, CSV) and plots over a -m sweep or a tune folder: h2t report DIR",
    "store": "ls | info | verify | rm | gc: the stores under a root (h2t store -h)",
}
USAGE = "usage: h2t {" + ",".join(VERBS) + "} [key=value ...] [-m] [-q]\n" + "\n".join(
    f"  {verb:8s} {text}" for verb, text in VERBS.items())


def _fail(message: str) -> None:
    print(f"h2t: error: {message}", file=sys.stderr)
    sys.exit(2)


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
                _fail(f"unknown dataset data={bad}; built in: {', '.join(known)} (or data=folder data.root=DIR)")
            if any(files):
                _fail(f"model={value} mixes config files and timm names: sweep them in separate runs, or write "
                      f"the timm ones as model=timm model.name=NAME,... ")
            for name in names:
                try:
                    check_model_name(name)
                except H2TError as exc:
                    _fail(str(exc))
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
            _fail(f"{key}: {WHERE_CREDENTIALS_GO}")
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
        _fail(message)


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


def _tune_task(cfg: DictConfig) -> float:
    job = settings(cfg).tune_job()
    check_job(job)
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
                    _fail(str(exc))
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


def _predict_command(args: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="h2t predict", description=VERBS["predict"])
    parser.add_argument("head", help="a <method>.head.pt written by probe, run or tune")
    parser.add_argument("images", nargs="+", help="image files, folders (searched recursively) or .txt lists")
    parser.add_argument("--out", default="predictions.csv")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    opts = parser.parse_args(args)
    if opts.batch_size < 1:
        _fail(f"--batch-size must be >= 1, got {opts.batch_size}")
    try:
        out, n, acc = predict_files(opts.head, opts.images, opts.out, opts.batch_size, opts.device, not opts.quiet)
    except H2TError as exc:
        _fail(str(exc))
    tail = "" if acc is None else f"; accuracy against the folder names: {100 * acc:.1f} %"
    print(f"{n} predictions -> {out}{tail}")


def _report_command(args: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="h2t report", description=VERBS["report"])
    parser.add_argument("dir", help="a -m sweep folder (multirun/...), a tune or probe output folder")
    opts = parser.parse_args(args)
    try:
        text, paths, failed = write_report(opts.dir)
    except H2TError as exc:
        _fail(str(exc))
    print(text)
    print("\nwritten: " + ", ".join(str(p) for p in paths))
    if failed:
        _fail(f"{len(failed)} failed job(s) in {opts.dir}, first: job {failed[0]['job']}: {failed[0].get('error')}")


def _store_command(args: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="h2t store", description="The stores under a root.")
    sub = parser.add_subparsers(dest="action", required=True)
    ls = sub.add_parser("ls", help="list stores")
    ls.add_argument("root", nargs="?", default=catalog.default_root())
    ls.add_argument("--json", action="store_true")
    for name, text in (("info", "provenance and layer table"), ("verify", "read every shard, check checksums"),
                       ("rm", "delete a store")):
        p = sub.add_parser(name, help=text)
        p.add_argument("ref", help="store path, id or unique id prefix")
        p.add_argument("--root", default=catalog.default_root())
        if name == "info":
            p.add_argument("--json", action="store_true")
        if name == "rm":
            p.add_argument("--derived", action="store_true",
                           help="delete only the derived artefacts (cached scores, column views)")
    gc = sub.add_parser("gc", help="delete incomplete stores nobody wrote to for a while")
    gc.add_argument("root", nargs="?", default=catalog.default_root())
    gc.add_argument("--older-than-hours", type=float, default=24.0)
    gc.add_argument("--dry-run", action="store_true")
    opts = parser.parse_args(args)
    try:
        if opts.action == "ls":
            rows = catalog.list_summaries(opts.root)
            if opts.json:
                print(json.dumps(rows, indent=2))
                return
            print(f"{'id':16s}  {'status':9s} {'model':24s} {'dataset':20s} {'taps':>4s} {'features':>9s} "
                  f"{'size':>10s}  {'created':16s}  by")
            for r in rows:
                if "model" not in r:
                    print(f"{r['id']:16s}  {r['status']}")
                    continue
                print(f"{r['id']:16s}  {r['status']:9s} {r['model'][:24]:24s} {r['dataset'][:20]:20s} {r['taps']:4d} "
                      f"{r['features']:9d} {catalog.human_bytes(r['size_bytes']):>10s}  {catalog.age(r['created_at']):16s}"
                      f"  {r['created_by']}")
            return
        if opts.action == "gc":
            stale = catalog.abandoned(opts.root, opts.older_than_hours * 3600)
            for path in stale:
                print(f"{'would remove' if opts.dry_run else 'removed'} {path}")
                if not opts.dry_run:
                    catalog.remove(path)
            if not stale:
                print("no abandoned stores")
            return
        path = catalog.resolve(opts.ref, opts.root)
        if opts.action == "rm":
            if opts.derived:
                catalog.remove_derived(path)
                print(f"removed the derived artefacts of {path}")
                return
            catalog.remove(path)
            print(f"removed {path}")
            return
        store = catalog.open_resolved(path)
        if opts.action == "info":
            info = {**catalog.summary(store), "spec": store.meta["spec"], "layers": store.layers,
                    "skipped": store.meta.get("skipped", [])}
            if opts.json:
                print(json.dumps(info, indent=2))
                return
            for key in ("id", "path", "status", "model", "dataset", "splits", "features", "created_at", "created_by"):
                print(f"{key:11s} {info[key]}")
            print(f"{'size':11s} {catalog.human_bytes(info['size_bytes'])}")
            print("provenance " + json.dumps(store.meta["spec"], sort_keys=True))
            print(f"\n{'#':>3s} {'tap':40s} {'role':18s} {'raw shape':>16s} {'dim':>7s} {'offset':>8s}  stored")
            dtypes = store.layer_dtypes()
            for i, layer in enumerate(store.layers):
                shape = "x".join(map(str, layer["raw_shape"]))
                source = f", copied from {layer['reused_from']}" if "reused_from" in layer else ""
                print(f"{i:3d} {layer['name'][:40]:40s} {layer['role'][:18]:18s} {shape:>16s} {layer['dim']:7d} "
                      f"{layer['offset']:8d}  {dtypes[layer['name']]}{source}")
            return
        problems = catalog.verify(store)
        for line in problems:
            print(line)
        if problems:
            _fail(f"store {store.id} at {path}: {len(problems)} problem(s), first: {problems[0]}")
        print(f"store {store.id} at {path}: every shard present and its checksums match ({store.meta['status']})")
    except H2TError as exc:
        _fail(str(exc))


@contextmanager
def _argv(args: list[str]):
    """Hydra's app reads its command line from sys.argv: set for the app's run only, then restored."""
    saved = sys.argv
    sys.argv = args
    try:
        yield
    finally:
        sys.argv = saved


def _hydra_verb(verb: str, rest: list[str]) -> None:
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
        _fail(f"{len(sweep['failed'])} job(s) of the sweep in {sweep['directory']} failed, "
              f"first: job {first['job']}: {first.get('error')}")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        _fail(f"unknown command {verb!r}\n{USAGE}")
    keep_freed_memory()  # every verb allocates large arrays: no page faults for each (pipeline/runtime.py)
    storage.configure_io()  # zarr's codec pipeline and I/O threads, for this command (pipeline/storage/__init__.py)
    if verb == "store":
        _store_command(rest)
    elif verb == "report":
        _report_command(rest)
    elif verb == "predict":
        _predict_command(rest)
    else:
        _hydra_verb(verb, rest)


if __name__ == "__main__":
    main()
