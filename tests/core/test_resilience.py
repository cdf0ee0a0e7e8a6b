"""How the core treats a struggling upstream: rate limits, concurrency caps, cool-downs.

Virtual time throughout (autojump clock), so "waited 3 s before asking again" is exact.
"""

from __future__ import annotations

import email.utils
import time
from pathlib import Path

import pytest
import trio

from streamsync_trio.upstream._client import parse_retry_after

from ..labs.corelab import MiB, Outcome, blob, drain, join_later, open_lab
from ..labs.fakes import Fault


def request_times(times: list[float]) -> list[float]:
    return [round(t, 2) for t in times]


async def test_429_with_retry_after_is_honoured_then_the_download_completes(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    data = blob(1 * MiB)
    async with open_lab(tmp_path, max_retries=3) as lab:
        digest = lab.fake.add_blob(data)
        lab.fake.faults[digest] = [Fault(status=429, headers={"Retry-After": "3"})]
        outcome = await drain(lab.subscribe(digest))
        assert outcome.error is None
        assert outcome.data == data
        assert len(lab.fake.blob_gets(digest)) == 2
        # First byte only after the upstream's 3 s, and no request in between.
        assert outcome.first_byte_at is not None
        assert outcome.first_byte_at >= 3.0


async def test_cool_down_after_429_covers_other_blobs_too(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    first, second = blob(200_000), blob(200_000)
    async with open_lab(tmp_path, max_retries=3) as lab:
        first_digest = lab.fake.add_blob(first)
        second_digest = lab.fake.add_blob(second)
        lab.fake.faults[first_digest] = [Fault(status=429, headers={"Retry-After": "10"})]
        results: list[Outcome] = []
        async with trio.open_nursery() as clients:
            clients.start_soon(join_later, lab, first_digest, 0.0, results)
            clients.start_soon(join_later, lab, second_digest, 1.0, results)
        assert all(r.error is None for r in results)
        # The second blob was asked for at 1 s but not sent upstream before the 10 s passed.
        assert len(lab.fake.blob_gets(second_digest)) == 1
        assert all(r.first_byte_at is not None and r.first_byte_at >= 10.0 for r in results)


async def test_429_without_retries_left_reaches_the_client_with_retry_after(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    async with open_lab(tmp_path, max_retries=0) as lab:
        digest = lab.fake.add_blob(blob(1000))
        lab.fake.faults[digest] = [Fault(status=429, headers={"Retry-After": "7"})]
        outcome = await drain(lab.subscribe(digest))
        assert outcome.error is not None
        assert outcome.error.status == 429
        assert outcome.error.headers["Retry-After"] == "7"
        # And while the cool-down lasts, nothing more is sent upstream.
        again = await drain(lab.subscribe(digest))
        assert again.error is not None
        assert again.error.status == 429
        assert int(again.error.headers["Retry-After"]) <= 7
        assert len(lab.fake.blob_gets(digest)) == 1


async def test_concurrent_upstream_requests_are_capped(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    blobs = [blob(512 * 1024) for _ in range(5)]
    async with open_lab(tmp_path, max_concurrent=2) as lab:
        digests = [lab.fake.add_blob(b) for b in blobs]
        results: list[Outcome] = []
        async with trio.open_nursery() as clients:
            for digest in digests:
                clients.start_soon(join_later, lab, digest, 0.0, results)
        assert all(r.error is None for r in results)
        assert sorted(r.data for r in results) == sorted(blobs)
        assert lab.fake.peak_open_bodies == 2


async def test_a_full_queue_answers_429_instead_of_waiting(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    async with open_lab(tmp_path, max_concurrent=1, max_queue=1) as lab:
        digests = [lab.fake.add_blob(blob(512 * 1024)) for _ in range(3)]
        results: list[Outcome] = []
        async with trio.open_nursery() as clients:
            for i, digest in enumerate(digests):
                clients.start_soon(join_later, lab, digest, i * 0.001, results)
        errors = [r.error for r in results if r.error is not None]
        assert len(errors) == 1
        assert errors[0].status == 429
        assert errors[0].headers["Retry-After"] == "1"
        assert sum(r.error is None for r in results) == 2


@pytest.mark.parametrize(
    ("value", "expected"),
    [("5", 5.0), ("0", 0.0), ("", None), (None, None), ("soon", None), ("-3", None)],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_parse_retry_after_http_date_in_the_past_is_zero() -> None:
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


async def test_an_upstream_that_never_answers_fails_fast_despite_the_retry_budget(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    async with open_lab(tmp_path, max_retries=5) as lab:
        digest = lab.fake.add_blob(blob(1000))
        lab.fake.down = True
        outcome = await drain(lab.subscribe(digest))
        assert outcome.error is not None
        assert outcome.error.status == 502
        assert len(lab.fake.blob_gets(digest)) == 2  # one quick retry for a blip, no more
        assert outcome.ended_at < 1.0  # backoff base 0.1 s: not the whole 5-retry schedule


async def test_retry_after_as_an_http_date_is_honoured_too(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    data = blob(100_000)
    when = email.utils.formatdate(time.time() + 6, usegmt=True)
    # One retry only: it must be spent after the upstream's date, not wasted before it.
    async with open_lab(tmp_path, max_retries=1) as lab:
        digest = lab.fake.add_blob(data)
        lab.fake.faults[digest] = [Fault(status=503, headers={"Retry-After": when})]
        outcome = await drain(lab.subscribe(digest))
        assert outcome.error is None
        assert outcome.data == data
        assert outcome.first_byte_at is not None
        assert outcome.first_byte_at >= 4.0  # the date is whole seconds; it took effect
        assert len(lab.fake.blob_gets(digest)) == 2
