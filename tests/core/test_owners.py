"""The registry's seam for cluster mode (``_owners``): it asks one ``Owners`` who owns a digest.

A registry driven by a tiny in-memory ``Owners``, with no lease file anywhere, shows that it
talks to the interface only: it follows an owner elsewhere that commits (and holds the last
byte back until then) or fails, and it produces a blob it claimed through the claim's
methods.  The lease-file implementation is exercised by test_workers.py.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from streamsync_trio import RegistryError
from streamsync_trio._reference import Digest, parse_digest
from streamsync_trio.core._downloads import BlobSource, Download
from streamsync_trio.core._registry import DownloadRegistry
from streamsync_trio.core._retry import RetryPolicy
from streamsync_trio.core._store import Store

from ..labs.corelab import MiB, blob, drain

PIECE = 64 * 1024


def digest_of(data: bytes) -> Digest:
    return parse_digest("sha256:" + hashlib.sha256(data).hexdigest())


@dataclass
class MemoryClaim:
    """This process owns the digest: a partial of our own, and a record of the calls."""

    partial: Path
    sizes: list[int] = field(default_factory=list)
    state: str = "held"
    forwardable: list[bool] = field(default_factory=list)

    def source(self, upstream: BlobSource, download: Download, *, forwardable: bool) -> BlobSource:
        self.forwardable.append(forwardable)
        return upstream

    def publish_size(self, size: int) -> None:
        self.sizes.append(size)

    async def keeps(self, download: Download) -> bool:
        return True

    def abandon(self) -> None:
        self.partial.unlink(missing_ok=True)
        self.state = "abandoned"

    def release(self) -> None:
        self.state = "released"


class ScriptedOwner:
    """An owner elsewhere, played in this process: it writes ``data`` a piece at a time into
    its own file and mirrors that into the download; it fails at ``fail_at`` bytes, or waits
    for ``commit`` and commits the file into the store."""

    def __init__(self, store: Store, data: bytes, path: Path, fail_at: int | None = None):
        self._store = store
        self._data = data
        self._file = path
        path.write_bytes(b"")
        self._hold = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.fail_at = fail_at
        self.commit = trio.Event()
        self.closed = 0

    @property
    def path(self) -> Path:
        return self._file

    def open_reader(self) -> int:
        return os.dup(self._hold)

    async def follow(self, download: Download) -> bool:
        download.set_size(len(self._data))
        for offset in range(0, len(self._data), PIECE):
            if self.fail_at is not None and offset >= self.fail_at:
                raise RegistryError(502, "UNAVAILABLE", "the owner elsewhere failed")
            piece = self._data[offset : offset + PIECE]
            with self._file.open("ab") as file:
                file.write(piece)
            download.advance(offset + len(piece))
            await trio.sleep(0.01)
        await self.commit.wait()
        download.path = self._store.commit_blob(self._file, download.digest)
        return True

    def close(self) -> None:
        os.close(self._hold)
        self.closed += 1


class MemoryOwners:
    """Digests in ``elsewhere`` are owned by that scripted owner (once); any other digest is
    claimed by this process."""

    def __init__(self, partials: Path) -> None:
        self._partials = partials
        self.elsewhere: dict[Digest, ScriptedOwner] = {}
        self.claims: list[MemoryClaim] = []

    def claim(self, digest: Digest) -> MemoryClaim | ScriptedOwner | None:
        owner = self.elsewhere.pop(digest, None)
        if owner is not None:
            return owner
        claim = MemoryClaim(self._partials / f"{digest.hex}.{len(self.claims)}")
        claim.partial.touch()
        self.claims.append(claim)
        return claim


@dataclass
class Body:
    total_size: int | None
    offset: int
    chunks: AsyncIterator[bytes]


async def pieces(data: bytes) -> AsyncIterator[bytes]:
    for offset in range(0, len(data), PIECE):
        await trio.sleep(0.01)
        yield data[offset : offset + PIECE]


@asynccontextmanager
async def upstream(data: bytes, asked: list[int], offset: int) -> AsyncIterator[Body]:
    asked.append(offset)
    yield Body(len(data), 0, pieces(data))


def no_leases(store: Store) -> bool:
    return not any(store.lease_dir.iterdir())


async def test_the_registry_follows_an_owner_elsewhere_that_commits(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    data = blob(MiB)
    digest = digest_of(data)
    store = Store(tmp_path / "cache")
    owners = MemoryOwners(store.partial_dir)
    owner = ScriptedOwner(store, data, tmp_path / "elsewhere")
    owners.elsewhere[digest] = owner
    asked: list[int] = []
    async with trio.open_nursery() as nursery:
        registry = DownloadRegistry(store, nursery, owners=owners)
        subscriber = registry.subscribe(
            digest, partial(upstream, data, asked), stall_timeout=5, retry=RetryPolicy()
        )
        assert subscriber.download.followed and registry.get(digest) is subscriber.download
        received = b""
        while len(received) < len(data) - 1:
            received += await subscriber.read(MiB)
        # Every byte is there, but the owner has not committed: the last one waits.
        with trio.move_on_after(1) as held:
            await subscriber.read(MiB)
        assert held.cancelled_caught and received == data[:-1]
        owner.commit.set()
        received += await subscriber.read(MiB)
        assert received == data and await subscriber.read(MiB) == b""
        subscriber.close()
        assert len(registry) == 0 and owner.closed == 1
        # Committed elsewhere, verified there: trusted here, served with no check.
        stored = registry.open_stored(digest)
        assert stored is not None and stored.download.verified
        stored.close()
    assert store.blob_path(digest).read_bytes() == data
    assert asked == [] and owners.claims == [] and no_leases(store)


async def test_an_owner_elsewhere_that_fails_ends_the_bodies_short_and_the_next_one_claims(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    data = blob(MiB)
    digest = digest_of(data)
    store = Store(tmp_path / "cache")
    owners = MemoryOwners(store.partial_dir)
    owner = ScriptedOwner(store, data, tmp_path / "elsewhere", fail_at=MiB // 2)
    owners.elsewhere[digest] = owner
    asked: list[int] = []
    source = partial(upstream, data, asked)
    async with trio.open_nursery() as nursery:
        registry = DownloadRegistry(store, nursery, owners=owners)
        failed = await drain(
            registry.subscribe(digest, source, stall_timeout=5, retry=RetryPolicy())
        )
        assert failed.error is not None and failed.error.status == 502
        assert len(failed.data) <= MiB // 2 and data.startswith(failed.data)
        assert len(registry) == 0 and owner.closed == 1 and asked == []
        assert store.blob_size(digest) is None
        # The owner is gone: this process claims the digest and fetches it itself.
        done = await drain(registry.subscribe(digest, source, stall_timeout=5, retry=RetryPolicy()))
        assert done.error is None and done.data == data
        assert len(registry) == 0
    assert asked == [0]
    [claim] = owners.claims
    assert (claim.sizes, claim.state) == ([MiB], "released")
    assert claim.forwardable == [True]  # a client's request, through the claim's source
    assert not claim.partial.exists() and store.blob_path(digest).read_bytes() == data
    assert no_leases(store)
