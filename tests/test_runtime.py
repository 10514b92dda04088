"""pipeline/runtime.py: process settings a command chooses at its start. Each test runs in a fresh
interpreter, so that freezing objects or changing malloc does not reach the rest of the test session."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
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
from pipeline.stages import _hold_dataset
from pipeline.write_processes import _start_worker

if __name__ == "__main__":
    method = sys.argv[1]  # as extraction starts them: decoders forked, writers spawned
    start, args = (_hold_dataset, (None,)) if method == "fork" else (_start_worker, ())
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context(method), initializer=start, initargs=args)
    print(pool.submit(os.getpid).result(), flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_decode_and_writer_processes_end_when_the_extraction_is_killed(tmp_path, method):
    """A pool's worker waits on its queue for ever once its parent is gone (it holds the queue's write end too);
    extraction's workers watch for that (`exit_with_parent`) and end."""
    (tmp_path / "pool.py").write_text(WORKER_POOL)
    parent = subprocess.Popen([sys.executable, str(tmp_path / "pool.py"), method], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    worker = psutil.Process(int(parent.stdout.readline()))
    parent.kill()
    parent.wait()
    _, alive = psutil.wait_procs([worker], timeout=15)
    assert not alive
