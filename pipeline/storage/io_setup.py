"""zarr's process-wide I/O settings, chosen explicitly by a command at its start (never on import).

`configure_io()`:
- zarr's codec pipeline: the Rust one from `zarrs` (default when it imports; `H2T_CODEC_PIPELINE=zarr`, or
  the argument, keeps zarr's own). It decodes in parallel outside the GIL, 10-16x faster than zarr's
  pipeline here (benchmarks/store_io.py); the bytes on storage are the same standard Zarr v3. Arrays and
  stores it does not take (variable-length strings, fsspec remotes) fall back to zarr's pipeline, and
  zarrs warns once per such array: that warning ("Array is unsupported by ZarrsCodecPipeline") is
  filtered, process-wide, by this function.
- zarr's event loop gets a pool of `io_threads` threads, so that small metadata reads and writes (ledger
  entries, claims) never queue behind long shard I/O (with zarr's default pool of cores + 4 threads the
  loop that claims the next shard stalled behind them).
Feature shards are written by shards.py in the caller's threads and need neither setting; without this
function everything still works, with zarr's defaults.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import zarr

from ..errors import H2TError
from . import zarr_compat
from .zarr_compat import CODEC_PIPELINE_PATHS as CODEC_PIPELINES

IO_THREADS = 256
ZARRS_FALLBACK_WARNING = "Array is unsupported by ZarrsCodecPipeline"


@dataclass(frozen=True)
class IOSetup:
    """What `configure_io` chose."""
    codec_pipeline: str  # "zarrs" or "zarr"
    io_threads: int  # threads of zarr's event loop's executor


_executor: dict = {}  # the executor this module gave zarr's event loop: {"loop", "threads", "pool"}


def configure_io(codec_pipeline: str | None = None, io_threads: int = IO_THREADS) -> IOSetup:
    """Set zarr's codec pipeline (`codec_pipeline`, else H2T_CODEC_PIPELINE, else `zarrs` when installed)
    and its event loop's thread pool for this process; returns what it chose. Idempotent: calling it again
    with the same settings changes nothing (the pool is replaced only for another size, or for a new event
    loop, as after a fork)."""
    name = codec_pipeline or os.environ.get("H2T_CODEC_PIPELINE") or "zarrs"
    if name not in CODEC_PIPELINES:
        raise H2TError(f"H2T_CODEC_PIPELINE must be one of {', '.join(CODEC_PIPELINES)}, got {name!r}")
    if name == "zarrs" and not _zarrs_available():
        name = "zarr"
    zarr.config.set({"codec_pipeline.path": CODEC_PIPELINES[name]})
    if name == "zarrs":
        warnings.filterwarnings("ignore", message=ZARRS_FALLBACK_WARNING, category=UserWarning)
    loop = zarr_compat.io_loop()
    if _executor.get("loop") is not loop or _executor.get("threads") != io_threads:
        pool = ThreadPoolExecutor(io_threads, thread_name_prefix="h2t-zarr-io")
        zarr_compat.set_io_executor(pool)
        previous = _executor.get("pool") if _executor.get("loop") is loop else None
        _executor.update(loop=loop, threads=io_threads, pool=pool)
        if previous is not None:
            previous.shutdown(wait=False)  # its running tasks finish; new ones go to the new pool
    return IOSetup(name, io_threads)


def _zarrs_available() -> bool:
    try:
        import zarrs  # noqa: F401, PLC0415 - optional at run time: without it zarr's own codec pipeline is used
    except ImportError:
        return False
    return True
