"""The fast path: cached manifests by digest and small stored blobs, answered before Quart.

Why: a fleet pulling one image sends thousands of small GETs and HEADs for the same few
objects, all answered from the cache, and for those Quart's full request cycle (request and
response objects, routing, before/after hooks, the body iterator) was most of the cost: under
wrk the proxy served fewer of them per second than Distribution's proxy.  This ASGI wrapper
answers the requests whose answer is certain at once from memory (the core's
``ManifestService.hot`` and ``BlobService.hot``), and passes everything else to Quart
unchanged: any query string, body, ``Range``, root path, a header it cannot read, a
credential not verified within the last minute, a digest not linked to the repository, an
object not in memory or no longer the file on disk, any 404 remembered.  So every refusal,
every error document and every upstream request still comes from the one slow path.

What it sends is what the slow path sends for the same request, byte for byte: the status,
the headers in the same order (``Docker-Distribution-API-Version`` last, as the after-request
hook adds it), the body; the counters it moves are the same (manifest requests; blob hits and
bytes served); the access log (the wrapper outside this one) writes the same line, with the
same source.  ``tests/edge/test_hot_path.py`` compares the two paths request by request.
"""

from __future__ import annotations

import logging

from quart import Quart

from .._config import Config
from .._errors import RegistryError
from .._reference import Digest, parse_digest, parse_v2_path
from ..core import Accept, CachedManifest
from ..upstream import route
from ._access_log import ASGIApp, Message, Receive, Scope, Send, mark_source
from ._auth import Htpasswd
from ._error_handlers import API_VERSION_HEADER
from ._state import STATE_KEY, ProxyState

log = logging.getLogger("streamsync_trio.http")

# The app's config key that turns the fast path off (tests compare the two paths with it).
ENABLED_KEY = "STREAMSYNC_HOT_PATH"
_API_VERSION = [(k.lower().encode(), v.encode()) for k, v in API_VERSION_HEADER.items()]
# Request headers that send a request to the slow path whatever it asks.
_SLOW_HEADERS = frozenset({b"range", b"content-length", b"transfer-encoding"})

Answer = tuple[list[tuple[bytes, bytes]], bytes]  # (response headers, body)


def with_hot_path(app: ASGIApp, quart: Quart, config: Config, auth: Htpasswd | None) -> ASGIApp:
    """Wrap Quart's ASGI app with the fast path (see the module's opening)."""

    async def hot_path(scope: Scope, receive: Receive, send: Send) -> None:
        state = quart.extensions.get(STATE_KEY)
        if (
            scope["type"] == "http"
            and scope["method"] in ("GET", "HEAD")
            and isinstance(state, ProxyState)
            and quart.config.get(ENABLED_KEY, True)
        ):
            try:
                answer = await _answer(state, config, auth, scope)
            except Exception:
                # A defect here must not cost the client its answer: the slow path gives it.
                log.exception("fast path failed on %s %s", scope["method"], scope["path"])
                answer = None
            if answer is not None:
                await _send(send, *answer)
                return
        await app(scope, receive, send)

    return hot_path


async def _send(send: Send, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    start: Message = {"type": "http.response.start", "status": 200, "headers": headers}
    await send(start)
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _answer(
    state: ProxyState, config: Config, auth: Htpasswd | None, scope: Scope
) -> Answer | None:
    """The response, when the fast path can give it; None sends the request to Quart."""
    path: str = scope["path"]
    if not path.startswith("/v2/") or scope["query_string"] or scope.get("root_path"):
        return None
    headers = _request_headers(scope)
    if headers is None:
        return None
    if auth is not None and auth.verified_user(_single(headers, "authorization")) is None:
        return None
    try:
        endpoint = parse_v2_path(path[4:], scope["method"])
        if endpoint.kind not in ("manifest", "blob"):
            return None
        target = route(config, endpoint.name, None)
        digest = parse_digest(endpoint.reference) if endpoint.kind == "blob" else None
    except RegistryError:
        return None
    upstream = state.upstreams[target.upstream.name]
    head = scope["method"] == "HEAD"
    if digest is not None:
        data = await state.blobs.hot(upstream, target.repo, digest)
        if data is None:
            return None
        return _blob_answer(state, scope, digest, data, head)
    manifest = state.manifests.hot(
        upstream, target.repo, endpoint.reference, Accept.parse(headers.get("accept", []))
    )
    if manifest is None:
        return None
    state.traffic.manifest_requests += 1
    return _manifest_headers(manifest), b"" if head else (manifest.body or b"")


def _request_headers(scope: Scope) -> dict[str, list[str]] | None:
    """The request's headers by lower-case name, decoded as Quart decodes them (latin-1);
    None when one of them sends the request to the slow path."""
    found: dict[str, list[str]] = {}
    for name, value in scope["headers"]:
        if name in _SLOW_HEADERS and (name != b"content-length" or value.strip() != b"0"):
            return None
        found.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))
    return found


def _single(headers: dict[str, list[str]], name: str) -> str | None:
    """The header's value; with several fields, the first (as ``Headers.get`` takes it)."""
    values = headers.get(name)
    return values[0] if values else None


def _manifest_headers(manifest: CachedManifest) -> list[tuple[bytes, bytes]]:
    """The headers ``_manifest_route`` sends, in its order."""
    return [
        (b"content-type", manifest.media_type.encode()),
        (b"docker-content-digest", manifest.digest.encode()),
        (b"etag", f'"{manifest.digest}"'.encode()),
        (b"content-length", str(manifest.size).encode()),
        *_API_VERSION,
    ]


def _blob_answer(
    state: ProxyState, scope: Scope, digest: Digest, data: bytes, head: bool
) -> Answer:
    """The headers ``_blob_route`` sends for a stored blob, in its order; a GET counted as
    its ``admit`` and body count it (a hit, and the bytes served from the cache)."""
    mark_source(scope, "cache")
    text = str(digest).encode()
    headers = [
        (b"docker-content-digest", text),
        (b"accept-ranges", b"bytes"),
        (b"content-type", b"application/octet-stream"),
        (b"etag", b'"' + text + b'"'),
        (b"content-length", str(len(data)).encode()),
        *_API_VERSION,
    ]
    if head:
        return headers, b""
    state.blobs.requests["hit"] += 1
    if data:
        state.traffic.served("cache", len(data))
    return headers, data
