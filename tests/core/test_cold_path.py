"""The cold path's order of events (issue 11): clients get verified bytes before durability.

An fsync of a large blob takes long (0.46 s for 256 MiB on the development disk); the clients
need the bytes checked, not the cache durable, so the last byte is released once the digest
is verified, and the fsync and the rename that makes the blob visible follow.  Only the end
of each response (the body's final ``b""``) waits for the commit, so whoever looks at the
store when a response has ended finds the blob there.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest
import trio
import trio.testing

from streamsync_trio._reference import parse_digest

from ..labs.corelab import MiB, assert_clean, blob, drain, open_lab
from ..labs.fakes import FakeRegistry


async def test_the_last_byte_does_not_wait_for_the_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = blob(3 * MiB)
    fsync_may_end = threading.Event()
    fsyncs: list[int] = []
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        fsyncs.append(fd)
        fsync_may_end.wait(timeout=30)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    async with open_lab(tmp_path, fake=FakeRegistry()) as lab:
        try:
            digest = lab.fake.add_blob(data)
            subscriber = lab.subscribe(digest)
            received = bytearray()
            with trio.fail_after(10):
                await subscriber.wait_size()
                while len(received) < len(data):
                    received += await subscriber.read(MiB)
                while not fsyncs:
                    await trio.sleep(0.01)
            # Every byte, verified, while the fsync has not ended.
            assert received == data
            assert not fsync_may_end.is_set()
            assert subscriber.download.released and not subscriber.download.verified
            # Not visible in the store before it is durable, and the response not ended.
            assert lab.store.blob_size(parse_digest(digest)) is None
            with trio.move_on_after(0.2) as waiting:
                await subscriber.read(MiB)
            assert waiting.cancelled_caught
            fsync_may_end.set()
            with trio.fail_after(10):
                assert await subscriber.read(MiB) == b""
            # Ended with the commit, in the same step.
            assert lab.store.blob_size(parse_digest(digest)) == len(data)
            assert lab.store.blob_path(parse_digest(digest)).read_bytes() == data
            subscriber.close()
        finally:
            fsync_may_end.set()  # a failed check must not leave the producer's thread stuck


async def test_a_failed_fsync_after_the_release_stores_nothing(
    tmp_path: Path, autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The clients had every verified byte; the commit fails: their responses end with the
    error (cut short after the last byte, which costs a client nothing), nothing is stored,
    nothing is left behind, and the next request fetches again."""
    data = blob(1 * MiB)

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    async with open_lab(tmp_path) as lab:
        digest = lab.fake.add_blob(data)
        monkeypatch.setattr(os, "fsync", failing_fsync)
        outcome = await drain(lab.subscribe(digest))
        monkeypatch.undo()
        assert outcome.data == data
        assert outcome.error is not None and outcome.error.status == 500
        assert lab.store.blob_size(parse_digest(digest)) is None
        await trio.testing.wait_all_tasks_blocked()
        assert_clean(lab)
        assert (await drain(lab.subscribe(digest))).data == data
        assert len(lab.fake.blob_gets(digest)) == 2
