"""Every use of zarr's or fsspec's private API, behind one named function each.

zarr-python 3 keeps its event loop, its blocking runner, the async side of a group and the chunk-key
layout out of its public API; fsspec's async copy is a private coroutine. The rest of pipeline/storage/
calls these functions only, and tests/test_zarr_compat.py calls each one against the installed zarr and
fsspec, so an upgrade that moves one fails there, by name, instead of deep inside an extraction.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Coroutine
from concurrent.futures import Executor
from typing import Any, TypeVar

import zarr
import zarr.core.sync  # private: zarr's event loop thread and the blocking runner of its sync API
from zarr.buffer import cpu, default_buffer_prototype

T = TypeVar("T")

# zarr's codec pipelines by their config path (`codec_pipeline.path`); zarr's own lives in a private module
CODEC_PIPELINE_PATHS = {"zarrs": "zarrs.ZarrsCodecPipeline", "zarr": "zarr.core.codec_pipeline.BatchedCodecPipeline"}


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on zarr's event loop from synchronous code and return its result (zarr.core.sync.sync)."""
    return zarr.core.sync.sync(coro)


def collect(items: AsyncIterable[T]) -> list[T]:
    """An async iterator of a zarr store (list_dir, list_prefix) as a list, run on zarr's event loop."""
    async def gather() -> list[T]:
        return [item async for item in items]
    return run(gather())


def io_loop() -> asyncio.AbstractEventLoop:
    """zarr's event loop (created and started on first use; zarr.core.sync._get_loop)."""
    return zarr.core.sync._get_loop()


def set_io_executor(executor: Executor) -> None:
    """Make `executor` the default executor of zarr's event loop: where zarr's stores run blocking file I/O."""
    io_loop().set_default_executor(executor)


def codec_pipeline() -> str:
    """The codec pipeline zarr uses now: its name in CODEC_PIPELINE_PATHS, else its config path."""
    path = zarr.config.get("codec_pipeline.path")
    return next((name for name, known in CODEC_PIPELINE_PATHS.items() if known == path), path)


async def get_bytes(store, key: str) -> bytes | None:
    """One object of a zarr store as bytes; None when absent."""
    buffer = await store.get(key, prototype=default_buffer_prototype())
    return None if buffer is None else buffer.to_bytes()


async def set_bytes(store, key: str, data: bytes) -> None:
    """Write one object of a zarr store."""
    await store.set(key, cpu.Buffer.from_bytes(data))


async def set_bytes_if_absent(store, key: str, data: bytes) -> None:
    """Write one object unless it exists (atomic where the store's backend is)."""
    await store.set_if_not_exists(key, default_buffer_prototype().buffer.from_bytes(data))


async def copy_object(source, target, key: str) -> None:
    """One object from one zarr store to another, as it is (no decode)."""
    await target.set(key, await source.get(key, prototype=default_buffer_prototype()))


def create_arrays(group: zarr.Group, arrays: list[tuple[str, dict]]) -> list[zarr.Array]:
    """Create arrays of a group concurrently (one metadata write each, all in flight at once), each from
    `(name, create_array keyword arguments)`; returns them opened, in order (Group._async_group)."""
    async def create_all():
        return await asyncio.gather(*(group._async_group.create_array(name, **kwargs) for name, kwargs in arrays))
    return [zarr.Array(created) for created in run(create_all())]


async def copy_tree(fs, source: str, target: str) -> None:
    """Copy every object under `source` to `target` inside one async fsspec filesystem (on S3: server-side
    CopyObject, no bytes through this machine; AsyncFileSystem._copy)."""
    await fs._copy(source, target, recursive=True)


def chunk_key(array: zarr.Array, coords: tuple[int, ...]) -> str:
    """The key, relative to the array, of the object holding the chunk (or shard) at grid `coords`, in the
    array's own chunk-key encoding (Zarr v3 default: `c/0/1`; ArrayV3Metadata.encode_chunk_key)."""
    return array.metadata.encode_chunk_key(tuple(coords))


def array_codecs(array: zarr.Array) -> list | None:
    """A Zarr v3 array's codec chain as declared in its metadata (a sharded array: one ShardingCodec);
    None for Zarr v2 arrays."""
    metadata = array.metadata
    if metadata.zarr_format != 3:
        return None
    return list(metadata.codecs)
