"""The producer's fast lane: a body pumped into the partial by one worker thread.

After the wire reader (``upstream/_wire``) made the pieces large, the profile of a cold pull
on a fast upstream still showed the trio thread about 84 % busy, and it was the ceiling: for
every MiB it received from the socket, handed the piece through the read-ahead channel,
hopped to a thread to write it and to another to hash it, and woke the subscribers, while it
also served every client.  A blocking loop in a worker thread does the same work with
almost no Python in it: receive into one buffer, hash it, write it, tell the event loop how
far the partial has grown.  ``recv``, the hash and ``pwrite`` all release the GIL, so the
loop runs beside the event loop rather than in its way; the event loop is left one callback
per batch and the serving.  Measured with ``bench/compare.py --fast-upstream``: see the
README's cold-path table.

The pump keeps the async producer's rules (``_producer``): batches of ``chunk_size``, a
partial batch written once its oldest byte waited :data:`FLUSH_INTERVAL` (time to first
byte on a slow upstream), the stall timeout, bytes an upstream repeats (it ignored our
Range) skipped, the body held to its size, and on a transient failure what arrived is kept
for the resume.  It is used when the source offers a :class:`~._downloads.BlockingBody`;
otherwise the producer reads ``chunks`` as before.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from .._errors import RegistryError, upstream_timeout
from ._downloads import BlockingBody
from ._limits import refuse_growth
from ._retry import is_transient

# A batch is flushed when it reaches chunk_size, or when its oldest byte has waited this long:
# a slow upstream must not hold the first byte back for a whole chunk (time to first byte).
FLUSH_INTERVAL = 0.05
# The event loop hears of progress once this much more is written (or FLUSH_INTERVAL after
# the last news, or at the end): every report wakes each subscriber, which then sends a file
# range through the ASGI server, and per piece that chain cost the event loop more than the
# bytes did (1 MiB reports: 2.3-3.8 CPU s/GB for a cold pull, 4 MiB: 1.4-1.9).
REPORT_BYTES = 4 * 1024 * 1024
# Write-back of the partial is started every this many bytes (``sync_file_range``), not per
# batch: each call submits the range to the block layer, which in a VM also means a trip to
# the hypervisor.
WRITEBACK_BYTES = 8 * 1024 * 1024


class Hasher(Protocol):
    """The running digest (a ``hashlib`` object)."""

    def update(self, data: memoryview, /) -> None: ...


class _Stopped(Exception):
    """The pump was interrupted (its producer was cancelled)."""


@dataclass
class Pump:
    """One attempt's body, from ``body`` into the partial at ``fd`` from byte ``available``.

    Runs in a worker thread (:meth:`run`); ``progress(available, count)`` is called there
    after each batch is hashed and written, and must hand the news to the event loop.
    ``size``/``maximum`` bound the whole blob (``refuse_growth``, as in ``Fetch``).
    """

    body: BlockingBody
    fd: int
    hasher: Hasher
    available: int
    skip: int
    size: int | None
    maximum: int | None
    chunk_size: int
    stall_timeout: float
    progress: Callable[[int, int], None]
    stopping: bool = False
    clock: Callable[[], float] = time.monotonic  # tests move it only when the body waits
    _hashing: ThreadPoolExecutor | None = None
    _reported: int = field(init=False)  # what the event loop has heard of
    _reported_at: float | None = None
    _writeback: WriteBack = field(init=False)
    _turn: int = 0
    _buffers: list[memoryview | None] = field(default_factory=lambda: [None, None])
    _hashes: list[Future[None] | None] = field(default_factory=lambda: [None, None])

    def run(self) -> None:
        """Every byte of the body, or the failure; what was written is reported first.

        The hash runs in a second thread (``_hashing``), one batch behind: hashing costs
        about as much as receiving and writing together (sha256 at 1.6 GB/s against the
        rest), so alone this thread would be the ceiling of a cold pull.  Two buffers take
        turns; a buffer is filled again only once its hash is done."""
        with ThreadPoolExecutor(1, thread_name_prefix="streamsync-hash") as hashing:
            self._hashing = hashing
            try:
                self._run()
            finally:
                self._settle()
                self._report(final=True)
                self._writeback.written(self.available, final=True)

    def __post_init__(self) -> None:
        self._reported = self.available
        self._writeback = WriteBack(self.fd, self.available)

    def _run(self) -> None:
        buffer = self._next_buffer()
        filled = 0
        batch_started = self.clock()
        waited = 0.0  # seconds spent waiting for the upstream since its last byte
        try:
            while True:
                if self.stopping:
                    raise _Stopped
                now = self.clock()
                # The stall timeout counts the waits only: a slow disk is not the upstream.
                wait = self.stall_timeout - waited
                if filled:
                    wait = min(wait, FLUSH_INTERVAL - (now - batch_started))
                unreported = self.available > self._reported
                if unreported and self._reported_at is not None:
                    # Written while the upstream pauses: not kept from the readers.
                    wait = min(wait, FLUSH_INTERVAL - (now - self._reported_at))
                if wait <= 0:
                    if filled:
                        buffer, filled = self._flush(buffer, filled), 0
                    elif unreported:
                        self._report()
                    else:
                        raise upstream_timeout("blob", f"no data for {self.stall_timeout:g}s")
                    continue
                # While skipping, the bytes land at the start and are dropped.
                space = buffer[: min(self.skip, len(buffer))] if self.skip else buffer[filled:]
                count = self.body.readinto(space, wait)
                if count is None:
                    waited += self.clock() - now
                    continue
                if count == 0:
                    break
                waited = 0.0
                if self.skip:  # the upstream ignored our Range: these we have already
                    self.skip -= count
                    continue
                refuse_growth(self.available + filled + count, self.size, self.maximum)
                if not filled:
                    batch_started = self.clock()
                filled += count
                if filled == len(buffer):
                    buffer, filled = self._flush(buffer, filled), 0
        except RegistryError as error:
            if is_transient(error):  # keep what arrived intact: a resume continues there
                self._flush(buffer, filled)
            raise
        self._flush(buffer, filled)

    def _flush(self, buffer: memoryview, filled: int) -> memoryview:
        """Hash (in the other thread) and write the batch; the buffer to fill next."""
        if not filled:
            return buffer
        batch = buffer[:filled]
        assert self._hashing is not None
        self._hashes[self._turn % 2] = self._hashing.submit(self.hasher.update, batch)
        self._writeback.write(self.available, batch)
        self.available += filled
        self._report()
        return self._next_buffer()

    def _report(self, *, final: bool = False) -> None:
        """Tell the event loop how far the partial has grown: the first batch at once (time
        to first byte), then every :data:`REPORT_BYTES` or :data:`FLUSH_INTERVAL`."""
        count = self.available - self._reported
        if not count:
            return
        now = self.clock()
        if (
            final
            or self._reported_at is None
            or count >= REPORT_BYTES
            or now - self._reported_at >= FLUSH_INTERVAL
        ):
            self._reported, self._reported_at = self.available, now
            self.progress(self.available, count)

    def _next_buffer(self) -> memoryview:
        """The other buffer, once its last batch is hashed."""
        self._turn += 1
        slot = self._turn % 2
        pending = self._hashes[slot]
        if pending is not None:
            self._hashes[slot] = None
            pending.result()  # raises what the hash raised (MemoryError)
        if self._buffers[slot] is None:
            self._buffers[slot] = memoryview(bytearray(self.chunk_size))
        buffer = self._buffers[slot]
        assert buffer is not None
        return buffer

    def _settle(self) -> None:
        """Wait for every hash: the digest is complete (or failed) when the pump returns."""
        for slot, pending in enumerate(self._hashes):
            if pending is not None:
                self._hashes[slot] = None
                pending.result()


def write_range(fd: int, offset: int, data: bytes | memoryview) -> None:
    """Write ``data`` at ``offset`` (in a worker thread: pwrite releases the GIL)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


