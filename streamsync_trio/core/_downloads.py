"""One in-flight blob (:class:`Download`) and its readers (:class:`Subscriber`).

The contract every source of bytes (this process's producer, a follower of an owner
elsewhere, the check of a stored blob) keeps with the readers:

* Subscribers read ``path`` at their own pace from their own offset.  Waking is a
  ``send_nowait`` into a one-slot channel: whoever advances a download never blocks on a
  subscriber, and because progress is monotonic a coalesced wake-up loses nothing.
* Nothing is ever delivered as complete before it is verified: every subscriber holds back
  the last byte of its range until the download is verified (length and digest checked) and
  released (:meth:`Download.release`).  A mismatch therefore always leaves every response
  short of its ``Content-Length``.  Release may come before the commit (the fsync of a large
  blob took 0.46 s of every cold pull, issue 11): a subscriber then sends its last byte at
  once, and only the end of its range (the ``b""`` that ends a body) waits for the commit or
  the failure.  A client has its whole, checked body by then; whoever looks at the store when
  a response has ended finds the blob there, as before.
* A blob of unknown length (no ``Content-Length``, no declared size) is still streamed: the
  subscribers learn that the upstream answered (:meth:`Subscriber.wait_answer`) without a
  size, and hold back the last byte written until the end is verified.
* Failure is recorded in the download (:meth:`Download.fail`) and every subscriber wait is
  cancelled through its registered cancel scope.

Subscriber waits are wrapped in cancel scopes inside plain ``async def`` methods, never around
a ``yield`` (PEP 789): the HTTP body just calls :meth:`Subscriber.read` (or
:meth:`Subscriber.read_or_range`, for a server that sends file ranges itself) and lets the
failure raise.

The progress side (``set_size``, ``mark_answered``, ``advance``, ``complete``, ``fail``) is
what a producer or a follower calls; nothing else mutates a download.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol, TypeVar

import trio

from .._errors import RegistryError
from .._reference import Digest
from ._limits import UNBOUNDED, Refused, SizeBound
from ._pagecache import FileRange, cache_read_failed, pages_cached, read_if_cached

_T = TypeVar("_T")


class BlobBody(Protocol):
    """What a source yields: an upstream body that starts at ``offset`` of the blob."""

    @property
    def total_size(self) -> int | None: ...
    @property
    def offset(self) -> int: ...
    @property
    def chunks(self) -> AsyncIterator[bytes]: ...


class BlockingBody(Protocol):
    """A body a worker thread can read without the event loop (see ``_pump``): what a source
    offers beside ``chunks`` when its bytes come straight from a socket.

    ``readinto`` blocks for at most ``timeout`` seconds: it returns how many bytes it put at
    the start of ``buffer``, ``0`` at the end of the body, ``None`` when nothing arrived in
    time; it raises ``RegistryError`` when the source fails (as ``chunks`` would).
    ``interrupt`` is called from the trio thread to make a ``readinto`` that is waiting, or
    any later one, give up at once; the reader is not used after that.
    """

    def readinto(self, buffer: memoryview, timeout: float) -> int | None: ...
    def interrupt(self) -> None: ...


# Opens the blob at a byte offset.  The upstream may ignore the offset and start at 0.
BlobSource = Callable[[int], AbstractAsyncContextManager[BlobBody]]


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


def failure_reason(error: RegistryError) -> str:
    """Why a download failed, as its statistics and logs count it."""
    if isinstance(error, Refused):
        return "too_large" if error.status == 502 else "no_space"
    if error.code == "DIGEST_INVALID":
        return "digest_mismatch"
    if error.code == "SIZE_INVALID":
        return "size_mismatch"
    return f"upstream_{error.status}"


class Download:
    """The shared state of one blob being fetched (or checked).  Mutated only through its
    progress methods, by whoever produces it: this process's producer, or a follower that
    mirrors an owner elsewhere (``_owners``)."""

    def __init__(
        self,
        digest: Digest,
        path: Path,
        origin: Hashable = None,
        group: str = "",
        bound: SizeBound = UNBOUNDED,
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
        self.released = False  # length and digest checked: the last bytes may be sent
        self._sized_when_answered = True  # False: responses went out without a length
        self.failure: RegistryError | None = None
        self.upstream_requests = 0
        self.resumes = 0
        # Set when another owner has the download and this process only mirrors it.
        self.followed = False
        # A follower's way to open the owner's bytes (a dup of a held fd): the owner may
        # rename (commit) or remove (failure) its file at any moment.  None: open ``path``.
        self.reader: Callable[[], int] | None = None
        # The owner tells followers elsewhere the size as soon as it knows it.
        self.on_size: Callable[[int], None] | None = None
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

    @property
    def answered(self) -> bool:
        """Whether the upstream answered with a body (or the download failed)."""
        return self._answered.is_set()

    async def wait_finished(self) -> None:
        await self._finished.wait()

    # -- progress: called by whoever produces the bytes ------------------------------------

    def set_size(self, size: int) -> None:
        """The blob's size is known: the upstream answered."""
        self.size = size
        self._size_known.set()
        self._answered.set()
        if self.on_size is not None:
            self.on_size(size)

    def mark_answered(self) -> None:
        """The upstream answered with a body, without saying its size (yet)."""
        if self.size is None and not self._answered.is_set():
            self._sized_when_answered = False
        self._answered.set()

    def advance(self, available: int) -> None:
        """Bytes up to ``available`` are written to ``path`` and safe to read."""
        self.available = available
        self._wake_all()

    def release(self) -> None:
        """Every byte is there and verified, not yet committed: the subscribers may send the
        last bytes they held back; their ranges end with the commit (:meth:`complete`) or
        the failure (:meth:`fail`).

        Not for a blob whose upstream answered without a size: its responses went out
        without a ``Content-Length`` (chunked), so a client learns that it has everything
        only from the end of the body, and an early last byte would gain it nothing; such a
        blob keeps its last byte until the commit, as it always did."""
        if self._sized_when_answered:
            self.released = True
            self._wake_all()

    def complete(self) -> None:
        """Every byte is there and verified: release the last bytes everyone held back."""
        self.released = True
        self.verified = True
        self._finished.set()
        self._wake_all()

    def fail(self, error: RegistryError) -> None:
        """End every subscriber's wait with ``error``.  Idempotent; never after success."""
        if self.failure is not None or self.verified:
            return
        self.failure = error
        for scope in self._scopes:
            scope.cancel()
        self._size_known.set()
        self._answered.set()
        self._finished.set()
        self._wake_all()

    def _wake_all(self) -> None:
        for channel in self._wakeups:
            try:
                channel.send_nowait(None)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # a pending wake-up already tells it to look at ``available``

    def _open_reader(self) -> int:
        if self.reader is not None:
            return self.reader()
        return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)


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
                if download.released and not download.verified:
                    # Its last byte is out, before the commit: the range ends with that.
                    await self._guarded(download._finished.wait)
                    continue  # committed, or failed (raises above)
                return 0
            # The last byte of every range waits for verification: a client can never
            # receive a complete body whose content was not checked.  Of unknown size, the
            # last byte written so far is held back: it may be the blob's last.
            if download.released:
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
            data = read_if_cached(fd, count, offset)
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
        loop, which is what :func:`~._pagecache.read_if_cached` avoids for reads.  Anything
        else (bytes on disk only, a kernel that cannot tell) is read as by :meth:`read`."""
        count = await self._next_count(range_bytes)
        fd = self._fd
        if count and fd is not None and pages_cached(fd, self.offset, count):
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


def download_event(name: str, download: Download, **more: object) -> dict[str, object]:
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


def read_stored(
    digest: Digest, fd: int, path: Path, on_close: Callable[[], None] | None = None
) -> Subscriber:
    """A subscriber over a blob already in the store (open at ``fd``): nothing in flight."""
    return Subscriber(verified_download(digest, path, os.fstat(fd).st_size), fd, on_close)


def verified_download(digest: Digest, path: Path, size: int) -> Download:
    """The state of a blob whose ``size`` bytes are all there and checked."""
    download = Download(digest, path)
    download.set_size(size)
    download.advance(size)
    download.complete()
    return download
