"""Process settings a command chooses explicitly at its start (never on import).

`keep_freed_memory`: glibc's malloc returns every block above 32 MiB to the kernel when it is freed and
maps it again, zero-filled, on the next allocation; a CPU forward allocates and frees activations of tens
to hundreds of MiB per layer, so a third of its time went to page faults (EfficientNet-Lite0 @ 160, batch
64, 2 cores: 36 img/s, 8 s of system time in 14 s; 115 img/s with freed memory kept for reuse, the same
peak RSS). PyTorch's CPU tuning guides reach the same end with jemalloc or tcmalloc; this needs neither.
"""
from __future__ import annotations

import ctypes
import ctypes.util

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
