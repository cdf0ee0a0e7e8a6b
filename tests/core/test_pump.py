"""The producer's fast lane (``core/_pump``): a body read, hashed and written by one thread.

The pump runs on a fake clock that moves only when the scripted body waits, so the flush
interval and the stall timeout are tested without sleeping; the interruption test and the
registry tests run it in a real worker thread, as the producer does.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from streamsync_trio import RegistryError
from streamsync_trio._errors import upstream_unavailable
from streamsync_trio._reference import parse_digest
from streamsync_trio._threads import run_interruptible
from streamsync_trio.core import _pump
from streamsync_trio.core._pump import FLUSH_INTERVAL, REPORT_BYTES, WRITEBACK_BYTES, Pump

from ..labs.corelab import STALL_TIMEOUT, assert_clean, drain, open_lab
from ..labs.fakes import digest_of

MiB = 1024 * 1024


@dataclass
class Pause:
    """The upstream sends nothing for ``seconds`` (for ever: ``inf``)."""

    seconds: float


@dataclass
class ScriptedBody:
    """A ``BlockingBody`` playing ``script``: bytes (handed out as the buffer allows),
    pauses (on ``clock``, which only they move), and errors (raised once)."""

    script: list[bytes | Pause | Exception]
    clock: list[float] = field(default_factory=lambda: [0.0])
    interrupted: threading.Event = field(default_factory=threading.Event)
    waits: list[float] = field(default_factory=list)

    def now(self) -> float:
        return self.clock[0]

    def readinto(self, buffer: memoryview, timeout: float) -> int | None:
        if self.interrupted.is_set():
            raise upstream_unavailable("blob", "interrupted")
        if not self.script:
            return 0
        step = self.script[0]
        if isinstance(step, Pause):
            self.waits.append(timeout)
            waited = min(timeout, step.seconds)
            self.clock[0] += waited
            step.seconds -= waited
            if step.seconds <= 0:
                self.script.pop(0)
            return None
        if isinstance(step, Exception):
            self.script.pop(0)
            raise step
        piece = step[: len(buffer)]
        if len(step) > len(buffer):
            self.script[0] = step[len(buffer) :]
        else:
            self.script.pop(0)
        buffer[: len(piece)] = piece
        return len(piece)

    def interrupt(self) -> None:
        self.interrupted.set()


@dataclass
class Run:
    pump: Pump
    path: Path
    reports: list[tuple[int, float]]  # (available, fake time)
    hasher: hashlib._Hash

    def written(self) -> bytes:
        return self.path.read_bytes()


OPENED: list[int] = []


@pytest.fixture(autouse=True)
def close_partials() -> Iterator[None]:
    yield
    while OPENED:
        os.close(OPENED.pop())


def pump_for(
    tmp_path: Path,
    body: ScriptedBody,
    *,
    available: int = 0,
    skip: int = 0,
    size: int | None = None,
    maximum: int | None = None,
    chunk_size: int = MiB,
    stall_timeout: float = 30.0,
) -> Run:
    path = tmp_path / "partial"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    OPENED.append(fd)
    reports: list[tuple[int, float]] = []
    hasher = hashlib.sha256()

    def progress(total: int, count: int) -> None:
        reports.append((total, body.now()))

    pump = Pump(
        body,
        fd,
        hasher,
        available,
        skip,
        size,
        maximum,
        chunk_size,
        stall_timeout,
        progress,
        clock=body.now,
    )
    return Run(pump, path, reports, hasher)


def pieces_of(data: bytes, rng: random.Random) -> list[bytes | Pause | Exception]:
    out: list[bytes | Pause | Exception] = []
    position = 0
    while position < len(data):
        size = rng.choice([1, 100, 4096, 65536, 300_000, MiB, 3 * MiB])
        out.append(data[position : position + size])
        position += size
    return out


def test_a_body_is_written_hashed_and_reported_in_order(tmp_path: Path) -> None:
    data = random.Random(1).randbytes(13 * MiB + 12345)
    run = pump_for(tmp_path, ScriptedBody(pieces_of(data, random.Random(2))), size=len(data))
    run.pump.run()
    assert run.written() == data
    assert run.hasher.hexdigest() == hashlib.sha256(data).hexdigest()
    totals = [total for total, _ in run.reports]
    assert totals == sorted(totals) and totals[-1] == len(data)
    # The first batch is reported at once; after it, one report per REPORT_BYTES at most
    # (no time passes here, so only the size makes a report).
    assert totals[0] == MiB
    assert len(totals) <= 2 + len(data) // REPORT_BYTES


def test_write_back_is_started_every_few_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One ``sync_file_range`` per WRITEBACK_BYTES, over contiguous ranges, not one per
    batch (each is a trip to the block layer, and in a VM to the hypervisor)."""
    started: list[tuple[int, int]] = []
    monkeypatch.setattr(
        _pump, "start_writeback", lambda fd, offset, count: started.append((offset, count))
    )
    data = random.Random(8).randbytes(2 * WRITEBACK_BYTES + 5 * MiB)
    run = pump_for(tmp_path, ScriptedBody(pieces_of(data, random.Random(9))), available=0)
    run.pump.run()
    every = WRITEBACK_BYTES
    # ... and the rest when the body ends, so the fsync before the commit finds it written.
    assert started == [(0, every), (every, every), (2 * every, 5 * MiB)]
    assert run.written() == data


