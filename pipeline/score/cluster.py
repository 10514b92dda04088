"""Scoring on a Dask cluster: every pass runs where the data is read.

`score.cluster=local:N` starts a `distributed.LocalCluster` of N worker processes; `tcp://HOST:PORT` joins an
existing scheduler (`dask scheduler` + `dask worker` on any machines that can reach the store's root). Each
pass (the column means, the loss and gradient, the power iteration, the working set's column gathers) is one
task per row block of whole shards: the worker opens the store from its root (local path, file://, s3://),
reads and normalises its blocks with the same `BlockReader` as the in-process path, and returns only partial
sums (D x K) or the requested columns. The driver holds the D x K weights and gradient, the
labels and the working set's n x |ws| columns, never an n x D block. A block is pinned to one worker, which
keeps its row norms, so the column gathers read only the chunks holding those columns. A pass is one task
per worker over its blocks (the next read while the current one is multiplied), whose partial sums are added
up on the worker and then pairwise between workers: the driver receives one D x K array per pass, whatever n
and the number of workers. The clients belong to a `ScoreRuntime`, which the command (or one `score_path`)
holds and closes: nothing here outlives it on the driver.
"""
from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np

from ..errors import H2TError
from ..rows import Rows, Segment
from ..storage import configure_io
from ..storage.store import open_store
from .matrix import BlockReader, Closing, add_partials, as_sums, block_rows_for

NO_CLUSTER = (None, "", "null", "none")  # the threaded in-process path


def check_spec(spec) -> None:
    """The form of `score.cluster`, checked without connecting."""
    if spec in NO_CLUSTER:
        return
    text = str(spec)
    if text.startswith("local:"):
        n = text.split(":", 1)[1]
        if n.isdigit() and int(n) >= 1:
            return
        raise H2TError(f"score.cluster=local:N needs N >= 1 worker processes, got {text!r}")
    if not text.startswith(("tcp://", "tls://", "ws://")):
        raise H2TError(f"score.cluster must be null, local:N or tcp://HOST:PORT, got {text!r}")


class ScoreRuntime:
    """The Dask clients that scoring uses, and the LocalClusters it started for them: opened on first need,
    one per `score.cluster` spec (a tune's many solves share it), all closed by `close()` or on leaving
    `with ScoreRuntime() as runtime:`. A command that scores more than once holds one for its whole run and
    passes it to every `score_path(..., runtime=runtime)`."""

    def __init__(self) -> None:
        self._opened: dict[str, tuple[Any, Any]] = {}  # spec -> (client, the LocalCluster it runs on or None)
        self._closed = False

    def client(self, spec):
        """The distributed Client for `score.cluster` (None: the threaded in-process path)."""
        if spec in NO_CLUSTER:
            return None
        if self._closed:
            raise H2TError("the scoring runtime is closed: its Dask clients are gone")
        spec = str(spec)
        if spec not in self._opened:
            check_spec(spec)
            self._opened[spec] = _start_local(spec) if spec.startswith("local:") else (_connect(spec), None)
        return self._opened[spec][0]

    @property
    def specs(self) -> list[str]:
        """The specs whose clients are open."""
        return list(self._opened)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Disconnect every client (and stop each LocalCluster) before the scheduler goes away; every one is
        closed even if another fails."""
        opened, self._opened, self._closed = self._opened, {}, True
        with ExitStack() as stack:  # runs every callback, the last pushed first
            for client, cluster in opened.values():
                if cluster is not None:
                    stack.callback(cluster.close)
                stack.callback(client.close)

    def __enter__(self) -> ScoreRuntime:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _start_local(spec: str):
    """`local:N`: a LocalCluster of N worker processes and a client of it."""
    try:
        from distributed import Client, LocalCluster  # noqa: PLC0415 - optional (h2t[cluster]): only `score.cluster` needs it
    except ImportError:
        raise H2TError(f"score.cluster={spec} needs Dask's distributed: pip install 'h2t[cluster]'") from None

    n = int(spec.split(":", 1)[1])
    threads = max(1, (os.cpu_count() or 1) // n)
    cluster = LocalCluster(n_workers=n, threads_per_worker=threads, processes=True, dashboard_address=":0",
                           silence_logs=logging.ERROR)
    try:
        return Client(cluster), cluster
    except BaseException:
        cluster.close()
        raise


def _connect(spec: str):
    """A client of the scheduler at `spec`, which must have workers."""
    try:
        from distributed import Client  # noqa: PLC0415 - optional (h2t[cluster]): only `score.cluster` needs it
    except ImportError:
        raise H2TError(f"score.cluster={spec} needs Dask's distributed: pip install 'h2t[cluster]'") from None

    _reachable(spec)
    try:
        client = Client(spec, timeout=30)
    except OSError as exc:
        raise H2TError(f"score.cluster={spec}: no Dask scheduler answers there ({exc})") from None
    if not client.scheduler_info().get("workers"):
        client.close()
        raise H2TError(f"score.cluster={spec}: the scheduler has no workers (start `dask worker {spec}`)")
    return client


def _reachable(address: str) -> None:
    """A refused or silent address fails in seconds, not after the client's connection timeout."""
    host, _, port = address.split("://", 1)[1].rpartition(":")
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=5).close()
    except (OSError, ValueError) as exc:
        raise H2TError(f"score.cluster={address}: no Dask scheduler answers there ({exc})") from None


