"""The wire reader's blocking side (``_wire.SocketBody``): a body a worker thread reads.

These need a real socket (the body reads a duplicate of the connection's descriptor), so a
scripted server on loopback sends a response in pieces, with pauses, over plain TCP or TLS
with the test CA; the reads run in a worker thread, as the core's pump runs them.
"""

from __future__ import annotations

import os
import random
from functools import partial

import httpx
import pytest
import trio

from streamsync_trio import RegistryError, UpstreamConfig
from streamsync_trio.upstream._client import Upstream
from streamsync_trio.upstream._wire import BLOCKING_BODY, SocketBody

from ..labs.fakes import FakeRegistry, Fault, digest_of
from ..labs.wirelab import Step, Trickle, head, scripted_server, serving_tls, wire_to

HOST = "registry.fake.test"
SCHEMES = ["http", "https"]


async def open_body(
    port: int, scheme: str, read_timeout: float | None = 5.0
) -> tuple[httpx.Response, SocketBody]:
    transport = wire_to(port)
    request = httpx.Request(
        "GET", f"{scheme}://{HOST}/b", extensions={"timeout": {"read": read_timeout}}
    )
    response = await transport.handle_async_request(request)
    body = response.extensions[BLOCKING_BODY]
    assert isinstance(body, SocketBody)
    return response, body


def read_all(body: SocketBody, size: int = 1 << 20, timeout: float = 5.0) -> bytes:
    """In a worker thread: every byte, with buffers of ``size``."""
    buffer = memoryview(bytearray(size))
    out = bytearray()
    while True:
        count = body.readinto(buffer, timeout)
        if count == 0:
            return bytes(out)
        if count:
            out += buffer[:count]


def split(raw: bytes, rng: random.Random) -> list[Step]:
    cuts = sorted({rng.randrange(1, len(raw)) for _ in range(rng.randrange(0, 8))})
    steps: list[Step] = []
    for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True):
        steps += [raw[a:b], 0.002]  # a pause, so the pieces arrive apart
    return steps


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_a_response_split_anywhere_reads_to_the_same_bytes(scheme: str) -> None:
    rng = random.Random(11)
    for _ in range(12):
        body = rng.randbytes(rng.choice([0, 1, 5000, 70_000, 300_000]))
        async with scripted_server(split(head(len(body)) + body, rng), scheme) as port:
            response, socket_body = await open_body(port, scheme)
            try:
                got = await trio.to_thread.run_sync(
                    read_all, socket_body, rng.choice([7, 4096, 1 << 20])
                )
            finally:
                await response.aclose()
        assert got == body


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_a_short_body_is_an_error_naming_what_is_missing(scheme: str) -> None:
    async with scripted_server([head(10) + b"12345", 0.05], scheme) as port:
        response, body = await open_body(port, scheme)
        try:
            buffer = memoryview(bytearray(100))
            assert await trio.to_thread.run_sync(body.readinto, buffer, 5.0) == 5
            # The server now holds the connection: nothing more within the timeout.
            assert await trio.to_thread.run_sync(body.readinto, buffer, 0.2) is None
        finally:
            await response.aclose()
    async with scripted_server([head(10) + b"12345", None], scheme) as port:
        response, body = await open_body(port, scheme)
        try:
            with pytest.raises(httpx.RemoteProtocolError, match="5 bytes missing"):
                await trio.to_thread.run_sync(read_all, body)
        finally:
            await response.aclose()


async def test_a_peer_that_closes_early_leaves_the_body_short() -> None:
    fake = FakeRegistry()
    data = os.urandom(400_000)
    digest = fake.add_blob(data)
    fake.faults[digest] = [Fault(drop_at=150_000)]
    async with serving_tls(fake) as port:
        config = UpstreamConfig(name=HOST, url=f"https://{HOST}")
        upstream = Upstream(config, transport=fake, blob_transport=wire_to(port))
        try:
            async with upstream.open_blob("library/app", digest) as blob:
                assert blob.blocking is not None
                buffer = memoryview(bytearray(1 << 20))
                received = 0
                with pytest.raises(RegistryError) as error:
                    while count := await trio.to_thread.run_sync(
                        blob.blocking.readinto, buffer, 5.0
                    ):
                        received += count
        finally:
            await upstream.aclose()
    assert received == 150_000
    assert (error.value.status, error.value.code) == (502, "UNAVAILABLE")
    assert "bytes missing" in error.value.message


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("together", [True, False], ids=["with-head", "after-head"])
async def test_bytes_past_the_content_length_are_never_read(scheme: str, together: bool) -> None:
    steps: list[Step] = [head(4) + b"abcdEXTRA"] if together else [head(4), 0.1, b"abcdEXTRA"]
    async with scripted_server(steps, scheme) as port:
        response, body = await open_body(port, scheme)
        try:
            assert await trio.to_thread.run_sync(read_all, body) == b"abcd"
        finally:
            await response.aclose()


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_the_read_timeout_counts_from_the_last_byte_across_reads(scheme: str) -> None:
    steps: list[Step] = [head(10) + b"12", 0.2, b"34", 1.0, b"567890"]
    async with scripted_server(steps, scheme) as port:
        response, body = await open_body(port, scheme, read_timeout=0.3)
        try:
            buffer = memoryview(bytearray(100))
            assert await trio.to_thread.run_sync(body.readinto, buffer, 5.0) == 2
            assert await trio.to_thread.run_sync(body.readinto, buffer, 5.0) == 2
            started = trio.current_time()  # the last byte: the read timeout counts from here
            with pytest.raises(httpx.ReadTimeout):
                while True:  # short waits, as the pump makes them between flushes
                    await trio.to_thread.run_sync(body.readinto, buffer, 0.05)
            assert 0.25 < trio.current_time() - started < 0.9
        finally:
            await response.aclose()


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_time_between_reads_is_not_a_read_timeout(scheme: str) -> None:
    """The read timeout counts waiting for bytes, not what the reader does between reads
    (a batch written to a slow disk): bytes that came meanwhile are read, not refused."""
    async with scripted_server([head(4) + b"12", 0.2, b"34"], scheme) as port:
        response, body = await open_body(port, scheme, read_timeout=0.3)
        try:
            buffer = memoryview(bytearray(100))
            assert await trio.to_thread.run_sync(body.readinto, buffer, 5.0) == 2
            await trio.sleep(0.6)  # busy elsewhere
            assert await trio.to_thread.run_sync(body.readinto, buffer, 5.0) == 2
        finally:
            await response.aclose()