def test_a_pause_does_not_keep_written_bytes_from_the_readers(tmp_path: Path) -> None:
    """A slow upstream: the partial batch is written FLUSH_INTERVAL after its first byte,
    and what is written is reported within FLUSH_INTERVAL, not at the end of the pause."""
    head = b"x" * 1000
    run = pump_for(tmp_path, ScriptedBody([head, Pause(10.0), b"y" * 10]))
    run.pump.run()
    assert run.reports[0][0] == 1000
    assert run.reports[0][1] == pytest.approx(FLUSH_INTERVAL)
    assert run.reports[-1][0] == 1010
    assert run.written() == head + b"y" * 10


def test_bytes_reported_late_are_reported_before_the_pause_ends(tmp_path: Path) -> None:
    """After the first report, a batch written within FLUSH_INTERVAL of the last report is
    held back for coalescing, but never past FLUSH_INTERVAL while the upstream pauses."""
    body = ScriptedBody([b"a" * 1000, b"b" * 1000, Pause(10.0), b"c"])
    run = pump_for(tmp_path, body, chunk_size=1000)
    run.pump.run()
    assert run.reports[0] == (1000, 0.0)  # the first batch at once
    # The second batch was written at once too, and coalesced: reported FLUSH_INTERVAL later.
    assert run.reports[1][0] == 2000
    assert run.reports[1][1] == pytest.approx(FLUSH_INTERVAL)
    assert run.reports[-1] == (2001, 10.0)


def test_an_upstream_silent_for_the_stall_timeout_is_a_504(tmp_path: Path) -> None:
    body = ScriptedBody([b"z" * 2000, Pause(float("inf"))])
    run = pump_for(tmp_path, body, stall_timeout=3.0)
    with pytest.raises(RegistryError) as error:
        run.pump.run()
    assert (error.value.status, error.value.message) == (
        504,
        "upstream blob timed out: no data for 3s",
    )
    assert run.reports[-1][0] == 2000  # what arrived is kept (a resume starts after it)
    assert body.now() == pytest.approx(3.0)
    assert run.written() == b"z" * 2000


