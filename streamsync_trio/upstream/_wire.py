"""Blob bodies at wire speed: an httpx transport that reads with large buffers.

Profiling the cold path (issue 11) showed the cost is per *piece*, not per byte: httpcore hands
a body over in pieces of at most 64 KiB, and trio's ``SSLStream`` in pieces of one TLS record
(16 KiB), and every piece makes a trip through httpcore, h11, a timeout scope and the trio
scheduler.  On a fast upstream that trip, not the network, was the ceiling (85-95 MB/s plain,
about 50 MB/s over TLS on the development machine).  This transport moves the same bytes in
pieces of up to :data:`RECEIVE_SIZE`:

* the response head is parsed by h11 (and chunked or close-delimited bodies stay with h11);
* a body with a ``Content-Length`` is then read straight from the stream, counting bytes, so a
  piece costs one ``recv`` and no copy through h11's buffer;
* TLS is an :class:`ssl.SSLObject` over memory BIOs (what trio's own ``SSLStream`` uses), but
  every socket read of up to 1 MiB is decrypted record after record in one synchronous loop
  instead of one scheduler trip per 16 KiB record.

It is an ``httpx.AsyncBaseTransport``, so everything above the socket stays httpx's: redirects
(and dropping ``Authorization`` when one leads to another origin), the request and response
models, the exception types the client maps to registry errors, and proxies: the client mounts
httpx's own proxy transports for the URLs ``HTTP(S)_PROXY``/``NO_PROXY`` route through a proxy
(see :func:`environment_mounts`), and this transport only ever talks to origins directly.

One connection per request, closed with the response: a blob holds its connection for the
whole transfer anyway, and a connection that is never reused cannot be found half-read.

A body with a ``Content-Length`` on a socket of ours is also offered, as the response
extension :data:`BLOCKING_BODY`, as a :class:`SocketBody`: the same bytes for a worker thread
to read with blocking calls, so the core's pump (``core/_pump``) can receive, hash and write
without the event loop.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, cast

import h11
import httpx
import trio

# Large enough that a piece's fixed cost (a scheduler trip, a timeout scope, a wake-up of the
# subscribers) is small beside its bytes; small enough that a few downloads at once stay
# within the memory budget.  Measured on loopback with bench/compare.py --fast-upstream.
RECEIVE_SIZE = 1024 * 1024
_TLS_RECORD = 16 * 1024  # the largest plaintext one TLS record carries
# Ciphertext worth a thread hop (about 50 us): below this, decrypting in place is cheaper.
_DECRYPT_IN_THREAD = 128 * 1024
_MAX_HEAD = 64 * 1024  # response line and headers; h11's limit on an incomplete event
_LONGEST_WAIT = 3600.0  # one blocking wait of a worker thread, when nothing bounds it

Connect = Callable[[str, int], Awaitable[trio.abc.Stream]]

# The response extension under which a body that a worker thread may read is offered
# (:class:`SocketBody`): a Content-Length body on a socket of our own.
BLOCKING_BODY = "streamsync.blocking_body"


log = logging.getLogger("streamsync_trio.upstream")


async def _open_tcp(host: str, port: int) -> trio.abc.Stream:
    return await trio.open_tcp_stream(host, port)


class WireTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 to an origin, directly, with large reads (see the module docstring).

    ``ssl_context`` is the one the httpx client verifies with, so both trust the same CAs
    (``SSL_CERT_FILE`` included); ``connect`` opens the TCP stream (tests point it at a
    local server while the URL keeps its host name, which TLS then checks and sends as SNI).
    """

    def __init__(self, ssl_context: ssl.SSLContext, *, connect: Connect = _open_tcp) -> None:
        self._ssl_context = ssl_context
        self._connect = connect

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        url = request.url
        if url.scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported scheme {url.scheme!r}", request=request)
        port = url.port or (443 if url.scheme == "https" else 80)
        # As httpcore logs its connections: which host each hop of a blob went to (a CDN's
        # redirect, say), never the query, which may carry a signature.
        log.debug("blob connection to %s:%d (%s)", url.host, port, url.scheme)
        with _mapped(request, httpx.ConnectError, httpx.ConnectTimeout, timeouts.get("connect")):
            stream = await self._connect(url.host, port)
            if url.scheme == "https":
                stream = await _TLSStream.wrap(stream, self._ssl_context, url.host)
        connection = _Connection(stream, request, timeouts.get("read"))
        try:
            with _mapped(request, httpx.WriteError, httpx.WriteTimeout, timeouts.get("write")):
                await connection.send_request()
            head = await connection.receive_head()
            log.debug("blob response %d from %s:%d", head.status_code, url.host, port)
            blocking = connection.blocking_body()
        except BaseException:
            await connection.aclose()
            raise
        extensions: dict[str, Any] = {"http_version": b"HTTP/1.1", "reason_phrase": head.reason}
        if blocking is not None:
            extensions[BLOCKING_BODY] = blocking
        return httpx.Response(
            head.status_code, headers=head.headers, stream=_Body(connection), extensions=extensions
        )