class WriteBack:
    """Hands a partial to the disk as it grows (``sync_file_range``, asynchronous): the fsync
    before the commit then finds little left to write, where it would otherwise flush the
    whole blob while every client waits (issue 11).  Started every :data:`WRITEBACK_BYTES`
    and for the rest at the end, not per batch.  Called from worker threads, one at a time.
    """

    def __init__(self, fd: int, start: int) -> None:
        self._fd = fd
        self._start = start  # where write-back was last started

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """:func:`write_range`, then write-back if it is due."""
        write_range(self._fd, offset, data)
        self.written(offset + len(data))

    def written(self, end: int, *, final: bool = False) -> None:
        """The partial is written up to ``end``; ``final``: nothing more follows."""
        count = end - self._start
        if count >= WRITEBACK_BYTES or (final and count > 0):
            start_writeback(self._fd, self._start, count)
            self._start = end


def _sync_file_range() -> Callable[[int, int, int], None]:
    """``sync_file_range(fd, offset, count, SYNC_FILE_RANGE_WRITE)`` where the C library has
    it (Linux; Python's ``os`` does not), else a no-op.  Start write-back, wait for nothing;
    a failure here is harmless (the fsync that follows reports real write errors)."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return lambda fd, offset, count: None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    write = 2  # SYNC_FILE_RANGE_WRITE

    def start(fd: int, offset: int, count: int) -> None:
        function(fd, offset, count, write)

    return start


start_writeback = _sync_file_range()
