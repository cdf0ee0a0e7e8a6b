"""The registry client: talking to upstream registries (token auth, timeouts, retries' raw
material, honest errors) and routing a repository name to its upstream.

May import: the top-level modules only.  The rest of the proxy never sees httpx.
"""

from ._client import (
    LATENCY_BUCKETS,
    MAX_MANIFEST_BYTES,
    Manifest,
    ManifestHead,
    Passthrough,
    Upstream,
)
from ._routing import Route, route

__all__ = [
    "LATENCY_BUCKETS",
    "MAX_MANIFEST_BYTES",
    "Manifest",
    "ManifestHead",
    "Passthrough",
    "Route",
    "Upstream",
    "route",
]