class _Connection:
    """One exchange on one connection: the request, the head, then the body's pieces."""

    def __init__(self, stream: trio.abc.Stream, request: httpx.Request, read: float | None):
        self._stream = stream
        self._request = request
        self._read_timeout = read
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEAD)
        self._remaining: int | None = None  # a Content-Length body read past h11
        self._socket_body: SocketBody | None = None
        self._closed = False

    async def send_request(self) -> None:
        request = self._request
        headers = [(k, v) for k, v in request.headers.raw if k.lower() != b"connection"]
        headers.append((b"Connection", b"close"))
        data = self._h11.send(
            h11.Request(method=request.method, target=request.url.raw_path, headers=headers)
        )
        data += self._h11.send(h11.EndOfMessage())
        await self._stream.send_all(data)

    async def receive_head(self) -> h11.Response:
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Response):
                break
            if not isinstance(event, h11.InformationalResponse):
                raise httpx.RemoteProtocolError(
                    f"unexpected {type(event).__name__}", request=self._request
                )
        length = _content_length(event)
        if length is not None and self._request.method != "HEAD" and event.status_code >= 200:
            self._remaining = length
        return event

    async def body(self) -> AsyncIterator[bytes]:
        if self._remaining is None:
            async for piece in self._framed_body():
                yield piece
            return
        # Whatever h11 already holds past the head first, then straight from the stream.
        while self._remaining > 0:
            event = self._h11.next_event()
            if not isinstance(event, h11.Data):
                break
            self._remaining -= len(event.data)
            yield bytes(event.data)
        while self._remaining > 0:
            piece = await self._receive(min(RECEIVE_SIZE, self._remaining))
            if not piece:
                raise _short_body(self._request, self._remaining)
            if len(piece) > self._remaining:
                piece = piece[: self._remaining]  # more than announced: never ours to keep
            self._remaining -= len(piece)
            yield piece

    async def _framed_body(self) -> AsyncIterator[bytes]:
        """Chunked, close-delimited or empty bodies: h11 does the framing."""
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return

    async def _next_event(self) -> Any:
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise httpx.RemoteProtocolError(str(exc), request=self._request) from exc
            if event is not h11.NEED_DATA:
                return event
            data = await self._receive(RECEIVE_SIZE)
            try:
                self._h11.receive_data(data)
            except h11.RemoteProtocolError as exc:
                raise httpx.RemoteProtocolError(str(exc), request=self._request) from exc

    async def _receive(self, max_bytes: int) -> bytes:
        with _mapped(self._request, httpx.ReadError, httpx.ReadTimeout, self._read_timeout):
            return bytes(await self._stream.receive_some(max_bytes))

    def blocking_body(self) -> SocketBody | None:
        """The body as a :class:`SocketBody`, when it has a length and the stream is a
        socket (or TLS over one) of ours; else None (h11 frames it, or a test's stream)."""
        if self._remaining is None:
            return None
        tls = self._stream if isinstance(self._stream, _TLSStream) else None
        stream = tls._stream if tls is not None else self._stream
        if not isinstance(stream, trio.SocketStream):
            return None
        try:
            duplicate = socket.socket(fileno=os.dup(stream.socket.fileno()))
        except OSError:  # out of descriptors, say: the async body reads it instead
            return None
        self._socket_body = SocketBody(self, duplicate, tls)
        return self._socket_body

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            if self._socket_body is not None:
                self._socket_body.close()
            with trio.CancelScope(shield=True):
                await self._stream.aclose()


