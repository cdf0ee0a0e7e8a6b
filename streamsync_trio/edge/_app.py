"""The HTTP edge: translates OCI distribution requests to the core and back.

Nothing here decides policy.  Each handler parses the request (``_reference``, ``_routing``,
``_ranges``), asks the core (``_streaming``, ``_manifests``, ``_upstream``), and turns the answer
or the :class:`RegistryError` into a response.  Two HTTP facts shape the blob handler:

* Status and headers leave before the first body byte, so the handler waits until the
  upstream's headers are in (``Subscriber.wait_answer``) before returning: an upstream 404 or
  401 still reaches the client as a real 404 or 401.
* Once headers are out, the only honest way to report a failure is to stop short of
  ``Content-Length`` (or, for a blob of unknown length sent chunked, without the last chunk):
  the body iterator raises, and hypercorn closes the connection.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from .._config import Config
from .._errors import RegistryError, blob_unknown
from .._logging import mark_source, with_access_log
from .._reference import Digest, Endpoint, parse_digest, parse_v2_path
from ..core import (
    Accept,
    BackgroundTasks,
    CachedManifest,
    CacheKeeper,
    DownloadRegistry,
    FileRange,
    ListingCache,
    ManifestService,
    RetryPolicy,
    SizeBound,
    Store,
    Subscriber,
    remembering,
)
from ..core import _listings as listings
from ..upstream import Route, Upstream, route
from ._auth import Htpasswd
from ._metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ._metrics import Traffic, render_own
from ._metrics import render as render_metrics
from ._peers import publish_periodically, read_others, withdraw
from ._ranges import parse_range
from ._status import render_status_page, status_snapshot
from ._zerocopy import enable_in_hypercorn, with_file_ranges, zero_copy_offered

log = logging.getLogger("streamsync_trio.http")

API_VERSION_HEADER = {"Docker-Distribution-API-Version": "registry/2.0"}


# Bytes per zero-copy body chunk (a FileRange).  They cost no memory here, only one round
# through Quart, hypercorn and h11, so they are bigger than chunks of bytes.  Warm, 8 clients
# (MB/s, CPU s/GB): 1 MiB 2304, 0.38; 2 MiB 2569, 0.33; 4 MiB 2490, 0.29; 8 MiB 2642, 0.26;
# 16 MiB 2678, 0.26.  Beyond 4 MiB the gain is within the machine's noise, while each range is
# a longer stretch of one client's body before the next turn of its loop.
FILE_RANGE = 4 * 1024 * 1024


class ChunkBudget:
    """Memory for response chunks in flight, shared by this process's open blob bodies.

    A body holds about one chunk at a time (read, then sent).  Big chunks cost less per byte
    (hypercorn, h11 and trio do a fixed amount of work per chunk): serving a cached blob to 8
    clients, 2 MiB chunks measured 11 % faster than 1 MiB with 10 % less CPU per GB, and
    512 KiB 10 % slower.  Peak RSS grew from 71 to 88 MiB, and with a fixed chunk size it
    would keep growing with the number of clients.  So the chunk is this budget divided among
    the open bodies, within bounds: 2 MiB for up to 8 clients, down to 256 KiB for 64 and
    more, so the chunks in flight stay within 16 MiB up to 64 concurrent blob responses.
    """

    TOTAL = 16 * 1024 * 1024
    SMALLEST = 256 * 1024
    LARGEST = 2 * 1024 * 1024

    def __init__(self) -> None:
        self.open_bodies = 0

    def chunk(self) -> int:
        share = self.TOTAL // max(1, self.open_bodies)
        return max(self.SMALLEST, min(self.LARGEST, share))


@dataclass
class ProxyState:
    """What the app holds for its lifetime; built in ``before_serving`` inside the app nursery."""

    config: Config
    store: Store
    downloads: DownloadRegistry
    manifests: ManifestService
    upstreams: dict[str, Upstream]
    started_at: float
    traffic: Traffic = field(default_factory=Traffic)
    chunk_budget: ChunkBudget = field(default_factory=ChunkBudget)
    # tags/list and referrers, collected whole from the upstream: (upstream, path) -> entries
    passthrough_cache: ListingCache[tuple[str, str], Sequence[Any]] = field(
        default_factory=ListingCache
    )

    @property
    def peers_dir(self) -> Path:
        """Where the worker processes on this cache publish their metrics (``_peers``)."""
        return self.store.root / "workers"


class _BlobBody:
    """The response body of a blob: reads through a subscriber, closes it when done.

    A class rather than an async generator so that Quart's ``aclose`` (or, if the response is
    dropped unsent, the finaliser) always releases the subscriber and its share of the chunk
    budget, even when iteration never started.
    """

    def __init__(
        self,
        subscriber: Subscriber,
        budget: ChunkBudget,
        traffic: Traffic,
        source: str,
        *,
        zero_copy: bool = False,
    ) -> None:
        self._subscriber = subscriber
        self._zero_copy = zero_copy
        self._budget = budget
        self._traffic = traffic
        self._source = source
        budget.open_bodies += 1
        self._open = True

    def __aiter__(self) -> AsyncIterator[bytes | FileRange]:
        return self

    async def __anext__(self) -> bytes | FileRange:
        try:
            if self._zero_copy:
                data = await self._subscriber.read_or_range(self._budget.chunk(), FILE_RANGE)
            else:
                data = await self._subscriber.read(self._budget.chunk())
        except BaseException:
            self._close()
            raise
        if not data:
            self._close()
            raise StopAsyncIteration
        self._traffic.served(self._source, len(data))
        return data

    async def aclose(self) -> None:
        self._close()

    def _close(self) -> None:
        if self._open:
            self._open = False
            self._budget.open_bodies -= 1
        self._subscriber.close()

    def __del__(self) -> None:
        self._close()


def _error_response(error: RegistryError) -> Response:
    headers = {"Content-Type": "application/json", **API_VERSION_HEADER, **error.headers}
    return Response(error.to_json(), status=error.status, headers=headers)


def create_app(config: Config, *, transport: httpx.AsyncBaseTransport | None = None) -> QuartTrio:
    """Build the proxy app.  ``transport`` replaces the network (tests inject faults with it)."""
    app = QuartTrio(__name__)
    # Blob responses last as long as the blob takes; Quart's 60 s default would cut them.
    app.config["RESPONSE_TIMEOUT"] = None
    # On SIGTERM hypercorn first gives in-flight responses its graceful_timeout; when the app
    # then shuts down, downloads still running are ended at once (partials removed) rather
    # than after Quart's default 5 s more, so the whole stop stays within graceful_timeout.
    app.config["BACKGROUND_TASK_SHUTDOWN_TIMEOUT"] = 0
    app.url_map.merge_slashes = False
    app.url_map.strict_slashes = False
    holder: dict[str, ProxyState] = {}
    # Loaded now, so a bad htpasswd file stops the server at start, naming the problem.
    auth = (
        Htpasswd.load(config.htpasswd, config.auth_realm) if config.htpasswd is not None else None
    )
    # Probes must work without credentials; metrics only if the operator says so.
    open_paths = {"/healthz", "/readyz"} | ({"/metrics"} if config.metrics_open else set())
    # Outermost, so the access log still sees (and counts) the file ranges as body chunks.
    app.asgi_app = with_file_ranges(  # type: ignore[method-assign,assignment]
        with_access_log(app.asgi_app)
    )
    enable_in_hypercorn()  # the app's bodies decide whether to send file ranges

    def state() -> ProxyState:
        return holder["state"]

    @app.before_serving
    async def start() -> None:
        store = Store(config.storage_root)
        removed = await trio.to_thread.run_sync(store.remove_leftover_partials)
        if removed:
            log.warning("removed %d partial download(s) left by a previous run", removed)
        await trio.to_thread.run_sync(store.migrate_manifests)  # once; it logs what it did
        usage = await trio.to_thread.run_sync(store.scan)
        tasks = BackgroundTasks(app.nursery)
        app.extensions["streamsync.tasks"] = tasks
        keeper: CacheKeeper | None = None
        if config.max_size is not None:
            # Busy: being downloaded, or read by any client (from the cache, or joined to a
            # download and still reading after its commit: the store counts both).
            keeper = CacheKeeper(
                store,
                config.max_size,
                lambda digest: downloads.get(digest) is not None or store.is_being_read(digest),
                lambda: sum(d.available for d in downloads.in_flight() if not d.followed),
            )
            tasks.start("eviction", keeper.run)
            store.on_released = keeper.blob_committed  # a blob it passed by may go now
        downloads = DownloadRegistry(
            store,
            app.nursery,
            chunk_size=config.chunk_size,
            on_commit=(lambda _: keeper.blob_committed()) if keeper is not None else None,
        )
        if keeper is not None:
            keeper.blob_committed()  # the cap may have shrunk since the last run
        holder["state"] = ProxyState(
            config=config,
            store=store,
            downloads=downloads,
            manifests=ManifestService(store, app.nursery),
            upstreams={u.name: Upstream(u, transport=transport) for u in config.upstreams},
            started_at=time.time(),
        )
        app.extensions["streamsync"] = holder["state"]
        peers_dir = holder["state"].peers_dir
        peers_dir.mkdir(exist_ok=True)
        tasks.start("listing expiry", holder["state"].passthrough_cache.expire_periodically)
        tasks.start(
            "metrics publisher",
            publish_periodically,
            peers_dir,
            partial(render_own, holder["state"]),
        )
        log.info(
            "serving from cache %s (%d blobs, %d bytes); upstreams: %s",
            store.root,
            usage.blobs,
            usage.bytes,
            ", ".join(
                f"{u.name}={u.url}{' (default)' if u.default else ''}" for u in config.upstreams
            ),
        )

    @app.after_serving
    async def stop() -> None:
        withdraw(state().peers_dir)
        for upstream in state().upstreams.values():
            await upstream.aclose()

    @app.before_request
    async def authenticate() -> None:
        if auth is None or request.path in open_paths:
            return
        if await auth.user_for(request.headers.get("Authorization")) is None:
            raise auth.challenge()

    @app.after_request
    async def api_version(response: Response) -> Response:
        response.headers.update(API_VERSION_HEADER)
        return response

    @app.errorhandler(RegistryError)
    async def registry_error(error: RegistryError) -> Response:
        if error.status == 401 and "WWW-Authenticate" not in error.headers:
            # RFC 7235: every 401 carries a challenge.  When the upstream refused us, the
            # client can do nothing with it but show it; that is still the honest answer.
            error.headers["WWW-Authenticate"] = f'Basic realm="{config.auth_realm}"'
        return _error_response(error)

    @app.errorhandler(Exception)
    async def unexpected_error(error: Exception) -> Response:
        # Never an HTML traceback page: a registry client only understands OCI errors.
        log.exception("unexpected error on %s %s", request.method, request.path)
        return _error_response(RegistryError(500, "UNKNOWN", "internal error"))

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        code = {404: "NOT_FOUND", 405: "UNSUPPORTED"}.get(status, "UNKNOWN")
        return _error_response(RegistryError(status, code, error.description or error.name))

    @app.route("/metrics")
    async def metrics() -> Response:
        others = await trio.to_thread.run_sync(read_others, state().peers_dir)
        return Response(
            render_metrics(state(), others), headers={"Content-Type": METRICS_CONTENT_TYPE}
        )

    @app.route("/_status")
    async def status_page() -> Response:
        page = render_status_page(status_snapshot(state()))
        return Response(page, headers={"Content-Type": "text/html; charset=utf-8"})

    @app.route("/_status.json")
    async def status_json() -> Response:
        return Response(
            json.dumps(status_snapshot(state())), headers={"Content-Type": "application/json"}
        )

    def background_tasks() -> BackgroundTasks:
        tasks = app.extensions["streamsync.tasks"]
        assert isinstance(tasks, BackgroundTasks)
        return tasks

    @app.route("/healthz")
    async def healthz() -> Response:
        # Alive unless this process cannot recover by itself (see ``_tasks``): then the
        # orchestrator should replace it.  A full disk is not that; it fails readiness.
        problems = background_tasks().liveness_problems()
        if not problems:
            return Response(b'{"status":"ok"}', headers={"Content-Type": "application/json"})
        body = json.dumps({"status": "failing", "problems": problems})
        return Response(body, status=503, headers={"Content-Type": "application/json"})

    @app.route("/readyz")
    async def readyz() -> Response:
        problems = background_tasks().readiness_problems()
        problems += await trio.to_thread.run_sync(state().store.check_writable)
        body = json.dumps(
            {"status": "ready" if not problems else "not ready", "problems": problems}
        )
        return Response(
            body, status=503 if problems else 200, headers={"Content-Type": "application/json"}
        )

    @app.route("/v2/", methods=["GET", "HEAD"])
    @app.route("/v2", methods=["GET", "HEAD"])
    async def base() -> Response:
        return Response(b"{}", headers={"Content-Type": "application/json"})

    @app.route("/v2/<path:rest>", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"])
    async def v2(rest: str) -> Response:
        endpoint = parse_v2_path(rest, request.method)
        target = route(config, endpoint.name, request.args.get("ns"))
        upstream = state().upstreams[target.upstream.name]
        if endpoint.kind == "blob":
            return await _blob(state(), upstream, target, endpoint)
        if endpoint.kind == "manifest":
            state().traffic.manifest_requests += 1
            manifest = await state().manifests.get(
                upstream,
                target.repo,
                endpoint.reference,
                # Every Accept line: clients send one per media type (see _negotiation).
                Accept.parse(request.headers.getlist("Accept")),
                head=request.method == "HEAD",
            )
            return _manifest_response(manifest)
        return await _passthrough(state(), upstream, target, endpoint)

    return app


def _manifest_response(manifest: CachedManifest) -> Response:
    headers = {
        "Content-Type": manifest.media_type,
        "Docker-Content-Digest": manifest.digest,
        "ETag": f'"{manifest.digest}"',
    }
    body = b"" if request.method == "HEAD" or manifest.body is None else manifest.body
    response = Response(body, headers=headers)
    response.headers["Content-Length"] = str(manifest.size)
    return response


async def _blob(
    state: ProxyState, upstream: Upstream, target: Route, endpoint: Endpoint
) -> Response:
    digest = parse_digest(endpoint.reference)
    headers = {
        "Docker-Content-Digest": str(digest),
        "Accept-Ranges": "bytes",
        "Content-Type": "application/octet-stream",
        "ETag": f'"{digest}"',
    }
    store = state.store
    origin = (upstream.name, target.repo)
    in_flight = state.downloads.get(digest)
    known = store.is_linked(upstream.name, target.repo, digest) or (
        in_flight is not None and in_flight.origin == origin
    )
    if not known and (in_flight is not None or store.blob_size(digest) is not None):
        # We hold this blob for another repository.  Serve it under this one only once the
        # upstream confirms it, asked as this repository: knowing a digest is not access.
        await _head_blob(state, upstream, target.repo, digest)
        await trio.to_thread.run_sync(store.link, upstream.name, target.repo, [digest])
        known = True
    # From here to the subscription there is no checkpoint: a download committing
    # concurrently is seen either in the store or in the registry, never in neither.
    try:
        stored = state.downloads.open_stored(digest)
    except OSError as exc:
        log.error("cannot open cached blob %s: %s", store.blob_path(digest), exc)
        raise RegistryError(500, "UNKNOWN", "cache read failed") from None
    source, joining = "stream", False
    mark_source(request.scope, source)
    if stored is not None:
        subscriber = stored
        source = "cache"
        mark_source(request.scope, source)
    elif request.method == "HEAD":
        download = state.downloads.get(digest)
        size = download.size if download is not None else None
        if size is None:
            mark_source(request.scope, "upstream")
            size = await _head_blob(state, upstream, target.repo, digest)
        if size is None:
            raise blob_unknown(str(digest))
        # The length a GET would refuse is not passed on either.
        refusal = _blob_bound(state, upstream, target.repo, digest).refusal(size)
        if refusal is not None:
            raise refusal
        response = Response(b"", headers=headers)
        response.headers["Content-Length"] = str(size)
        return response
    else:
        # Not known here means nothing is stored or in flight: this request starts the
        # download, as this repository, so the upstream's answer is the confirmation.
        joining = state.downloads.get(digest) is not None
        subscriber = state.downloads.subscribe(
            digest,
            partial(upstream.open_blob, target.repo, str(digest)),
            stall_timeout=upstream.config.read_timeout,
            retry=RetryPolicy(max_retries=upstream.config.max_retries),
            origin=origin,
            group=upstream.name,
            bound=_blob_bound(state, upstream, target.repo, digest),
        )
        if subscriber.download.verified:
            source = "cache"  # another worker committed it just now
            mark_source(request.scope, source)
        joining = joining or subscriber.download.followed
        if not known and (subscriber.download.followed or subscriber.download.verified):
            # Another worker fetched it, maybe for another repository: knowing a digest is
            # not access, so the upstream confirms it for this one, as above.
            try:
                await _head_blob(state, upstream, target.repo, digest)
            except BaseException:
                subscriber.close()
                raise
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
    if not known:
        await trio.to_thread.run_sync(store.link, upstream.name, target.repo, [digest])
    if request.method == "GET":
        result = "hit" if source == "cache" else "join" if joining else "miss"
        state.traffic.blob_requests[result] += 1
    status = 200
    start, end = 0, size
    if span is not None:
        start, end = span
        subscriber.select_range(start, end)
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    if end is None:
        # Chunked: a failure then ends the body without its last chunk (hypercorn closes
        # the connection), which a client sees as incomplete, as it would a short body.
        # Bytes, not file ranges: this path is rare, and h11 frames each chunk itself.
        chunked = Response(
            _BlobBody(subscriber, state.chunk_budget, state.traffic, source), headers=headers
        )
        chunked.timeout = None
        return chunked
    if request.method == "HEAD":
        subscriber.close()
        response = Response(b"", status=status, headers=headers)
    else:
        response = Response(
            _BlobBody(
                subscriber,
                state.chunk_budget,
                state.traffic,
                source,
                zero_copy=state.config.zero_copy and zero_copy_offered(request.scope),
            ),
            status=status,
            headers=headers,
        )
        response.timeout = None
    response.headers["Content-Length"] = str(end - start)
    return response


def _blob_bound(state: ProxyState, upstream: Upstream, repo: str, digest: Digest) -> SizeBound:
    """How large this blob may be: what the repository's stored manifests declare, or else
    the upstream's (or the cache's) ``max_blob_size``.  Synchronous (one small read), so a
    caller between ``open_stored`` and ``subscribe`` stays without a checkpoint."""
    return SizeBound(
        declared=state.store.declared_size(upstream.name, repo, digest),
        maximum=upstream.config.max_blob_size or state.config.max_blob_size,
    )


async def _head_blob(
    state: ProxyState, upstream: Upstream, repo: str, digest: Digest
) -> int | None:
    """The upstream's HEAD of a blob, unless it said 404 for this repository moments ago
    (to a HEAD or to a download: the downloads' negative cache is shared)."""
    return await remembering(
        state.downloads.not_found,
        ((upstream.name, repo), digest),
        partial(upstream.head_blob, repo, str(digest)),
    )


async def _passthrough(
    state: ProxyState, upstream: Upstream, target: Route, endpoint: Endpoint
) -> Response:
    """tags/list and referrers: answered from the upstream's whole listing (``_listings``)."""
    if endpoint.kind == "referrers":
        digest = parse_digest(endpoint.reference)
        artifact_type = request.args.get("artifactType")
        referrers = await _listing(
            state,
            upstream,
            target.repo,
            f"/v2/{target.repo}/referrers/{digest}",
            kind="referrers",
        )
        body = listings.render_referrers(referrers, artifact_type)
        headers = {"Content-Type": listings.INDEX_MEDIA_TYPE}
        if artifact_type is not None:
            headers["OCI-Filters-Applied"] = "artifactType"
    else:
        n, last = listings.parse_tag_query(request.args)
        tags = await _listing(
            state, upstream, target.repo, f"/v2/{target.repo}/tags/list", kind="tags"
        )
        page, next_last = listings.paginate(tags, n, last)
        # The name the client asked for, not the upstream's (``docker.io/alpine``, not
        # ``library/alpine``), so its next request lands here again.
        body = listings.render_tags(endpoint.name, page)
        headers = {"Content-Type": listings.TAGS_CONTENT_TYPE}
        if n is not None and next_last is not None:
            ns = request.args.get("ns")
            headers["Link"] = listings.tags_link(endpoint.name, n, next_last, ns)
    response = Response(b"" if request.method == "HEAD" else body, headers=headers)
    response.headers["Content-Length"] = str(len(body))
    return response


async def _listing(
    state: ProxyState, upstream: Upstream, repo: str, path: str, *, kind: str
) -> Sequence[Any]:
    """The upstream's whole listing at ``path``, from the brief cache or collected now
    (once, however many clients ask for it meanwhile)."""

    async def referrers() -> Sequence[Any]:
        return await listings.fetch_all(
            partial(upstream.passthrough, repo, path, accept=listings.INDEX_MEDIA_TYPE),
            path,
            listings.parse_referrers,
            upstream=upstream.name,
            not_found=lambda body: listings.upstream_not_found(
                body, "UNSUPPORTED", f"upstream {upstream.name} has no referrers API here"
            ),
        )

    async def tags() -> Sequence[Any]:
        found = await listings.fetch_all(
            partial(upstream.passthrough, repo, path),
            path,
            listings.parse_tags,
            upstream=upstream.name,
            not_found=lambda body: listings.upstream_not_found(
                body, "NAME_UNKNOWN", f"repository not found upstream at {upstream.name}"
            ),
        )
        return listings.sorted_tags(found)

    if kind == "referrers":
        return await state.passthrough_cache.get_or_fetch(
            (upstream.name, path), referrers, listings.referrers_size
        )
    return await state.passthrough_cache.get_or_fetch(
        (upstream.name, path), tags, listings.tags_size
    )
