"""The routes for operators, not registry clients: liveness and readiness probes, Prometheus
metrics, and the status page with its JSON."""

from __future__ import annotations

import json

import trio
from quart import Quart, Response

from ._cluster import refresh_members
from ._metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ._metrics import render as render_metrics
from ._peers import read_others
from ._state import background_tasks, proxy_state
from ._status import render_status_page, status_snapshot

# What a client may ask without credentials: probes always.
PROBE_PATHS = frozenset({"/healthz", "/readyz"})
METRICS_PATH = "/metrics"


def add_service_routes(app: Quart) -> None:
    @app.route("/healthz")
    async def healthz() -> Response:
        # Alive unless this process cannot recover by itself (see ``_tasks``): then the
        # orchestrator should replace it.  A full disk is not that; it fails readiness.
        problems = background_tasks(app).liveness_problems()
        if not problems:
            return _json(b'{"status":"ok"}')
        return _json(json.dumps({"status": "failing", "problems": problems}), 503)

    @app.route("/readyz")
    async def readyz() -> Response:
        problems = background_tasks(app).readiness_problems()
        problems += await trio.to_thread.run_sync(proxy_state(app).store.check_writable)
        body = json.dumps(
            {"status": "ready" if not problems else "not ready", "problems": problems}
        )
        return _json(body, 503 if problems else 200)

    @app.route(METRICS_PATH)
    async def metrics() -> Response:
        state = proxy_state(app)
        others = await trio.to_thread.run_sync(read_others, state.peers_dir)
        return Response(
            render_metrics(state, others), headers={"Content-Type": METRICS_CONTENT_TYPE}
        )

    @app.route("/_status")
    async def status_page() -> Response:
        await refresh_members(proxy_state(app).cluster)
        page = render_status_page(status_snapshot(proxy_state(app)))
        return Response(page, headers={"Content-Type": "text/html; charset=utf-8"})

    @app.route("/_status.json")
    async def status_json() -> Response:
        await refresh_members(proxy_state(app).cluster)
        return _json(json.dumps(status_snapshot(proxy_state(app))))


def _json(body: str | bytes, status: int = 200) -> Response:
    return Response(body, status=status, headers={"Content-Type": "application/json"})
