"""Blob GET and HEAD: the request translated to the blob service, its answer to a response.

The service (``core/_blobs``) decides who may read the blob and from where; this handler only
turns headers into arguments and the answer into status, headers and body.  Two HTTP facts
shape it:

* Status and headers leave before the first body byte, so the handler waits until the
  upstream's headers are in (``Subscriber.wait_answer``) before returning: an upstream 404 or
  401 still reaches the client as a real 404 or 401.
* Once headers are out, the only honest way to report a failure is to stop short of
  ``Content-Length`` (or, for a blob of unknown length sent chunked, without the last chunk):
  the body iterator raises, and hypercorn closes the connection.
"""

from __future__ import annotations

from functools import partial

from quart import Response, request

from .._reference import Endpoint, parse_digest
from ..core import BlobHead, BlobRead
from ..upstream import Route, Upstream
from ._access_log import mark_source
from ._bodies import BlobResponseBody
from ._ranges import parse_range
from ._state import ProxyState
from ._zerocopy import sent_encrypted, zero_copy_offered


async def serve_blob(
    state: ProxyState, upstream: Upstream, target: Route, endpoint: Endpoint
) -> Response:
    digest = parse_digest(endpoint.reference)
    headers = {
        "Docker-Content-Digest": str(digest),
        "Accept-Ranges": "bytes",
        "Content-Type": "application/octet-stream",
        "ETag": f'"{digest}"',
    }
    opened = await state.blobs.open(
        upstream,
        target.repo,
        digest,
        head=request.method == "HEAD",
        on_source=partial(mark_source, request.scope),
    )
    if isinstance(opened, BlobHead):
        response = Response(b"", headers=headers)
        response.headers["Content-Length"] = str(opened.size)
        return response
    subscriber = opened.subscriber
    try:
        size = await subscriber.wait_answer()
        # Several Range fields are one multi-range request, which parse_range refuses.
        ranges = request.headers.getlist("Range")
        if size is None and (ranges or request.http_version != "1.1"):
            # A blob of unknown length goes out chunked as it arrives, except to a Range
            # (which needs the size) and to HTTP/1.0 (which cannot tell an aborted body
            # without a length from a complete one): these wait for the whole blob.
            size = await subscriber.wait_size()
        span = None if size is None else parse_range(",".join(ranges) if ranges else None, size)
    except BaseException:
        subscriber.close()
        raise
    await state.blobs.admit(opened, count=request.method == "GET")
    status = 200
    if span is not None:
        subscriber.select_range(*span)
        status = 206
        headers["Content-Range"] = f"bytes {span[0]}-{span[1] - 1}/{size}"
    return _response(state, opened, status, headers, span or (0, size))


def _response(
    state: ProxyState,
    opened: BlobRead,
    status: int,
    headers: dict[str, str],
    span: tuple[int, int | None],
) -> Response:
    """The response for the bytes ``span`` of the blob (``None`` as its end: unknown yet)."""
    start, end = span
    if end is None:
        # Chunked: a failure then ends the body without its last chunk (hypercorn closes
        # the connection), which a client sees as incomplete, as it would a short body.
        # Bytes, not file ranges: this path is rare, and h11 frames each chunk itself.
        body = BlobResponseBody(
            opened.subscriber,
            state.chunk_budget,
            state.traffic,
            opened.source,
            encrypted=sent_encrypted(request.scope),
        )
        chunked = Response(body, headers=headers)
        chunked.timeout = None
        return chunked
    if request.method == "HEAD":
        opened.subscriber.close()
        response = Response(b"", status=status, headers=headers)
    else:
        body = BlobResponseBody(
            opened.subscriber,
            state.chunk_budget,
            state.traffic,
            opened.source,
            zero_copy=state.config.zero_copy and zero_copy_offered(request.scope),
            encrypted=sent_encrypted(request.scope),
        )
        response = Response(body, status=status, headers=headers)
        response.timeout = None
    response.headers["Content-Length"] = str(end - start)
    return response
