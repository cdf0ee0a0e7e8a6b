"""The peer endpoint: another node of the cluster reads a blob from this one.

``GET /_cluster/blobs/<upstream>/<repo>/<digest>``, signed with the shared secret (HMAC,
``cluster/_peerauth``) and never with a client's credentials: it is registered only in
cluster mode, and the client ``htpasswd`` check lets it through to this check instead.  It is
served like a client's GET of the blob (from the cache, or the download in flight with the
last byte held back until verified, or a new download) with one difference: a download it
starts never reads from a third node, and while our own download of the digest reads from a
peer the request is refused with 503, so the asking node decides again (one hop, no loops).
"""

from __future__ import annotations

import logging
import time

from quart import Quart, Response, request

from .._errors import RegistryError
from .._reference import parse_digest, parse_v2_path
from ..cluster import HEADER, PEER_PREFIX, Cluster, ClusterStats, PeerAuthError, verify
from ..core import BlobRead
from ._bodies import BlobResponseBody
from ._ranges import parse_range
from ._state import ProxyState, Traffic, proxy_state
from ._zerocopy import sent_encrypted, zero_copy_offered

log = logging.getLogger("streamsync_trio.cluster")


class _PeerTraffic(Traffic):
    """Bytes sent to peers count as peer bytes, not as bytes served to clients."""

    def __init__(self, stats: ClusterStats) -> None:
        super().__init__()
        self._stats = stats

    def served(self, source: str, count: int) -> None:
        self._stats.peer_bytes_sent += count


def add_peer_routes(app: Quart) -> None:
    @app.route(PEER_PREFIX + "<path:rest>", methods=["GET"])
    async def peer_blob(rest: str) -> Response:
        return await serve_peer_blob(proxy_state(app), rest)


def _authenticate(cluster: Cluster) -> None:
    """Raise 401 unless the request carries a valid, fresh signature of exactly its target."""
    target = request.scope.get("raw_path", b"").decode("latin-1")
    query = request.scope.get("query_string", b"")
    if query:
        target += "?" + query.decode("latin-1")
    try:
        verify(cluster.secret, request.method, target, request.headers.get(HEADER), time.time())
    except PeerAuthError as exc:
        cluster.stats.peer_requests["unauthorized"] += 1
        log.warning("peer request %s refused: %s", target, exc)  # the reason stays here
        raise RegistryError(
            401,
            "UNAUTHORIZED",
            "peer authentication required",
            headers={"WWW-Authenticate": HEADER},
        ) from None


async def serve_peer_blob(state: ProxyState, rest: str) -> Response:
    cluster = state.cluster
    if cluster is None:
        raise RegistryError(404, "NOT_FOUND", "not a cluster node")
    _authenticate(cluster)
    name, _, path = rest.partition("/")
    upstream = state.upstreams.get(name)
    repo, _, reference = path.rpartition("/")
    if upstream is None or not repo:
        raise RegistryError(404, "NAME_UNKNOWN", f"no upstream {name!r} on this node")
    endpoint = parse_v2_path(f"{repo}/blobs/{reference}", "GET")  # checks the name
    digest = parse_digest(endpoint.reference)
    if cluster.relaying(digest):
        cluster.stats.peer_requests["refused"] += 1
        raise RegistryError(
            503,
            "UNAVAILABLE",
            "this node reads that blob from another node",
            headers={"Retry-After": "1"},
        )
    opened = await state.blobs.open(upstream, endpoint.name, digest, forwardable=False)
    assert isinstance(opened, BlobRead)  # a GET, never a HEAD
    subscriber = opened.subscriber
    try:
        size = await subscriber.wait_answer()
        ranged = request.headers.get("Range")
        if size is None and ranged:
            size = await subscriber.wait_size()
        span = None if size is None else parse_range(ranged, size)
        await state.blobs.admit(opened, count=False)
    except BaseException:
        subscriber.close()
        raise
    cluster.stats.peer_requests["served"] += 1
    headers = {"Docker-Content-Digest": str(digest), "Content-Type": "application/octet-stream"}
    status = 200
    if span is not None:
        subscriber.select_range(*span)
        status = 206
        headers["Content-Range"] = f"bytes {span[0]}-{span[1] - 1}/{size}"
    if size is not None:
        start, end = span or (0, size)
        headers["Content-Length"] = str(end - start)
    body = BlobResponseBody(
        subscriber,
        state.chunk_budget,
        _PeerTraffic(cluster.stats),
        opened.source,
        # Chunked (size unknown) bodies go as bytes: h11 frames each chunk itself.
        zero_copy=size is not None and state.config.zero_copy and zero_copy_offered(request.scope),
        encrypted=sent_encrypted(request.scope),
    )
    response = Response(body, status=status, headers=headers)
    response.timeout = None
    return response
