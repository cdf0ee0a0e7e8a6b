"""The producer: one upstream body into one partial file, resumed when it drops, verified.

The producer appends upstream bytes to the partial in batches of at least ``chunk_size``,
advances ``available`` and wakes the subscribers (``_downloads``).  A body that comes
straight from a socket (``BlockingBody``) is pumped by worker threads without the event loop
(``_pump``); any other body is read here, piece by piece, and each batch is written in a
worker thread while another thread hashes it (:class:`HashLane`).
Before the first byte it checks the upstream's answer
against the download's bound and the cache's free space (``_limits``); when the body drops or
stalls it asks again from ``available`` (``_retry``), skipping what it has when the upstream
ignores the Range.  At the end it checks length and digest: only then may the registry
commit the blob and release the bytes every subscriber held back.

It runs as a task of the app's nursery (see ``_registry``), which supervises it: what
happens on failure or success to the registry entry, the lease and the files is decided
there, not here.
"""

from __future__ import annotations

import errno
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import trio

from .._errors import RegistryError, upstream_timeout, upstream_unavailable
from .._threads import run_interruptible
from ._downloads import (
    BlobSource,
    BlockingBody,
    Download,
    DownloadStats,
    download_event,
    failure_reason,
)
from ._limits import no_room, refuse_growth, size_invalid
from ._pump import FLUSH_INTERVAL, Hasher, Pump, WriteBack
from ._retry import RetryPolicy, is_transient

log = logging.getLogger("streamsync_trio.streaming")


@dataclass
class Fetch:
    """Fetches ``download`` from ``source`` into the partial open at ``fd``.

    ``check_room(download, size)`` raises when the cache cannot take a blob of ``size``
    bytes (it knows the other downloads in flight); ``stats`` counts resumes and bytes.
    """

    download: Download
    fd: int
    source: BlobSource
    stall_timeout: float
    retry: RetryPolicy
    chunk_size: int
    stats: DownloadStats
    check_room: Callable[[Download, int], None]

    async def run(self) -> None:
        """Every byte of the blob, verified; raises ``RegistryError`` (or ``OSError``)."""
        download, retry = self.download, self.retry
        hasher = HashLane(download.digest.algorithm)
        attempt = 0
        while True:
            try:
                await self._attempt(hasher)
                break
            except RegistryError as error:
                if not is_transient(error) or attempt >= retry.budget(download.size, error):
                    raise
                delay = retry.delay(attempt, error)
                attempt += 1
                download.resumes += 1
                self.stats.resumes += 1
                log.info(
                    "download %s: %s; resuming at byte %d in %.2fs (attempt %d/%d)",
                    download.digest,
                    error.message,
                    download.available,
                    delay,
                    attempt,
                    retry.max_retries,
                    extra=download_event(
                        "download_resume",
                        download,
                        reason=failure_reason(error),
                        offset=download.available,
                    ),
                )
                await trio.sleep(delay)

        if download.size is None:
            download.set_size(download.available)
        if download.available != download.size:
            raise size_invalid(f"got {download.available} of {download.size} bytes")
        if await hasher.hexdigest() != download.digest.hex:
            raise RegistryError(
                502,
                "DIGEST_INVALID",
                "upstream content does not match its digest",
                detail={"digest": str(download.digest)},
            )

    async def _attempt(self, hasher: HashLane) -> None:
        download = self.download
        download.upstream_requests += 1
        async with self.source(download.available) as body:
            # A body read from another node of a cluster (``from_peer``, see
            # ``Claim.source``) is not upstream traffic: the upstream bytes count only what
            # the upstream registry sent.
            upstream = not getattr(body, "from_peer", False)
            admit(download, body.total_size, self.check_room)
            if body.offset > download.available:
                raise upstream_unavailable("blob", "upstream resumed past the requested offset")
            # An upstream that ignores Range starts again at 0: skip what we already have.
            skip = download.available - body.offset
            blocking: BlockingBody | None = getattr(body, "blocking", None)
            if blocking is not None:  # bytes straight from a socket: the fast lane
                await self._pump(blocking, hasher, skip, upstream)
                return
            batch = bytearray()
            batch_started = 0.0
            chunks = aiter(body.chunks)
            writeback = WriteBack(self.fd, download.available)
            try:
                while True:
                    with trio.move_on_after(self.stall_timeout) as stall:
                        chunk = await anext(chunks, None)
                    if stall.cancelled_caught:
                        raise upstream_timeout("blob", f"no data for {self.stall_timeout:g}s")
                    if chunk is None:
                        break
                    if skip:
                        dropped = min(skip, len(chunk))
                        chunk = chunk[dropped:]
                        skip -= dropped
                        if not chunk:
                            continue
                    self._bound(len(batch) + len(chunk))
                    if not batch and len(chunk) >= self.chunk_size:
                        # A large piece (the wire reader hands over up to 1 MiB) goes to
                        # disk as it is: copying it into the batch first would only cost.
                        await self._write(bytes(chunk), hasher, upstream, writeback)
                        continue
                    if not batch:
                        batch_started = trio.current_time()
                    batch += chunk
                    if (
                        len(batch) >= self.chunk_size
                        or trio.current_time() - batch_started >= FLUSH_INTERVAL
                    ):
                        await self._flush(batch, hasher, upstream, writeback)
            except RegistryError as error:
                # Keep what arrived intact: a resume continues from there.
                if is_transient(error):
                    await self._flush(batch, hasher, upstream, writeback)
                raise
            await self._flush(batch, hasher, upstream, writeback)
            await trio.to_thread.run_sync(
                partial(writeback.written, download.available, final=True)
            )

    async def _pump(self, body: BlockingBody, hasher: HashLane, skip: int, upstream: bool) -> None:
        """The body read, hashed and written by one worker thread (``_pump``); the event
        loop hears of each batch written, in order, before this returns or raises."""
        download = self.download
        token = trio.lowlevel.current_trio_token()

        def advanced(available: int, count: int) -> None:
            if upstream:
                self.stats.upstream_bytes += count
            download.advance(available)

        def progress(available: int, count: int) -> None:  # in the worker thread
            try:
                token.run_sync_soon(advanced, available, count)
            except trio.RunFinishedError:
                pass

        pump = Pump(
            body,
            self.fd,
            await hasher.exclusive(),
            download.available,
            skip,
            download.size,
            download.bound.maximum,
            self.chunk_size,
            self.stall_timeout,
            progress,
        )

        def interrupt() -> None:
            pump.stopping = True
            body.interrupt()

        await run_interruptible(pump.run, interrupt)

    def _bound(self, pending: int) -> None:
        """Refuse a body growing past its size, or past the maximum when it has none."""
        download = self.download
        refuse_growth(download.available + pending, download.size, download.bound.maximum)

    async def _flush(
        self, batch: bytearray, hasher: HashLane, upstream: bool, writeback: WriteBack
    ) -> None:
        if not batch:
            return
        data = bytes(batch)
        batch.clear()
        await self._write(data, hasher, upstream, writeback)

    async def _write(
        self, data: bytes, hasher: HashLane, upstream: bool, writeback: WriteBack
    ) -> None:
        download = self.download
        await hasher.add(data)  # hashed while it is written
        await trio.to_thread.run_sync(writeback.write, download.available, data)
        if upstream:
            self.stats.upstream_bytes += len(data)
        download.advance(download.available + len(data))


