"""pipeline/runtime.py: process settings a command chooses at its start. Each test runs in a fresh
interpreter, so that freezing objects or changing malloc does not reach the rest of the test session."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_imports_uncollected_pauses_collection_then_freezes_what_the_block_made():
    out = _run("""
        import gc
        from pipeline.runtime import imports_uncollected
        before = gc.get_freeze_count()
        with imports_uncollected():
            inside = gc.isenabled()
            made = [[i] for i in range(50_000)]  # tracked containers, as an import makes
            collections = gc.get_count()[0]
        frozen = gc.get_freeze_count() - before
        tracked = {id(o) for o in gc.get_objects()}
        print(inside, gc.isenabled(), frozen >= 50_000, any(id(m) in tracked for m in made), collections >= 50_000)
    """)
    # collection paused inside (no gen-0 pass reset its count), the block's objects frozen and out of the
    # collector's lists afterwards, collection on again
    assert out == "False True True False True"


def test_imports_uncollected_leaves_a_disabled_collector_disabled_and_survives_errors():
    out = _run("""
        import gc
        from pipeline.runtime import imports_uncollected
        gc.disable()
        with imports_uncollected():
            pass
        after_disabled = gc.isenabled()
        gc.enable()
        try:
            with imports_uncollected():
                raise ValueError("an import failed")
        except ValueError:
            pass
        print(after_disabled, gc.isenabled())
    """)
    assert out == "False True"


def test_a_verb_imports_torch_frozen():
    """`h2t VERB` (pipeline/jobs.py) imports the model stack inside the block: torch's objects end up frozen."""
    out = _run("""
        import contextlib, gc, io
        from pipeline import cli
        with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
            cli.main(["extract", "--help"])  # Hydra's help: after the imports, before any job
        import torch
        tracked = {id(o) for o in gc.get_objects()}
        print(gc.isenabled(), gc.get_freeze_count() > 100_000, id(torch.nn.Module) in tracked)
    """)
    assert out == "True True False"


WORKER_POOL = """
import multiprocessing, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from pipeline.stages import _hold_dataset
from pipeline.write_processes import _start_worker


def start_late(start, args, pid_file):
    # a worker still starting (a spawned one importing) when its parent is killed
    Path(pid_file).write_text(str(os.getpid()))
    while os.getppid() == args[-1]:
        time.sleep(0.02)
    start(*args)


if __name__ == "__main__":
    method, when, pid_file = sys.argv[1:]  # as extraction starts them: decoders forked, writers spawned
    start, args = (_hold_dataset, (None, os.getpid())) if method == "fork" else (_start_worker, (os.getpid(),))
    if when == "late":
        start, args = start_late, (start, args, pid_file)
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context(method), initializer=start, initargs=args)
    future = pool.submit(os.getpid)
    if when == "started":
        Path(pid_file).write_text(str(future.result()))
    time.sleep(120)
"""


@pytest.mark.parametrize("when", ["started", "late"])
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_decode_and_writer_processes_end_when_the_extraction_is_killed(tmp_path, method, when):
    """A pool's worker waits on its queue for ever once its parent is gone (it holds the queue's write end too);
    extraction's workers watch for that (`exit_with_parent`) and end, also one whose start ran after the kill."""
    (tmp_path / "pool.py").write_text(WORKER_POOL)
    pid_file = tmp_path / "worker.pid"
    parent = subprocess.Popen([sys.executable, str(tmp_path / "pool.py"), method, when, str(pid_file)],
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.02)
    worker = psutil.Process(int(pid_file.read_text()))
    parent.kill()
    parent.wait()
    _, alive = psutil.wait_procs([worker], timeout=15)
    for process in alive:  # a failure leaves nothing running
        process.kill()
    assert not alive
