"""Shard writes in worker processes (`extract.writers_in=processes`): the store path without a GIL shared
with the forward, the decoders and the other writers.

A writer thread releases the GIL for each inner chunk's codec call and takes it back after: hundreds of
times per shard. Beside a thread that runs Python without pause, each of those takes waits for the
interpreter's switch interval (5 ms): a writer that encodes 300-400 MiB/s alone wrote 2-12 MiB/s beside a
pure-Python loop on the CPU machine (benchmarks/README.md, writers_in.py). Worker processes have a
GIL each.

Each worker opens the store at its first write, as another writer of it would (claims, the ledger and the widening
protocol already serve several processes: a widening in the main process is followed by every worker's
next shard), and writes the shards it is handed. A batch reaches it through shared memory: the main process
copies the batch's blocks into one segment (one copy of the bytes, in a packing thread beside the main
thread), and the segment is reused once that write is done. `ProcessWriter` has `stages.Writer`'s interface.
"""
from __future__ import annotations

import ctypes
import errno
import multiprocessing
import os
import signal
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing.shared_memory import SharedMemory
from typing import TYPE_CHECKING

import numpy as np

from .errors import H2TError
from .runtime import exit_with_parent
from .storage.quant import QuantizedBlock
from .storage.store import FeatureStore, StaleShard
from .storage.writer import WriterTimes

if TYPE_CHECKING:
    from .stages import Shard

# (offset, shape, dtype) of one array in a segment; a block is one array, or two for an int8 tap
Placed = tuple[int, tuple[int, ...], str]


class ProcessWriter:
    """Writes shards in `writers` worker processes, at most `writers + 1` batches in flight; the main process
    releases a shard's claim when its write is done (marked in the ledger, or found stale)."""

    def __init__(self, store, claims, writers: int):
        if writers < 1:
            raise H2TError(f"extract.writers must be >= 1, got {writers}")
        self.claims, self.limit = claims, writers + 1
        self.stale = 0  # shards written across another writer's widening
        self.times = WriterTimes()
        self._where = (store.path, store.options)  # each worker opens the store at its first write
        self._inflight: deque[tuple[Future, SharedMemory, str]] = deque()
        self._free: list[SharedMemory] = []
        self._segments: list[SharedMemory] = []
        self._retired: list[str] = []  # segments replaced by larger ones: workers let go of them
        # spawn: a fork of a process with CUDA, Hydra and I/O threads running is not safe
        self._pool = ProcessPoolExecutor(writers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_start_worker, initargs=(os.getpid(),))
        self._packers = ThreadPoolExecutor(writers, thread_name_prefix="h2t-pack")
        try:  # every worker starts now (a pool spawns one per call waiting), while the first batches compute
            for _ in range(writers):
                self._pool.submit(_ready)
        except BaseException:
            self.close(raise_errors=False)
            raise

    def submit(self, shard: Shard, blocks: list, dtypes: dict | None = None) -> None:
        """`dtypes`: what each block was cast to (a shard cast before another writer widened a tap is stale)."""
        waited = time.perf_counter()
        while len(self._inflight) >= self.limit:
            self._finish_oldest()
        self.times.submit_wait_s += time.perf_counter() - waited
        layout, nbytes = place(blocks)
        segment = self._segment(nbytes)
        self._inflight.append((self._packers.submit(self._pack_and_send, blocks, layout, segment, shard, dtypes),
                               segment, f"{shard.split}/{shard.index}"))

    def _pack_and_send(self, blocks: list, layout: list[list[Placed]], segment: SharedMemory, shard: Shard,
                       dtypes: dict | None) -> Future:
        """In a packing thread (the copies release the GIL, so they run beside the main thread's work): the
        blocks into the segment, then the write to a worker."""
        pack(blocks, layout, segment.buf)
        return self._pool.submit(_write, self._where, segment.name, tuple(self._retired), shard.split, shard.start,
                                 layout, dtypes)

    def _segment(self, nbytes: int) -> SharedMemory:
        """A free segment of at least `nbytes` (one too small is replaced)."""
        if self._free:
            segment = self._free.pop()
            if segment.size >= nbytes:
                return segment
            self._segments.remove(segment)
            self._retired.append(segment.name)
            _release(segment)
        segment = allocate_segment(nbytes, len(self._segments) - len(self._free))
        self._segments.append(segment)
        return segment

    def _finish_oldest(self) -> None:
        packed, segment, key = self._inflight.popleft()
        try:
            stale, cpu_s, wall_s = packed.result().result()
        except Exception:
            self.claims.release(key)  # the write failed: the shard is free again
            self._free.append(segment)
            raise
        except BaseException:  # interrupted while the write may still run: `close` waits for it first
            self._inflight.appendleft((packed, segment, key))
            raise
        self.claims.release(key)
        self._free.append(segment)
        self.stale += stale
        self.times.add(cpu_s, wall_s)

    def drain(self) -> None:
        """Wait for every write in flight (errors surface here)."""
        while self._inflight:
            self._finish_oldest()

    def close(self, raise_errors: bool = True) -> None:
        """Finish the writes in flight (as writer threads do: shards already computed are kept); after another
        error, theirs are not raised over it. The workers exit and the segments are removed either way."""
        try:
            if raise_errors:
                self.drain()
        finally:
            try:
                self._packers.shutdown(wait=True)
                self._pool.shutdown(wait=True)
            finally:
                for _, _, key in self._inflight:  # after an error: written or not, these shards are free again
                    self.claims.release(key)
                self._inflight.clear()
                for segment in self._segments:
                    _release(segment)
                self._segments.clear()
                self._free.clear()


