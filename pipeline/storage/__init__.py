"""The storage layer: the store schema (as code), locations, claims, growing stores, the catalog and derived
views. Everything that touches Zarr lives here; the stages above it see `FeatureStore` and plain arrays.

zarr's codec pipeline is switched to the Rust one from the `zarrs` package when it is installed: on the
default layout it writes sharded zstd + CRC32C arrays 3-16x faster than zarr's own and decodes in parallel
outside the GIL (benchmarks/store_io.py). The bytes on storage are the same standard Zarr v3; arrays or
stores it does not handle (variable-length strings, fsspec remotes) fall back to zarr's pipeline.
`H2T_CODEC_PIPELINE=zarr` keeps zarr's own pipeline everywhere.
"""
from __future__ import annotations

import os
import warnings

import zarr

CODEC_PIPELINES = {"zarrs": "zarrs.ZarrsCodecPipeline", "zarr": "zarr.core.codec_pipeline.BatchedCodecPipeline"}


def use_codec_pipeline(name: str | None = None) -> str:
    """Select zarr's codec pipeline for this process: `zarrs` (default when installed) or `zarr`."""
    from ..errors import H2TError

    name = name or os.environ.get("H2T_CODEC_PIPELINE") or "zarrs"
    if name not in CODEC_PIPELINES:
        raise H2TError(f"H2T_CODEC_PIPELINE must be one of {', '.join(CODEC_PIPELINES)}, got {name!r}")
    if name == "zarrs":
        try:
            import zarrs  # noqa: F401
        except ImportError:
            name = "zarr"
    zarr.config.set({"codec_pipeline.path": CODEC_PIPELINES[name]})
    return name


def widen_io_executor(threads: int = 256) -> None:
    """Give zarr's event loop a thread pool large enough that small metadata reads and writes (ledger
    entries, shard claims) never queue behind the long shard encodes that writers hand it: with zarr's
    default pool (cores + 4 threads) the loop that claims the next shard stalled behind them."""
    from concurrent.futures import ThreadPoolExecutor

    from zarr.core import sync

    sync._get_loop().set_default_executor(ThreadPoolExecutor(threads, thread_name_prefix="h2t-zarr-io"))


# Arrays the Rust pipeline does not take are handled by zarr's own, which it says once per array.
warnings.filterwarnings("ignore", message="Array is unsupported by ZarrsCodecPipeline")
CODEC_PIPELINE = use_codec_pipeline()
widen_io_executor()
