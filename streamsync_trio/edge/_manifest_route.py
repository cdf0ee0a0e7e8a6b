"""Manifest GET and HEAD: the client's ``Accept`` to the manifest service, its answer back."""

from __future__ import annotations

from quart import Response, request

from .._reference import Endpoint
from ..core import Accept, CachedManifest
from ..upstream import Route, Upstream
from ._state import ProxyState


async def serve_manifest(
    state: ProxyState, upstream: Upstream, target: Route, endpoint: Endpoint
) -> Response:
    state.traffic.manifest_requests += 1
    manifest = await state.manifests.get(
        upstream,
        target.repo,
        endpoint.reference,
        # Every Accept line: clients send one per media type (see _negotiation).
        Accept.parse(request.headers.getlist("Accept")),
        head=request.method == "HEAD",
    )
    return _response(manifest)


def _response(manifest: CachedManifest) -> Response:
    headers = {
        "Content-Type": manifest.media_type,
        "Docker-Content-Digest": manifest.digest,
        "ETag": f'"{manifest.digest}"',
    }
    body = b"" if request.method == "HEAD" or manifest.body is None else manifest.body
    response = Response(body, headers=headers)
    response.headers["Content-Length"] = str(manifest.size)
    return response