class SocketBody:
    """The rest of a Content-Length body, read by blocking calls from a worker thread (the
    core's ``BlockingBody``, see ``core/_pump``).

    It reads the connection's socket through a duplicate of its descriptor, which the event
    loop does not touch while a thread reads it (the socket stays non-blocking; the waits
    are ``poll``), and decrypts TLS with the connection's own ``SSLObject``, whose BIOs may
    still hold ciphertext.  Bytes h11 received past the head come first.  The same bounds as
    :meth:`_Connection.body`: never past the length, a short body is an error, and the
    connection's read timeout, which counts the time spent waiting in :meth:`readinto` since
    the last byte (across calls that got nothing; not the time the caller spends between
    calls, writing to a slow disk, say).  :meth:`interrupt` shuts the socket down, which ends
    a wait in another thread at once; the connection is useless after it anyway.
    """

    def __init__(
        self, connection: _Connection, duplicate: socket.socket, tls: _TLSStream | None
    ) -> None:
        self._connection = connection
        self._socket = duplicate
        self._tls = tls
        self._interrupted = False
        self._waited = 0.0  # seconds spent waiting for bytes since the last byte
        self._leftover = bytearray()  # what h11 holds past the head; taken at the first read
        self._took_leftover = False

    def readinto(self, buffer: memoryview, timeout: float) -> int | None:
        """Up to ``len(buffer)`` bytes of the body into ``buffer``; 0 at its end, None when
        nothing arrived within ``timeout``.  Raises the httpx exceptions the async body
        raises for the same faults."""
        connection = self._connection
        request = connection._request
        remaining = connection._remaining
        assert remaining is not None
        if not self._took_leftover:
            self._take_leftover()
        if remaining <= 0:
            return 0
        limit = min(len(buffer), remaining)
        if self._leftover:
            count = min(limit, len(self._leftover))
            buffer[:count] = self._leftover[:count]
            del self._leftover[:count]
        else:
            try:
                received = self._waiting(buffer[:limit], timeout)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                if self._interrupted:
                    raise httpx.ReadError("interrupted", request=request) from None
                raise httpx.ReadError(str(exc) or type(exc).__name__, request=request) from exc
            if received is None:
                return None
            count = received
            if count == 0:
                if self._interrupted:
                    raise httpx.ReadError("interrupted", request=request)
                raise _short_body(request, remaining)
        connection._remaining = remaining - count
        self._waited = 0.0
        return count

    def _take_leftover(self) -> None:
        connection = self._connection
        self._took_leftover = True
        while True:  # counted in ``_remaining`` as they are handed out, like the rest
            event = connection._h11.next_event()
            if not isinstance(event, h11.Data):
                break
            self._leftover += event.data

    def _waiting(self, view: memoryview, timeout: float) -> int | None:
        """:meth:`_receive` within ``timeout`` and what is left of the read timeout, which
        is raised once the waits since the last byte add up to it."""
        read_timeout = self._connection._read_timeout
        wait = timeout
        if read_timeout is not None:
            wait = min(wait, read_timeout - self._waited)
        started = time.monotonic()
        count = self._receive(view, time.monotonic() + max(wait, 0.0))
        if count is None:
            self._waited += time.monotonic() - started
            if read_timeout is not None and self._waited >= read_timeout:
                raise httpx.ReadTimeout("read timed out", request=self._connection._request)
        return count

    def _receive(self, view: memoryview, deadline: float) -> int | None:
        """Bytes from the socket (decrypted, with TLS) into ``view``; None at ``deadline``
        (a TLS record trickling in counts against it too)."""
        while True:
            if self._tls is not None:
                filled = self._tls._decrypt_into(view)
                if filled or self._tls._eof:
                    return filled
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            # Never None (blocking): that would clear O_NONBLOCK on the socket the event
            # loop shares with this duplicate.
            self._socket.settimeout(min(max(left, 0.001), _LONGEST_WAIT))
            try:
                if self._tls is None:
                    return self._socket.recv_into(view, len(view))
                data = self._socket.recv(RECEIVE_SIZE)
            except TimeoutError:
                return None
            self._tls._received(data)

    def interrupt(self) -> None:
        self._interrupted = True
        with suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._socket.close()


class _Body(httpx.AsyncByteStream):
    def __init__(self, connection: _Connection) -> None:
        self._connection = connection

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for piece in self._connection.body():
            yield piece

    async def aclose(self) -> None:
        await self._connection.aclose()


def _short_body(request: httpx.Request, missing: int) -> httpx.RemoteProtocolError:
    """A body that ended before its ``Content-Length`` (httpcore's words for it)."""
    return httpx.RemoteProtocolError(
        f"peer closed connection without sending complete message body: {missing} bytes missing",
        request=request,
    )


def _content_length(response: h11.Response) -> int | None:
    """The body's length when h11 frames it by ``Content-Length`` (no Transfer-Encoding)."""
    lengths = [v for k, v in response.headers if k == b"content-length"]
    if not lengths or any(k == b"transfer-encoding" for k, _ in response.headers):
        return None
    try:
        return int(lengths[0])  # h11 has refused a malformed or conflicting one already
    except ValueError:
        return None