def test_a_slow_disk_is_not_a_silent_upstream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stall timeout counts the time spent waiting for the upstream, not the time a
    write took: 40 s per batch written, with a 30 s stall timeout, is no stall."""
    body = ScriptedBody([b"d" * MiB, b"e" * MiB, Pause(20.0), b"f" * MiB])
    real_write = _pump.write_range

    def slow_write(fd: int, offset: int, data: memoryview) -> None:
        body.clock[0] += 40.0
        real_write(fd, offset, data)

    monkeypatch.setattr(_pump, "write_range", slow_write)
    run = pump_for(tmp_path, body, stall_timeout=30.0)
    run.pump.run()
    assert run.written() == b"d" * MiB + b"e" * MiB + b"f" * MiB


def test_bytes_the_upstream_repeats_are_skipped(tmp_path: Path) -> None:
    """The upstream ignored our Range and starts at 0: the first ``skip`` bytes are ours."""
    data = random.Random(3).randbytes(3 * MiB)
    path = tmp_path / "partial"
    path.write_bytes(data[:1_000_000])
    run = pump_for(
        tmp_path,
        ScriptedBody(pieces_of(data, random.Random(4))),
        available=1_000_000,
        skip=1_000_000,
        size=len(data),
    )
    run.pump.run()
    assert run.written() == data
    assert run.hasher.hexdigest() == hashlib.sha256(data[1_000_000:]).hexdigest()
    assert run.reports[-1][0] == len(data)


def test_a_body_longer_than_its_size_is_refused_unwritten(tmp_path: Path) -> None:
    run = pump_for(tmp_path, ScriptedBody([b"q" * 11]), size=10)
    with pytest.raises(RegistryError) as error:
        run.pump.run()
    assert error.value.code == "SIZE_INVALID"
    assert run.reports == [] and run.written() == b""


def test_a_body_without_a_length_is_held_to_the_maximum(tmp_path: Path) -> None:
    run = pump_for(tmp_path, ScriptedBody([b"q" * 5000, b"r" * 6000]), maximum=10_000)
    with pytest.raises(RegistryError) as error:
        run.pump.run()
    assert (error.value.status, error.value.code) == (502, "SIZE_INVALID")
    assert "above the limit of 10000" in error.value.message
    assert run.reports == []


def test_a_transient_failure_keeps_what_arrived(tmp_path: Path) -> None:
    failure = upstream_unavailable("blob", "connection reset")
    run = pump_for(tmp_path, ScriptedBody([b"k" * 7000, failure]))
    with pytest.raises(RegistryError) as error:
        run.pump.run()
    assert error.value is failure
    assert run.written() == b"k" * 7000
    assert run.reports[-1][0] == 7000


def test_a_failed_hash_fails_the_pump(tmp_path: Path) -> None:
    class Broken:
        def update(self, data: memoryview, /) -> None:
            raise MemoryError

    run = pump_for(tmp_path, ScriptedBody([b"m" * (3 * MiB)]))
    run.pump.hasher = Broken()
    with pytest.raises(MemoryError):
        run.pump.run()


async def test_a_cancelled_pump_is_interrupted_and_waited_for(tmp_path: Path) -> None:
    """Cancelling the producer interrupts the thread's blocking read, and the cancellation
    returns only once the thread is done with the partial's descriptor."""
    entered = threading.Event()
    finished = threading.Event()

    class Blocking(ScriptedBody):
        def readinto(self, buffer: memoryview, timeout: float) -> int | None:
            entered.set()
            self.interrupted.wait(timeout)  # a socket that sends nothing, until shut down
            time.sleep(0.2)  # and a thread that takes a moment to notice
            raise upstream_unavailable("blob", "interrupted")

    body = Blocking([])
    run = pump_for(tmp_path, body, stall_timeout=60.0)

    def interrupt() -> None:  # as the producer's
        run.pump.stopping = True
        body.interrupt()

    def work() -> None:
        try:
            run.pump.run()
        finally:
            finished.set()

    with trio.fail_after(10):
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_interruptible, work, interrupt)
                await trio.to_thread.run_sync(entered.wait)
                scope.cancel()
    assert scope.cancelled_caught
    assert body.interrupted.is_set() and finished.is_set()


async def test_a_failing_interrupt_still_waits_for_the_thread() -> None:
    finished = threading.Event()
    release = threading.Event()

    def work() -> None:
        release.wait(10)
        time.sleep(0.2)
        finished.set()

    def interrupt() -> None:
        release.set()
        raise RuntimeError("could not interrupt")

    with trio.fail_after(10), pytest.raises(RuntimeError), trio.CancelScope() as scope:
        scope.cancel()
        await run_interruptible(work, interrupt)
    assert finished.is_set()  # the error left only once the thread was done


# -- through the registry: the producer picks the fast lane when the source offers it ------


@dataclass
class PumpedBody:
    total_size: int | None
    offset: int
    chunks: AsyncIterator[bytes]
    blocking: ScriptedBody


