"""The wire lab: an httpx transport (a FakeRegistry, a MockTransport) served over real TLS.

The large-buffer blob reader (``streamsync_trio.upstream._wire``) talks to sockets, not to an
httpx transport, so its fault tests need the fake upstream on a real connection: hypercorn on
a loopback port, with a certificate for ``*.fake.test`` signed by a test CA (made once per
session with the openssl command line).  The reader's ``connect`` goes to that port whatever
the host; TLS still checks the host name and sends it as SNI.  The ASGI adapter takes the
host from the request's ``Host``, so a redirect to ``cdn.fake.test`` reaches the fake as such.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import ssl
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from streamsync_trio import UpstreamConfig
from streamsync_trio.upstream import Upstream
from streamsync_trio.upstream._wire import WireTransport

from .fake_server import asgi_app


@dataclass(frozen=True)
class Certificates:
    ca: Path
    cert: Path
    key: Path


@functools.cache
def certificates() -> Certificates:
    """A test CA and a server certificate for the fake hosts, made once per session."""
    folder = Path(tempfile.mkdtemp(prefix="wirelab-"))
    atexit.register(shutil.rmtree, folder, True)
    names = ["DNS:registry.fake.test", "DNS:cdn.fake.test", "DNS:auth.fake.test"]
    return make_ca(folder, [*names, "IP:127.0.0.1"])  # the last for proxies served over TLS


def make_ca(folder: Path, names: list[str]) -> Certificates:
    """A throw-away CA in ``folder`` and a server certificate it signed for ``names``
    (``subjectAltName`` entries such as ``DNS:localhost`` or ``IP:127.0.0.1``), made with the
    openssl command line, so no Python crypto package is needed.  The benchmarks use it too."""
    folder.mkdir(parents=True, exist_ok=True)
    ca, ca_key = folder / "ca.pem", folder / "ca-key.pem"
    cert, key, csr = folder / "server.pem", folder / "server-key.pem", folder / "server.csr"
    extensions = folder / "server.ext"
    extensions.write_text(
        f"subjectAltName = {', '.join(names)}\n"
        "basicConstraints = CA:FALSE\nkeyUsage = digitalSignature, keyEncipherment\n"
        "extendedKeyUsage = serverAuth\n"
        "subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid,issuer\n"
    )
    p256 = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    # Python 3.13 verifies strictly (VERIFY_X509_STRICT): the CA needs its key usage.
    ca_ext = ["-addext", "keyUsage = critical, keyCertSign, cRLSign"]
    ca_ext += ["-addext", "basicConstraints = critical, CA:TRUE"]
    _openssl("req", "-x509", *p256, *ca_ext, "-keyout", ca_key, "-out", ca, "-subj", "/CN=test CA")
    subject = names[0].split(":", 1)[1]
    _openssl("req", *p256, "-keyout", key, "-out", csr, "-subj", f"/CN={subject}")
    _openssl(
        *("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial"),
        *("-out", cert, "-days", "2", "-extfile", extensions),
    )
    return Certificates(ca, cert, key)


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def client_context(ca: Path | None = None) -> ssl.SSLContext:
    """What the proxy's clients verify with, trusting ``ca`` (the test CA by default)."""
    return ssl.create_default_context(cafile=str(ca or certificates().ca))


@asynccontextmanager
async def serving_tls(transport: httpx.AsyncBaseTransport) -> AsyncIterator[int]:
    """Serve ``transport`` over HTTPS on a free loopback port; yields the port."""
    certs = certificates()
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 0.2
    config.certfile = str(certs.cert)
    config.keyfile = str(certs.key)
    config.alpn_protocols = ["http/1.1"]
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        app = asgi_app(transport, by_host=True)
        binds = await nursery.start(
            partial(serve, app, config, shutdown_trigger=shutdown.wait)  # type: ignore[arg-type]
        )
        try:
            yield int(binds[0].rsplit(":", 1)[1])
        finally:
            shutdown.set()


def wire_to(port: int, ca: Path | None = None) -> WireTransport:
    """The blob reader, connecting to ``port`` on loopback whatever host a URL names."""

    async def connect(host: str, _port: int) -> trio.abc.Stream:
        return await trio.open_tcp_stream("127.0.0.1", port)

    return WireTransport(client_context(ca), connect=connect)


# Which reader the current test's blob bodies go through: "httpx" (from the transport the
# test scripts) or "wire" (the large-buffer reader, from the same transport served over real
# TLS).  Set per test by the ``blob_reader`` fixture (tests/conftest.py); tests marked
# ``both_readers`` run once with each, since what a client sees must not differ.
READER = ["httpx"]


@asynccontextmanager
async def upstream_reading(
    config: UpstreamConfig, transport: httpx.AsyncBaseTransport
) -> AsyncIterator[Upstream]:
    """An :class:`Upstream` over ``transport`` whose blob bodies go through ``READER``."""
    async with AsyncExitStack() as stack:
        wire = None
        if READER[0] == "wire":
            wire = wire_to(await stack.enter_async_context(serving_tls(transport)))
        upstream = Upstream(config, transport=transport, blob_transport=wire)
        try:
            yield upstream
        finally:
            await upstream.aclose()


# -- a scripted server on a real socket -----------------------------------------------------


@dataclass(frozen=True)
class Trickle:
    """Send ``data`` with what goes on the wire (the ciphertext, over TLS) cut into pieces
    of ``piece`` bytes, ``every`` seconds apart."""

    data: bytes
    piece: int
    every: float


# bytes to send, seconds to wait, a trickle, or None: close now
Step = bytes | float | Trickle | None


class _Throttled(trio.abc.Stream):
    """The server's socket, which trickles what it sends while ``trickle`` is set."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.trickle: Trickle | None = None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.trickle is None:
            await self.stream.send_all(data)
            return
        view = memoryview(data)
        for start in range(0, len(view), self.trickle.piece):
            await self.stream.send_all(view[start : start + self.trickle.piece])
            await trio.sleep(self.trickle.every)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.stream.aclose()


@asynccontextmanager
async def scripted_server(steps: list[Step], scheme: str) -> AsyncIterator[int]:
    """One connection on a free loopback port: read the request head, play ``steps``, then
    hold the connection open until the test is done.  Yields the port."""
    context = None
    if scheme == "https":
        certs = certificates()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(certs.cert, certs.key)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    done = trio.Event()

    async def serve_one() -> None:
        wire = _Throttled(await listeners[0].accept())
        stream: trio.abc.Stream = wire
        if context is not None:
            stream = trio.SSLStream(wire, context, server_side=True)
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some(65536)
        for step in steps:
            if step is None:
                break
            if isinstance(step, float):
                await trio.sleep(step)
            elif isinstance(step, Trickle):
                wire.trickle = step
                await stream.send_all(step.data)
                wire.trickle = None
            else:
                await stream.send_all(step)
        else:
            await done.wait()
        await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_one)
        try:
            yield listeners[0].socket.getsockname()[1]
        finally:
            done.set()
            await listeners[0].aclose()


def head(length: int) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % length
