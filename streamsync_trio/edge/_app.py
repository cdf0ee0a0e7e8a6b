"""The HTTP edge assembled: the ASGI app hypercorn serves, from the pieces beside this module.

Nothing in the edge decides policy.  Each handler parses the request (``_reference``,
``upstream.route``, ``_ranges``), asks the core (the blob and manifest services, the
listings), and turns the answer or the :class:`RegistryError` into a response.  The pieces:

* ``_lifecycle``: the state built at start (store, downloads, services, upstreams, background
  tasks) and closed at the end; ``_state`` holds it.
* ``_blob_route``, ``_manifest_route``, ``_listing_route``: the ``/v2/`` API, dispatched here
  by what the path names; ``_service_routes``: probes, metrics, the status page.
* ``_error_handlers``: every error as an OCI error document.
* ``_access_log`` and ``_zerocopy``: ASGI wrappers at the wire (one log line per request;
  file ranges sent with ``sendfile``); ``_hot_path``, inside them, answers cached manifests
  by digest and small stored blobs without Quart's request cycle.
"""

from __future__ import annotations

import httpx
from quart import Response, request
from quart_trio import QuartTrio

from .._config import Config
from .._reference import parse_v2_path
from ..cluster import PEER_PREFIX
from ..upstream import route
from ._access_log import with_access_log
from ._auth import Htpasswd
from ._blob_route import serve_blob
from ._error_handlers import install_error_handlers
from ._hot_path import ENABLED_KEY, with_hot_path
from ._lifecycle import install_lifecycle
from ._listing_route import serve_listing
from ._manifest_route import serve_manifest
from ._peer_route import add_peer_routes
from ._service_routes import METRICS_PATH, PROBE_PATHS, add_service_routes
from ._state import proxy_state
from ._zerocopy import enable_in_hypercorn, with_file_ranges


def create_app(
    config: Config, *, transport: httpx.AsyncBaseTransport | None = None, hot_path: bool = True
) -> QuartTrio:
    """Build the proxy app.  ``transport`` replaces the network (tests inject faults with it);
    ``hot_path`` False sends every request through Quart (``app.config[ENABLED_KEY]`` turns
    it off and on later: tests compare the two paths)."""
    app = QuartTrio(__name__)
    app.config[ENABLED_KEY] = hot_path
    # Blob responses last as long as the blob takes; Quart's 60 s default would cut them.
    app.config["RESPONSE_TIMEOUT"] = None
    # On SIGTERM hypercorn first gives in-flight responses its graceful_timeout; when the app
    # then shuts down, downloads still running are ended at once (partials removed) rather
    # than after Quart's default 5 s more, so the whole stop stays within graceful_timeout.
    app.config["BACKGROUND_TASK_SHUTDOWN_TIMEOUT"] = 0
    app.url_map.merge_slashes = False
    app.url_map.strict_slashes = False
    # Loaded now, so a bad htpasswd file stops the server at start, naming the problem.
    auth = None if config.htpasswd is None else Htpasswd.load(config.htpasswd, config.auth_realm)
    if auth is not None:
        _require_credentials(app, auth, config)
    # Outermost, so the access log still sees (and counts) the file ranges as body chunks;
    # the fast path inside the access log, so its answers get the same line.
    app.asgi_app = with_file_ranges(  # type: ignore[method-assign,assignment]
        with_access_log(with_hot_path(app.asgi_app, app, config, auth))
    )
    enable_in_hypercorn()  # the app's bodies decide whether to send file ranges
    install_lifecycle(app, config, transport)
    install_error_handlers(app, config.auth_realm)
    add_service_routes(app)
    if config.cluster is not None:
        add_peer_routes(app)  # HMAC-signed requests of the other nodes (F, issue 13)
    _add_registry_routes(app, config)
    return app


def _require_credentials(app: QuartTrio, auth: Htpasswd, config: Config) -> None:
    """Every request needs a user from ``auth``, except probes (which must work without
    credentials) and, if the operator says so, metrics."""
    open_paths = PROBE_PATHS | ({METRICS_PATH} if config.metrics_open else set())
    # Peer requests carry the cluster's HMAC instead, checked by their route.
    peer_prefix = PEER_PREFIX if config.cluster is not None else None

    @app.before_request
    async def authenticate() -> None:
        if request.path in open_paths:
            return
        if peer_prefix is not None and request.path.startswith(peer_prefix):
            return
        if await auth.user_for(request.headers.get("Authorization")) is None:
            raise auth.challenge()


def _add_registry_routes(app: QuartTrio, config: Config) -> None:
    """The OCI distribution API: ``/v2/`` (the version check) and everything below it."""

    @app.route("/v2/", methods=["GET", "HEAD"])
    @app.route("/v2", methods=["GET", "HEAD"])
    async def base() -> Response:
        return Response(b"{}", headers={"Content-Type": "application/json"})

    @app.route("/v2/<path:rest>", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"])
    async def v2(rest: str) -> Response:
        endpoint = parse_v2_path(rest, request.method)
        target = route(config, endpoint.name, request.args.get("ns"))
        state = proxy_state(app)
        upstream = state.upstreams[target.upstream.name]
        if endpoint.kind == "blob":
            return await serve_blob(state, upstream, target, endpoint)
        if endpoint.kind == "manifest":
            return await serve_manifest(state, upstream, target, endpoint)
        return await serve_listing(state, upstream, target, endpoint)
