"""The Hydra verbs (`h2t extract | probe | run | tune [overrides]`): the command line checked in one line
(credentials refused before Hydra saves them, the config composed once), then Hydra runs the verb's task
(pipeline/tasks.py); a failing job of a sweep is recorded and the sweep goes on."""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import hydra
import psutil
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf.errors import OmegaConfBaseException

from .config import CONF_DIR
from .errors import H2TError, fail
from .report import FAILED_FILE
from .runtime import imports_uncollected
from .storage.location import CREDENTIAL_SETTINGS, WHERE_CREDENTIALS_GO


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
            from .backbone import check_model_name  # noqa: PLC0415 - start-up time: timm only for timm names

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


def output_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def _guarded(task):
    """One line and exit status 2 for a user error. In a -m sweep a failing job is recorded instead
    (failed.json in its folder) and the sweep goes on: the command exits non-zero when it ends."""
    def wrapped(cfg):
        multirun = HydraConfig.get().mode == RunMode.MULTIRUN
        try:
            return task(cfg)
        except KeyboardInterrupt as exc:
            terminated = isinstance(exc, Terminated)
            print(f"h2t: {'terminated' if terminated else 'interrupted'}; the store stays incomplete and resumes on "
                  "the next run", file=sys.stderr)
            sys.exit(128 + signal.SIGTERM if terminated else 130)
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
    out = output_dir()
    out.mkdir(parents=True, exist_ok=True)
    (out / FAILED_FILE).write_text(json.dumps({"error": message, "traceback": traceback.format_exc()}, indent=2))
    print(f"h2t: job failed: {message}", file=sys.stderr)


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (`kill`, a scheduler's time limit): the command stops as on Ctrl-C, running its clean-up
    (claims released, writer and decode processes stopped, the store left incomplete to resume)."""


@contextmanager
def _terminated_as_interrupt():
    """While a verb runs in the main thread, SIGTERM raises `Terminated` there (Python's default ends the
    process at once, skipping every `finally`); the previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


SCRATCH_PREFIX = "h2t-sweep-"


@contextmanager
def command_scratch() -> Iterator[Path]:
    """A temp folder for one command, named by its pid (`h2t-sweep-<pid>-...`) and removed after it. A command
    killed with SIGKILL runs no clean-up, so each command first removes the folders of commands whose process
    is gone."""
    for old in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*-*"):
        pid = old.name[len(SCRATCH_PREFIX):].split("-")[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-") as scratch:
        yield Path(scratch)


@contextmanager
def _argv(args: list[str]):
    """Hydra's app reads its command line from sys.argv, and HYDRA_FULL_ERROR from the environment (unset:
    our one-line errors, not Hydra's traceback): both set for the app's run only, then restored."""
    saved, saved_error = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = args
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    try:
        yield
    finally:
        sys.argv = saved
        if saved_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)


def run_verb(verb: str, rest: list[str]) -> None:
    """`h2t VERB [overrides] [-m] [-q]` for a Hydra verb; exits non-zero when a job of a sweep failed."""
    quiet = [a for a in rest if a in ("-q", "--quiet")]
    rest = [a for a in rest if a not in quiet]
    args = _rewrite_groups(rest)
    if quiet:  # warnings and errors only, no progress bars; the job's log file keeps everything
        args += ["hydra.job_logging.handlers.console.level=WARNING", "extract.progress=false"]
    _check_overrides(verb, args)
    with imports_uncollected():  # ~400 k objects for life: not scanned again (pipeline/runtime.py)
        from . import tasks  # noqa: PLC0415 - start-up time: a bad override is one line before torch loads

    app = hydra.main(config_path=str(CONF_DIR), config_name=verb, version_base="1.3")(_guarded(tasks.TASKS[verb]))
    with command_scratch() as scratch:
        outcome = scratch / "outcome.json"  # the sweep's failed jobs (pipeline/report.py SweepReport)
        argv = [f"h2t-{verb}"] + _flags_first(args + [f"hydra.job.name={verb}",
                                                      f"hydra.callbacks.sweep_report.outcome={outcome}"])
        with _terminated_as_interrupt(), _argv(argv):
            app()
        sweep = json.loads(outcome.read_text()) if outcome.is_file() else {"failed": []}
    if sweep["failed"]:
        first = sweep["failed"][0]
        fail(f"{len(sweep['failed'])} job(s) of the sweep in {sweep['directory']} failed, "
              f"first: job {first['job']}: {first.get('error')}")


