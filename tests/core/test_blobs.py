"""The blob service without HTTP: repository scoping, the choice of source, hit/join/miss.

Over the core lab (a store, a download registry, an upstream over the fake registry, virtual
time).  The fake's ``private`` marks a blob readable only under some repositories, as a real
registry does for a private repository's layers.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from streamsync_trio import RegistryError
from streamsync_trio._reference import parse_digest
from streamsync_trio.core import BlobHead, BlobRead, BlobService
from streamsync_trio.core._blobs import Source

from ..labs.corelab import REPO, Lab, MiB, blob, drain, open_lab

OTHER = "library/other"


def heads(lab: Lab, digest: str, repo: str) -> list[httpx.Request]:
    return [
        r
        for r in lab.fake.requests
        if r.method == "HEAD" and r.url.path == f"/v2/{repo}/blobs/{digest}"
    ]


async def read_all(service: BlobService, opened: BlobRead | BlobHead) -> bytes:
    """Read a blob the way a GET response does: admitted, then drained."""
    assert isinstance(opened, BlobRead)
    await opened.subscriber.wait_answer()
    await service.admit(opened, count=True)
    outcome = await drain(opened.subscriber)
    assert outcome.error is None
    return outcome.data


async def test_a_stored_blob_is_not_served_to_another_repository_unconfirmed(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    data = blob(1 * MiB)
    async with open_lab(tmp_path) as lab:
        service = BlobService(lab.store, lab.registry)
        digest = lab.fake.add_blob(data)
        lab.fake.private[digest] = {REPO, "library/third"}
        key = parse_digest(digest)

        first = await service.open(lab.upstream, REPO, key)
        assert isinstance(first, BlobRead)
        assert (first.source, first.result) == ("stream", "miss")
        assert await read_all(service, first) == data
        assert lab.store.blob_size(key) == len(data)

        # Stored, but for REPO: knowing the digest is not access to it under OTHER.
        with pytest.raises(RegistryError) as refused:
            await service.open(lab.upstream, OTHER, key)
        assert (refused.value.status, refused.value.code) == (404, "BLOB_UNKNOWN")
        assert len(heads(lab, digest, OTHER)) == 1
        assert not lab.store.is_linked(lab.upstream.name, OTHER, key)
        # Asked again at once: the upstream's 404 is remembered, not asked for again.
        with pytest.raises(RegistryError):
            await service.open(lab.upstream, OTHER, key, head=True)
        assert len(heads(lab, digest, OTHER)) == 1

        # Its own repository: a hit, without asking the upstream.
        again = await service.open(lab.upstream, REPO, key)
        assert isinstance(again, BlobRead)
        assert (again.source, again.result) == ("cache", "hit")
        assert await read_all(service, again) == data
        assert len(heads(lab, digest, REPO)) == 0

        # A repository the upstream confirms: served from the cache, and linked for next time.
        third = await service.open(lab.upstream, "library/third", key)
        assert isinstance(third, BlobRead)
        assert (third.source, third.result) == ("cache", "hit")
        assert await read_all(service, third) == data
        assert lab.store.is_linked(lab.upstream.name, "library/third", key)
        assert len(heads(lab, digest, "library/third")) == 1
        assert len(lab.fake.blob_gets(digest)) == 1

        # Refused requests count as nothing.
        assert service.requests == {"hit": 2, "join": 0, "miss": 1}


async def test_a_download_in_flight_is_joined_only_by_its_own_repository(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    data = blob(2 * MiB)  # 0.32 s from the fake
    async with open_lab(tmp_path) as lab:
        service = BlobService(lab.store, lab.registry)
        digest = lab.fake.add_blob(data)
        lab.fake.private[digest] = {REPO}
        key = parse_digest(digest)

        first = await service.open(lab.upstream, REPO, key)
        second = await service.open(lab.upstream, REPO, key)
        assert isinstance(first, BlobRead) and isinstance(second, BlobRead)
        assert (second.source, second.result) == ("stream", "join")
        assert second.subscriber.download is first.subscriber.download
        with pytest.raises(RegistryError) as refused:
            await service.open(lab.upstream, OTHER, key)
        assert refused.value.status == 404
        assert lab.registry.get(key) is not None  # the refusal left the download alone

        async with trio.open_nursery() as clients:
            clients.start_soon(read_all, service, first)
            clients.start_soon(read_all, service, second)
        assert len(lab.fake.blob_gets(digest)) == 1
        assert service.requests == {"hit": 0, "join": 1, "miss": 1}


async def test_a_head_of_a_blob_not_stored_asks_the_upstream_and_counts_nothing(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    data = blob(1 * MiB)
    async with open_lab(tmp_path) as lab:
        service = BlobService(lab.store, lab.registry)
        digest = lab.fake.add_blob(data)
        sources: list[Source] = []
        head = await service.open(
            lab.upstream, REPO, parse_digest(digest), head=True, on_source=sources.append
        )
        assert head == BlobHead(len(data))
        assert sources == ["stream", "upstream"]  # the last word counts: the upstream's HEAD
        assert lab.fake.blob_gets(digest) == []
        assert len(heads(lab, digest, REPO)) == 1
        # A HEAD answered from a stored blob is admitted (linked) but not counted.
        stored = await service.open(lab.upstream, REPO, parse_digest(digest))
        await read_all(service, stored)
        looked = await service.open(lab.upstream, REPO, parse_digest(digest), head=True)
        assert isinstance(looked, BlobRead) and looked.source == "cache"
        await service.admit(looked, count=False)
        looked.subscriber.close()
        assert service.requests == {"hit": 0, "join": 0, "miss": 1}


async def test_a_blob_larger_than_its_bound_is_refused_even_to_a_head(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    async with open_lab(tmp_path) as lab:
        service = BlobService(lab.store, lab.registry, max_blob_size=MiB)
        digest = lab.fake.add_blob(blob(MiB + 1))
        with pytest.raises(RegistryError) as refused:
            await service.open(lab.upstream, REPO, parse_digest(digest), head=True)
        assert (refused.value.status, refused.value.code) == (502, "SIZE_INVALID")
        assert service.requests == {"hit": 0, "join": 0, "miss": 0}