SHM_ROOT = "/dev/shm"  # where POSIX shared memory lives on Linux (a tmpfs, 64 MiB in a default Docker container)


def allocate_segment(nbytes: int, in_use: int) -> SharedMemory:
    """A new segment of `nbytes` with its memory reserved: a segment is created sparse, and a write past a full
    tmpfs would kill the process (SIGBUS) instead of raising; `posix_fallocate` fails first, with ENOSPC."""
    segment = SharedMemory(create=True, size=max(nbytes, 1))
    path = os.path.join(SHM_ROOT, segment.name.lstrip("/"))
    if not hasattr(os, "posix_fallocate") or not os.path.exists(path):
        return segment
    try:
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, segment.size)
        finally:
            os.close(fd)
    except OSError as error:
        _release(segment)
        if error.errno != errno.ENOSPC:
            raise
        stat = os.statvfs(SHM_ROOT)
        raise H2TError(f"extract.writers_in=processes: a batch needs {nbytes / 2**20:,.0f} MiB of shared memory, "
                       f"{SHM_ROOT} has {stat.f_bavail * stat.f_frsize / 2**20:,.0f} MiB free ({in_use} batches in "
                       f"flight): use fewer extract.writers, a smaller extract.batch_size, extract.writers_in=threads, "
                       f"or a larger {SHM_ROOT} (docker run --shm-size)") from None
    return segment


