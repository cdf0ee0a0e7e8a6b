"""Blob bodies without copying: ``sendfile(2)`` under hypercorn, as the ASGI extension
``http.response.zerocopysend``.

Serving a cached layer is the hot path.  A body of ``bytes`` costs this process three copies
per byte (page cache to a buffer, buffer to ``bytes``, ``bytes`` to the socket), and with one
event loop those copies, not the network, set the throughput.  ``sendfile`` hands page-cache
pages to the socket instead.  Hypercorn 0.18 implements no zero-copy extension, and Quart
sends every item of a body iterator as ``http.response.body``, so this module has both halves:

* the server: :func:`enable_in_hypercorn` puts subclasses of hypercorn's HTTP stream, HTTP/1.1
  protocol and trio TCP server in place of the originals.  The stream advertises the extension
  on plain-text HTTP/1.1 only (TLS must encrypt the bytes in user space, HTTP/2 frames them
  itself) and passes the :class:`FileRange` on as body data; the protocol lets h11 frame it
  (``send_with_data_passthrough`` exists for exactly this); the TCP server sends it.  The TCP
  server also lets a send to a client that stopped reading be cancelled (see there).
* the app: :func:`with_file_ranges` turns the ``FileRange`` items of a body, which Quart wraps
  in ``http.response.body``, into ``http.response.zerocopysend`` messages.

Since the subclasses are in place anyway, they also fix how hypercorn 0.18 ends connections
(see :class:`_TCPServer`) and put a reason phrase in the status line (``200 OK``).

hypercorn is pinned (pyproject.toml), and the tests run these classes under the real server.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import os
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any, cast

import h11
import hypercorn.protocol as hypercorn_protocol
import trio
from hypercorn.events import Closed, Event, RawData
from hypercorn.protocol import h11 as hypercorn_h11
from hypercorn.protocol.events import Body
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.http_stream import ASGIHTTPState, HTTPStream
from hypercorn.trio import run as hypercorn_trio_run
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.typing import ASGISendEvent
from hypercorn.utils import suppress_body

from ..core import FileRange, cache_read_failed
from ._access_log import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("streamsync_trio.http")

ZEROCOPYSEND = "http.response.zerocopysend"

# Bounds on what a client may hold, read from hypercorn's config (``hypercorn.toml``) under
# these names, with these defaults.  hypercorn keeps keys it does not know as attributes.
HEADER_TIMEOUT_KEY = "header_timeout"
HEADER_TIMEOUT = 20.0  # seconds from a request's first byte to the end of its headers
MAX_CONNECTIONS_PER_CLIENT_KEY = "max_connections_per_client"
MAX_CONNECTIONS_PER_CLIENT = 256  # per worker process and client address; 0: no cap


def with_file_ranges(app: ASGIApp) -> ASGIApp:
    """Wrap an ASGI app whose bodies may yield :class:`FileRange` items: those leave as
    ``http.response.zerocopysend`` messages.  Bodies yield them only where
    :func:`zero_copy_offered` says the server takes them."""

    async def app_with_file_ranges(scope: Scope, receive: Receive, send: Send) -> None:
        if not zero_copy_offered(scope):
            await app(scope, receive, send)
            return

        async def send_ranges(message: Message) -> None:
            body = message.get("body") if message["type"] == "http.response.body" else None
            if isinstance(body, FileRange):
                message = {
                    "type": ZEROCOPYSEND,
                    "file": body,
                    "offset": body.offset,
                    "count": body.count,
                    "more_body": message.get("more_body", False),
                }
            await send(message)

        await app(scope, receive, send_ranges)

    return app_with_file_ranges


def zero_copy_offered(scope: Mapping[str, object]) -> bool:
    """Whether the server serving this request sends :class:`FileRange` bodies itself."""
    extensions = scope.get("extensions")
    return (
        scope.get("type") == "http" and isinstance(extensions, dict) and ZEROCOPYSEND in extensions
    )


def sent_encrypted(scope: Mapping[str, object]) -> bool:
    """Whether this request's response leaves through TLS (each chunk is then held several
    times on its way out: see ``ChunkBudget``)."""
    return scope.get("scheme") == "https"


class _OfferZeroCopy:
    """hypercorn's app wrapper, with the extension added to every HTTP scope."""

    def __init__(self, app: Any) -> None:
        self._app = app

    async def __call__(
        self, scope: dict[str, Any], receive: Any, send: Any, sync_spawn: Any, call_soon: Any
    ) -> None:
        scope["extensions"][ZEROCOPYSEND] = {}
        await self._app(scope, receive, send, sync_spawn, call_soon)


