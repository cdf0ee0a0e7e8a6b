"""The large-buffer blob reader (``upstream._wire``): framing, faults, TLS, proxies.

The fault tests the httpx reader has run against this one too (see ``BOTH_READERS`` in
test_upstream.py); here are the faults only a socket can show: a response split anywhere, a
lying Content-Length, a stalled or refused connection, a certificate that does not verify, and
the environment's proxy settings.
"""

from __future__ import annotations

import gzip
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import certifi
import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamsync_trio import RegistryError, UpstreamConfig
from streamsync_trio.upstream._client import Upstream
from streamsync_trio.upstream._wire import WireTransport

from ..labs.fakes import FakeRegistry, Fault, digest_of
from ..labs.wirelab import client_context, serving_tls, wire_to

HOST = "registry.fake.test"
REPO = "library/app"
BLOB = os.urandom(300_000)
DIGEST = digest_of(BLOB)


class Scripted(trio.abc.Stream):
    """A connection whose peer sends ``pieces`` one receive at a time, then closes."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = list(pieces)
        self.sent = bytearray()
        self.closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sent += data

    async def wait_send_all_might_not_block(self) -> None:
        pass

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        if not self.pieces:
            return b""
        piece = self.pieces.pop(0)
        if max_bytes is not None and len(piece) > max_bytes:
            self.pieces.insert(0, piece[max_bytes:])
            piece = piece[:max_bytes]
        return piece

    async def aclose(self) -> None:
        self.closed = True


def scripted_transport(stream: Scripted) -> WireTransport:
    async def connect(host: str, port: int) -> trio.abc.Stream:
        return stream

    return WireTransport(client_context(Path(certifi.where())), connect=connect)


async def read_all(stream: Scripted) -> tuple[httpx.Response, bytes]:
    transport = scripted_transport(stream)
    response = await transport.handle_async_request(httpx.Request("GET", f"http://{HOST}/b"))
    try:
        assert isinstance(response.stream, httpx.AsyncByteStream)
        body = b"".join([piece async for piece in response.stream])
    finally:
        await response.aclose()
    return response, body


def framed(body: bytes, framing: str, chunk_sizes: list[int]) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
    if framing == "length":
        return head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    if framing == "close":
        return head + b"Connection: close\r\n\r\n" + body
    chunks, position = [], 0
    for size in [*chunk_sizes, len(body)]:
        piece = body[position : position + max(size, 1)]
        if piece:
            chunks.append(b"%x\r\n%s\r\n" % (len(piece), piece))
        position += len(piece)
    return head + b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(chunks) + b"0\r\n\r\n"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=st.binary(max_size=3000),
    framing=st.sampled_from(["length", "chunked", "close"]),
    chunk_sizes=st.lists(st.integers(1, 700), max_size=6),
    cuts=st.lists(st.integers(0, 4000), max_size=12),
)
def test_a_response_split_anywhere_parses_to_the_same_bytes(
    body: bytes, framing: str, chunk_sizes: list[int], cuts: list[int]
) -> None:
    raw = framed(body, framing, chunk_sizes)
    points = sorted({c for c in cuts if 0 < c < len(raw)})
    pieces = [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]
    response, received = trio.run(read_all, Scripted(pieces))
    assert response.status_code == 200
    assert received == body


async def test_the_request_names_the_host_and_asks_to_close() -> None:
    stream = Scripted([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"])
    await read_all(stream)
    head = bytes(stream.sent).split(b"\r\n")
    assert head[0] == b"GET /b HTTP/1.1"
    assert b"Host: registry.fake.test" in head and b"Connection: close" in head
    assert stream.closed


async def test_a_body_shorter_than_its_content_length_is_an_error() -> None:
    stream = Scripted([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", b"12345"])
    with pytest.raises(httpx.RemoteProtocolError, match="5 bytes missing"):
        await read_all(stream)


async def test_bytes_past_the_content_length_are_not_part_of_the_body() -> None:
    stream = Scripted([b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nabcd", b"efgh"])
    _, body = await read_all(stream)
    assert body == b"abcd"


async def test_a_truncated_chunked_body_is_an_error() -> None:
    stream = Scripted([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabc"])
    with pytest.raises(httpx.RemoteProtocolError):
        await read_all(stream)


async def test_a_compressed_body_is_passed_on_as_sent() -> None:
    """The digest is of the bytes as sent: a blob is never inflated on the way in."""
    packed = gzip.compress(b"layer bytes")
    head = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n"
    _, body = await read_all(Scripted([head % len(packed) + packed]))
    assert body == packed


# -- over real TLS ---------------------------------------------------------------------------


@asynccontextmanager
async def upstream_with(
    fake: FakeRegistry, wire: WireTransport | None = None, *, port: int | None = None, **kw: object
) -> AsyncIterator[Upstream]:
    async with serving_tls(fake) as served:
        config = UpstreamConfig(name=HOST, url=f"https://{HOST}", **kw)  # type: ignore[arg-type]
        upstream = Upstream(config, transport=fake, blob_transport=wire or wire_to(served))
        try:
            yield upstream
        finally:
            await upstream.aclose()


async def read_blob(upstream: Upstream) -> bytes:
    async with upstream.open_blob(REPO, DIGEST) as body:
        return b"".join([piece async for piece in body.chunks])


def stocked() -> FakeRegistry:
    fake = FakeRegistry()
    fake.add_blob(BLOB)
    return fake


async def test_a_blob_arrives_whole_over_tls() -> None:
    async with upstream_with(stocked()) as upstream:
        assert await read_blob(upstream) == BLOB


async def test_a_certificate_from_an_untrusted_ca_is_refused() -> None:
    fake = stocked()
    async with serving_tls(fake) as port:
        wire = wire_to(port, ca=Path(certifi.where()))  # the public CAs, not the test CA
        async with upstream_with(fake, wire) as upstream:
            with pytest.raises(RegistryError) as error:
                await read_blob(upstream)
    assert (error.value.status, error.value.code) == (502, "UNAVAILABLE")
    assert "cannot connect" in error.value.message
    assert fake.blob_gets(DIGEST) == []  # nothing was sent over it


async def test_a_certificate_for_another_host_is_refused() -> None:
    """The URL's host is checked against the certificate (and sent as SNI)."""
    fake = stocked()
    async with serving_tls(fake) as port:
        config = UpstreamConfig(name="other.test", url="https://other.test")
        upstream = Upstream(config, transport=fake, blob_transport=wire_to(port))
        try:
            with pytest.raises(RegistryError) as error:
                await read_blob(upstream)
        finally:
            await upstream.aclose()
    assert "cannot connect" in error.value.message