async def no_chunks() -> AsyncIterator[bytes]:
    raise AssertionError("the producer must use the blocking body")
    yield b""  # an async generator


@dataclass
class BlockingSource:
    """A source whose bodies offer ``blocking`` (and no usable ``chunks``): each call plays
    the next script from the offset asked for."""

    data: bytes
    scripts: list[list[bytes | Pause | Exception]]
    offsets: list[int] = field(default_factory=list)

    @asynccontextmanager
    async def __call__(self, offset: int) -> AsyncIterator[PumpedBody]:
        self.offsets.append(offset)
        yield PumpedBody(len(self.data), offset, no_chunks(), ScriptedBody(self.scripts.pop(0)))


async def test_a_download_through_the_pump_resumes_and_verifies(tmp_path: Path) -> None:
    data = random.Random(5).randbytes(5 * MiB + 77)
    cut = 2 * MiB + 5
    source = BlockingSource(
        data,
        [
            [data[:cut], upstream_unavailable("blob", "connection reset")],
            pieces_of(data[cut:], random.Random(6)),
        ],
    )
    async with open_lab(tmp_path, max_retries=2) as lab:
        subscriber = lab.registry.subscribe(
            parse_digest(digest_of(data)), source, stall_timeout=STALL_TIMEOUT, retry=lab.retry
        )
        outcome = await drain(subscriber)
        assert outcome.error is None and outcome.data == data
        assert source.offsets == [0, cut]
        assert lab.store.blob_path(parse_digest(digest_of(data))).read_bytes() == data
        assert_clean(lab)


@dataclass
class ChunkedBody:
    total_size: int | None
    offset: int
    chunks: AsyncIterator[bytes]


async def test_the_async_path_starts_write_back_as_the_pump_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body with no socket behind it (``chunks`` only) gets the same write-back: every
    WRITEBACK_BYTES and the rest at the end, over contiguous ranges."""
    started: list[tuple[int, int]] = []

    def record(fd: int, offset: int, count: int) -> None:
        started.append((offset, count))

    monkeypatch.setattr(_pump, "start_writeback", record)
    data = random.Random(10).randbytes(2 * WRITEBACK_BYTES + 3 * MiB + 17)

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 300_000):
            yield data[start : start + 300_000]

    @asynccontextmanager
    async def source(offset: int) -> AsyncIterator[ChunkedBody]:
        yield ChunkedBody(len(data), offset, pieces())

    async with open_lab(tmp_path) as lab:
        subscriber = lab.registry.subscribe(
            parse_digest(digest_of(data)), source, stall_timeout=STALL_TIMEOUT, retry=lab.retry
        )
        outcome = await drain(subscriber)
        assert outcome.error is None and outcome.data == data
    # Batches here are the 300,000-byte pieces: write-back starts at the first batch that
    # reaches WRITEBACK_BYTES since the last start, then covers the rest at the end.
    ends = [offset + count for offset, count in started]
    assert [offset for offset, _ in started] == [0, *ends[:-1]]  # contiguous
    assert ends[-1] == len(data)
    assert all(WRITEBACK_BYTES <= count < WRITEBACK_BYTES + 300_000 for _, count in started[:-1])
    assert len(started) == 3


async def test_a_pumped_body_that_does_not_match_its_digest_is_never_complete(
    tmp_path: Path,
) -> None:
    data = random.Random(7).randbytes(3 * MiB)
    wrong = bytearray(data)
    wrong[-1] ^= 1
    source = BlockingSource(data, [[bytes(wrong)]])
    async with open_lab(tmp_path) as lab:
        subscriber = lab.registry.subscribe(
            parse_digest(digest_of(data)), source, stall_timeout=STALL_TIMEOUT, retry=lab.retry
        )
        outcome = await drain(subscriber)
        assert outcome.error is not None and outcome.error.code == "DIGEST_INVALID"
        assert len(outcome.data) < len(data)  # the last byte never left
        await trio.testing.wait_all_tasks_blocked()
        assert not lab.store.blob_path(parse_digest(digest_of(data))).exists()
        assert_clean(lab)