class _HTTPStream(HTTPStream):
    """hypercorn's HTTP stream, also taking ``http.response.zerocopysend``."""

    def __init__(
        self, app: Any, config: Any, context: Any, task_group: Any, ssl: bool, *args: Any
    ) -> None:
        if not ssl:
            app = _OfferZeroCopy(app)
        super().__init__(app, config, context, task_group, ssl, *args)

    async def app_send(self, message: ASGISendEvent | None) -> None:
        if message is None or message["type"] != ZEROCOPYSEND:
            await super().app_send(message)
            return
        file_range = cast(dict[str, Any], message)["file"]
        if not isinstance(file_range, FileRange):
            raise TypeError(f"{ZEROCOPYSEND}: this server sends FileRange objects only")
        if self.state != ASGIHTTPState.RESPONSE:
            file_range.close()
            await super().app_send(message)  # raises hypercorn's UnexpectedMessageError
            return
        if file_range.count and not suppress_body(
            self.scope["method"], int(self.response["status"])
        ):
            # Typed bytes, but h11 (send_with_data_passthrough) only needs its len().
            await self.send(Body(stream_id=self.stream_id, data=cast(bytes, file_range)))
        else:
            file_range.close()
        if not message.get("more_body", False):
            await super().app_send({"type": "http.response.body", "body": b"", "more_body": False})


class _H11Protocol(H11Protocol):
    """hypercorn's HTTP/1.1 protocol; lets h11 frame a :class:`FileRange` without its bytes,
    and gives every status line its reason phrase.

    hypercorn builds its h11 responses without a ``reason``, so h11 writes ``HTTP/1.1 200 ``:
    valid (RFC 9112 allows an empty phrase) but unusual enough to trip strict clients and
    confuse people reading a capture.  Every response (the app's, hypercorn's own error
    answers, ``100 Continue``) passes through here, so this is the one place to add it.
    """

    async def _send_h11_event(self, event: Any) -> None:
        if isinstance(event, (h11.Response, h11.InformationalResponse)) and not event.reason:
            event = dataclasses.replace(event, reason=_reason_phrase(event.status_code))
        if not (isinstance(event, h11.Data) and isinstance(event.data, FileRange)):
            await super()._send_h11_event(event)
            return
        try:
            pieces = self.connection.send_with_data_passthrough(event)
        except h11.LocalProtocolError:
            event.data.close()
            if self.connection.their_state != h11.ERROR:
                raise
            return
        for piece in pieces or ():
            await self.send(RawData(data=piece))


def _reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b"Unknown"  # a status code without a registered phrase


