"""Process settings a command chooses explicitly at its start (never on import).

`keep_freed_memory`: glibc's malloc returns every block above 32 MiB to the kernel when it is freed and
maps it again, zero-filled, on the next allocation; a CPU forward allocates and frees activations of tens
to hundreds of MiB per layer, so a third of its time went to page faults (EfficientNet-Lite0 @ 160, batch
64, 2 cores: 36 img/s, 8 s of system time in 14 s; 115 img/s with freed memory kept for reuse, the same
peak RSS). PyTorch's CPU tuning guides reach the same end with jemalloc or tcmalloc; this needs neither.

`imports_uncollected`: importing torch, timm, zarr and Hydra makes ~400 k objects that live as long as the
process; the cyclic garbage collector scanned them all again in each of its 8 full collections during those
imports (0.9-1.0 s of every verb's start, `h2t tune` on the embedded default) and in every later one (0.22 s
each, one per T = 8192 extraction of 512 images). Imported with collection paused, they are then moved out of
its reach (`gc.freeze`), as CPython's documentation advises for long-lived start-up objects.

`exit_with_parent`: what a worker process (decoders, shard writers) sets at its start, so that it does not
outlive an extraction that was killed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import threading
import time
from contextlib import contextmanager
from typing import Iterator

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
KEEP_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Serve large blocks from the heap and keep freed memory for reuse (glibc only; elsewhere a no-op).
    True when applied."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))


@contextmanager
def imports_uncollected() -> Iterator[None]:
    """Pause the cyclic garbage collector for the block (a verb's heavy imports), then freeze what exists
    (objects alive now are never scanned again; reference counting still frees them) and resume it."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        freeze_imported()
        if enabled:
            gc.enable()


def freeze_imported() -> None:
    """Move every object alive now out of the collector's reach: what `imports_uncollected` ends with, for
    code that imported at module level (the benchmarks, to measure what the command does)."""
    gc.freeze()


def exit_with_parent(parent: int, poll_s: float = 1.0) -> None:
    """In a worker process: end it when `parent` (the pid of the process that started it, taken there) is gone
    (killed, or ended by a signal that ran no clean-up). A pool's worker would otherwise wait on its queue for
    ever, holding its shared memory; a write it cuts leaves at most a temp file, which the next run replaces.
    A daemon thread polls the parent's pid (an orphan is re-parented), so it works the same for forked and
    spawned workers. The pid comes from the parent because a spawned worker still importing when its parent
    was killed would otherwise take its new parent (init) for the one to watch, and never end."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=watch, name="h2t-parent-watch", daemon=True).start()
