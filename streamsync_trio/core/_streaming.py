"""Streaming single-flight downloads: one producer per blob, any number of subscribers.

This module is the heart of the proxy and knows nothing of HTTP.  Its contract:

* One :class:`Download` per digest while the blob is in flight, kept in a
  :class:`DownloadRegistry`.  Its producer task runs in a nursery that outlives every request
  (the app's), so the client that triggered a download can leave without stopping it.
* The producer appends upstream bytes to a partial file in >= ``chunk_size`` batches (one worker
  thread hop per batch: write + hash together), advances ``available`` and wakes subscribers.
* Subscribers read the partial file at their own pace from their own offset.  Waking is a
  ``send_nowait`` into a one-slot channel: the producer never blocks on a subscriber, and because
  progress is monotonic a coalesced wake-up loses nothing.
* Nothing is ever delivered as complete before it is verified: every subscriber holds back the
  last byte of its range until the producer has checked length and digest.  A mismatch therefore
  always leaves every response short of its ``Content-Length``.
* Failure (upstream error, retries exhausted, stall, disk error, shutdown) is recorded in the
  download, every subscriber wait is cancelled through its registered cancel scope, the partial
  is removed and the entry leaves the registry, so the next request starts afresh.
* Success fsyncs, renames into the store, and only then drops the registry entry: a request
  either finds the download or the stored blob, never neither.
* Every download is bounded (:class:`SizeBound`): by the size a stored manifest declares for
  the blob, which the upstream's length must match, or else by a maximum size; a length
  above the bound, or a body growing past it, fails the download before the disk fills.  A
  known length must also fit in the cache's free space before the first byte is written.
* A blob of unknown length (no ``Content-Length``, no declared size) is still streamed: the
  subscribers learn that the upstream answered (:meth:`Subscriber.wait_answer`) without a
  size, and hold back the last byte written until the end is verified.
* A stored blob is checked too, once per process: the first time this process serves it (or
  when the file at its path is another file than the one checked), a checker hashes it while
  its subscribers read it, and they hold back the last byte until the digest matches, like
  joiners of a download.  A damaged blob is quarantined, its bodies end short, and the next
  request downloads it afresh.  Blobs already checked, or committed by a download, are served
  with no check at all (see :class:`TrustedBlobs`).

Subscriber waits are wrapped in cancel scopes inside plain ``async def`` methods, never around a
``yield`` (PEP 789): the HTTP body just calls :meth:`Subscriber.read` (or
:meth:`Subscriber.read_or_range`, for a server that sends file ranges itself) and lets the
failure raise.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import mmap
import os
import platform
import random
import sys
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

import trio

from .._errors import RegistryError, upstream_timeout, upstream_unavailable
from .._reference import Digest
from ._lease import Followed, Owned, claim, is_same_file
from ._negative import NegativeCache
from ._scrub import hash_step

if TYPE_CHECKING:
    from ._store import Store

log = logging.getLogger("streamsync_trio.streaming")

_T = TypeVar("_T")

# A batch is flushed when it reaches chunk_size, or when its oldest byte has waited this long:
# a slow upstream must not hold the first byte back for a whole chunk (time to first byte).
FLUSH_INTERVAL = 0.05

# How often a follower looks at another process's download (lock, size, bytes written).
FOLLOW_INTERVAL = 0.02

# Claiming a digest retries when its owner ends mid-claim; this many times, then 503.
_START_ATTEMPTS = 5

# Free space a download of known size must leave on the cache's file system: room for what
# is written besides blobs (manifests, tag records and links, the workers' metrics files,
# the file system's own metadata).  Small, so a small cache disk can still take its blobs.
FREE_SPACE_MARGIN = 32 * 1024 * 1024

# What a client hears when the cache has no room for a blob: come back later (eviction or
# finishing downloads change the picture), no sooner than this.
_NO_ROOM_RETRY_AFTER = "30"

# Checking a stored blob on its first serve: bytes hashed per worker-thread hop (about 13 ms
# of sha256 here, so a shutdown is not held up, and the hop costs under 1 %), and how many
# hops run at once (hashing is CPU work: more threads than cores only share the cores).
CHECK_STEP = 16 * 1024 * 1024
CHECK_THREADS = 2
# How many checked blobs a process remembers (about 400 bytes each: ~6 MiB at most).  A blob
# forgotten is checked again on its next serve, which costs time, never correctness.
TRUSTED_MAX = 16384


@dataclass(frozen=True, slots=True)
class SizeBound:
    """How large a blob may be, decided before its download starts.

    ``declared``: the size the repository's stored manifests give the blob's descriptor.  The
    digest of a manifest was verified, so this is the publisher's word: an upstream that
    announces another length is wrong (502, nothing cached), and an upstream that announces
    none is held to it.  ``maximum``: the bound for a blob no manifest we hold describes
    (``max_blob_size``).  None: unbounded (the core's own tests).
    """

    declared: int | None = None
    maximum: int | None = None

    def refusal(self, announced: int) -> RegistryError | None:
        """Why a blob the upstream announces as ``announced`` bytes is refused; None if not."""
        if self.declared is not None:
            if announced != self.declared:
                return _size_invalid(
                    f"the upstream announces {announced} bytes, "
                    f"its manifest declares {self.declared}"
                )
            return None
        if self.maximum is not None and announced > self.maximum:
            return _too_large(f"the upstream announces {announced} bytes", self.maximum)
        return None


def _too_large(what: str, maximum: int) -> RegistryError:
    return _Refused(
        502,
        "SIZE_INVALID",
        f"upstream blob too large: {what}, above the limit of {maximum} (max_blob_size)",
    )


class _Refused(RegistryError):
    """A download refused on policy (size bound, free space): final, never retried, since
    asking again would get the same answer."""


class BlobBody(Protocol):
    """What a source yields: an upstream body that starts at ``offset`` of the blob."""

    @property
    def total_size(self) -> int | None: ...
    @property
    def offset(self) -> int: ...
    @property
    def chunks(self) -> AsyncIterator[bytes]: ...


# Opens the blob at a byte offset.  The upstream may ignore the offset and start at 0.
BlobSource = Callable[[int], AbstractAsyncContextManager[BlobBody]]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounded resumption of a dropped or stalled upstream body."""

    max_retries: int = 5
    backoff_base: float = 0.5
    backoff_cap: float = 10.0
    # Honour an upstream Retry-After, but never wait longer than this for one attempt.
    retry_after_cap: float = 60.0

    def budget(self, size: int | None, error: RegistryError) -> int:
        """How many retries this failure may use.

        Resuming a transfer that started (we know the blob's size) is worth the whole budget,
        and so is an upstream that asked us to wait.  But an upstream that never answered is
        most likely down: one quick retry for a blip, then the clients hear it promptly
        instead of waiting through every backoff.
        """
        if size is not None or "Retry-After" in error.headers:
            return self.max_retries
        return min(self.max_retries, 1)

    def delay(self, attempt: int, error: RegistryError) -> float:
        retry_after = error.headers.get("Retry-After", "")
        if retry_after.isdigit():
            # Honour the upstream's wait (our own 429s carry the remaining cool-down).
            return min(float(retry_after), self.retry_after_cap)
        # Exponential backoff with full jitter: retries from many proxies never synchronise.
        return random.uniform(0, min(self.backoff_cap, self.backoff_base * 2**attempt))


def _is_transient(error: RegistryError) -> bool:
    """Worth another attempt: the upstream faltered or asked us to wait.  Wrong content is
    not transient: asking again for what the upstream sent wrong would only hammer it."""
    return (
        error.status in (429, 502, 503, 504)
        and error.code not in _CONTENT_ERRORS
        and not isinstance(error, _Refused)
    )


_CONTENT_ERRORS = ("DIGEST_INVALID", "SIZE_INVALID")


def _size_invalid(why: str) -> RegistryError:
    return RegistryError(502, "SIZE_INVALID", f"upstream blob has the wrong size: {why}")


@dataclass
class DownloadStats:
    """Counters over the downloads of one group (the proxy groups by upstream)."""

    started: int = 0
    committed: int = 0
    resumes: int = 0
    upstream_bytes: int = 0  # bytes received from the upstream and written
    failures: dict[str, int] = field(default_factory=dict)  # by reason

    def failed(self, reason: str) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1

    def add(self, other: DownloadStats) -> None:
        self.started += other.started
        self.committed += other.committed
        self.resumes += other.resumes
        self.upstream_bytes += other.upstream_bytes
        for reason, count in other.failures.items():
            self.failures[reason] = self.failures.get(reason, 0) + count


def _failure_reason(error: RegistryError) -> str:
    if isinstance(error, _Refused):
        return "too_large" if error.status == 502 else "no_space"
    if error.code == "DIGEST_INVALID":
        return "digest_mismatch"
    if error.code == "SIZE_INVALID":
        return "size_mismatch"
    return f"upstream_{error.status}"


class Download:
    """The shared state of one in-flight blob.  Mutated only by its producer."""

    def __init__(
        self,
        digest: Digest,
        path: Path,
        origin: Hashable = None,
        group: str = "",
        bound: SizeBound = SizeBound(),
    ) -> None:
        self.digest = digest
        self.bound = bound
        self.group = group  # for statistics: the proxy counts per upstream
        self.started_at = trio.current_time()
        # Whom the source fetches as (for the proxy: upstream and repository).  Joining under
        # the same origin needs no further proof that the blob belongs there.
        self.origin = origin
        self.path = path  # the partial; after commit, the stored blob (open fds survive rename)
        self.size: int | None = None
        self.available = 0  # bytes written to ``path`` and safe to read
        self.verified = False  # length and digest checked, blob committed
        self.failure: RegistryError | None = None
        self.upstream_requests = 0
        self.resumes = 0
        # Set when another process owns the download and this one only tails its partial.
        self.followed = False
        # A follower's fd on the owner's partial: subscribers dup it, because the path can
        # be renamed (commit) or removed (failure) in the other process at any moment.
        self._hold_fd: int | None = None
        # The owner tells other processes the size as soon as it knows it.
        self._on_size: Callable[[int], None] | None = None
        self._size_known = trio.Event()  # set once size is known, or on failure
        # Set once the upstream answered with a body (its size maybe still unknown), or on
        # failure: what a response must wait for before it sends its status.
        self._answered = trio.Event()
        self._finished = trio.Event()  # set on commit or on failure
        self._wakeups: set[trio.MemorySendChannel[None]] = set()
        self._scopes: set[trio.CancelScope] = set()

    @property
    def subscriber_count(self) -> int:
        return len(self._wakeups)

    async def wait_finished(self) -> None:
        await self._finished.wait()

    def _wake_all(self) -> None:
        for channel in self._wakeups:
            try:
                channel.send_nowait(None)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # a pending wake-up already tells it to look at ``available``

    def _set_size(self, size: int) -> None:
        self.size = size
        self._size_known.set()
        self._answered.set()
        if self._on_size is not None:
            self._on_size(size)

    def _open_reader(self) -> int:
        if self._hold_fd is not None:
            return os.dup(self._hold_fd)
        return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)

    def _fail(self, error: RegistryError) -> None:
        if self.failure is not None or self.verified:
            return
        self.failure = error
        for scope in self._scopes:
            scope.cancel()
        self._size_known.set()
        self._answered.set()
        self._finished.set()
        self._wake_all()


