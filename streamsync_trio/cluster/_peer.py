"""Reading a blob from another node: a signed GET on its peer endpoint, with large reads.

A node that lacks a digest another node is downloading makes that node its upstream for
the download: ``GET /_cluster/blobs/<upstream>/<repo>/<digest>`` with ``Range:
bytes=<offset>-``, signed with the shared secret (``_peerauth``).  The owner answers as it
answers a client: from its cache, or from its download in flight, holding the last byte back
until it verified the blob, so nothing complete ever leaves it unverified.  This node then
verifies the bytes again itself (``core/_producer``): a peer can cost time, never
correctness.

The bytes are most of a cluster's traffic, so they are read with the upstream client's
large-buffer transport (``upstream/_wire``, issue 11), not through httpcore's 64 KiB pieces.
Every failure before the body is a :class:`PeerUnavailable`, so the caller can try elsewhere
at once; a failure in the body is a transient ``RegistryError``, so the producer resumes and
decides again where from.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from dataclasses import dataclass
from urllib.parse import quote

import httpx
import trio

from .._errors import RegistryError, upstream_timeout, upstream_unavailable
from ..upstream._wire import BLOCKING_BODY, SocketBody, WireTransport
from ._peerauth import sign

PEER_PREFIX = "/_cluster/blobs/"
USER_AGENT = "streamsync-trio/0.1 (peer)"
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class PeerUnavailable(RegistryError):
    """A peer could not be asked (refused, reset, timed out) or did not answer 200/206;
    transient, so a producer that sees it resumes and decides again where from."""

    def __init__(self, node_url: str, why: str) -> None:
        super().__init__(502, "UNAVAILABLE", f"peer {node_url}: {why}")
        self.node_url = node_url


def peer_path(upstream: str, repo: str, digest: str) -> str:
    """The peer endpoint's path for a blob (what is signed, exactly as sent)."""
    return PEER_PREFIX + quote(f"{upstream}/{repo}/{digest}", safe="/:")


@dataclass
class PeerBody:
    """An open peer response: a :class:`~streamsync_trio.core.BlobBody` (``from_peer``, so
    the producer does not count its bytes as upstream bytes), with ``blocking`` for the
    producer's pump when the bytes come straight from a socket (the core's
    ``BlockingBody``), as an upstream body has."""

    total_size: int | None
    offset: int
    chunks: AsyncIterator[bytes]
    node_url: str
    _response: httpx.Response
    from_peer: bool = True
    blocking: PeerSocketBody | None = None

    async def aclose(self) -> None:
        await self._response.aclose()


class PeerSocketBody:
    """A peer body read by a worker thread: the peer's failures as ``chunks`` raises them,
    and its bytes counted (in the trio thread, where the counter lives)."""

    def __init__(self, body: SocketBody, node_url: str, on_bytes: Callable[[int], None]):
        self._body = body
        self._node_url = node_url
        self._on_bytes = on_bytes
        self._token = trio.lowlevel.current_trio_token()

    def readinto(self, buffer: memoryview, timeout: float) -> int | None:
        try:
            count = self._body.readinto(buffer, timeout)
        except httpx.HTTPError as exc:
            raise _body_failure(self._node_url, exc) from None
        if count:
            with suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._on_bytes, count)
        return count

    def interrupt(self) -> None:
        self._body.interrupt()


class PeerClient:
    """Opens blobs on other nodes.  ``transport`` replaces the network (tests)."""

    def __init__(
        self,
        secret: bytes,
        *,
        connect_timeout: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
        on_bytes: Callable[[int], None] = lambda count: None,
    ) -> None:
        self._secret = secret
        self._on_bytes = on_bytes
        # No read timeout here: the producer's stall timeout bounds every wait for bytes
        # (a peer that holds the last byte until it verified is not stalled).
        self._client = httpx.AsyncClient(
            transport=transport or WireTransport(httpx.create_ssl_context()),
            timeout=httpx.Timeout(
                connect=connect_timeout, read=None, write=connect_timeout, pool=connect_timeout
            ),
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def open(
        self, node_url: str, upstream: str, repo: str, digest: str, offset: int
    ) -> PeerBody:
        """The blob from ``offset`` on, once the peer's status and headers are in; the
        caller closes it.  Raises :class:`PeerUnavailable`."""
        request = self._client.build_request("GET", node_url + peer_path(upstream, repo, digest))
        target = request.url.raw_path.decode("ascii")
        request.headers.update(sign(self._secret, "GET", target, time.time()))
        if offset:
            request.headers["Range"] = f"bytes={offset}-"
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise PeerUnavailable(node_url, _describe(exc)) from None
        try:
            total, start = _extent(response, node_url)
        except BaseException:
            await response.aclose()
            raise
        body = PeerBody(total, start, self._chunks(response, node_url), node_url, response)
        socket_body = response.extensions.get(BLOCKING_BODY)
        if isinstance(socket_body, SocketBody):
            body.blocking = PeerSocketBody(socket_body, node_url, self._on_bytes)
        return body

    async def _chunks(self, response: httpx.Response, node_url: str) -> AsyncIterator[bytes]:
        try:
            async for chunk in response.aiter_raw():
                self._on_bytes(len(chunk))
                yield chunk
        except httpx.HTTPError as exc:
            raise _body_failure(node_url, exc) from None


def _body_failure(node_url: str, exc: httpx.HTTPError) -> RegistryError:
    """A peer body that failed: timed out, or dropped, reset, or short of its length (the
    owner failed or died).  Transient either way, so the producer resumes elsewhere."""
    if isinstance(exc, httpx.TimeoutException):
        return upstream_timeout(f"peer {node_url}", _describe(exc))
    return upstream_unavailable(f"peer {node_url}", _describe(exc))


def _extent(response: httpx.Response, node_url: str) -> tuple[int | None, int]:
    """(the blob's size if known, where the body starts) of a 200 or 206; anything else
    from a peer means "not from this one" (see the module docstring)."""
    if response.status_code == 200:
        length = response.headers.get("Content-Length")
        return (int(length) if length and length.isdigit() else None), 0
    if response.status_code == 206:
        match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
        if match is None:
            raise PeerUnavailable(node_url, "206 without a usable Content-Range")
        return (int(match[3]) if match[3] != "*" else None), int(match[1])
    raise PeerUnavailable(node_url, f"answered {response.status_code}")


def _describe(exc: httpx.HTTPError) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