@dataclass(frozen=True)
class StoreRef:
    """How a worker opens the store: its path and storage options (credentials travel with the task)."""
    path: str
    options: dict | None
    splits: tuple[str, ...]


# --- worker side ---------------------------------------------------------------------------------------------
# These live in each Dask worker process, not on the driver: a matrix's later passes and column gathers run
# on the worker its blocks are pinned to and reuse what its first pass left there (the opened store, each
# block's row norms), which the driver could only hand over by shipping n x layers norms with every task.
# Both are keyed by the matrix's token and released by `_forget`, which the matrix's close() runs on every
# worker.
_READERS: dict[str, BlockReader] = {}  # token -> the store opened for that matrix
_NORMS: dict[tuple[str, int], np.ndarray] = {}  # (token, block) -> the block's row norms per layer


def _reader(ref: StoreRef, token: str) -> BlockReader:
    reader = _READERS.get(token)
    if reader is None:
        configure_io()  # this worker process's zarr I/O, as the command set its own (idempotent)
        store = open_store(ref.path, options=ref.options)
        if store is None:
            raise H2TError(f"worker: no store at {ref.path}")
        reader = _READERS[token] = BlockReader(store, ref.splits)
    return reader


def _read_block(ref: StoreRef, token: str, block: int, segment: Segment) -> np.ndarray:
    reader = _reader(ref, token)
    rows = segment.dst.stop - segment.dst.start
    out = np.empty((rows, reader.D), np.float32)
    norms = np.empty((rows, len(reader.layers)), np.float32)
    reader.fill(out, segment, norms, known=False)
    _NORMS[(token, block)] = norms
    return out


def _reduce_task(ref: StoreRef, token: str, items: list[tuple[int, Segment]], fn, *args):
    """This worker's share of a pass: its blocks in order, the next one read while fn runs on the current
    one, the partial sums added up here (one D x K result per worker and pass goes back to the driver)."""
    total = None
    with ThreadPoolExecutor(1, thread_name_prefix="h2t-prefetch") as prefetch:
        pending = prefetch.submit(_read_block, ref, token, *items[0])
        for k, (_i, segment) in enumerate(items):
            block = pending.result()
            if k + 1 < len(items):
                pending = prefetch.submit(_read_block, ref, token, *items[k + 1])
            total = add_partials(total, fn(block, segment.dst, *args))
            del block
    return total


def _columns_task(ref: StoreRef, token: str, items: list[tuple[int, Segment]], idx: np.ndarray) -> list[np.ndarray]:
    """Columns idx of this worker's blocks; only their chunks are read where the block's norms are known."""
    out = []
    for block, segment in items:
        norms = _NORMS.get((token, block))
        if norms is None:  # the block was assigned elsewhere before (a worker left): read it whole once
            out.append(np.ascontiguousarray(_read_block(ref, token, block, segment)[:, idx]))
            continue
        part = np.empty((segment.dst.stop - segment.dst.start, len(idx)), np.float32)
        _reader(ref, token).columns(part, segment, idx, norms)
        out.append(part)
    return out


def _column_sums(X: np.ndarray, _rows) -> np.ndarray:
    return X.sum(axis=0, dtype=np.float64)


