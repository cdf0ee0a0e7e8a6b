"""Process-wide tuning that must happen before the first worker thread starts."""

from __future__ import annotations

import ctypes
import ctypes.util

_M_ARENA_MAX = -8  # glibc's mallopt parameter number


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas (normally up to 8 per core, one per thread that allocates).

    Disk reads and writes run in trio's worker threads, and each thread that allocates a
    megabyte buffer would otherwise get an arena of its own that keeps freed memory.  Measured
    with 8 clients reading a cached 256 MiB blob: peak RSS 106 MiB with the default, 77 MiB
    with 2 arenas, throughput unchanged.  Equivalent to ``MALLOC_ARENA_MAX=2``; a no-op where
    the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(_M_ARENA_MAX, arenas)
    except (OSError, AttributeError):
        return
