"""A download whose claim does not keep the blob (cluster ``placement = "shard"`` on a node
that is not the digest's home): verified exactly as any other, then streamed through.

Its readers finish from the descriptors they hold although the partial is removed instead
of committed; nothing is stored; the next request downloads it again.  A follower in another
worker process of the same node (lease files, ``_lease``) ends well too: the owner marks the
partial before removing it.  Two registries over one cache root stand for two worker
processes, as in test_workers.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import trio

from streamsync_trio._reference import Digest, parse_digest
from streamsync_trio.core._downloads import BlobSource, Download, Subscriber
from streamsync_trio.core._lease import LeaseFiles, LeaseFollower, Owned
from streamsync_trio.core._registry import DownloadRegistry
from streamsync_trio.core._store import Store

from ..labs.corelab import Lab, MiB, Outcome, blob, drain, open_lab
from ..labs.fakes import Fault


@dataclass
class NotKept:
    """A claim of this machine's lease files that streams its blob through."""

    owned: Owned

    @property
    def partial(self) -> Path:
        return self.owned.partial

    def source(self, upstream: BlobSource, download: Download, *, forwardable: bool) -> BlobSource:
        return upstream

    async def keeps(self, download: Download) -> bool:
        return False

    def publish_size(self, size: int) -> None:
        self.owned.publish_size(size)

    def abandon(self) -> None:
        self.owned.abandon()

    def release(self) -> None:
        self.owned.release()


class PassingThrough:
    """The lease files of one machine, whose claims keep nothing."""

    def __init__(self, store: Store) -> None:
        self._local = LeaseFiles(store)

    def claim(self, digest: Digest) -> NotKept | LeaseFollower | None:
        answer = self._local.claim(digest)
        return NotKept(answer) if isinstance(answer, Owned) else answer


@asynccontextmanager
async def worker(lab: Lab, *, keeps: bool) -> AsyncIterator[Lab]:
    """A 'worker process' on the lab's cache and upstream: own store object, own registry."""
    store = Store(lab.store.root)
    owners = LeaseFiles(store) if keeps else PassingThrough(store)
    async with trio.open_nursery() as nursery:
        registry = DownloadRegistry(store, nursery, chunk_size=256 * 1024, owners=owners)
        yield replace(lab, store=store, registry=registry, nursery=nursery)


def leftovers(lab: Lab) -> list[str]:
    return sorted(p.name for p in (*lab.partials(), *lab.store.lease_dir.iterdir()))


async def read_after_the_drop(lab: Lab, subscriber: Subscriber, zero_copy: bool) -> Outcome:
    """A slow reader: a first piece, then nothing until the download ended and its partial
    is gone by name, then the rest."""
    first = await subscriber.read(100_000)
    await subscriber.download.wait_finished()
    assert subscriber.download.verified and lab.partials() == []
    rest = await drain(subscriber, zero_copy=zero_copy)
    return replace(rest, data=first + rest.data)


@pytest.mark.parametrize("zero_copy", [False, True])
async def test_a_blob_not_kept_reaches_every_reader_and_leaves_nothing(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, zero_copy: bool
) -> None:
    data = blob(3 * MiB)  # 6.4 MB/s: about 0.5 s
    async with open_lab(tmp_path) as lab, worker(lab, keeps=False) as shard:
        digest = lab.fake.add_blob(data)
        first = shard.subscribe(digest)
        await trio.sleep(0.2)
        late = shard.subscribe(digest)
        assert late.download is first.download
        outcomes: list[Outcome] = []
        async with trio.open_nursery() as nursery:

            async def run_fast() -> None:
                outcomes.append(await drain(first, zero_copy=zero_copy))

            async def run_slow() -> None:
                outcomes.append(await read_after_the_drop(shard, late, zero_copy))

            nursery.start_soon(run_fast)
            nursery.start_soon(run_slow)
        assert [(o.error, o.data == data) for o in outcomes] == [(None, True), (None, True)]
        # Verified like any download, then not committed: nothing stored, nothing left.
        assert shard.store.blob_size(parse_digest(digest)) is None
        assert shard.store.usage().blobs == 0
        totals = shard.registry.totals()
        assert (totals.started, totals.committed, totals.failures) == (1, 0, {})
        assert len(shard.registry) == 0 and leftovers(shard) == []
        # The next request downloads it again (in a cluster: from the digest's home).
        again = await drain(shard.subscribe(digest))
        assert again.error is None and again.data == data
        assert len(lab.fake.blob_gets(digest)) == 2
        assert leftovers(shard) == []


async def test_a_worker_following_an_owner_that_does_not_keep_the_blob_finishes_too(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    data = blob(3 * MiB)
    async with (
        open_lab(tmp_path) as lab,
        worker(lab, keeps=False) as one,
        worker(lab, keeps=True) as two,
    ):
        digest = lab.fake.add_blob(data)
        owner = one.subscribe(digest)
        await trio.sleep(0.2)
        follower = two.subscribe(digest)
        assert follower.download.followed
        outcomes: list[Outcome] = []
        async with trio.open_nursery() as nursery:

            async def run(subscriber: Subscriber) -> None:
                outcomes.append(await drain(subscriber))

            nursery.start_soon(run, owner)
            nursery.start_soon(run, follower)
        assert [(o.error, o.data == data) for o in outcomes] == [(None, True), (None, True)]
        assert len(lab.fake.blob_gets(digest)) == 1
        assert follower.download.verified
        # Not stored, and not counted as stored by the follower either.
        assert lab.store.blob_size(parse_digest(digest)) is None
        assert two.store.usage().blobs == 0
        assert len(two.registry) == 0 and leftovers(two) == []


async def test_a_damaged_blob_not_kept_never_completes_in_any_worker(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    data = blob(2 * MiB)
    async with (
        open_lab(tmp_path) as lab,
        worker(lab, keeps=False) as one,
        worker(lab, keeps=True) as two,
    ):
        digest = lab.fake.add_blob(data)
        lab.fake.faults[digest] = [Fault(corrupt_at=len(data) // 2)]
        owner = one.subscribe(digest)
        await trio.sleep(0.1)
        follower = two.subscribe(digest)
        assert follower.download.followed
        mine, theirs = await drain(owner), await drain(follower)
        assert mine.error is not None and mine.error.code == "DIGEST_INVALID"
        assert theirs.error is not None and theirs.error.status == 502
        assert len(mine.data) < len(data) and len(theirs.data) < len(data)
        assert lab.store.blob_size(parse_digest(digest)) is None
        assert leftovers(two) == []