def _forget(token: str) -> int:
    """Release this worker's caches of the matrix `token`; returns how many entries were held."""
    keys = [k for k in _NORMS if k[0] == token]
    for key in keys:
        del _NORMS[key]
    return len(keys) + (_READERS.pop(token, None) is not None)


# --- driver side -------------------------------------------------------------------------------------------
def _add_pair(a, b):
    return add_partials(add_partials(None, a), b)


class ClusterMatrix(Closing):
    """The Matrix protocol (pipeline/score/contracts.py) with every pass on the cluster; close() releases
    the caches its passes left on the workers."""

    in_memory = False

    def __init__(self, store, rows: Rows | str, client, memory_budget_bytes: int, center: bool = True):
        self.rows = Rows.of(store, rows) if isinstance(rows, str) else rows
        self.client = client
        self.layers = store.layers
        self.n = self.rows.size(store)
        self.D = sum(layer["dim"] for layer in self.layers)
        splits = tuple(split for split, _ in self.rows.parts)
        itemsize = max(np.dtype(store.features(s, layer["name"]).dtype).itemsize for s in splits for layer in self.layers)
        self.block_rows = block_rows_for(memory_budget_bytes, self.D, itemsize, store.info.shard_rows, self.n)
        self.ref = StoreRef(str(store.path), store.options, splits)
        self.token = uuid.uuid4().hex
        self.segments = list(self.rows.segments(store, self.block_rows, align=store.info.shard_rows))
        workers = sorted(client.scheduler_info()["workers"])
        self.placement = [workers[i % len(workers)] for i in range(len(self.segments))]
        self.assignment: dict[str, list[tuple[int, Segment]]] = {}  # worker -> its blocks, in row order
        for i, (segment, worker) in enumerate(zip(self.segments, self.placement)):
            self.assignment.setdefault(worker, []).append((i, segment))
        self.passes = 0
        self.centered = center
        self.mean = np.zeros(self.D, np.float32)
        self.offset: np.ndarray | None = None
        try:
            totals = self.reduce(_column_sums)  # also leaves each block's row norms on its worker
        except BaseException:
            self.close()  # the blocks read before the failure
            raise
        if center:
            self.mean = (totals / self.n).astype(np.float32)
            self.offset = self.mean

    def _per_worker(self, task, *args):
        """One task per worker over the blocks placed on it; yields (its blocks, its result) as they finish."""
        from distributed import as_completed  # noqa: PLC0415 - optional (h2t[cluster]): only `score.cluster` needs it

        futures = {self.client.submit(task, self.ref, self.token, items, *args, workers=[worker],
                                      allow_other_workers=True, pure=False): items
                   for worker, items in self.assignment.items()}
        for future, result in as_completed(futures, with_results=True):
            yield futures[future], result
            future.release()

    def reduce(self, fn: Callable[..., Any], *args: Any) -> Any:
        """sum over blocks of fn(block, rows, *args): each worker adds up its own blocks' terms, then the
        workers' sums are added pairwise on the workers (a tree), so the driver receives one D x K result
        per pass however many workers there are (at K = 1000 a partial is 1.6 GB for D = 400 k)."""
        self.passes += 1
        shared = self.client.scatter([fn, *args], broadcast=True, hash=False)
        level = [self.client.submit(_reduce_task, self.ref, self.token, items, *shared, workers=[worker],
                                    allow_other_workers=True, pure=False)
                 for worker, items in self.assignment.items()]
        while len(level) > 1:
            pairs = [level[i:i + 2] for i in range(0, len(level), 2)]
            level = [self.client.submit(_add_pair, *pair, pure=False) if len(pair) == 2 else pair[0]
                     for pair in pairs]
        total = level[0].result()
        level[0].release()
        return as_sums(total)

    def columns(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        out = np.empty((self.n, len(idx)), np.float32)
        for items, parts in self._per_worker(_columns_task, idx):
            for (_block, segment), part in zip(items, parts):
                out[segment.dst] = part
        if self.centered:
            out -= self.mean[idx]
        return out

    def close(self) -> None:
        """Release every worker's caches of this matrix (its opened store, its blocks' row norms)."""
        try:
            self.client.run(_forget, self.token)
        except Exception:  # noqa: BLE001 - workers that left took their caches with them
            pass