def place(blocks: list) -> tuple[list[list[Placed]], int]:
    """Where each block's arrays go in one segment (back to back, each at its dtype's alignment: blocks
    that lie back to back in the host buffer stay so), and the segment's size."""
    layout, offset = [], 0
    for block in blocks:
        placed = []
        for array in _arrays(block):
            offset = -(-offset // array.dtype.alignment) * array.dtype.alignment
            placed.append((offset, tuple(array.shape), array.dtype.str))
            offset += array.nbytes
        layout.append(placed)
    return layout, offset


def pack(blocks: list, layout: list[list[Placed]], buffer) -> None:
    """Copy the blocks into the segment: one `memmove` per run of blocks adjacent both in the host buffer and
    in the segment (a batch cast into one buffer per dtype is one or two runs). Each copy releases the GIL
    once; a copy per tap waited for it 51 times a shard beside a busy main thread."""
    base = np.frombuffer(buffer, np.uint8).ctypes.data
    runs: list[list[int]] = []  # [segment offset, source address, bytes]
    sources = []  # contiguous sources, alive until copied
    for block, placed in zip(blocks, layout):
        for array, (offset, _, _) in zip(_arrays(block), placed):
            if not array.nbytes:
                continue  # nothing to copy (and an empty array's address is not its neighbours')
            source = np.ascontiguousarray(array)
            sources.append(source)
            address, nbytes = source.ctypes.data, source.nbytes
            last = runs[-1] if runs else None
            if last is not None and last[0] + last[2] == offset and last[1] + last[2] == address:
                last[2] += nbytes
            else:
                runs.append([offset, address, nbytes])
    for offset, address, nbytes in runs:
        ctypes.memmove(base + offset, address, nbytes)


def _arrays(block) -> list[np.ndarray]:
    return [block.codes, block.params] if isinstance(block, QuantizedBlock) else [block]


def unpack(layout: list[list[Placed]], buffer) -> list:
    """The blocks `pack` wrote, as views of the segment."""
    views = [[_view(buffer, where) for where in placed] for placed in layout]
    return [QuantizedBlock(*arrays) if len(arrays) == 2 else arrays[0] for arrays in views]


def _view(buffer, where: Placed) -> np.ndarray:
    offset, shape, dtype = where
    return np.ndarray(shape, np.dtype(dtype), buffer=buffer, offset=offset)


def _release(segment: SharedMemory) -> None:
    try:
        segment.close()
    finally:
        try:
            segment.unlink()
        except FileNotFoundError:
            pass


# --- in each worker process --------------------------------------------------------------------------------
_STORES: dict[str, FeatureStore] = {}  # by path: opened at a worker's first write to it
_ATTACHED: dict[str, SharedMemory] = {}


def _start_worker(parent: int) -> None:
    """A worker's start: Ctrl-C reaches the whole process group, and a write it cut would leave a temp file;
    the main process (`parent`) stops the workers itself (`close`), and a worker ends when it is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exit_with_parent(parent)


def _ready() -> None:
    """Nothing: a call that makes the pool start a worker."""


def _store(path: str, options: dict | None) -> FeatureStore:
    """The worker's open store (errors reach the main process as the write's own), with the process-wide
    settings an h2t command makes (pipeline/runtime.py, storage's I/O setup) made once."""
    store = _STORES.get(path)
    if store is None:
        from .runtime import keep_freed_memory  # noqa: PLC0415 - in the worker only
        from .storage import configure_io  # noqa: PLC0415
        from .storage.store import open_store  # noqa: PLC0415
        if not _STORES:
            keep_freed_memory()
            configure_io()
        opened = open_store(path, options=options)
        if opened is None:
            raise H2TError(f"store {path} is gone")
        store = _STORES[path] = opened
    return store


def _write(where: tuple[str, dict | None], name: str, retired: tuple[str, ...], split: str, start: int,
           layout: list[list[Placed]], dtypes: dict | None) -> tuple[bool, float, float]:
    """Write one shard from its segment; returns (stale, CPU seconds, wall seconds)."""
    cpu, wall = time.thread_time(), time.perf_counter()
    for old in retired:  # segments the main process replaced: their memory is freed once no one maps them
        if old in _ATTACHED:
            _ATTACHED.pop(old).close()
    segment = _ATTACHED.get(name)
    if segment is None:
        segment = _ATTACHED[name] = SharedMemory(name=name)
    store = _store(*where)
    stale = False
    try:
        store.write_rows(split, start, unpack(layout, segment.buf), dtypes)
    except StaleShard:
        stale = True  # not marked done: claimed and computed again, with the new dtypes
    return stale, time.thread_time() - cpu, time.perf_counter() - wall