class _TCPServer(TCPServer):
    """hypercorn's trio connection, with two changes to how HTTP/1.1 sends:

    * a :class:`FileRange` leaves with ``sendfile(2)``;
    * a send can be cancelled.  hypercorn shields every send, so a client that stops reading
      but keeps its connection open held its response, and with it the graceful shutdown,
      forever (measured: still running 30 s after SIGTERM with ``--graceful-timeout 2``).
      A cancelled send leaves the response cut short, so the connection is closed at once:
      the client sees the abort, and no byte can follow a partial write.  Sends are only
      cancelled when the response is being given up anyway (shutdown past its grace period,
      client gone): Quart finishes sending before it cancels a request's tasks.

    HTTP/2 keeps hypercorn's shielded send: there a cancelled stream must not close the
    connection that every other stream shares.

    And three changes to how connections end, each a fault of hypercorn 0.18 measured here:

    * The close is shielded.  After a response that ends the connection (``Connection:
      close``, HTTP/1.0) hypercorn closes it from inside the app's last send, and quart-trio
      cancels the request's tasks at that very moment: the cancellation struck the close at
      its first checkpoint (``send_eof``), before the socket was closed, so the client got
      its response and then waited for an EOF that came only with the keep-alive timeout.
    * A connection the client has closed (or that failed, or timed out) is closed at once.
      hypercorn waited for its keep-alive timer instead, so every client that closed an idle
      connection left it in CLOSE-WAIT, holding an fd, for ``keep_alive_timeout`` (measured:
      5000 connect/close cycles took a worker from 9 to 5009 fds).
    * Bounds on slow and greedy clients: a request's headers must be complete within
      ``header_timeout`` seconds of the connection's start (first request) or of their
      first byte (later requests; between requests the keep-alive timeout applies).
      ``read_timeout`` only bounds the gap between two reads, which a slowloris client
      dribbling a line every few seconds never exceeds.  And one client address holds at
      most ``max_connections_per_client`` connections per worker process (more are closed
      unanswered); behind a reverse proxy every connection has the proxy's address.
    """

    async def run(self) -> None:
        client = _peer_host(self.stream)
        cap = int(getattr(self.config, MAX_CONNECTIONS_PER_CLIENT_KEY, MAX_CONNECTIONS_PER_CLIENT))
        if not _CLIENTS.admit(client, cap):
            await trio.aclose_forcefully(self.stream)
            return
        try:
            await super().run()
        finally:
            _CLIENTS.leave(client, cap)

    async def _read_data(self) -> None:
        """hypercorn's read loop, with the header deadline, and a close when it ends."""
        header_timeout = float(getattr(self.config, HEADER_TIMEOUT_KEY, HEADER_TIMEOUT))
        gap = self.config.read_timeout or math.inf
        headers_due = trio.current_time() + header_timeout  # the first request's
        while True:
            awaiting_headers = _awaiting_request_headers(self.protocol.protocol)
            if not awaiting_headers:
                headers_due = math.inf
            try:
                with trio.fail_at(min(trio.current_time() + gap, headers_due)):
                    data = await self.stream.receive_some(MAX_RECV)
            except (trio.ClosedResourceError, trio.BrokenResourceError, trio.TooSlowError):
                break
            if awaiting_headers and data and headers_due == math.inf:
                headers_due = trio.current_time() + header_timeout
            await self.protocol.handle(RawData(bytes(data)))
            if data == b"":
                break
        await self.protocol.handle(Closed())
        # Nothing more can come in; whatever the app still sends is cut short anyway (the
        # Closed above told it the client is gone), so the connection goes now.
        await self.idle_task.stop()
        await self._close()

    async def _close(self) -> None:
        with trio.CancelScope(shield=True):  # cannot block: shutdown(2) and close(2)
            await super()._close()

    async def protocol_send(self, event: Event) -> None:
        if not isinstance(event, RawData) or not isinstance(self.protocol.protocol, H11Protocol):
            await super().protocol_send(event)
            return
        data = event.data
        try:
            async with self.send_lock:
                if isinstance(data, FileRange):
                    await _send_file_range(self.stream, data)
                else:
                    await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
            # Busy: the client hung up mid-body, and ``_read_data`` is closing the stream
            # (``send_eof``, which takes trio's send guard but not our send lock) while this
            # send ran.  The only other sender is that closer, so it means "closed" too; a
            # 60-minute soak logged it 19 times as "Error in ASGI Framework".
            await self.protocol.handle(Closed())
        except trio.Cancelled:
            await trio.aclose_forcefully(self.stream)
            raise
        except _CacheReadFailed as failure:
            assert isinstance(data, FileRange)
            error = cache_read_failed(data.path, failure.offset, failure)
            # Closing the connection is how the client learns that the body is cut short;
            # the error then ends the response as a failed read does on the other path.
            await trio.aclose_forcefully(self.stream)
            raise error from None
        finally:
            if isinstance(data, FileRange):
                data.close()


class _OpenConnections:
    """Open connections by client address, in this process (all of them in its one event
    loop, so plain counting is safe)."""

    def __init__(self) -> None:
        self.by_client: dict[str, int] = {}
        self._warned: set[str] = set()

    def admit(self, client: str, cap: int) -> bool:
        count = self.by_client.get(client, 0)
        if cap > 0 and count >= cap:
            if client not in self._warned:  # once per burst, not per refused connection
                self._warned.add(client)
                log.warning("client %s has %d connections open; refusing more", client, cap)
            return False
        self.by_client[client] = count + 1
        return True

    def leave(self, client: str, cap: int) -> None:
        count = self.by_client.get(client, 1) - 1
        if count > 0:
            self.by_client[client] = count
        else:
            self.by_client.pop(client, None)
        if count < cap:
            self._warned.discard(client)


