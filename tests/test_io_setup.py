"""zarr's process-wide I/O settings (pipeline/storage/io_setup.py): importing the storage layer changes none
of them; `configure_io()` sets them when a command asks, once, and says what it chose. Each check runs in a
fresh interpreter (this one's settings were made by conftest's pytest_configure)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

IMPORT_ONLY = """
import json, warnings
import torch, zarr, zarr.core.sync, botocore.session, obstore  # third-party imports first: their own warning filters are not ours
import pipeline.errors, pipeline.pooling
before = (zarr.config.get("codec_pipeline.path"), [repr(f) for f in warnings.filters])
import pipeline.storage
from pipeline.storage import catalog, claims, handle, io_setup, location, meta, quant, relevance, reuse, schema
from pipeline.storage import shards, store, views, widening, writer, zarr_compat
after = (zarr.config.get("codec_pipeline.path"), [repr(f) for f in warnings.filters])
print(json.dumps({"same": before == after, "loop": zarr.core.sync.loop[0] is not None,
                  "new_filters": [f for f in after[1] if f not in before[1]]}))
"""

CONFIGURE = """
import asyncio, json, threading, warnings
import zarr
from pipeline.storage import configure_io, io_setup, zarr_compat
first = configure_io()
pool = io_setup._executor["pool"]
second = configure_io()

async def thread_name():
    return await asyncio.get_running_loop().run_in_executor(None, lambda: threading.current_thread().name)

with warnings.catch_warnings(record=True) as caught:  # as zarrs says it of an array it leaves to zarr's pipeline
    warnings.warn(io_setup.ZARRS_FALLBACK_WARNING + ": TypeError: unsupported", UserWarning)
print(json.dumps({"first": list(first.__dict__.values()), "same": first == second,
                  "same_pool": io_setup._executor["pool"] is pool, "thread": zarr_compat.run(thread_name()),
                  "path": zarr.config.get("codec_pipeline.path"), "pipeline": zarr_compat.codec_pipeline(),
                  "warnings": [str(w.message) for w in caught if "ZarrsCodecPipeline" in str(w.message)]}))
"""


def run_python(code: str, **env) -> dict:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_the_storage_layer_changes_no_process_wide_setting():
    out = run_python(IMPORT_ONLY)
    assert out["same"], out["new_filters"]  # zarr's codec pipeline and the warning filters as they were
    assert not out["loop"]  # zarr's event loop not even started, so its executor is zarr's own


def test_configure_io_sets_zarrs_and_the_io_pool_once():
    out = run_python(CONFIGURE, H2T_CODEC_PIPELINE="")
    assert out["first"] == ["zarrs", 256] and out["same"] and out["same_pool"]
    assert out["path"] == "zarrs.ZarrsCodecPipeline" and out["pipeline"] == "zarrs"
    assert out["thread"].startswith("h2t-zarr-io")
    assert out["warnings"] == []  # zarrs' fallback warning is filtered


def test_configure_io_keeps_zarrs_own_pipeline_when_asked():
    out = run_python(CONFIGURE, H2T_CODEC_PIPELINE="zarr")
    assert out["first"] == ["zarr", 256] and out["pipeline"] == "zarr"
    assert out["path"] == "zarr.core.codec_pipeline.BatchedCodecPipeline"
    assert len(out["warnings"]) == 1  # nothing filtered: zarrs is not in use


def test_configure_io_names_an_unknown_pipeline():
    done = subprocess.run([sys.executable, "-c", "from pipeline.storage import configure_io; configure_io('rust')"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode != 0 and "H2T_CODEC_PIPELINE must be one of zarrs, zarr, got 'rust'" in done.stderr
