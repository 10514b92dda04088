"""pipeline/runtime.py: process settings a command chooses at its start. Each test runs in a fresh
interpreter, so that freezing objects or changing malloc does not reach the rest of the test session."""
from __future__ import annotations

import subprocess
import sys
import textwrap


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