_CLIENTS = _OpenConnections()


def _peer_host(stream: Any) -> str:
    """The client's address, for the per-client cap ("" when it cannot be had)."""
    sock = getattr(stream, "socket", None) or getattr(
        getattr(stream, "transport_stream", None), "socket", None
    )
    try:
        peer = sock.getpeername() if sock is not None else ""
    except OSError:
        return ""  # already gone
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)


def _awaiting_request_headers(protocol: object) -> bool:
    """Whether an HTTP/1.1 connection is between requests or inside a request's headers
    (h11 leaves the client's state at IDLE until the whole head has arrived)."""
    if not isinstance(protocol, H11Protocol):
        return False
    connection = protocol.connection
    return isinstance(connection, h11.Connection) and connection.their_state is h11.IDLE


class _CacheReadFailed(Exception):
    def __init__(self, offset: int, why: object) -> None:
        super().__init__(str(why))
        self.offset = offset


# Errors of the socket, not of the file, from sendfile: the peer is gone or unreachable.
_SOCKET_ERRORS = {
    errno.EPIPE,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ENOTCONN,
    errno.ESHUTDOWN,
    errno.ETIMEDOUT,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.EBADF,  # closed by another task (keep-alive timeout, shutdown) meanwhile
    errno.ENOTSOCK,
}

# Bytes read in one worker-thread hop when the page cache no longer holds them.
_READ_PIECE = 1024 * 1024


async def _send_file_range(stream: Any, file_range: FileRange) -> None:
    """Send the whole range on a non-blocking trio socket stream, waiting when it is full.

    The page cache is asked again before every ``sendfile`` call: the body checked it when it
    made the range, but a slow client may come back for the rest much later, when a cache
    bigger than memory has evicted those pages, and ``sendfile`` would then wait for the disk
    inside the event loop.  Evicted pieces are read in a worker thread and sent as bytes.
    """
    if not isinstance(stream, trio.SocketStream):
        raise TypeError("zero-copy send needs a plain TCP stream")
    await trio.lowlevel.checkpoint_if_cancelled()
    sock = stream.socket
    offset, left = file_range.offset, file_range.count
    while left:
        if not file_range.cached(offset, left):
            piece = min(left, _READ_PIECE)
            try:
                data = await trio.to_thread.run_sync(os.pread, file_range.fd, piece, offset)
            except OSError as exc:
                raise _CacheReadFailed(offset, exc) from exc
            if not data:
                raise _CacheReadFailed(offset, "the file ended before the range")
            await stream.send_all(data)
            offset += len(data)
            left -= len(data)
            continue
        out = sock.fileno()
        if out < 0:
            raise trio.ClosedResourceError("the connection was closed")
        try:
            sent = os.sendfile(out, file_range.fd, offset, left)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        except OSError as exc:
            if exc.errno in _SOCKET_ERRORS:
                raise trio.BrokenResourceError(str(exc)) from exc
            raise _CacheReadFailed(offset, exc) from exc
        if sent == 0:
            raise _CacheReadFailed(offset, "the file ended before the range")
        offset += sent
        left -= sent
    await trio.lowlevel.cancel_shielded_checkpoint()


def enable_in_hypercorn() -> None:
    """Serve ``http.response.zerocopysend``, and let sends be cancelled, in hypercorn's trio
    worker.  Idempotent.

    hypercorn looks these classes up by module global when it creates a connection, so the
    replacement takes effect for every connection accepted afterwards, with either launcher
    (``streamsync-trio serve`` or ``hypercorn``): both import the app before serving.
    """
    setattr(hypercorn_h11, "HTTPStream", _HTTPStream)  # noqa: B010
    setattr(hypercorn_protocol, "H11Protocol", _H11Protocol)  # noqa: B010
    setattr(hypercorn_trio_run, "TCPServer", _TCPServer)  # noqa: B010
