"""The streaming core, driven without HTTP: a DownloadRegistry, subscribers and a fake upstream.

Time is virtual (autojump clock): the fake upstream sends 64 KiB every 10 ms, so a 4 MiB blob
takes 0.64 virtual seconds, and joins, stalls and drops happen at exact virtual times.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
import trio.testing

from streamsync_trio import RegistryError
from streamsync_trio._reference import Digest, parse_digest
from streamsync_trio.core import _producer

from ..labs.corelab import (
    STALL_TIMEOUT,
    MiB,
    Outcome,
    assert_clean,
    blob,
    drain,
    join_later,
    open_fds,
    open_lab,
)
from ..labs.fakes import Fault


@pytest.mark.parametrize("zero_copy", [False, True], ids=["bytes", "file-ranges"])
async def test_three_clients_joining_at_different_times_share_one_upstream_request(
    tmp_path: Path, autojump_clock: trio.abc.Clock, zero_copy: bool
) -> None:
    data = blob(4 * MiB)
    fds_before = open_fds()
    async with open_lab(tmp_path) as lab:
        digest = lab.fake.add_blob(data)
        results: list[Outcome] = []
        async with trio.open_nursery() as clients:
            for delay in (0.0, 0.2, 0.5):  # the blob takes 0.64 s to arrive
                clients.start_soon(join_later, lab, digest, delay, results, zero_copy)
        assert [r.error for r in results] == [None, None, None]
        assert all(r.data == data for r in results)
        # Bytes just written are in the page cache: with a zero-copy server, they leave as
        # file ranges (descriptors closed: see the fd count below).
        assert all((r.ranges > 0) == zero_copy for r in results)
        assert len(lab.fake.blob_gets(digest)) == 1
        # Late joiners catch up from disk and finish with the download, not 0.64 s later.
        ends = sorted(r.ended_at for r in results)
        assert ends[-1] - ends[0] < 0.05
        assert lab.store.blob_size(parse_digest(digest)) == len(data)
        await trio.testing.wait_all_tasks_blocked()
        assert_clean(lab)
    assert open_fds() == fds_before


async def test_bytes_stream_before_the_download_completes(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    data = blob(4 * MiB)
    async with open_lab(tmp_path) as lab:
        digest = lab.fake.add_blob(data)
        outcome = await drain(lab.subscribe(digest))
        assert outcome.data == data
        assert outcome.first_byte_at is not None
        # First bytes after a flush interval or a chunk, not after the whole 0.64 s transfer.
        assert outcome.first_byte_at < 0.1
        assert outcome.ended_at >= 0.64


async def test_a_client_that_stops_reading_delays_nobody(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    data = blob(4 * MiB)
    async with open_lab(tmp_path) as lab:
        digest = lab.fake.add_blob(data)
        stuck = lab.subscribe(digest)
        await stuck.wait_size()
        assert await stuck.read(1000)  # reads once, then never again
        outcome = await drain(lab.subscribe(digest))
        assert outcome.data == data
        assert outcome.ended_at < 0.7  # the upstream's pace, unaffected by the stuck reader
        assert lab.store.blob_size(parse_digest(digest)) == len(data)
        # The stuck client can still finish later, from the committed file.
        rest = await drain(stuck)
        assert rest.error is None
        assert len(rest.data) == len(data) - 1000


async def test_fifty_clients_mean_one_upstream_request(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    data = blob(1 * MiB)
    async with open_lab(tmp_path) as lab:
        digest = lab.fake.add_blob(data)
        results: list[Outcome] = []
        async with trio.open_nursery() as clients:
            for i in range(50):
                clients.start_soon(join_later, lab, digest, i * 0.003, results)
        assert len(results) == 50
        assert all(r.error is None and r.data == data for r in results)
        assert len(lab.fake.blob_gets(digest)) == 1


async def test_upstream_drop_ends_every_subscriber_promptly_and_cleans_up(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    data = blob(4 * MiB)
    drop_at = 1 * MiB + 12345
    fds_before = open_fds()
    async with open_lab(tmp_path, max_retries=0) as lab:
        digest = lab.fake.add_blob(data)
        lab.fake.faults[digest] = [Fault(drop_at=drop_at)]
        results: list[Outcome] = []
        async with trio.open_nursery() as clients:
            for delay in (0.0, 0.05, 0.1):
                clients.start_soon(join_later, lab, digest, delay, results)
        # The drop happens at ~0.17 s (drop_at / 6.4 MB/s); everyone ends at that moment.
        drop_time = 0.01 * (drop_at // (64 * 1024) + 1)
        for outcome in results:
            assert outcome.error is not None
            assert outcome.error.status == 502
            assert len(outcome.data) <= drop_at
            assert outcome.data == data[: len(outcome.data)]
            assert outcome.ended_at - drop_time < 0.02
        assert lab.store.blob_size(parse_digest(digest)) is None
        await trio.testing.wait_all_tasks_blocked()
        assert_clean(lab)
        # The next request starts afresh and succeeds.
        again = await drain(lab.subscribe(digest))
        assert again.error is None and again.data == data
        assert len(lab.fake.blob_gets(digest)) == 2
    assert open_fds() == fds_before


@pytest.mark.parametrize("zero_copy", [False, True], ids=["bytes", "file-ranges"])
async def test_corrupt_upstream_bytes_never_yield_a_complete_body(
    tmp_path: Path, autojump_clock: trio.abc.Clock, zero_copy: bool
) -> None:
    data = blob(2 * MiB)
    async with open_lab(tmp_path) as lab:
        digest = lab.fake.add_blob(data)
        lab.fake.faults[digest] = [Fault(corrupt_at=len(data) - 1)]  # even the very last byte
        results: list[Outcome] = []
        async with trio.open_nursery() as clients:
            for delay in (0.0, 0.1, 0.3):
                clients.start_soon(join_later, lab, digest, delay, results, zero_copy)
        for outcome in results:
            assert outcome.error is not None
            assert outcome.error.code == "DIGEST_INVALID"
            assert len(outcome.data) < len(data)  # always short of Content-Length
        assert lab.registry.totals().failures == {"digest_mismatch": 1}
        assert lab.registry.totals().committed == 0
        assert len(lab.fake.blob_gets(digest)) == 1  # wrong content is not asked for again
        assert lab.store.blob_size(parse_digest(digest)) is None
        await trio.testing.wait_all_tasks_blocked()
        assert_clean(lab)


async def test_short_body_is_a_failure_not_a_complete_blob(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    data = blob(1 * MiB)
    async with open_lab(tmp_path) as lab:
        digest = lab.fake.add_blob(data)
        lab.fake.faults[digest] = [Fault(short_by=10)]
        outcome = await drain(lab.subscribe(digest))
        assert outcome.error is not None
        assert outcome.error.code == "SIZE_INVALID"
        assert len(outcome.data) < len(data)
        assert lab.registry.totals().failures == {"size_mismatch": 1}
        assert lab.store.blob_size(parse_digest(digest)) is None


@pytest.mark.parametrize(
    ("status", "expected_status", "expected_code"),
    [
        (404, 404, "BLOB_UNKNOWN"),
        (401, 401, "UNAUTHORIZED"),
        (403, 403, "DENIED"),
        (429, 429, "TOOMANYREQUESTS"),
        (500, 502, "UNAVAILABLE"),
        (503, 503, "UNAVAILABLE"),
    ],
)
async def test_upstream_error_status_reaches_every_subscriber_before_any_byte(
    tmp_path: Path,
    autojump_clock: trio.abc.Clock,
    status: int,
    expected_status: int,
    expected_code: str,
) -> None:
    data = blob(100_000)
    async with open_lab(tmp_path, max_retries=0) as lab:
        digest = lab.fake.add_blob(data)
        lab.fake.faults[digest] = [Fault(status=status)]
        subscribers = [lab.subscribe(digest) for _ in range(3)]
        for subscriber in subscribers:
            with pytest.raises(RegistryError) as caught:
                await subscriber.wait_size()
            subscriber.close()
            assert (caught.value.status, caught.value.code) == (expected_status, expected_code)
        await trio.testing.wait_all_tasks_blocked()
        assert_clean(lab)


async def test_stall_past_the_read_timeout_fails_the_download(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    data = blob(1 * MiB)
    async with open_lab(tmp_path, max_retries=0) as lab:
        digest = lab.fake.add_blob(data)
        lab.fake.faults[digest] = [Fault(stall_at=300_000)]
        outcome = await drain(lab.subscribe(digest))
        assert outcome.error is not None and outcome.error.status == 504
        stalled_at = 0.01 * (300_000 // (64 * 1024) + 1)
        assert outcome.ended_at == pytest.approx(stalled_at + STALL_TIMEOUT, abs=0.02)
        await trio.testing.wait_all_tasks_blocked()
        assert_clean(lab)


async def test_drop_is_resumed_with_a_range_request(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    data = blob(2 * MiB)
    async with open_lab(tmp_path, max_retries=3) as lab:
        digest = lab.fake.add_blob(data)
        lab.fake.faults[digest] = [Fault(drop_at=700_000), Fault(stall_at=100_000)]
        results: list[Outcome] = []
        async with trio.open_nursery() as clients:
            for delay in (0.0, 0.5):
                clients.start_soon(join_later, lab, digest, delay, results)
        assert all(r.error is None and r.data == data for r in results)
        gets = lab.fake.blob_gets(digest)
        assert len(gets) == 3
        assert lab.registry.totals().resumes == 2
        assert lab.registry.totals().upstream_bytes == len(data)  # nothing fetched twice
        assert "Range" not in gets[0].headers
        # Batches before the drop were kept, so the resume asks for what is missing only.
        first_resume = int(gets[1].headers["Range"].removeprefix("bytes=").rstrip("-"))
        second_resume = int(gets[2].headers["Range"].removeprefix("bytes=").rstrip("-"))
        assert 0 < first_resume <= 700_000
        assert first_resume < second_resume <= first_resume + 100_000


async def test_upstream_that_ignores_range_restarts_without_corrupting_anyone(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    data = blob(2 * MiB)
    async with open_lab(tmp_path, max_retries=2) as lab:
        digest = lab.fake.add_blob(data)
        lab.fake.faults[digest] = [Fault(drop_at=1 * MiB), Fault(ignore_range=True)]
        outcome = await drain(lab.subscribe(digest))
        assert outcome.error is None
        assert hashlib.sha256(outcome.data).hexdigest() == digest.removeprefix("sha256:")


async def test_client_disconnect_never_cancels_the_download(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    data = blob(2 * MiB)
    async with open_lab(tmp_path) as lab:
        digest = lab.fake.add_blob(data)
        subscriber = lab.subscribe(digest)
        await subscriber.wait_size()
        await subscriber.read(1000)
        subscriber.close()  # the only client goes away
        download = lab.registry.get(parse_digest(digest))
        assert download is not None
        await download.wait_finished()
        assert download.verified
        assert lab.store.blob_size(parse_digest(digest)) == len(data)
        stored = lab.store.blob_path(parse_digest(digest)).read_bytes()
        assert stored == data


async def test_range_of_an_in_flight_blob_is_served_as_bytes_arrive(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    data = blob(4 * MiB)
    async with open_lab(tmp_path) as lab:
        digest = lab.fake.add_blob(data)
        first = lab.subscribe(digest)
        await first.wait_size()
        ranged = lab.subscribe(digest)
        await ranged.wait_size()
        ranged.select_range(1 * MiB, 1 * MiB + 1000)
        middle = await drain(ranged)
        assert middle.data == data[1 * MiB : 1 * MiB + 1000]
        # Even a range that ends mid-blob waits for verification of the whole blob.
        assert middle.ended_at >= 0.64
        assert (await drain(first)).data == data


@pytest.mark.parametrize(
    ("error", "status"),
    [
        # A full disk is "come back later" (eviction may make room), like a 503 upstream.
        (errno.ENOSPC, 503),
        (errno.EIO, 500),
    ],
    ids=["ENOSPC", "EIO"],
)
async def test_disk_error_fails_the_download_cleanly(
    tmp_path: Path,
    autojump_clock: trio.abc.Clock,
    monkeypatch: pytest.MonkeyPatch,
    error: int,
    status: int,
) -> None:
    data = blob(1 * MiB)
    calls = 0
    real_pwrite = os.pwrite

    def failing_pwrite(fd: int, buffer: memoryview, offset: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(error, os.strerror(error))
        return real_pwrite(fd, buffer, offset)

    async with open_lab(tmp_path) as lab:
        digest = lab.fake.add_blob(data)
        monkeypatch.setattr(os, "pwrite", failing_pwrite)
        outcome = await drain(lab.subscribe(digest))
        monkeypatch.undo()
        assert outcome.error is not None and outcome.error.status == status
        await trio.testing.wait_all_tasks_blocked()
        assert_clean(lab)
        assert (await drain(lab.subscribe(digest))).data == data


async def test_hashing_runs_beside_the_writes_and_ends_before_the_last_byte(
    tmp_path: Path, autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch is hashed in a thread of its own while it is written (issue 11): with the hash
    stuck, bytes are still written and streamed, but the last byte waits for every hash."""
    data = blob(1 * MiB)
    gate = threading.Event()

    class GatedHash:
        def __init__(self, algorithm: str) -> None:
            self._real = hashlib.new(algorithm)

        def update(self, data: bytes) -> None:
            gate.wait(5)  # real seconds: only ever reached when the test fails
            self._real.update(data)

        def hexdigest(self) -> str:
            return self._real.hexdigest()

    monkeypatch.setattr(_producer, "hashlib", SimpleNamespace(new=GatedHash))
    try:
        async with open_lab(tmp_path) as lab:
            digest = lab.fake.add_blob(data)
            subscriber = lab.subscribe(digest)
            download = subscriber.download
            results: list[Outcome] = []

            async def client() -> None:
                results.append(await drain(subscriber))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(client)
                with trio.fail_after(STALL_TIMEOUT / 2):
                    while download.available == 0:
                        await trio.sleep(0.01)
                await trio.sleep(1)  # the whole body has arrived by now
                # Written while its hash has not finished: not verified, nothing released.
                assert 0 < download.available < len(data)
                assert not download.verified and not results
                gate.set()
            assert results[0].error is None and results[0].data == data
    finally:
        gate.set()


async def test_shutdown_cancels_producers_and_removes_partials(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    data = blob(4 * MiB)
    results: list[Outcome] = []
    async with open_lab(tmp_path) as lab:
        digest = lab.fake.add_blob(data)
        lab.nursery.start_soon(join_later, lab, digest, 0.0, results)
        await trio.sleep(0.2)
        lab.nursery.cancel_scope.cancel()
    assert results == [] or results[0].error is not None
    assert lab.partials() == []
    assert lab.store.blob_size(parse_digest(digest)) is None


def test_digest_dataclass_is_the_registry_key() -> None:
    digest = parse_digest("sha256:" + "a" * 64)
    assert digest == Digest("sha256", "a" * 64)
    assert str(digest) == "sha256:" + "a" * 64