def admit(
    download: Download, announced: int | None, check_room: Callable[[Download, int], None]
) -> None:
    """Check the upstream's answer (its length, if any) against the download's bound and,
    on the first answer, the free space; then tell the subscribers it answered.

    Raises before a byte is written, so a refused blob leaves nothing behind.  A declared
    size stands in for a missing length: the body is then held to it byte by byte.
    """
    if announced is not None:
        refusal = download.bound.refusal(announced)
        if refusal is not None:
            raise refusal
    if download.answered:  # a resumption
        if download.size is None:
            if announced is not None:
                download.set_size(announced)
        elif announced is not None and announced != download.size:
            raise upstream_unavailable("blob", "size changed between attempts")
        return
    size = announced if announced is not None else download.bound.declared
    if size is None:
        download.mark_answered()
        return
    if size == 0 and hashlib.new(download.digest.algorithm).hexdigest() != download.digest.hex:
        # An empty body has no last byte to hold back until it is verified, so it would
        # be complete before its check: only the empty blob's own digest may be empty.
        raise size_invalid("the upstream announces 0 bytes for a blob that is not empty")
    check_room(download, size)
    download.set_size(size)


def write_failure(exc: OSError) -> tuple[str, RegistryError]:
    """What a failed write of the partial means: the reason counted, and the clients' error
    (a full disk is no room in the cache, which clients retry later)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no_space", no_room("the cache's disk is full")
    return "disk", RegistryError(500, "UNKNOWN", "cache write failed")


class HashLane:
    """The digest of the body, computed in a worker thread of its own, beside the writes.

    One thread hop per batch used to write it and then hash it, and the producer waited for
    both before it took the next batch (issue 11; measured on a cold 256 MiB pull over TLS:
    182 -> 211 MB/s).  Now a batch is hashed while it is written, and its hash may still
    run while the next batch is received; only one batch is hashed at a time, which keeps
    the updates in order and bounds the bytes held to one batch.  Subscribers may read a
    batch before its hash is done: they hold the last byte back until the download is
    verified, and :meth:`hexdigest` waits for every hash, so nothing complete is released
    unchecked.  A thread cannot be cancelled: a producer cancelled meanwhile leaves it to
    finish one batch's update of a hasher nobody reads any more.
    """

    def __init__(self, algorithm: str) -> None:
        self._hasher = hashlib.new(algorithm)
        self._token = trio.lowlevel.current_trio_token()
        self._idle = trio.Event()
        self._idle.set()
        self._failure: BaseException | None = None

    async def add(self, data: bytes) -> None:
        """Start hashing ``data``, once the previous batch's hash is done."""
        await self._idle.wait()
        self._raise_failure()
        idle = self._idle = trio.Event()

        def update() -> None:  # in the worker thread, as is deliver
            try:
                self._hasher.update(data)
            except BaseException as exc:  # MemoryError: the digest is then unknown
                self._failure = exc

        def deliver(_: object) -> None:
            try:
                self._token.run_sync_soon(idle.set)
            except trio.RunFinishedError:
                pass  # the run ended (cancelled) meanwhile: nobody waits for this hash

        trio.lowlevel.start_thread_soon(update, deliver)

    async def exclusive(self) -> Hasher:
        """The hasher itself, once every batch added is hashed, for a caller that updates it
        synchronously (the pump's thread) and adds nothing here until it is done."""
        await self._idle.wait()
        self._raise_failure()
        return self._hasher

    async def hexdigest(self) -> str:
        """The digest of every byte added, once all of them are hashed."""
        await self._idle.wait()
        self._raise_failure()
        return self._hasher.hexdigest()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure
