"""What the app holds for its lifetime, and the counters the HTTP layer keeps.

Its own module so that everything that reads the state (routes, metrics, the status page)
imports it from here and nothing imports the app: no module of the edge imports another in
a circle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quart import Quart

from .._config import Config
from ..cluster import Cluster
from ..core import (
    BackgroundTasks,
    BlobService,
    DownloadRegistry,
    ListingCache,
    ManifestService,
    Store,
)
from ..upstream import Upstream

# The keys of the app's ``extensions`` that hold the state and the background tasks.
STATE_KEY = "streamsync"
TASKS_KEY = "streamsync.tasks"


@dataclass
class Traffic:
    """What clients got from the proxy (counted by the HTTP layer)."""

    served_bytes: dict[str, int] = field(default_factory=lambda: {"cache": 0, "stream": 0})
    manifest_requests: int = 0

    def served(self, source: str, count: int) -> None:
        self.served_bytes[source] += count


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
    # A chunk sent over TLS is held about four times on its way out: the bytes read, h11's
    # framed copy, the ciphertext in OpenSSL's outgoing memory BIO (whose buffer keeps its
    # size after it is read) and the bytes read out of it for the socket.  bench/tls_clients.py,
    # 8 TLS clients, peak RSS: 2 MiB chunks 139-162 MiB, 512 KiB 89-96, 256 KiB 82-85 (the
    # goal is 100); warm MB/s 721-846, 588-720, 449-625.
    # Charged four times against the budget, and never below 64 KiB: 256 KiB for up to 16
    # TLS clients, 64 KiB from 64.
    ENCRYPTED_LARGEST = 256 * 1024
    ENCRYPTED_SMALLEST = 64 * 1024

    def __init__(self) -> None:
        self.open_bodies = 0

    def chunk(self, *, encrypted: bool = False) -> int:
        """Bytes for a body's next chunk; smaller when the connection encrypts them."""
        share = self.TOTAL // max(1, self.open_bodies)
        if encrypted:
            return max(self.ENCRYPTED_SMALLEST, min(self.ENCRYPTED_LARGEST, share // 4))
        return max(self.SMALLEST, min(self.LARGEST, share))


@dataclass
class ProxyState:
    """What the app holds for its lifetime; built in ``before_serving`` inside the app nursery
    (``_lifecycle``)."""

    config: Config
    store: Store
    downloads: DownloadRegistry
    blobs: BlobService
    manifests: ManifestService
    upstreams: dict[str, Upstream]
    started_at: float
    traffic: Traffic = field(default_factory=Traffic)
    chunk_budget: ChunkBudget = field(default_factory=ChunkBudget)
    # tags/list and referrers, collected whole from the upstream: (upstream, path) -> entries
    passthrough_cache: ListingCache[tuple[str, str], Sequence[Any]] = field(
        default_factory=ListingCache
    )
    cluster: Cluster | None = None  # [cluster]: this node's part in it (F, issue 13)

    @property
    def peers_dir(self) -> Path:
        """Where the worker processes on this cache publish their metrics (``_peers``)."""
        return self.store.root / "workers"


def proxy_state(app: Quart) -> ProxyState:
    """The state of a serving app (set at its start)."""
    state = app.extensions[STATE_KEY]
    assert isinstance(state, ProxyState)
    return state


def background_tasks(app: Quart) -> BackgroundTasks:
    """The background tasks of a serving app (started at its start)."""
    tasks = app.extensions[TASKS_KEY]
    assert isinstance(tasks, BackgroundTasks)
    return tasks