async def test_a_trickling_tls_record_does_not_hold_a_read_past_its_timeout() -> None:
    """Ciphertext arriving a few bytes at a time, never a whole record: each read still
    returns at its timeout, so the pump can look at its own clocks."""
    record = b"x" * 2000
    steps: list[Step] = [head(len(record)), 0.05, Trickle(record, piece=64, every=0.05)]
    async with scripted_server(steps, "https") as port:
        response, body = await open_body(port, "https", read_timeout=None)
        try:
            buffer = memoryview(bytearray(4096))
            started = trio.current_time()
            assert await trio.to_thread.run_sync(body.readinto, buffer, 0.3) is None
            assert trio.current_time() - started < 0.8  # the record takes about 1.6 s
            got = bytearray()
            with trio.fail_after(10):
                while len(got) < len(record):
                    count = await trio.to_thread.run_sync(body.readinto, buffer, 0.3)
                    got += buffer[: count or 0]
            assert bytes(got) == record
        finally:
            await response.aclose()


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_an_interrupt_ends_a_waiting_read_at_once(scheme: str) -> None:
    async with scripted_server([head(10) + b"12"], scheme) as port:
        response, body = await open_body(port, scheme, read_timeout=None)
        try:
            buffer = memoryview(bytearray(100))
            assert await trio.to_thread.run_sync(body.readinto, buffer, 5.0) == 2
            outcome: list[BaseException] = []

            def wait_long() -> None:
                try:
                    body.readinto(buffer, 60.0)
                except BaseException as exc:
                    outcome.append(exc)

            with trio.fail_after(5):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(partial(trio.to_thread.run_sync, wait_long))
                    await trio.sleep(0.2)
                    body.interrupt()
            assert isinstance(outcome[0], httpx.ReadError)
            assert "interrupted" in str(outcome[0])
        finally:
            await response.aclose()


async def test_the_event_loop_keeps_its_socket_and_the_duplicate_is_closed() -> None:
    """The thread's waits must not make the shared socket blocking, and closing the
    response closes the thread's duplicate descriptor."""
    before = len(os.listdir("/proc/self/fd"))
    async with scripted_server([head(6), 0.1, b"abc", 0.3, b"def"], "http") as port:
        response, body = await open_body(port, "http")
        buffer = memoryview(bytearray(100))
        assert await trio.to_thread.run_sync(body.readinto, buffer, 60.0) == 3
        assert os.get_blocking(body._socket.fileno()) is False
        assert await trio.to_thread.run_sync(body.readinto, buffer, 0.05) is None
        assert os.get_blocking(body._socket.fileno()) is False
        assert isinstance(response.stream, httpx.AsyncByteStream)
        rest = b"".join([piece async for piece in response.stream])  # the event loop reads
        assert rest == b"def"
        await response.aclose()
    assert len(os.listdir("/proc/self/fd")) == before


async def test_only_a_body_with_a_length_on_a_real_socket_is_offered() -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    async with scripted_server([chunked], "http") as port:
        transport = wire_to(port)
        response = await transport.handle_async_request(httpx.Request("GET", f"http://{HOST}/b"))
        assert BLOCKING_BODY not in response.extensions
        await response.aclose()
    fake = FakeRegistry()
    digest = fake.add_blob(b"small")
    upstream = Upstream(UpstreamConfig(name=HOST, url=f"https://{HOST}"), transport=fake)
    try:
        async with upstream.open_blob("library/app", digest) as blob:
            assert blob.blocking is None  # an httpx transport: chunks only
            assert b"".join([c async for c in blob.chunks]) == b"small"
    finally:
        await upstream.aclose()
    assert digest == digest_of(b"small")