async def test_a_stalled_body_times_out_as_a_read_timeout() -> None:
    fake = stocked()
    fake.faults[DIGEST] = [Fault(stall_at=100_000)]
    received = bytearray()
    async with upstream_with(fake, read_timeout=0.3) as upstream:
        with pytest.raises(RegistryError) as error:
            async with upstream.open_blob(REPO, DIGEST) as body:
                async for piece in body.chunks:
                    received += piece
    assert error.value.status == 504
    assert "read timeout" in error.value.message
    assert bytes(received) == BLOB[:100_000]


async def test_a_refused_connection_is_502() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    async with upstream_with(stocked(), wire_to(port)) as upstream:
        with pytest.raises(RegistryError) as error:
            await read_blob(upstream)
    assert error.value.status == 502
    assert "cannot connect" in error.value.message


async def test_a_proxy_from_the_environment_is_used_for_blobs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The wire reader never tunnels: where HTTPS_PROXY applies, httpx's proxy transport
    fetches the blob; NO_PROXY sends it back to the wire reader."""
    seen: list[bytes] = []
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    proxy_port = listener.getsockname()[1]

    async def proxy() -> None:
        connection, _ = await listener.accept()
        with connection:
            seen.append(await connection.recv(4096))

    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy_port}")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(proxy)
        async with upstream_with(stocked()) as upstream:
            with pytest.raises(RegistryError):
                await read_blob(upstream)
    listener.close()
    assert seen and seen[0].startswith(b"CONNECT registry.fake.test:443 ")
    monkeypatch.setenv("NO_PROXY", HOST)
    async with upstream_with(stocked()) as upstream:
        assert await read_blob(upstream) == BLOB
