"""tags/list and referrers: answered from the upstream's whole listing (see ``core/_listings``),
collected once and cached briefly, then paged or filtered for each client."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

from quart import Response, request

from .._reference import Endpoint, parse_digest
from ..core import (
    INDEX_MEDIA_TYPE,
    TAGS_CONTENT_TYPE,
    fetch_all,
    paginate,
    parse_referrers,
    parse_tag_query,
    parse_tags,
    referrers_size,
    render_referrers,
    render_tags,
    sorted_tags,
    tags_link,
    tags_size,
    upstream_not_found,
)
from ..upstream import Route, Upstream
from ._state import ProxyState


async def serve_listing(
    state: ProxyState, upstream: Upstream, target: Route, endpoint: Endpoint
) -> Response:
    if endpoint.kind == "referrers":
        digest = parse_digest(endpoint.reference)
        artifact_type = request.args.get("artifactType")
        path = f"/v2/{target.repo}/referrers/{digest}"
        referrers = await _listing(state, upstream, target.repo, path, kind="referrers")
        body = render_referrers(referrers, artifact_type)
        headers = {"Content-Type": INDEX_MEDIA_TYPE}
        if artifact_type is not None:
            headers["OCI-Filters-Applied"] = "artifactType"
    else:
        n, last = parse_tag_query(request.args)
        path = f"/v2/{target.repo}/tags/list"
        tags = await _listing(state, upstream, target.repo, path, kind="tags")
        page, next_last = paginate(tags, n, last)
        # The name the client asked for, not the upstream's (``docker.io/alpine``, not
        # ``library/alpine``), so its next request lands here again.
        body = render_tags(endpoint.name, page)
        headers = {"Content-Type": TAGS_CONTENT_TYPE}
        if n is not None and next_last is not None:
            headers["Link"] = tags_link(endpoint.name, n, next_last, request.args.get("ns"))
    response = Response(b"" if request.method == "HEAD" else body, headers=headers)
    response.headers["Content-Length"] = str(len(body))
    return response


async def _listing(
    state: ProxyState, upstream: Upstream, repo: str, path: str, *, kind: str
) -> Sequence[Any]:
    """The upstream's whole listing at ``path``, from the brief cache or collected now
    (once, however many clients ask for it meanwhile)."""

    async def referrers() -> Sequence[Any]:
        return await fetch_all(
            partial(upstream.passthrough, repo, path, accept=INDEX_MEDIA_TYPE),
            path,
            parse_referrers,
            upstream=upstream.name,
            not_found=lambda body: upstream_not_found(
                body, "UNSUPPORTED", f"upstream {upstream.name} has no referrers API here"
            ),
        )

    async def tags() -> Sequence[Any]:
        found = await fetch_all(
            partial(upstream.passthrough, repo, path),
            path,
            parse_tags,
            upstream=upstream.name,
            not_found=lambda body: upstream_not_found(
                body, "NAME_UNKNOWN", f"repository not found upstream at {upstream.name}"
            ),
        )
        return sorted_tags(found)

    if kind == "referrers":
        return await state.passthrough_cache.get_or_fetch(
            (upstream.name, path), referrers, referrers_size
        )
    return await state.passthrough_cache.get_or_fetch((upstream.name, path), tags, tags_size)
