"""The peer reader (``cluster/_peer``) against scripted peers: what it sends, and how each way
a peer can fail turns into "try elsewhere now" (before the body) or a transient error the
producer resumes from (in the body).  And a node without ``[cluster]`` has no peer endpoint.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from streamsync_trio import RegistryError
from streamsync_trio.cluster import HEADER, PeerClient, PeerUnavailable, peer_path, verify
from streamsync_trio.core._retry import is_transient

from ..labs.fakes import FakeRegistry
from ..labs.httplab import running_proxy
from ..labs.wirelab import Step, head, scripted_server, wire_to

SECRET = b"peer secret"
NODE = "http://10.0.0.5:5000"
DIGEST = "sha256:" + "ab" * 32
DATA = bytes(range(256)) * 64


class Scripted(httpx.AsyncBaseTransport):
    """A peer that answers every request with ``respond(request)``."""

    def __init__(self, status: int = 206, headers: dict[str, str] | None = None, cut: int = 0):
        self.status, self.headers, self.cut = status, headers, cut
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        start = int(request.headers.get("Range", "bytes=0-")[6:-1])
        headers = self.headers
        if headers is None:
            headers = {
                "Content-Range": f"bytes {start}-{len(DATA) - 1}/{len(DATA)}",
                "Content-Length": str(len(DATA) - start),
            }
        return httpx.Response(
            self.status,
            headers=headers,
            stream=_Body(DATA[start : len(DATA) - self.cut], short=self.cut > 0),
        )


class _Body(httpx.AsyncByteStream):
    def __init__(self, data: bytes, short: bool) -> None:
        self._data = data
        self._short = short

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self._data
        if self._short:  # as the wire transport says of a body short of its length
            raise httpx.RemoteProtocolError("peer closed connection without sending complete")


async def read(client: PeerClient, offset: int) -> tuple[int | None, int, bytes]:
    body = await client.open(NODE, "docker.io", "library/app", DIGEST, offset)
    try:
        return body.total_size, body.offset, b"".join([c async for c in body.chunks])
    finally:
        await body.aclose()


async def test_a_peer_read_is_signed_ranged_and_counted() -> None:
    peer = Scripted()
    received: list[int] = []
    client = PeerClient(SECRET, transport=peer, on_bytes=received.append)
    assert await read(client, 1000) == (len(DATA), 1000, DATA[1000:])
    [request] = peer.requests
    path = peer_path("docker.io", "library/app", DIGEST)
    assert request.url == NODE + path and request.headers["Range"] == "bytes=1000-"
    assert request.headers["Accept-Encoding"] == "identity"
    verify(SECRET, "GET", path, request.headers[HEADER], time.time())  # raises if not
    assert sum(received) == len(DATA) - 1000
    await client.aclose()


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        (401, {}),  # another secret
        (404, {}),  # another config (unknown upstream): we ask the upstream ourselves
        (503, {"Retry-After": "1"}),  # relaying, or shutting down
        (206, {"Content-Range": "bytes */100"}),
    ],
)
async def test_a_peer_that_does_not_serve_the_blob_is_unavailable(
    status: int, headers: dict[str, str]
) -> None:
    client = PeerClient(SECRET, transport=Scripted(status, headers))
    with pytest.raises(PeerUnavailable) as raised:
        await read(client, 0)
    assert raised.value.node_url == NODE and raised.value.status == 502
    await client.aclose()


async def test_a_peer_that_cannot_be_reached_is_unavailable() -> None:
    port_with_nothing = 9  # discard: nothing listens on loopback here
    client = PeerClient(SECRET, connect_timeout=2)
    with pytest.raises(PeerUnavailable):
        await client.open(f"http://127.0.0.1:{port_with_nothing}", "u", "r", DIGEST, 0)
    await client.aclose()


async def test_a_body_cut_short_is_a_transient_error_to_resume_from() -> None:
    client = PeerClient(SECRET, transport=Scripted(cut=100))
    body = await client.open(NODE, "docker.io", "library/app", DIGEST, 0)
    got = bytearray()
    with pytest.raises(RegistryError) as raised:
        async for chunk in body.chunks:
            got += chunk
    await body.aclose()
    assert bytes(got) == DATA[:-100]
    error = raised.value
    assert error.status == 502 and is_transient(error)  # the producer resumes, re-decides
    await client.aclose()


async def test_a_peer_body_on_a_socket_is_offered_to_the_pump_counted_and_mapped() -> None:
    """Over a real connection the body comes with ``blocking`` (the producer's fast lane):
    its bytes are counted as ``chunks`` counts them, and a cut is a transient error."""
    received: list[int] = []
    steps: list[Step] = [head(len(DATA)) + DATA[:10_000], 0.05, DATA[10_000:15_000], None]
    async with scripted_server(steps, "http") as port:
        client = PeerClient(SECRET, transport=wire_to(port), on_bytes=received.append)
        body = await client.open(NODE, "docker.io", "library/app", DIGEST, 0)
        try:
            assert body.blocking is not None
            read = partial(body.blocking.readinto, memoryview(bytearray(1 << 20)), 5.0)
            got = 0
            with pytest.raises(RegistryError) as raised:
                while count := await trio.to_thread.run_sync(read):
                    got += count
            await trio.testing.wait_all_tasks_blocked()  # counts reach the event loop
        finally:
            await body.aclose()
            await client.aclose()
    assert got == sum(received) == 15_000
    error = raised.value
    assert error.status == 502 and is_transient(error)
    assert f"peer {NODE}" in error.message


async def test_without_a_cluster_there_is_no_peer_endpoint(tmp_path: Path) -> None:
    fake = FakeRegistry()
    digest = fake.add_blob(DATA)
    async with (
        running_proxy(tmp_path, fake) as proxy,
        httpx.AsyncClient() as client,
    ):
        path = peer_path("registry.fake.test", "library/app", digest)
        response = await client.get(proxy.url + path)
        assert response.status_code == 404
        assert fake.blob_gets(digest) == []
        with trio.fail_after(1):
            assert (await client.get(f"{proxy.url}/_status.json")).json()["cluster"] is None
