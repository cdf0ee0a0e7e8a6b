"""The status snapshot behind ``/_status.json`` and the live page at ``/_status``."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from ._http import ProxyState


def status_snapshot(state: ProxyState) -> dict[str, Any]:
    now = trio.current_time()
    downloads = []
    for download in sorted(state.downloads.in_flight(), key=lambda d: d.started_at):
        elapsed = max(now - download.started_at, 1e-9)
        origin = download.origin if isinstance(download.origin, tuple) else ("", "")
        downloads.append(
            {
                "digest": str(download.digest),
                "upstream": origin[0],
                "repository": origin[1],
                "size": download.size,
                "received": download.available,
                "progress": (download.available / download.size) if download.size else None,
                "rate_bytes_per_second": download.available / elapsed,
                "subscribers": download.subscriber_count,
                "resumes": download.resumes,
                "elapsed_seconds": elapsed,
            }
        )
    traffic = state.traffic
    requests = traffic.blob_requests
    total_requests = sum(requests.values())
    usage = state.store.usage()
    upstream_bytes = state.downloads.totals().upstream_bytes
    served = sum(traffic.served_bytes.values())
    return {
        "uptime_seconds": time.time() - state.started_at,
        "downloads": downloads,
        "cache": {
            "root": str(state.store.root),
            "blobs": usage.blobs,
            "bytes": usage.bytes,
            "hit_rate": requests["hit"] / total_requests if total_requests else None,
        },
        "traffic": {
            "blob_requests": dict(requests),
            "served_bytes": dict(traffic.served_bytes),
            "upstream_bytes": upstream_bytes,
            "dedupe_ratio": served / upstream_bytes if upstream_bytes else None,
        },
        "upstreams": [
            {"name": name, "url": upstream.config.url, "default": upstream.config.default}
            for name, upstream in state.upstreams.items()
        ],
    }
