"""Streaming as a socket client sees it: the real app under a real hypercorn on loopback.

The upstream is the fake transport (real-time delays here), so faults are exact, while the
client side is a real HTTP/1.1 connection: Content-Length, aborted bodies, disconnects.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import httpx
import pytest
import trio

from streamsync_trio._reference import parse_digest
from streamsync_trio.core import Subscriber
from streamsync_trio.edge._state import ChunkBudget

from ..labs.fakes import FakeRegistry, Fault
from ..labs.httplab import MiB, fetch, fetch_until_abort, real_time_fake, running_proxy
from ..labs.wirelab import client_context


async def test_concurrent_clients_stream_one_upstream_download(tmp_path: Path) -> None:
    fake = real_time_fake()
    data = os.urandom(8 * MiB)
    digest = fake.add_blob(data)
    async with running_proxy(tmp_path, fake) as proxy, httpx.AsyncClient() as client:
        results: list[tuple[httpx.Response, bytes]] = []

        async def one(delay: float) -> None:
            await trio.sleep(delay)
            results.append(await fetch(client, proxy.blob_url(digest)))

        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(one, i * 0.03)
        for response, body in results:
            assert response.status_code == 200
            assert response.headers["Content-Length"] == str(len(data))
            assert response.headers["Docker-Content-Digest"] == digest
            assert body == data
        assert len(fake.blob_gets(digest)) == 1
        assert await proxy.wait_stored(digest) == len(data)
        await proxy.wait_idle()


async def test_upstream_drop_aborts_every_body_short_of_content_length(tmp_path: Path) -> None:
    fake = real_time_fake()
    data = os.urandom(4 * MiB)
    digest = fake.add_blob(data)
    fake.faults[digest] = [Fault(drop_at=1 * MiB)]
    async with running_proxy(tmp_path, fake, max_retries=0) as proxy:
        async with httpx.AsyncClient() as client, trio.open_nursery() as nursery:
            outcomes: list[tuple[int, int, bytes]] = []

            async def one() -> None:
                outcomes.append(await fetch_until_abort(client, proxy.blob_url(digest)))

            for _ in range(3):
                nursery.start_soon(one)
        for status, length, received in outcomes:
            assert (status, length) == (200, len(data))
            assert len(received) <= 1 * MiB
            assert received == data[: len(received)]
        await proxy.wait_idle()
        assert proxy.state.store.blob_size(parse_digest(digest)) is None
        # The next request starts afresh.
        async with httpx.AsyncClient() as client:
            response, body = await fetch(client, proxy.blob_url(digest))
        assert response.status_code == 200 and body == data


async def test_corrupt_upstream_never_gives_a_complete_200(tmp_path: Path) -> None:
    fake = real_time_fake()
    data = os.urandom(2 * MiB)
    digest = fake.add_blob(data)
    fake.faults[digest] = [Fault(corrupt_at=12345)]
    async with running_proxy(tmp_path, fake) as proxy, httpx.AsyncClient() as client:
        status, length, received = await fetch_until_abort(client, proxy.blob_url(digest))
        assert (status, length) == (200, len(data))
        assert len(received) < len(data)
        await proxy.wait_idle()
        assert proxy.state.store.blob_size(parse_digest(digest)) is None


@pytest.mark.parametrize(
    ("status", "expected", "code"),
    [(404, 404, "BLOB_UNKNOWN"), (401, 401, "UNAUTHORIZED"), (503, 503, "UNAVAILABLE")],
)
async def test_upstream_error_status_is_a_real_status(
    tmp_path: Path, status: int, expected: int, code: str
) -> None:
    fake = real_time_fake()
    digest = fake.add_blob(os.urandom(1000))
    fake.faults[digest] = [Fault(status=status)]
    async with running_proxy(tmp_path, fake, max_retries=0) as proxy, httpx.AsyncClient() as client:
        response = await client.get(proxy.blob_url(digest))
        assert response.status_code == expected
        assert response.headers["Content-Type"] == "application/json"
        assert response.json()["errors"][0]["code"] == code
        await proxy.wait_idle()


async def test_client_disconnect_does_not_cancel_the_download(tmp_path: Path) -> None:
    fake = real_time_fake()
    data = os.urandom(4 * MiB)
    digest = fake.add_blob(data)
    async with running_proxy(tmp_path, fake) as proxy:
        async with httpx.AsyncClient() as client, client.stream("GET", proxy.blob_url(digest)) as r:
            async for _ in r.aiter_raw():
                break  # one chunk, then hang up
        assert await proxy.wait_stored(digest) == len(data)
        path = proxy.state.store.blob_path(parse_digest(digest))
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest.removeprefix("sha256:")
        assert len(fake.blob_gets(digest)) == 1
        await proxy.wait_idle()


async def test_head_of_uncached_blob_does_not_download_it(tmp_path: Path) -> None:
    fake = real_time_fake()
    data = os.urandom(3 * MiB)
    digest = fake.add_blob(data)
    async with running_proxy(tmp_path, fake) as proxy, httpx.AsyncClient() as client:
        response = await client.head(proxy.blob_url(digest))
        assert response.status_code == 200
        assert response.headers["Content-Length"] == str(len(data))
        assert response.headers["Docker-Content-Digest"] == digest
        assert fake.blob_gets(digest) == []
        assert len(proxy.state.downloads) == 0


async def test_range_on_in_flight_blob_is_206_from_the_partial(tmp_path: Path) -> None:
    fake = FakeRegistry(chunk_delay=0.01)  # 4 MiB over 0.64 s: surely in flight
    data = os.urandom(4 * MiB)
    digest = fake.add_blob(data)
    async with running_proxy(tmp_path, fake) as proxy, httpx.AsyncClient() as client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch, client, proxy.blob_url(digest))
            await trio.sleep(0.2)
            assert len(proxy.state.downloads) == 1
            response = await client.get(
                proxy.blob_url(digest), headers={"Range": f"bytes={2 * MiB}-"}
            )
        assert response.status_code == 206
        assert response.headers["Content-Range"] == f"bytes {2 * MiB}-{len(data) - 1}/{len(data)}"
        assert response.content == data[2 * MiB :]
        assert len(fake.blob_gets(digest)) == 1


async def test_stored_blob_is_served_with_ranges_and_416(tmp_path: Path) -> None:
    fake = real_time_fake()
    data = os.urandom(3 * MiB + 17)
    digest = fake.add_blob(data)
    async with running_proxy(tmp_path, fake) as proxy, httpx.AsyncClient() as client:
        await fetch(client, proxy.blob_url(digest))
        await proxy.wait_stored(digest)
        _, body = await fetch(client, proxy.blob_url(digest))
        assert body == data
        partial_response = await client.get(proxy.blob_url(digest), headers={"Range": "bytes=-100"})
        assert partial_response.status_code == 206
        assert partial_response.content == data[-100:]
        unsatisfiable = await client.get(
            proxy.blob_url(digest), headers={"Range": f"bytes={len(data)}-"}
        )
        assert unsatisfiable.status_code == 416
        assert unsatisfiable.headers["Content-Range"] == f"bytes */{len(data)}"
        assert len(fake.blob_gets(digest)) == 1


@pytest.mark.parametrize("zero_copy", [True, False], ids=["sendfile", "read"])
async def test_unreadable_cached_blob_is_a_clean_500_and_logged_with_its_path(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    zero_copy: bool,
) -> None:
    fake = real_time_fake()
    data = os.urandom(10 * MiB)  # several response chunks either way
    digest = fake.add_blob(data)
    settings = {"zero_copy": zero_copy}
    async with (
        running_proxy(tmp_path, fake, settings=settings) as proxy,
        httpx.AsyncClient() as client,
    ):
        await fetch(client, proxy.blob_url(digest))
        path = proxy.state.store.blob_path(parse_digest(digest))
        await proxy.wait_stored(digest)

        def failing_open(self: object, digest: object) -> int:
            raise OSError(5, "Input/output error")

        with monkeypatch.context() as patch:
            patch.setattr(type(proxy.state.store), "open_blob", failing_open)
            response = await client.get(proxy.blob_url(digest))
        assert response.status_code == 500
        assert response.json()["errors"][0]["code"] == "UNKNOWN"
        assert str(path) in caplog.text

        real_pread, real_preadv, real_sendfile = os.pread, os.preadv, os.sendfile
        sendfile_offsets: list[int] = []

        def failing_pread(fd: int, count: int, offset: int) -> bytes:
            if offset >= 2 * MiB:
                raise OSError(5, "Input/output error")
            return real_pread(fd, count, offset)

        def failing_preadv(fd: int, buffers: list[bytearray], offset: int, flags: int = 0) -> int:
            if offset >= 2 * MiB:
                raise OSError(5, "Input/output error")
            return real_preadv(fd, buffers, offset, flags)

        def failing_sendfile(out_fd: int, in_fd: int, offset: int, count: int) -> int:
            sendfile_offsets.append(offset)
            if offset >= 2 * MiB:
                raise OSError(5, "Input/output error")
            return real_sendfile(out_fd, in_fd, offset, min(count, 2 * MiB - offset))

        with monkeypatch.context() as patch:  # the disk fails past the first 2 MiB
            patch.setattr(os, "pread", failing_pread)
            patch.setattr(os, "preadv", failing_preadv)
            patch.setattr(os, "sendfile", failing_sendfile)
            status, length, received = await fetch_until_abort(client, proxy.blob_url(digest))
        assert (status, length) == (200, len(data))
        assert len(received) == 2 * MiB
        assert received == data[: 2 * MiB]
        assert f"of {path}" in caplog.text
        # The cached bytes took the path the setting chose.
        assert bool(sendfile_offsets) == zero_copy
        # Still healthy: the next request is served whole.
        _, body = await fetch(client, proxy.blob_url(digest))
        assert body == data


def test_response_chunks_share_one_budget_so_memory_stays_flat() -> None:
    budget = ChunkBudget()
    sizes = {}
    for clients in (1, 8, 16, 64, 1000):
        budget.open_bodies = clients
        sizes[clients] = budget.chunk()
    assert sizes == {
        1: 2 * MiB,
        8: 2 * MiB,
        16: 1 * MiB,
        64: 256 * 1024,
        1000: 256 * 1024,
    }


def test_a_body_sent_over_tls_gets_small_chunks() -> None:
    """Encrypting holds each chunk about four times over (see ChunkBudget)."""
    budget = ChunkBudget()
    sizes = {}
    for clients in (1, 8, 16, 32, 64, 1000):
        budget.open_bodies = clients
        sizes[clients] = budget.chunk(encrypted=True)
    kib = 1024
    assert sizes == {
        1: 256 * kib,
        8: 256 * kib,
        16: 256 * kib,
        32: 128 * kib,
        64: 64 * kib,
        1000: 64 * kib,
    }


@pytest.mark.parametrize("tls", [True, False], ids=["https", "http"])
async def test_clients_over_tls_are_served_in_small_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tls: bool
) -> None:
    """Cold and warm, a client over TLS is read for in chunks of at most 256 KiB; one over
    plain HTTP (with sendfile off, so its bytes are read too) in the budget's 2 MiB."""
    asked: list[int] = []
    read = Subscriber.read

    async def recording(self: Subscriber, max_bytes: int) -> bytes:
        asked.append(max_bytes)
        return await read(self, max_bytes)

    monkeypatch.setattr(Subscriber, "read", recording)
    fake = real_time_fake()
    data = os.urandom(6 * MiB)
    digest = fake.add_blob(data)
    settings = {"zero_copy": False}
    async with (
        running_proxy(tmp_path, fake, settings=settings, tls=tls) as proxy,
        httpx.AsyncClient(verify=client_context()) as client,
    ):
        assert proxy.url.startswith("https://" if tls else "http://")
        for _ in ("cold", "warm"):
            _, body = await fetch(client, proxy.blob_url(digest))
            assert body == data
            await proxy.wait_idle()
    assert max(asked) == (256 * 1024 if tls else 2 * MiB)


async def test_every_blob_body_gives_its_share_back(tmp_path: Path) -> None:
    """Finished, cut off, or never started: the open-body count returns to zero."""
    fake = real_time_fake()
    digest = fake.add_blob(os.urandom(4 * MiB))
    async with running_proxy(tmp_path, fake) as proxy, httpx.AsyncClient() as client:
        await fetch(client, proxy.blob_url(digest))  # finished
        async with client.stream("GET", proxy.blob_url(digest)) as response:
            await anext(response.aiter_raw())  # then hung up mid-body
        await client.head(proxy.blob_url(digest))  # a body never started
        with trio.fail_after(5):
            while proxy.state.chunk_budget.open_bodies:
                await trio.sleep(0.01)
