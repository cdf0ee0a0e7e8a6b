"""Single-flight across worker processes that share one cache (``_lease``).

Two registries, each with its own Store over the same cache root, stand for two worker
processes: ``flock`` locks belong to open file descriptions, so they conflict between the two
exactly as between processes.  The process-level proof (hypercorn with two workers, the real
registry and skopeo) is in test_workers_process.py and test_e2e.py.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import trio

from streamsync_trio._reference import parse_digest
from streamsync_trio.core._downloads import Subscriber
from streamsync_trio.core._lease import Followed, Owned, claim
from streamsync_trio.core._store import Store

from ..labs.corelab import Lab, MiB, Outcome, blob, drain, open_lab, second_worker
from ..labs.fakes import FakeRegistry, Fault


def leftovers(lab: Lab) -> list[str]:
    return sorted(p.name for p in (*lab.partials(), *lab.store.lease_dir.iterdir()))


async def test_a_second_worker_follows_the_first_and_the_upstream_is_asked_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    data = blob(4 * MiB)  # 6.4 MB/s: about 0.65 s
    async with open_lab(tmp_path) as one:
        digest = one.fake.add_blob(data)
        async with second_worker(one) as two:
            owner = one.subscribe(digest)
            await trio.sleep(0.2)
            follower = two.subscribe(digest)
            assert follower.download.followed
            assert not owner.download.followed
            # A late joiner in the second worker joins its follower, not a third download.
            await trio.sleep(0.1)
            late = two.subscribe(digest)
            assert late.download is follower.download
            async with trio.open_nursery() as nursery:
                outcomes: list[Outcome] = []

                async def run(subscriber: Subscriber) -> None:
                    outcomes.append(await drain(subscriber))

                for subscriber in (owner, follower, late):
                    nursery.start_soon(run, subscriber)
            assert [o.error for o in outcomes] == [None, None, None]
            assert all(o.data == data for o in outcomes)
            # Bytes reached every reader while the owner was still downloading (~0.65 s).
            assert all(o.first_byte_at is not None and o.first_byte_at < 0.5 for o in outcomes)
            assert len(one.fake.blob_gets(digest)) == 1
            assert follower.download.verified
            assert follower.download.path == one.store.blob_path(parse_digest(digest))
            assert two.store.usage().blobs == 1  # the follower counted the commit
            assert len(two.registry) == 0 and two.nursery.child_tasks == frozenset()
        assert leftovers(one) == []


async def test_a_follower_never_completes_a_body_the_owner_could_not_verify(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    data = blob(2 * MiB)
    async with open_lab(tmp_path) as one:
        digest = one.fake.add_blob(data)
        one.fake.faults[digest] = [Fault(corrupt_at=len(data) - 1)]  # even the last byte
        async with second_worker(one) as two:
            owner = one.subscribe(digest)
            await trio.sleep(0.1)
            follower = two.subscribe(digest)
            assert follower.download.followed
            mine, theirs = await drain(owner), await drain(follower)
            assert mine.error is not None and mine.error.code == "DIGEST_INVALID"
            assert theirs.error is not None and theirs.error.status == 502
            assert "another worker" in theirs.error.message
            # Short of the Content-Length: a client can tell it is incomplete.
            assert len(theirs.data) < len(data)
            assert len(one.fake.blob_gets(digest)) == 1
        assert leftovers(one) == []
        assert one.store.blob_size(parse_digest(digest)) is None


async def test_a_crashed_owner_fails_its_followers_and_the_next_request_starts_afresh(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    data = blob(1 * MiB)
    async with open_lab(tmp_path) as one:
        digest = one.fake.add_blob(data)
        # A worker that claimed the digest, wrote half and published the size, then died:
        # its lock drops with its file descriptor, and nothing of its cleanup runs.
        dead = claim(one.store.lease_dir, one.store.partial_dir, parse_digest(digest))
        assert isinstance(dead, Owned)
        dead.partial.write_bytes(data[: len(data) // 2])
        dead.publish_size(len(data))
        follower = one.subscribe(digest)
        assert follower.download.followed
        assert await follower.wait_size() == len(data)
        os.close(dead.fd)  # the "kill -9"
        outcome = await drain(follower)
        assert outcome.error is not None and outcome.error.status == 502
        assert outcome.data == data[: len(data) // 2]
        assert len(one.fake.blob_gets(digest)) == 0
        # The dead worker's partial and lease are still there; the next request takes over.
        assert dead.partial.exists()
        retry = await drain(one.subscribe(digest))
        assert retry.error is None and retry.data == data
        assert len(one.fake.blob_gets(digest)) == 1
        assert leftovers(one) == []


async def test_a_worker_that_claims_after_the_owner_committed_serves_the_stored_blob(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    data = blob(512 * 1024)
    async with open_lab(tmp_path) as one:
        digest = one.fake.add_blob(data)
        assert (await drain(one.subscribe(digest))).data == data
        async with second_worker(one) as two:
            # The HTTP layer looked in the store before the commit; it subscribes after it.
            late = two.subscribe(digest)
            assert late.download.verified
            assert (await drain(late)).data == data
        assert len(one.fake.blob_gets(digest)) == 1
        assert leftovers(one) == []


async def test_the_owner_failing_upstream_fails_followers_promptly(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    fake = FakeRegistry(chunk_delay=0.01)
    data = blob(2 * MiB)
    digest = fake.add_blob(data)
    fake.faults[digest] = [Fault(drop_at=MiB)]  # no retries in this lab: the owner fails
    async with open_lab(tmp_path, fake=fake) as one, second_worker(one) as two:
        owner = one.subscribe(digest)
        await trio.sleep(0.05)
        follower = two.subscribe(digest)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain, owner)
            started = trio.current_time()
            outcome = await drain(follower)
        assert outcome.error is not None
        # Failed within a poll of the owner's failure (the drop comes at about 0.16 s).
        assert trio.current_time() - started < 0.5
        assert len(outcome.data) < len(data)
        assert leftovers(one) == []


def test_startup_cleanup_removes_only_what_no_live_worker_owns(tmp_path: Path) -> None:
    store = Store(tmp_path / "cache")
    live_digest = parse_digest("sha256:" + hashlib.sha256(b"live").hexdigest())
    dead_digest = parse_digest("sha256:" + hashlib.sha256(b"dead").hexdigest())
    live = claim(store.lease_dir, store.partial_dir, live_digest)
    dead = claim(store.lease_dir, store.partial_dir, dead_digest)
    assert isinstance(live, Owned) and isinstance(dead, Owned)
    for lease in (live, dead):
        lease.partial.write_bytes(b"some bytes")
        lease.publish_size(100)
    os.close(dead.fd)  # died
    stray = store.partial_dir / "sha256-0123.abcdef"  # a partial with no lease at all
    stray.write_bytes(b"x")

    assert store.remove_leftover_partials() == 2
    assert sorted(p.name for p in store.partial_dir.iterdir()) == [live.partial.name]
    assert sorted(p.name for p in store.lease_dir.iterdir()) == sorted(
        [live.lease.name, f"{live.lease.name}.{live.partial.name.rpartition('.')[2]}.size"]
    )
    # The live owner is undisturbed and finishes normally.
    other = claim(store.lease_dir, store.partial_dir, live_digest)
    assert isinstance(other, Followed) and other.partial == live.partial
    assert other.size() == 100
    other.close()
    live.partial.unlink()
    live.release()
    assert list(store.lease_dir.iterdir()) == []


@pytest.mark.parametrize("order", ["follower first", "owner first"])
def test_a_lease_is_never_owned_twice(tmp_path: Path, order: str) -> None:
    store = Store(tmp_path / "cache")
    digest = parse_digest("sha256:" + hashlib.sha256(b"x").hexdigest())
    first = claim(store.lease_dir, store.partial_dir, digest)
    second = claim(store.lease_dir, store.partial_dir, digest)
    assert isinstance(first, Owned) and isinstance(second, Followed)
    assert not second.owner_ended()
    if order == "owner first":
        first.release()
        assert second.owner_ended()
        second.close()
    else:
        second.close()
        first.release()
    # After a clean release the next claim owns a fresh generation.
    third = claim(store.lease_dir, store.partial_dir, digest)
    assert isinstance(third, Owned) and third.partial != first.partial
    third.release()


async def test_a_follower_holds_back_the_last_byte_until_the_owner_commits(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Every byte is written, but the owner has not verified and committed: a follower
    delivers all but the last, and when the owner dies instead, the body stays short."""
    data = blob(1 * MiB)
    async with open_lab(tmp_path) as one:
        digest = one.fake.add_blob(data)
        owner = claim(one.store.lease_dir, one.store.partial_dir, parse_digest(digest))
        assert isinstance(owner, Owned)
        owner.partial.write_bytes(data)  # complete, and even correct: still unverified
        owner.publish_size(len(data))
        follower = one.subscribe(digest)
        assert await follower.wait_size() == len(data)
        received = bytearray()
        with trio.move_on_after(2):
            while chunk := await follower.read(100_000):
                received += chunk
        assert bytes(received) == data[:-1]  # blocked on the last byte for 2 s
        os.close(owner.fd)  # the owner dies without committing
        outcome = await drain(follower)
        assert outcome.error is not None and outcome.error.status == 502
        assert outcome.data == b""  # nothing more, ever
        assert len(one.fake.blob_gets(digest)) == 0
