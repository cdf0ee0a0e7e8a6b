"""Streaming as a socket client sees it: the real app under a real hypercorn on loopback.

The upstream is the fake transport (real-time delays here), so faults are exact, while the
client side is a real HTTP/1.1 connection: Content-Length, aborted bodies, disconnects.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from streamsync_trio import create_app
from streamsync_trio._http import ProxyState
from streamsync_trio._reference import parse_digest

from .conftest import make_config
from .fakes import FakeRegistry, Fault

MiB = 1024 * 1024


@dataclass
class Running:
    url: str
    state: ProxyState
    fake: FakeRegistry

    def blob_url(self, digest: str, repo: str = "library/app") -> str:
        return f"{self.url}/v2/{repo}/blobs/{digest}"

    async def wait_stored(self, digest: str, timeout: float = 10.0) -> int:
        with trio.fail_after(timeout):
            while (size := self.state.store.blob_size(parse_digest(digest))) is None:
                await trio.sleep(0.01)
        return size

    async def wait_idle(self, timeout: float = 10.0) -> None:
        """Until no download is in flight and no partial file is left."""
        with trio.fail_after(timeout):
            while len(self.state.downloads) or any(self.state.store.partial_dir.iterdir()):
                await trio.sleep(0.01)


@asynccontextmanager
async def running_proxy(
    tmp_path: Path, fake: FakeRegistry, **upstream: object
) -> AsyncIterator[Running]:
    app = create_app(make_config(tmp_path / "cache", **upstream), transport=fake)
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.alpn_protocols = ["http/1.1"]
    config.accesslog = None
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, app, config, shutdown_trigger=shutdown.wait))
        try:
            yield Running(binds[0], app.extensions["streamsync"], fake)
        finally:
            shutdown.set()


def real_time_fake() -> FakeRegistry:
    return FakeRegistry(chunk_delay=0.002)  # 64 KiB per 2 ms: ~32 MB/s


async def fetch(client: httpx.AsyncClient, url: str) -> tuple[httpx.Response, bytes]:
    async with client.stream("GET", url) as response:
        body = b"".join([chunk async for chunk in response.aiter_raw()])
    return response, body


async def fetch_until_abort(client: httpx.AsyncClient, url: str) -> tuple[int, int, bytes]:
    """GET a body that must be cut short: (status, Content-Length, bytes received)."""
    received = bytearray()
    async with client.stream("GET", url) as response:
        with pytest.raises(httpx.RemoteProtocolError):
            async for chunk in response.aiter_raw():
                received += chunk
    return response.status_code, int(response.headers["Content-Length"]), bytes(received)


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
    fake = real_time_fake()
    data = os.urandom(4 * MiB)
    digest = fake.add_blob(data)
    async with running_proxy(tmp_path, fake) as proxy, httpx.AsyncClient() as client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch, client, proxy.blob_url(digest))
            await trio.sleep(0.05)
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