class Subscriber:
    """One reader of a download: a client response, from ``start`` to ``end`` (exclusive)."""

    def __init__(
        self,
        download: Download,
        fd: int | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.download = download
        self._on_close = on_close
        self.offset = 0
        self._end: int | None = None
        # Opened synchronously, in the same scheduling step that found the download, so the
        # path cannot be renamed or removed in between.
        self._fd: int | None = download._open_reader() if fd is None else fd
        self._wake_send, self._wake_receive = trio.open_memory_channel[None](1)
        download._wakeups.add(self._wake_send)

    def select_range(self, start: int, end: int) -> None:
        """Serve only ``[start, end)`` of the blob (a Range request); before the first read."""
        self.offset = start
        self._end = end

    async def _guarded(self, wait: Callable[[], Awaitable[_T]]) -> _T:
        """Run one wait under a cancel scope the producer cancels when the download fails."""
        download = self.download
        if download.failure is not None:
            raise download.failure
        scope = trio.CancelScope()
        download._scopes.add(scope)
        try:
            with scope:
                return await wait()
        finally:
            download._scopes.discard(scope)
        # Reached only when the producer cancelled our scope, which it does only on failure.
        raise download.failure or RegistryError(500, "UNKNOWN", "download cancelled")

    async def wait_size(self) -> int:
        """Wait until the blob's size is known (normally: the upstream headers are in)."""
        await self._guarded(self.download._size_known.wait)
        if self.download.failure is not None:
            raise self.download.failure
        assert self.download.size is not None
        return self.download.size

    async def wait_answer(self) -> int | None:
        """Wait until the upstream answered with a body; the blob's size, or None when the
        upstream did not say (the body then ends when the upstream's does)."""
        await self._guarded(self.download._answered.wait)
        if self.download.failure is not None:
            raise self.download.failure
        return self.download.size

    @property
    def end(self) -> int | None:
        """Where this subscriber's bytes end; None while the blob's size is unknown."""
        return self.download.size if self._end is None else self._end

    async def _next_count(self, max_bytes: int) -> int:
        """Wait until bytes at ``offset`` are safe to send; how many, up to ``max_bytes``
        (0 at the end of the range)."""
        download = self.download
        while True:
            if download.failure is not None:
                raise download.failure
            end = self.end  # re-read: a blob of unknown size learns it at its end
            if end is not None and self.offset >= end:
                return 0
            # The last byte of every range waits for verification: a client can never
            # receive a complete body whose content was not checked.  Of unknown size, the
            # last byte written so far is held back: it may be the blob's last.
            if download.verified:
                assert end is not None
                limit = end
            elif end is None:
                limit = download.available - 1
            else:
                limit = min(download.available, end - 1)
            if self.offset < limit:
                return min(max_bytes, limit - self.offset)
            await self._guarded(self._wake_receive.receive)

    async def read(self, max_bytes: int) -> bytes:
        """The next bytes of the range, as soon as they are safe to send; ``b""`` at the end."""
        count = await self._next_count(max_bytes)
        if not count:
            return b""
        download = self.download
        fd = self._fd
        assert fd is not None
        offset = self.offset
        try:
            data = _read_if_cached(fd, count, offset)
            if data is None:
                data = await self._guarded(
                    partial(trio.to_thread.run_sync, os.pread, fd, count, offset)
                )
            else:
                await self._guarded(trio.lowlevel.checkpoint)
        except OSError as exc:
            raise cache_read_failed(download.path, offset, exc) from None
        if download.failure is not None:
            raise download.failure
        if not data:
            raise RegistryError(500, "UNKNOWN", "cache file ended early")
        self.offset += len(data)
        return data

    async def read_or_range(self, max_bytes: int, range_bytes: int) -> bytes | FileRange:
        """Like :meth:`read`, but bytes already in the page cache come as a :class:`FileRange`
        of up to ``range_bytes``, for a server that can send them without reading them.

        Only cached bytes: ``sendfile(2)`` would otherwise wait for the disk inside the event
        loop, which is what :func:`_read_if_cached` avoids for reads.  Anything else (bytes
        on disk only, a kernel that cannot tell) is read as by :meth:`read`."""
        count = await self._next_count(range_bytes)
        fd = self._fd
        if count and fd is not None and _pages_cached(fd, self.offset, count):
            await self._guarded(trio.lowlevel.checkpoint)
            if self.download.failure is not None:
                raise self.download.failure
            file_range = FileRange(os.dup(fd), self.offset, count, self.download.path)
            self.offset += count
            return file_range
        return await self.read(max_bytes)

    def close(self) -> None:
        """Leave the download.  Idempotent; never touches the producer."""
        self.download._wakeups.discard(self._wake_send)
        self._wake_send.close()
        self._wake_receive.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            if self._on_close is not None:
                self._on_close()

    def __del__(self) -> None:
        # Last line of defence: a response dropped before its body was ever iterated
        # (client gone between handler and send) must not leak the file descriptor.
        if self._fd is not None:
            self.close()


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
        return _pages_cached(self.fd, offset, count)

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


def _pages_cached(fd: int, offset: int, count: int) -> bool:
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


def _read_if_cached(fd: int, count: int, offset: int) -> bytes | None:
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


def read_stored(
    digest: Digest, fd: int, path: Path, on_close: Callable[[], None] | None = None
) -> Subscriber:
    """A subscriber over a blob already in the store (open at ``fd``): nothing in flight."""
    return Subscriber(_verified(digest, path, os.fstat(fd).st_size), fd, on_close)


def _verified(digest: Digest, path: Path, size: int) -> Download:
    """The state of a blob whose ``size`` bytes are all there and checked."""
    download = Download(digest, path)
    download.available = size
    download.verified = True
    download._set_size(size)
    download._finished.set()
    return download


class TrustedBlobs:
    """The stored blobs this process has checked (or committed), by the identity of the file
    checked: (device, inode, size).  Bounded; the least recently served are forgotten first.

    Not the modification time, although a change in it would be the usual sign: here it is
    the LRU clock, which every serve (of any worker process) moves.  Nothing in the proxy
    writes a stored file in place; a blob that comes again is a new file (a new inode), and
    that is what the identity catches.  A bit that rots in a file already checked is what
    ``cache verify`` is for.
    """

    def __init__(self, limit: int = TRUSTED_MAX) -> None:
        self._limit = limit
        self._entries: OrderedDict[Digest, tuple[int, int, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def trusts(self, digest: Digest, identity: tuple[int, int, int]) -> bool:
        if self._entries.get(digest) != identity:
            return False
        self._entries.move_to_end(digest)
        return True

    def add(self, digest: Digest, identity: tuple[int, int, int]) -> None:
        self._entries[digest] = identity
        self._entries.move_to_end(digest)
        while len(self._entries) > self._limit:
            self._entries.popitem(last=False)


def _identity(stat: os.stat_result) -> tuple[int, int, int]:
    return (stat.st_dev, stat.st_ino, stat.st_size)


class DownloadRegistry:
    """Who is downloading which digest, and the producers that do it.

    This is the second seam of design.md §8: a multi-replica version answers "who owns this
    digest, and how do I follow it" with a shared lease instead of this dict.
    """

    def __init__(
        self,
        store: Store,
        nursery: trio.Nursery,
        *,
        chunk_size: int = 1024 * 1024,
        on_commit: Callable[[Download], None] | None = None,
        disk_free: Callable[[], int] | None = None,
        check_stored: bool = True,
    ) -> None:
        self._store = store
        # Stored blobs checked in this process, and the checks running (see open_stored).
        self._checking_stored = check_stored
        self.trusted = TrustedBlobs()
        self._checks: dict[Digest, tuple[tuple[int, int, int], Download]] = {}
        self._check_limiter = trio.CapacityLimiter(CHECK_THREADS)
        self.stored_checks = {"verified": 0, "damaged": 0}
        # Bytes free for us on the cache's file system (a parameter so tests can fill it).
        self._disk_free = disk_free or partial(_disk_free, store.root)
        # Upstream 404s by (origin, digest): a storm of requests for a missing blob costs one
        # upstream request per ``_negative.TTL``.
        self.not_found: NegativeCache[tuple[Hashable, Digest]] = NegativeCache()
        self._on_commit = on_commit
        self._nursery = nursery
        self._chunk_size = chunk_size
        self._downloads: dict[Digest, Download] = {}
        self.stats: dict[str, DownloadStats] = {}  # by group

    def __len__(self) -> int:
        return len(self._downloads)

    def get(self, digest: Digest) -> Download | None:
        return self._downloads.get(digest)

    def in_flight(self) -> list[Download]:
        return list(self._downloads.values())

    def totals(self) -> DownloadStats:
        total = DownloadStats()
        for stats in self.stats.values():
            total.add(stats)
        return total

    def _stats(self, download: Download) -> DownloadStats:
        return self.stats.setdefault(download.group, DownloadStats())

    def subscribe(
        self,
        digest: Digest,
        source: BlobSource,
        *,
        stall_timeout: float,
        retry: RetryPolicy,
        origin: Hashable = None,
        group: str = "",
        bound: SizeBound = SizeBound(),
    ) -> Subscriber:
        """Join the download of ``digest``, starting one (with ``source``) if none is running.

        Synchronous on purpose: looking up, creating and joining happen in one scheduling
        step, so two requests can never both start a producer for one digest.  ``bound``
        applies to a download this call starts.  Raises the upstream's 404 without asking
        it again when it answered so for ``origin`` moments ago.
        """
        download = self._downloads.get(digest)
        if download is not None:
            return self._join(download)
        self.not_found.check((origin, digest))
        try:
            return self._start(digest, source, stall_timeout, retry, origin, group, bound)
        except OSError as exc:
            log.error("cannot start the download of %s: %s", digest, exc)
            raise RegistryError(500, "UNKNOWN", "cache write failed") from None

    def _start(
        self,
        digest: Digest,
        source: BlobSource,
        stall_timeout: float,
        retry: RetryPolicy,
        origin: Hashable,
        group: str,
        bound: SizeBound,
    ) -> Subscriber:
        """Own the download, or follow the process that owns it (see ``_lease``)."""
        store = self._store
        for _ in range(_START_ATTEMPTS):
            try:
                lease = claim(store.lease_dir, store.partial_dir, digest)
            except RuntimeError as exc:
                raise RegistryError(
                    503, "UNAVAILABLE", str(exc), headers={"Retry-After": "1"}
                ) from None
            subscriber: Subscriber | None
            if isinstance(lease, Owned):
                subscriber = self._own(
                    digest, lease, source, stall_timeout, retry, origin, group, bound
                )
            else:
                subscriber = self._follow_owner(digest, lease, origin, group)
            if subscriber is not None:
                return subscriber
        raise RegistryError(
            503, "UNAVAILABLE", "the download kept changing hands", headers={"Retry-After": "1"}
        )

    def _own(
        self,
        digest: Digest,
        lease: Owned,
        source: BlobSource,
        stall_timeout: float,
        retry: RetryPolicy,
        origin: Hashable,
        group: str,
        bound: SizeBound,
    ) -> Subscriber:
        """Start the download we just claimed; on any error, let go of the claim at once
        (a leaked lease would block this digest in every worker)."""
        try:
            # The caller found nothing stored, but another process may have committed
            # since; its lease is gone then, and we must not fetch the blob again.
            stored = self.open_stored(digest, just_committed=True)
            if stored is not None:
                lease.abandon()
                return stored
            fd = os.open(lease.partial, os.O_WRONLY | os.O_CLOEXEC)
        except BaseException:
            lease.abandon()
            raise
        try:
            download = Download(digest, lease.partial, origin, group, bound)
            download._on_size = partial(_publish_size, lease, digest)
            self._nursery.start_soon(
                self._produce, download, fd, lease, source, stall_timeout, retry
            )
        except BaseException:
            os.close(fd)
            lease.abandon()
            raise
        # Registered only once its producer exists: an entry without one would hang joiners.
        self._downloads[digest] = download
        self._stats(download).started += 1
        log.info("download %s started", digest, extra=_event("download_start", download))
        return self._join(download)

    def _follow_owner(
        self, digest: Digest, lease: Followed, origin: Hashable, group: str
    ) -> Subscriber | None:
        """Follow another process's download; None if it ended before we could open it."""
        try:
            hold = os.open(lease.partial, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            # The owner ended between the two steps: committed, or failed.
            lease.close()
            return self.open_stored(digest, just_committed=True)
        except BaseException:
            lease.close()
            raise
        try:
            download = Download(digest, lease.partial, origin, group)
            download.followed = True
            download._hold_fd = hold
            self._nursery.start_soon(self._follow, download, lease, hold)
        except BaseException:
            os.close(hold)
            lease.close()
            raise
        self._downloads[digest] = download
        log.info(
            "download %s is owned by another process; following it",
            digest,
            extra=_event("download_follow", download),
        )
        return self._join(download)

    def _join(self, download: Download) -> Subscriber:
        """A subscriber that counts as a reader of the digest until it closes: after the
        commit it goes on reading the stored blob, which eviction must leave alone."""
        subscriber = Subscriber(download, on_close=partial(self._store.release, download.digest))
        self._store.hold(download.digest)
        return subscriber

    def open_stored(self, digest: Digest, *, just_committed: bool = False) -> Subscriber | None:
        """A subscriber over the stored blob (marked as being read until it closes), or None
        when it is not stored.  Raises ``OSError`` when it is stored but cannot be opened.

        A blob this process has not checked yet is served while a checker hashes it, with
        its last byte held back until the digest matches (see :meth:`_check_stored`).
        ``just_committed``: the caller found no blob a moment ago (no checkpoint since) and
        then no download either, so the file was renamed into place in between by the
        process that verified it: trusted as if committed here."""
        fd = self._store.open_blob(digest)
        if fd is None:
            return None
        on_close = partial(self._store.release, digest)
        path = self._store.blob_path(digest)
        try:
            identity = _identity(os.fstat(fd))
            if just_committed:
                self.trusted.add(digest, identity)
            if not self._checking_stored or self.trusted.trusts(digest, identity):
                return read_stored(digest, fd, path, on_close)
            download = self._checked(digest, fd, path, identity)
        except BaseException:
            os.close(fd)
            on_close()
            raise
        if download is None:
            os.close(fd)
            on_close()
            return None  # it was damaged: quarantined, and the caller downloads it
        return Subscriber(download, fd, on_close)

    def _checked(
        self, digest: Digest, fd: int, path: Path, identity: tuple[int, int, int]
    ) -> Download | None:
        """The check of this stored file: the one running, or a new one; None when the blob
        is found damaged at once (an empty file: nothing to hold back, so it is judged
        before any header goes out)."""
        running = self._checks.get(digest)
        if running is not None and running[0] == identity:
            return running[1]
        size = identity[2]
        if size == 0:
            if hashlib.new(digest.algorithm).hexdigest() == digest.hex:
                self.trusted.add(digest, identity)
                return _verified(digest, path, 0)
            self._damaged(digest, path, identity, "is empty")
            return None
        download = Download(digest, path)
        download.available = size
        download._set_size(size)
        checker_fd = os.dup(fd)
        try:
            self._nursery.start_soon(self._check_stored, download, checker_fd, identity)
        except BaseException:
            os.close(checker_fd)
            raise
        self._store.hold(digest)  # until the check ends, whoever leaves meanwhile
        self._checks[digest] = (identity, download)
        return download

    async def _check_stored(
        self, download: Download, fd: int, identity: tuple[int, int, int]
    ) -> None:
        """Hash a stored blob while it is being served; never raises.

        Its subscribers read the file as it is (every byte is there) but hold back the last
        one, so a damaged blob is never served complete.  The checker reads the same pages
        they do, so the disk is read once; what it adds is the hashing, in a worker thread.
        """
        digest = download.digest
        problem = "does not match its digest"
        try:
            hasher = hashlib.new(digest.algorithm)
            offset, size = 0, identity[2]
            while offset < size:
                got = await trio.to_thread.run_sync(
                    hash_step, fd, hasher, offset, CHECK_STEP, limiter=self._check_limiter
                )
                if not got:
                    break
                offset += got
            if offset == size and hasher.hexdigest() == digest.hex:
                self.trusted.add(digest, identity)
                self.stored_checks["verified"] += 1
                download.verified = True
                download._finished.set()
                download._wake_all()
                return
        except OSError as exc:
            problem = f"cannot be read ({exc.strerror})"
        except trio.Cancelled:
            download._fail(RegistryError(503, "UNAVAILABLE", "the proxy is shutting down"))
            raise
        except Exception as exc:
            log.exception("checking stored blob %s: unexpected error", digest)
            download._fail(RegistryError(500, "UNKNOWN", f"internal error: {type(exc).__name__}"))
            return
        finally:
            os.close(fd)
            if self._checks.get(digest, (None, None))[1] is download:
                del self._checks[digest]
            self._store.release(digest)
        # One step, no checkpoint: the file leaves the store before the bodies end, so a
        # client retrying at once already misses it and downloads the blob afresh.
        self._damaged(digest, download.path, identity, problem)
        download._fail(RegistryError(500, "UNKNOWN", "the cached blob is damaged; retry"))

    def _damaged(
        self, digest: Digest, path: Path, identity: tuple[int, int, int], problem: str
    ) -> None:
        self.stored_checks["damaged"] += 1
        try:
            moved = self._store.quarantine("blobs", path, identity[:2])
        except OSError as exc:
            log.error("stored blob %s %s, and cannot be quarantined: %s", path, problem, exc)
            return
        log.error(
            "stored blob %s %s; moved to %s, the next request downloads it afresh",
            path,
            problem,
            moved,
        )

    # -- a follower ------------------------------------------------------------------------

    async def _follow(self, download: Download, lease: Followed, hold: int) -> None:
        """Tail another process's partial until its owner lets go; never raises.

        Polling, because neither a lock release nor a file growing in another process can be
        awaited in trio; every ``FOLLOW_INTERVAL`` costs three system calls.  The owner ended
        well only if the stored blob is the very file we have been reading: then every byte
        we served was verified by the owner, and the held-back last bytes may go.
        """
        try:
            while True:
                ended = lease.owner_ended()  # first: whatever it wrote before is seen below
                if download.size is None:
                    size = lease.size()
                    if size is not None:
                        download._set_size(size)
                written = os.fstat(hold).st_size
                if written > download.available:
                    # Bytes in the partial: the owner's upstream answered, even if with no
                    # length (then the size comes only at the end).
                    download._answered.set()
                    download.available = written
                    download._wake_all()
                if ended:
                    break
                await trio.sleep(FOLLOW_INTERVAL)
            stored = self._store.blob_path(download.digest)
            if not is_same_file(hold, stored):
                raise RegistryError(
                    502,
                    "UNAVAILABLE",
                    "the upstream download failed in another worker process; retry",
                )
            size = os.fstat(hold).st_size
            if download.size is None:
                download._set_size(size)
            download.available = size
            download.path = stored
            self._store.note_committed(size)
            self._finish(download, "committed by its owner process")
        except RegistryError as error:
            log.warning(
                "download %s failed: %s",
                download.digest,
                error.message,
                extra=_event("download_fail", download, reason="owner_failed"),
            )
            download._fail(error)
        except OSError as exc:
            log.error("download %s: cannot follow %s: %s", download.digest, download.path, exc)
            download._fail(RegistryError(500, "UNKNOWN", "cache read failed"))
        except trio.Cancelled:
            download._fail(RegistryError(503, "UNAVAILABLE", "the proxy is shutting down"))
            raise
        except Exception as exc:
            log.exception("download %s: unexpected error while following", download.digest)
            download._fail(RegistryError(500, "UNKNOWN", f"internal error: {type(exc).__name__}"))
        finally:
            download._hold_fd = None
            os.close(hold)
            lease.close()
            self._drop(download)

    # -- the producer ------------------------------------------------------------------------

    async def _produce(
        self,
        download: Download,
        fd: int,
        lease: Owned,
        source: BlobSource,
        stall_timeout: float,
        retry: RetryPolicy,
    ) -> None:
        """Supervise one download.  Never lets an exception escape into the app nursery."""
        committed = False
        try:
            await self._fetch(download, fd, source, stall_timeout, retry)
            await trio.to_thread.run_sync(os.fsync, fd)
            # The rename, the path switch and the registry removal happen in one step: a
            # request sees either this download or the stored blob.
            download.path = self._store.commit_blob(download.path, download.digest)
            committed = True
            self._stats(download).committed += 1
            self._finish(download, "committed")
        except RegistryError as error:
            log.warning(
                "download %s failed: %s",
                download.digest,
                error.message,
                extra=_event("download_fail", download, reason=_failure_reason(error)),
            )
            self._stats(download).failed(_failure_reason(error))
            self.not_found.note((download.origin, download.digest), error)
            download._fail(error)
        except OSError as exc:
            log.error("download %s: disk error on %s: %s", download.digest, download.path, exc)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self._stats(download).failed("no_space")
                download._fail(_no_room("the cache's disk is full"))
            else:
                self._stats(download).failed("disk")
                download._fail(RegistryError(500, "UNKNOWN", "cache write failed"))
        except trio.Cancelled:
            self._stats(download).failed("shutdown")
            download._fail(RegistryError(503, "UNAVAILABLE", "the proxy is shutting down"))
            raise
        except Exception as exc:
            log.exception("download %s: unexpected error", download.digest)
            self._stats(download).failed("internal")
            download._fail(RegistryError(500, "UNKNOWN", f"internal error: {type(exc).__name__}"))
        finally:
            os.close(fd)
            self._drop(download)
            # Cleanup must not raise into the app nursery (that would end every download).
            try:
                if not committed:
                    download.path.unlink(missing_ok=True)
            except OSError as exc:
                log.error("download %s: cannot remove %s: %s", download.digest, download.path, exc)
            try:
                # Last: the moment the lock drops, followers elsewhere look for the result.
                lease.release()
            except OSError as exc:
                log.error("download %s: cannot release its lease: %s", download.digest, exc)

    def _finish(self, download: Download, how: str) -> None:
        """The blob is verified and stored: release the last bytes everyone held back.

        Verified, out of the registry, and waiters woken in one step, so a request sees
        either this download or the stored blob."""
        download.verified = True
        self._drop(download)
        try:
            # Verified on its way in: trusted as stored, with no check on its next serve.
            self.trusted.add(download.digest, _identity(os.stat(download.path)))
        except OSError:
            pass  # evicted already; the next serve checks whatever is there then
        download._finished.set()
        download._wake_all()
        if self._on_commit is not None:
            self._on_commit(download)
        log.info("download %s %s", download.digest, how, extra=_event("download_finish", download))

    def _drop(self, download: Download) -> None:
        if self._downloads.get(download.digest) is download:
            del self._downloads[download.digest]

    async def _fetch(
        self,
        download: Download,
        fd: int,
        source: BlobSource,
        stall_timeout: float,
        retry: RetryPolicy,
    ) -> None:
        hasher = hashlib.new(download.digest.algorithm)
        attempt = 0
        while True:
            try:
                await self._fetch_attempt(download, fd, source, stall_timeout, hasher)
                break
            except RegistryError as error:
                if not _is_transient(error) or attempt >= retry.budget(download.size, error):
                    raise
                delay = retry.delay(attempt, error)
                attempt += 1
                download.resumes += 1
                self._stats(download).resumes += 1
                log.info(
                    "download %s: %s; resuming at byte %d in %.2fs (attempt %d/%d)",
                    download.digest,
                    error.message,
                    download.available,
                    delay,
                    attempt,
                    retry.max_retries,
                    extra=_event(
                        "download_resume",
                        download,
                        reason=_failure_reason(error),
                        offset=download.available,
                    ),
                )
                await trio.sleep(delay)

        if download.size is None:
            download._set_size(download.available)
        if download.available != download.size:
            raise _size_invalid(f"got {download.available} of {download.size} bytes")
        if hasher.hexdigest() != download.digest.hex:
            raise RegistryError(
                502,
                "DIGEST_INVALID",
                "upstream content does not match its digest",
                detail={"digest": str(download.digest)},
            )

    async def _fetch_attempt(
        self,
        download: Download,
        fd: int,
        source: BlobSource,
        stall_timeout: float,
        hasher: hashlib._Hash,
    ) -> None:
        download.upstream_requests += 1
        async with source(download.available) as body:
            self._admit(download, body.total_size)
            if body.offset > download.available:
                raise upstream_unavailable("blob", "upstream resumed past the requested offset")
            # An upstream that ignores Range starts again at 0: skip what we already have.
            skip = download.available - body.offset
            batch = bytearray()
            batch_started = 0.0
            chunks = aiter(body.chunks)
            try:
                while True:
                    with trio.move_on_after(stall_timeout) as stall:
                        chunk = await anext(chunks, None)
                    if stall.cancelled_caught:
                        raise upstream_timeout("blob", f"no data for {stall_timeout:g}s")
                    if chunk is None:
                        break
                    if skip:
                        dropped = min(skip, len(chunk))
                        chunk = chunk[dropped:]
                        skip -= dropped
                        if not chunk:
                            continue
                    size, maximum = download.size, download.bound.maximum
                    total = download.available + len(batch) + len(chunk)
                    if size is not None and total > size:
                        raise _size_invalid(f"the upstream sent more than its {size} bytes")
                    if size is None and maximum is not None and total > maximum:
                        raise _too_large("the upstream sent more without a length", maximum)
                    if not batch:
                        batch_started = trio.current_time()
                    batch += chunk
                    if (
                        len(batch) >= self._chunk_size
                        or trio.current_time() - batch_started >= FLUSH_INTERVAL
                    ):
                        await self._flush(download, fd, batch, hasher)
            except RegistryError as error:
                # Keep what arrived intact: a resume continues from there.
                if _is_transient(error):
                    await self._flush(download, fd, batch, hasher)
                raise
            await self._flush(download, fd, batch, hasher)

    def _admit(self, download: Download, announced: int | None) -> None:
        """Check the upstream's answer (its length, if any) against the download's bound and,
        on the first answer, the free space; then tell the subscribers it answered.

        Raises before a byte is written, so a refused blob leaves nothing behind.  A declared
        size stands in for a missing length: the body is then held to it byte by byte.
        """
        if announced is not None:
            refusal = download.bound.refusal(announced)
            if refusal is not None:
                raise refusal
        if download._answered.is_set():  # a resumption
            if download.size is None:
                if announced is not None:
                    download._set_size(announced)
            elif announced is not None and announced != download.size:
                raise upstream_unavailable("blob", "size changed between attempts")
            return
        size = announced if announced is not None else download.bound.declared
        if size is None:
            download._answered.set()
            return
        if size == 0 and hashlib.new(download.digest.algorithm).hexdigest() != download.digest.hex:
            # An empty body has no last byte to hold back until it is verified, so it would
            # be complete before its check: only the empty blob's own digest may be empty.
            raise _size_invalid("the upstream announces 0 bytes for a blob that is not empty")
        self._check_room(download, size)
        download._set_size(size)

    def _check_room(self, download: Download, size: int) -> None:
        """Refuse a blob the cache's disk cannot hold: what it still needs, plus what the
        other downloads here still need, plus a margin, must be free now.

        A check, not a reservation of blocks: another program (or another worker process)
        may still fill the disk, and then the write fails with ENOSPC (see ``_produce``).
        """
        others = sum(
            d.size - d.available
            for d in self._downloads.values()
            if d is not download and not d.followed and d.size is not None
        )
        free = self._disk_free()
        if free < size - download.available + others + FREE_SPACE_MARGIN:
            raise _no_room(
                f"the blob has {size} bytes, {free} bytes are free "
                f"and downloads in flight still need {others}"
            )

    async def _flush(
        self, download: Download, fd: int, batch: bytearray, hasher: hashlib._Hash
    ) -> None:
        if not batch:
            return
        data = bytes(batch)
        batch.clear()
        await trio.to_thread.run_sync(_write_and_hash, fd, download.available, data, hasher)
        download.available += len(data)
        self._stats(download).upstream_bytes += len(data)
        download._wake_all()


def _no_room(why: str) -> RegistryError:
    """No room in the cache.  503 UNAVAILABLE with Retry-After: the distribution spec has no
    code for it, 507 is WebDAV's and clients treat it as final, while a 503 is what registry
    clients retry (and eviction or downloads finishing may make room by then)."""
    return _Refused(
        503,
        "UNAVAILABLE",
        f"not enough room in the cache: {why}",
        headers={"Retry-After": _NO_ROOM_RETRY_AFTER},
    )


def _disk_free(root: Path) -> int:
    """Bytes an unprivileged writer may still put on the file system holding ``root``."""
    stat = os.statvfs(root)
    return stat.f_bavail * stat.f_frsize


def _publish_size(lease: Owned, digest: Digest, size: int) -> None:
    try:
        lease.publish_size(size)
    except OSError as exc:
        # Followers in other processes then learn the size when the download ends.
        log.warning("download %s: cannot publish its size: %s", digest, exc)


def _event(name: str, download: Download, **more: object) -> dict[str, object]:
    """The structured fields of a download log line."""
    origin = download.origin if isinstance(download.origin, tuple) else ("", "")
    return {
        "event": name,
        "digest": str(download.digest),
        "upstream": origin[0],
        "repository": origin[1],
        "size": download.size,
        "bytes": download.available,
        "duration_ms": round((trio.current_time() - download.started_at) * 1000, 1),
        "subscribers": download.subscriber_count,
        "upstream_requests": download.upstream_requests,
        "resumes": download.resumes,
        **more,
    }


def _write_and_hash(fd: int, offset: int, data: bytes, hasher: hashlib._Hash) -> None:
    """One worker-thread hop per batch: hashlib and pwrite both release the GIL."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written
    hasher.update(data)
