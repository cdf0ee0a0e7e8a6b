"""Blob downloads are bounded (issue 14, defect 6): by the size a stored manifest declares, by
``max_blob_size``, and by the cache's free space; a blob of unknown length still streams.

Core tests drive the DownloadRegistry under the autojump clock with a fake upstream that can
drop or replace its ``Content-Length`` and send endless bodies; the HTTP tests run the app
under a real hypercorn, one of them reading the wire with a raw socket.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import AsyncIterator, Awaitable, Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from streamsync_trio import RegistryError
from streamsync_trio._config import DEFAULT_MAX_BLOB_SIZE, ConfigError, parse_config
from streamsync_trio._reference import parse_digest
from streamsync_trio.core._descriptors import declared_sizes
from streamsync_trio.core._downloads import Download, Subscriber
from streamsync_trio.core._limits import FREE_SPACE_MARGIN, SizeBound
from streamsync_trio.core._pagecache import FileRange
from streamsync_trio.core._producer import admit
from streamsync_trio.core._registry import DownloadRegistry
from streamsync_trio.core._store import Store

from ..labs.corelab import (
    REPO,
    STALL_TIMEOUT,
    Lab,
    MiB,
    Outcome,
    assert_clean,
    blob,
    drain,
    open_lab,
    second_worker,
)
from ..labs.fakes import UPSTREAM, FakeRegistry, Fault, digest_of
from ..labs.httplab import running_proxy

TB = 10_000_000_000_000  # the length a lying upstream announced in the adversarial round
GiB = 1024**3


class LyingRegistry(FakeRegistry):
    """The fake upstream, but it can drop or replace a blob's ``Content-Length``, and send a
    blob that never ends."""

    def __init__(self, **settings: float) -> None:
        super().__init__(**settings)  # type: ignore[arg-type]
        self.lengths: dict[str, str | None] = {}  # digest -> Content-Length sent (None: none)
        self.endless: dict[str, _Endless] = {}

    def add_endless(self) -> str:
        digest = digest_of(os.urandom(16))  # content that never ends has no real digest
        self.endless[digest] = _Endless(self.chunk_size, self.chunk_delay)
        return digest

    def _blob(self, request: httpx.Request, digest: str) -> httpx.Response:
        endless = self.endless.get(digest)
        if endless is not None and request.method == "GET":
            headers = {"Content-Type": "application/octet-stream"}
            return httpx.Response(200, headers=headers, stream=endless)
        response = super()._blob(request, digest)
        if digest in self.lengths and response.status_code in (200, 206):
            length = self.lengths[digest]
            del response.headers["Content-Length"]
            if length is not None:
                response.headers["Content-Length"] = length
        return response


class _Endless(httpx.AsyncByteStream):
    """A body without end, as far as a bounded proxy can tell.  It does stop at ``LIMIT``,
    so that a proxy without the bound fails its test instead of filling the disk."""

    LIMIT = 32 * MiB

    def __init__(self, chunk_size: int, delay: float) -> None:
        self.chunk_size = chunk_size
        self.delay = delay
        self.sent = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while self.sent < self.LIMIT:
            await trio.sleep(self.delay)
            self.sent += self.chunk_size
            yield bytes(self.chunk_size)


def subscribe(lab: Lab, digest: str, bound: SizeBound | None = None) -> Subscriber:
    return lab.registry.subscribe(
        parse_digest(digest),
        partial(lab.upstream.open_blob, REPO, digest),
        stall_timeout=STALL_TIMEOUT,
        retry=lab.retry,
        bound=bound or SizeBound(),
    )


async def drain_as_it_comes(subscriber: Subscriber, *, zero_copy: bool = False) -> Outcome:
    """Like ``corelab.drain``, but reading from the moment the upstream answers, as the HTTP
    body of a blob of unknown length does, not from when the size is known."""
    received = bytearray()
    first: float | None = None
    ranges = 0
    try:
        await subscriber.wait_answer()
        while True:
            piece = await (
                subscriber.read_or_range(100_000, 300_000)
                if zero_copy
                else subscriber.read(100_000)
            )
            if isinstance(piece, FileRange):
                ranges += 1
                with contextlib.closing(piece):
                    piece = os.pread(piece.fd, piece.count, piece.offset)
            if not piece:
                break
            if first is None:
                first = trio.current_time()
            received += piece
    except RegistryError as error:
        return Outcome(bytes(received), error, first, trio.current_time(), ranges)
    finally:
        subscriber.close()
    return Outcome(bytes(received), None, first, trio.current_time(), ranges)


def upstream_bytes(lab: Lab) -> int:
    return lab.registry.totals().upstream_bytes


# -- pure parts --------------------------------------------------------------------------------


def test_declared_sizes_of_a_manifest_and_an_index() -> None:
    layer, config, child = (digest_of(bytes([n])) for n in range(3))
    manifest = (
        b'{"schemaVersion": 2, "config": {"digest": "%s", "size": 7},'
        b' "layers": [{"digest": "%s", "size": 123456789012},'
        b' {"digest": "sha256:zz", "size": 5}, {"digest": "%s", "size": true},'
        b' {"digest": "%s", "size": -1}, "junk"]}'
        % (config.encode(), layer.encode(), child.encode(), child.encode())
    )
    assert declared_sizes(manifest) == {parse_digest(config): 7, parse_digest(layer): 123456789012}
    index = b'{"manifests": [{"digest": "%s", "size": 99}]}' % child.encode()
    assert declared_sizes(index) == {parse_digest(child): 99}
    # One digest with two sizes: one is wrong and we cannot tell which, so neither binds.
    twice = b'{"layers": [{"digest": "%s", "size": 1}, {"digest": "%s", "size": 2}]}' % (
        layer.encode(),
        layer.encode(),
    )
    assert declared_sizes(twice) == {}
    for nonsense in (b"", b"[]", b"{", b'{"layers": 3}', b'{"layers": [{"size": 1}]}'):
        assert declared_sizes(nonsense) == {}


def test_size_bound_refusals_name_both_sizes() -> None:
    assert SizeBound().refusal(TB) is None
    assert SizeBound(maximum=100).refusal(100) is None
    too_large = SizeBound(maximum=100).refusal(101)
    assert too_large is not None
    assert (too_large.status, too_large.code) == (502, "SIZE_INVALID")
    assert "101" in too_large.message and "100" in too_large.message
    # A declared size is the bound itself, and wins over the maximum either way.
    assert SizeBound(declared=5000, maximum=100).refusal(5000) is None
    mismatch = SizeBound(declared=5000, maximum=10_000).refusal(4999)
    assert mismatch is not None
    assert (mismatch.status, mismatch.code) == (502, "SIZE_INVALID")
    assert "4999" in mismatch.message and "5000" in mismatch.message


def test_store_keeps_declared_sizes_per_repository(tmp_path: Path) -> None:
    store = Store(tmp_path / "cache")
    digest = parse_digest(digest_of(b"layer"))
    other = parse_digest(digest_of(b"other"))
    assert store.declared_size("up", "a", digest) is None
    store.link("up", "a", [digest, other])  # a link alone declares nothing
    assert store.declared_size("up", "a", digest) is None
    store.note_declared_sizes("up", "a", {digest: 1234})
    assert store.declared_size("up", "a", digest) == 1234
    assert store.is_linked("up", "a", digest)
    store.link("up", "a", [digest])  # linking again keeps the size
    assert store.declared_size("up", "a", digest) == 1234
    # Another repository's manifests do not bind this one's pulls.
    assert store.declared_size("up", "b", digest) is None
    assert store.declared_size("other", "a", digest) is None
    store.note_declared_sizes("up", "b", {digest: 1})
    assert store.declared_size("up", "a", digest) == 1234
    assert store.declared_size("up", "b", digest) == 1


def test_max_blob_size_config() -> None:
    assert parse_config({}).max_blob_size == DEFAULT_MAX_BLOB_SIZE == 64 * GiB
    config = parse_config(
        {
            "storage": {"max_blob_size": "2GiB"},
            "upstream": [
                {"name": "a.example", "url": "https://a.example", "max_blob_size": 1000},
                {"name": "b.example", "url": "https://b.example"},
            ],
        }
    )
    assert config.max_blob_size == 2 * GiB
    assert [u.max_blob_size for u in config.upstreams] == [1000, None]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"storage": {"max_blob_size": "lots"}}, "storage.max_blob_size"),
        ({"storage": {"max_blob_size": 0}}, "storage.max_blob_size: must be positive"),
        ({"storage": {"max_blob_size": True}}, "storage.max_blob_size: expected"),
        (
            {"upstream": [{"name": "a.example", "url": "https://a", "max_blob_size": "-1"}]},
            "upstream[0].max_blob_size",
        ),
        (
            {"upstream": [{"name": "a.example", "url": "https://a", "max_blob_size": 1.5}]},
            "upstream[0].max_blob_size: expected",
        ),
        ({"storage": {"max_blob_sizes": "1GiB"}}, "unknown key storage.max_blob_sizes"),
    ],
)
def test_max_blob_size_config_errors_name_the_key(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(data)


# -- the core ----------------------------------------------------------------------------------


async def test_a_lying_huge_length_fails_before_a_byte_is_written(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    fake = LyingRegistry(chunk_delay=0.01)
    async with open_lab(tmp_path, fake=fake, max_retries=3) as lab:
        digest = fake.add_blob(blob(MiB))
        fake.lengths[digest] = str(TB)
        subscribers = [subscribe(lab, digest, SizeBound(maximum=64 * GiB)) for _ in range(2)]
        for subscriber in subscribers:
            with pytest.raises(RegistryError) as caught:
                await subscriber.wait_answer()
            subscriber.close()
            assert (caught.value.status, caught.value.code) == (502, "SIZE_INVALID")
            assert str(TB) in caught.value.message
        await trio.testing.wait_all_tasks_blocked()
        assert upstream_bytes(lab) == 0
        assert len(fake.blob_gets(digest)) == 1  # a refusal is final: never retried
        assert lab.store.blob_size(parse_digest(digest)) is None
        assert_clean(lab)


async def test_an_empty_body_for_a_blob_that_is_not_empty_never_completes(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """An empty body has no last byte to hold back until the check, so it would be a
    complete 200 before the digest was verified: refused unless the digest is the empty
    blob's."""
    fake = LyingRegistry()
    async with open_lab(tmp_path, fake=fake, max_retries=3) as lab:
        digest = fake.add_blob(blob(MiB))
        fake.lengths[digest] = "0"
        subscriber = subscribe(lab, digest, SizeBound(maximum=64 * GiB))
        with pytest.raises(RegistryError) as caught:
            await subscriber.wait_answer()
        subscriber.close()
        assert (caught.value.status, caught.value.code) == (502, "SIZE_INVALID")
        empty = fake.add_blob(b"")
        drained = await drain(subscribe(lab, empty, SizeBound(maximum=64 * GiB)))
        assert drained.data == b"" and drained.error is None
        with trio.fail_after(10):  # the empty blob's commit runs in worker threads
            while lab.registry.in_flight():
                await trio.sleep(0.01)
        assert lab.store.blob_size(parse_digest(empty)) == 0
        assert lab.store.blob_size(parse_digest(digest)) is None
        # The rule itself, free of timing: whether a client would have seen the empty 200
        # depends on whether it looked before the check failed.
        with pytest.raises(RegistryError) as refused:
            admit(Download(parse_digest(digest), tmp_path / "a"), 0, lab.registry._check_room)
        assert refused.value.code == "SIZE_INVALID"
        admit(Download(parse_digest(empty), tmp_path / "b"), 0, lab.registry._check_room)
        assert_clean(lab)


