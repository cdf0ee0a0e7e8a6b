"""Reading blob files from the event loop without waiting for the disk.

A hot layer is served from the page cache, and there a worker-thread hop costs about as much
as copying a megabyte.  So a read first asks the kernel for bytes it already holds
(:func:`read_if_cached`, ``RWF_NOWAIT``) and goes to a thread only when they are on disk; and
a server that can send file ranges itself (``sendfile(2)``) gets a :class:`FileRange` only for
bytes the page cache holds (:func:`pages_cached`, ``cachestat(2)``), because ``sendfile`` would
otherwise wait for the disk inside the event loop.

Whenever the kernel cannot tell (an old kernel, a seccomp filter, a file system without
``RWF_NOWAIT``), the answer is "not cached": the caller then reads in a thread, which is
always correct, just slower.  Nothing here knows about downloads.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import platform
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from .._errors import RegistryError

log = logging.getLogger("streamsync_trio.streaming")


def cache_read_failed(path: Path, offset: int, why: object) -> RegistryError:
    """Log a failed read of a cached file, naming the file for the operator, and return the
    error for the client, which names none."""
    log.error("cache read failed at byte %d of %s: %s", offset, path, why)
    return RegistryError(500, "UNKNOWN", "cache read failed")


class FileRange:
    """``count`` bytes of an open file from ``offset``: a body chunk to send as is.

    A server that supports it hands these bytes from the page cache to the socket with
    ``sendfile(2)``, where a ``bytes`` chunk costs this process three copies per byte (page
    cache to buffer, buffer to ``bytes``, ``bytes`` to the socket).  ``len()`` is the byte
    count, which is all h11 needs to frame it.

    The range owns its descriptor (a ``dup`` of the subscriber's): it travels into the
    server's code, and a subscriber closed meanwhile (client gone, shutdown) must not leave
    the server holding a number that the next ``open`` may give to another file.
    """

    __slots__ = ("count", "fd", "offset", "path")

    def __init__(self, fd: int, offset: int, count: int, path: Path) -> None:
        self.fd = fd
        self.offset = offset
        self.count = count
        self.path = path  # for error messages

    def __len__(self) -> int:
        return self.count

    def fileno(self) -> int:
        return self.fd

    def cached(self, offset: int, count: int) -> bool:
        """Whether the page cache holds ``[offset, offset + count)`` of the file right now."""
        return pages_cached(self.fd, offset, count)

    def close(self) -> None:
        """Idempotent."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")
    ]


# cachestat(2), Linux 6.5+.  451 in the syscall table that every architecture has shared since
# 5.x; only the two checked here are enabled, an unknown number is not worth guessing.
_SYS_CACHESTAT = (
    451 if sys.platform == "linux" and platform.machine() in ("x86_64", "aarch64") else None
)
_libc_syscall: Callable[..., int] | None = None


def pages_cached(fd: int, offset: int, count: int) -> bool:
    """Whether every page of ``[offset, offset + count)`` is in the page cache.

    False whenever the kernel cannot say (no cachestat, a seccomp filter refusing it): the
    caller then reads, which is always correct, just slower.
    """
    global _SYS_CACHESTAT, _libc_syscall
    if _SYS_CACHESTAT is None:
        return False
    if _libc_syscall is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        _libc_syscall = libc.syscall
    span = _CachestatRange(offset, count)
    stat = _Cachestat()
    result = _libc_syscall(
        ctypes.c_long(_SYS_CACHESTAT),
        ctypes.c_uint(fd),
        ctypes.byref(span),
        ctypes.byref(stat),
        ctypes.c_uint(0),
    )
    if result != 0:
        if ctypes.get_errno() == errno.ENOSYS:
            _SYS_CACHESTAT = None  # never available in this process; stop asking
        # Otherwise (EPERM: a file of another owner, or a seccomp filter) for this call only.
        return False
    pages = (offset + count - 1) // _PAGE - offset // _PAGE + 1
    return int(stat.nr_cache) >= pages


def read_if_cached(fd: int, count: int, offset: int) -> bytes | None:
    """Read without a worker thread when the bytes are in the page cache, else None.

    A thread hop costs about as much as copying a megabyte, and most reads of a hot layer
    are served from memory.  ``RWF_NOWAIT`` makes the kernel refuse (EAGAIN) instead of
    blocking the event loop on a disk read, and that case goes to a worker thread.

    ``os.pread`` has no flags argument, so the kernel copies into a scratch buffer and we copy
    that into the ``bytes`` the response needs.  The scratch buffer is placed so that its
    address has the same remainder modulo the page size as the file offset: the kernel's copy
    out of the page cache (``rep movsb``) runs three to four times slower when source and
    destination are a few bytes apart modulo 4096, which is exactly where a fresh
    ``bytearray`` from malloc lands (measured here: 0.50 s/GB at 16 bytes apart, 0.15 s/GB
    when aligned).  Reusing one buffer per thread also saves an allocation and a page fault
    per chunk.
    """
    if _RWF_NOWAIT is None:
        return None
    window = _scratch_window(count, offset)
    try:
        got = os.preadv(fd, [window], offset, _RWF_NOWAIT)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            return None  # a file system without RWF_NOWAIT support
        raise
    if got <= 0:
        return None  # nothing cached yet; the worker thread will wait for the disk
    return bytes(window[:got])


_PAGE = mmap.PAGESIZE
_scratch = threading.local()


def _scratch_window(count: int, offset: int) -> memoryview:
    """``count`` writable bytes whose address is congruent to ``offset`` modulo the page size.

    Anonymous mmap memory is page aligned, so a slice starting at ``offset % page`` has the
    file offset's alignment.  The buffer only grows; it is per thread because every event
    loop reads synchronously into it and copies out before the next checkpoint.
    """
    buffer: mmap.mmap | None = getattr(_scratch, "buffer", None)
    needed = count + _PAGE
    if buffer is None or len(buffer) < needed:
        # The old buffer is not closed: a view of it may still be alive in a traceback, and
        # it is unmapped anyway once the last reference goes.
        buffer = mmap.mmap(-1, max(needed, 1024 * 1024 + _PAGE))
        _scratch.buffer = buffer
    start = offset % _PAGE
    return memoryview(buffer)[start : start + count]


_RWF_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)