class _TLSStream(trio.abc.Stream):
    """TLS over a trio stream, decrypting everything one socket read brought at once.

    trio's ``SSLStream.receive_some`` returns one record (16 KiB) per call; here a call
    returns up to ``max_bytes`` of plaintext, read record by record into one buffer without
    going back to the scheduler while the memory BIO still holds ciphertext.  Verification
    and SNI come from the context (``check_hostname``) and ``server_hostname``.  A peer that
    closes without ``close_notify`` is read as the end of the stream, as httpcore does
    (``https_compatible``): the HTTP framing above detects a short body.
    """

    def __init__(self, stream: trio.abc.Stream, context: ssl.SSLContext, host: str) -> None:
        self._stream = stream
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_hostname=host)
        self._buffer = bytearray(RECEIVE_SIZE)
        self._eof = False

    @classmethod
    async def wrap(cls, stream: trio.abc.Stream, context: ssl.SSLContext, host: str) -> _TLSStream:
        tls = cls(stream, context, host)
        try:
            while True:
                try:
                    tls._tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await tls._flush()
                    if not await tls._fill():
                        raise ssl.SSLEOFError("connection closed in the TLS handshake") from None
            await tls._flush()
        except BaseException:
            await stream.aclose()
            raise
        return tls

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._tls.write(data)
        await self._flush()

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        limit = min(max_bytes or RECEIVE_SIZE, len(self._buffer))
        while True:
            if self._incoming.pending >= _DECRYPT_IN_THREAD:
                # Decryption releases the GIL: in a worker thread it runs beside the trio
                # thread (which serves the clients) instead of in its way.
                filled = await trio.to_thread.run_sync(self._decrypt, limit)
            else:
                filled = self._decrypt(limit)
            if filled or self._eof:
                return bytes(memoryview(self._buffer)[:filled])
            if not await self._fill():
                self._eof = True
                self._incoming.write_eof()

    def _decrypt(self, limit: int) -> int:
        return self._decrypt_into(memoryview(self._buffer)[:limit])

    def _decrypt_into(self, view: memoryview) -> int:
        """Plaintext into ``view``, record after record, while ciphertext is at hand."""
        limit = len(view)
        filled = 0
        while filled < limit:
            try:
                # With a buffer, read() returns the count (typeshed says bytes).
                count = cast(int, self._tls.read(min(_TLS_RECORD, limit - filled), view[filled:]))
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self._eof = True
                break
            if count == 0:
                self._eof = True
                break
            filled += count
        return filled

    def _received(self, data: bytes | bytearray) -> None:
        """Ciphertext from the socket, or ``b""`` at its end."""
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    async def _fill(self) -> bool:
        data = await self._stream.receive_some(RECEIVE_SIZE)
        if data:
            self._received(data)
        return bool(data)

    async def _flush(self) -> None:
        pending = self._outgoing.read()
        if pending:
            await self._stream.send_all(pending)

    async def aclose(self) -> None:
        await self._stream.aclose()


@contextmanager
def _mapped(
    request: httpx.Request,
    error: type[httpx.TransportError],
    timeout_error: type[httpx.TimeoutException],
    timeout: float | None,
) -> Iterator[None]:
    """Socket, TLS and timeout failures as the httpx exceptions the client maps to
    registry errors (and a certificate that does not verify is a failure to connect)."""
    try:
        with trio.fail_after(timeout if timeout is not None else float("inf")):
            yield
    except trio.TooSlowError as exc:
        raise timeout_error(
            f"{error.__name__.removesuffix('Error').lower()} timed out", request=request
        ) from exc
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        # ssl.SSLError is an OSError
        raise error(str(exc) or type(exc).__name__, request=request) from exc


def environment_mounts(
    ssl_context: ssl.SSLContext, limits: httpx.Limits
) -> dict[str, httpx.AsyncBaseTransport | None]:
    """httpx's proxy transports for the URLs the environment sends through a proxy.

    The same patterns httpx derives from ``HTTP(S)_PROXY``, ``ALL_PROXY`` and ``NO_PROXY``
    when it builds its own transports; ``None`` (a ``NO_PROXY`` entry) falls through to the
    client's own transport, this one.  Any URL a proxy applies to, a redirect target too, is
    fetched by httpx through that proxy: this transport never tunnels.
    """
    from httpx._utils import get_environment_proxies  # the function httpx itself uses

    mounts: dict[str, httpx.AsyncBaseTransport | None] = {}
    for pattern, proxy in get_environment_proxies().items():
        mounts[pattern] = (
            None
            if proxy is None
            else httpx.AsyncHTTPTransport(proxy=proxy, verify=ssl_context, limits=limits)
        )
    return mounts