async def test_an_endless_body_without_length_stops_at_the_maximum(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    fake = LyingRegistry(chunk_delay=0.01)
    maximum = 3 * MiB + 1000
    async with open_lab(tmp_path, fake=fake, max_retries=3) as lab:
        digest = fake.add_endless()
        outcome = await drain_as_it_comes(subscribe(lab, digest, SizeBound(maximum=maximum)))
        assert outcome.error is not None
        assert (outcome.error.status, outcome.error.code) == (502, "SIZE_INVALID")
        assert "max_blob_size" in outcome.error.message
        # The client got bytes as they came (no length to wait for), and never all of them.
        assert outcome.first_byte_at is not None and outcome.first_byte_at < 0.2
        assert len(outcome.data) < maximum
        # The disk never held more than the bound, and the upstream was let go at it.
        assert upstream_bytes(lab) <= maximum
        await trio.testing.wait_all_tasks_blocked()
        assert fake.endless[digest].sent <= maximum + fake.chunk_size
        sent = fake.endless[digest].sent
        await trio.sleep(1)
        assert fake.endless[digest].sent == sent
        assert_clean(lab)


async def test_a_length_that_disagrees_with_the_manifest_fails_and_caches_nothing(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    fake = LyingRegistry(chunk_delay=0.01)
    data = blob(MiB)
    async with open_lab(tmp_path, fake=fake) as lab:
        digest = fake.add_blob(data)
        outcome = await drain(subscribe(lab, digest, SizeBound(declared=len(data) - 1)))
        assert outcome.error is not None
        assert (outcome.error.status, outcome.error.code) == (502, "SIZE_INVALID")
        assert f"announces {len(data)} bytes" in outcome.error.message
        assert f"declares {len(data) - 1}" in outcome.error.message
        assert outcome.data == b""
        await trio.testing.wait_all_tasks_blocked()
        assert upstream_bytes(lab) == 0
        assert lab.store.blob_size(parse_digest(digest)) is None
        assert_clean(lab)


async def test_a_declared_size_stands_in_for_a_missing_length(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    fake = LyingRegistry(chunk_delay=0.01)
    data = blob(2 * MiB)
    async with open_lab(tmp_path, fake=fake) as lab:
        digest = fake.add_blob(data)
        fake.lengths[digest] = None
        subscriber = subscribe(lab, digest, SizeBound(declared=len(data), maximum=MiB))
        # The size is known when the upstream answers, so a response can send its length.
        assert await subscriber.wait_answer() == len(data)
        outcome = await drain(subscriber)
        assert outcome.error is None and outcome.data == data
        assert lab.store.blob_size(parse_digest(digest)) == len(data)


async def test_a_body_longer_than_its_declared_size_fails(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    fake = LyingRegistry(chunk_delay=0.01)
    async with open_lab(tmp_path, fake=fake) as lab:
        digest = fake.add_endless()
        declared = MiB + 17
        outcome = await drain(subscribe(lab, digest, SizeBound(declared=declared)))
        assert outcome.error is not None
        assert (outcome.error.status, outcome.error.code) == (502, "SIZE_INVALID")
        assert len(outcome.data) < declared
        assert upstream_bytes(lab) <= declared
        await trio.testing.wait_all_tasks_blocked()
        assert_clean(lab)


async def test_a_blob_of_unknown_length_streams_and_holds_back_its_last_byte(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    fake = LyingRegistry(chunk_delay=0.01)
    data = blob(4 * MiB)  # 0.64 s at the fake's pace
    async with open_lab(tmp_path, fake=fake) as lab:
        digest = fake.add_blob(data)
        fake.lengths[digest] = None
        subscriber = subscribe(lab, digest, SizeBound(maximum=64 * GiB))
        assert await subscriber.wait_answer() is None
        assert trio.current_time() < 0.1  # answered at once, not after the whole blob
        received = bytearray()
        reads = 0
        while piece := await subscriber.read(len(data)):
            received += piece
            reads += 1
            download = subscriber.download
            # Until verified, never all that was written: the last byte may be the blob's.
            assert download.verified or subscriber.offset < download.available
        subscriber.close()
        assert received == data
        assert reads > 3  # as it arrived, not in one piece at the end
        assert lab.store.blob_size(parse_digest(digest)) == len(data)
        # The same through the zero-copy path (file ranges of the partial).
        other = blob(2 * MiB)
        other_digest = fake.add_blob(other)
        fake.lengths[other_digest] = None
        outcome = await drain_as_it_comes(subscribe(lab, other_digest), zero_copy=True)
        assert outcome.error is None and outcome.data == other
        assert outcome.ranges > 0


async def test_a_corrupt_blob_of_unknown_length_never_completes(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    fake = LyingRegistry(chunk_delay=0.01)
    data = blob(2 * MiB)
    async with open_lab(tmp_path, fake=fake) as lab:
        digest = fake.add_blob(data)
        fake.lengths[digest] = None
        fake.faults[digest] = [Fault(corrupt_at=len(data) - 1)]  # the very last byte
        outcome = await drain_as_it_comes(subscribe(lab, digest, SizeBound(maximum=64 * GiB)))
        assert outcome.error is not None and outcome.error.code == "DIGEST_INVALID"
        assert len(outcome.data) < len(data) and data.startswith(outcome.data)
        await trio.testing.wait_all_tasks_blocked()
        assert_clean(lab)


async def test_another_worker_streams_a_blob_of_unknown_length_as_it_arrives(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    fake = LyingRegistry(chunk_delay=0.01)
    data = blob(4 * MiB)  # 0.64 s
    async with open_lab(tmp_path, fake=fake) as one:
        digest = fake.add_blob(data)
        fake.lengths[digest] = None
        async with second_worker(one) as two:
            owner = subscribe(one, digest)
            await trio.sleep(0.1)
            follower = subscribe(two, digest)
            assert follower.download.followed
            # The follower learns that the owner's upstream answered from the bytes in its
            # partial, long before the size is known at the end.
            assert await follower.wait_answer() is None
            assert trio.current_time() < 0.3
            outcomes: list[Outcome] = []
            async with trio.open_nursery() as nursery:
                for subscriber in (owner, follower):
                    nursery.start_soon(
                        lambda s: _append(outcomes, drain_as_it_comes(s)), subscriber
                    )
            assert [o.error for o in outcomes] == [None, None]
            assert all(o.data == data for o in outcomes)
            assert all(o.first_byte_at is not None and o.first_byte_at < 0.5 for o in outcomes)
            assert len(fake.blob_gets(digest)) == 1


async def _append(into: list[Outcome], outcome: Awaitable[Outcome]) -> None:
    into.append(await outcome)


async def test_no_room_on_disk_is_a_503_before_a_byte_is_written(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    fake = LyingRegistry(chunk_delay=0.01)
    free = [10 * MiB + FREE_SPACE_MARGIN]
    async with open_lab(tmp_path, fake=fake, max_retries=3) as lab:
        lab.registry = DownloadRegistry(
            lab.store, lab.nursery, chunk_size=256 * 1024, disk_free=lambda: free[0]
        )
        first, second, third = (fake.add_blob(blob(6 * MiB)) for _ in range(3))
        fitting = subscribe(lab, first)
        assert await fitting.wait_answer() == 6 * MiB
        # The first download still needs most of its 6 MiB: the second does not fit beside
        # it, though the disk has 10 MiB free right now.
        refused = subscribe(lab, second)
        with pytest.raises(RegistryError) as caught:
            await refused.wait_answer()
        refused.close()
        assert (caught.value.status, caught.value.code) == (503, "UNAVAILABLE")
        assert caught.value.headers.get("Retry-After", "").isdigit()
        assert len(fake.blob_gets(second)) == 1  # not retried
        assert (await drain(fitting)).error is None
        # A blob of unknown length is not refused up front (the write would fail with ENOSPC).
        fake.lengths[third] = None
        free[0] = 0
        assert (await drain_as_it_comes(subscribe(lab, third))).error is None
        await trio.testing.wait_all_tasks_blocked()
        assert_clean(lab)
        assert lab.store.blob_size(parse_digest(second)) is None


# -- over HTTP ---------------------------------------------------------------------------------


async def test_no_ten_terabyte_length_reaches_a_client(tmp_path: Path) -> None:
    fake = LyingRegistry(chunk_delay=0.002)
    digest = fake.add_blob(blob(MiB))
    fake.lengths[digest] = str(TB)
    async with (
        running_proxy(tmp_path, fake, settings={"max_blob_size": 64 * GiB}) as proxy,
        httpx.AsyncClient() as client,
    ):
        for method in ("HEAD", "GET"):
            response = await client.request(method, proxy.blob_url(digest))
            assert response.status_code == 502, method
            assert response.headers.get("Content-Length") != str(TB)
            if method == "GET":
                assert response.json()["errors"][0]["code"] == "SIZE_INVALID"
        await proxy.wait_idle()
        assert proxy.state.store.blob_size(parse_digest(digest)) is None


async def test_a_per_upstream_maximum_applies(tmp_path: Path) -> None:
    fake = LyingRegistry(chunk_delay=0.002)
    digest = fake.add_blob(blob(2 * MiB))
    async with (
        running_proxy(tmp_path, fake, max_blob_size=MiB) as proxy,
        httpx.AsyncClient() as client,
    ):
        response = await client.get(proxy.blob_url(digest))
        assert response.status_code == 502
        assert "max_blob_size" in response.json()["errors"][0]["message"]


async def test_the_manifests_declared_size_binds_the_download(tmp_path: Path) -> None:
    fake = LyingRegistry(chunk_delay=0.002)
    data = blob(MiB)
    digest = fake.add_blob(data)
    async with (
        running_proxy(tmp_path, fake) as proxy,
        httpx.AsyncClient() as client,
    ):
        # What the manifest service records when it stores a manifest naming this layer.
        proxy.state.store.note_declared_sizes(
            UPSTREAM, "library/app", {parse_digest(digest): len(data) + 1}
        )
        response = await client.get(proxy.blob_url(digest))
        assert response.status_code == 502
        message = response.json()["errors"][0]["message"]
        assert f"{len(data)} bytes" in message and f"declares {len(data) + 1}" in message
        await proxy.wait_idle()
        assert proxy.state.store.blob_size(parse_digest(digest)) is None


async def test_a_blob_without_length_streams_chunked_before_it_has_arrived(
    tmp_path: Path,
) -> None:
    fake = LyingRegistry(chunk_delay=0.01)  # 4 MiB take 0.64 s
    data = blob(4 * MiB)
    digest = fake.add_blob(data)
    fake.lengths[digest] = None
    async with (
        running_proxy(tmp_path, fake) as proxy,
        httpx.AsyncClient() as client,
        client.stream("GET", proxy.blob_url(digest)) as response,
    ):
        assert response.status_code == 200
        download = proxy.state.downloads.get(parse_digest(digest))
        assert download is not None and download.available < len(data)
        assert "Content-Length" not in response.headers
        assert response.headers["Transfer-Encoding"] == "chunked"
        body = b"".join([chunk async for chunk in response.aiter_raw()])
        assert body == data
        await proxy.wait_stored(digest)


async def test_http10_and_range_clients_of_a_blob_without_length_get_a_length(
    tmp_path: Path,
) -> None:
    fake = LyingRegistry(chunk_delay=0.002)
    data = blob(MiB)
    digest = fake.add_blob(data)
    fake.lengths[digest] = None
    async with running_proxy(tmp_path, fake) as proxy:
        head, _ = await raw_get(proxy.url, proxy.blob_url(digest), "HTTP/1.0")
        assert f"content-length: {len(data)}" in head.lower()
        await proxy.wait_idle()
        other = blob(MiB)
        other_digest = fake.add_blob(other)
        fake.lengths[other_digest] = None
        async with httpx.AsyncClient() as client:
            ranged = await client.get(
                proxy.blob_url(other_digest), headers={"Range": "bytes=10-19"}
            )
        assert ranged.status_code == 206
        assert ranged.headers["Content-Range"] == f"bytes 10-19/{len(other)}"
        assert ranged.content == other[10:20]


async def test_a_corrupt_chunked_body_is_aborted_without_its_last_chunk(
    tmp_path: Path,
) -> None:
    fake = LyingRegistry(chunk_delay=0.002)
    data = blob(2 * MiB)
    digest = fake.add_blob(data)
    fake.lengths[digest] = None
    fake.faults[digest] = [Fault(corrupt_at=len(data) - 10)]
    async with running_proxy(tmp_path, fake) as proxy:
        head, body = await raw_get(proxy.url, proxy.blob_url(digest), "HTTP/1.1")
        assert head.startswith("HTTP/1.1 200")
        assert "transfer-encoding: chunked" in head.lower()
        received, complete = decode_chunked(body)
        # The connection closed with no terminating chunk: an incomplete body to any client.
        assert not complete
        assert 0 < len(received) < len(data)
        assert data.startswith(received[: len(data) - 10])
        await proxy.wait_idle()
        assert proxy.state.store.blob_size(parse_digest(digest)) is None
        # And the same blob intact: the terminating chunk comes, the blob is whole.
        fake.faults[digest] = []
        head, body = await raw_get(proxy.url, proxy.blob_url(digest), "HTTP/1.1", close=True)
        assert decode_chunked(body) == (data, True)


async def test_a_full_cache_disk_answers_503_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from streamsync_trio.core import _registry

    monkeypatch.setattr(_registry, "_disk_free", lambda root: FREE_SPACE_MARGIN + MiB)
    fake = LyingRegistry(chunk_delay=0.002)
    digest = fake.add_blob(blob(2 * MiB))
    async with running_proxy(tmp_path, fake) as proxy, httpx.AsyncClient() as client:
        response = await client.get(proxy.blob_url(digest))
        assert response.status_code == 503
        assert response.json()["errors"][0]["code"] == "UNAVAILABLE"
        assert "room" in response.json()["errors"][0]["message"]
        assert response.headers["Retry-After"].isdigit()
        await proxy.wait_idle()
        assert proxy.state.store.blob_size(parse_digest(digest)) is None


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        if os.environ.get("CI"):
            raise AssertionError(f"cannot mount a tmpfs: {mounted.stderr!r}")
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr!r}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


async def test_free_space_of_a_real_small_disk_is_checked(tmp_path: Path) -> None:
    fake = LyingRegistry(chunk_delay=0.001)
    big, small = blob(40 * MiB), blob(8 * MiB)
    big_digest, small_digest = fake.add_blob(big), fake.add_blob(small)
    with small_tmpfs(tmp_path / "disk", "64m") as disk:
        async with (
            running_proxy(disk, fake) as proxy,
            httpx.AsyncClient(timeout=30) as client,
        ):
            # 40 MiB + the margin do not fit on 64 MiB; 8 MiB do.
            refused = await client.get(proxy.blob_url(big_digest))
            assert refused.status_code == 503
            assert (await client.get(proxy.blob_url(small_digest))).content == small
            await proxy.wait_idle()
            assert list(proxy.state.store.partial_dir.iterdir()) == []


# -- a raw HTTP/1 client -------------------------------------------------------------------------


async def raw_get(base: str, url: str, version: str, *, close: bool = False) -> tuple[str, bytes]:
    """Send one GET as raw bytes and read until the server closes: (head, body bytes)."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    target = url.removeprefix(base)
    stream = await trio.open_tcp_stream(host, int(port))
    request = f"GET {target} {version}\r\nHost: {host}\r\n"
    if close:
        request += "Connection: close\r\n"
    received = bytearray()
    async with stream:
        await stream.send_all((request + "\r\n").encode())
        with trio.fail_after(20):
            while chunk := await stream.receive_some(1 << 16):
                received += chunk
                if version == "HTTP/1.1" and received.endswith(b"\r\n0\r\n\r\n"):
                    break
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    return head.decode("latin-1"), body


def decode_chunked(body: bytes) -> tuple[bytes, bool]:
    """The data of a chunked body, and whether it ended with its terminating chunk."""
    data = bytearray()
    position = 0
    while True:
        line_end = body.find(b"\r\n", position)
        if line_end < 0:
            return bytes(data), False
        size = int(body[position:line_end].split(b";")[0], 16)
        if size == 0:
            return bytes(data), body[line_end : line_end + 4] == b"\r\n\r\n"
        start = line_end + 2
        piece = body[start : start + size]
        data += piece
        if len(piece) < size:
            return bytes(data), False
        position = start + size + 2
