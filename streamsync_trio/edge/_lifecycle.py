"""The app's lifetime: what it builds when serving starts, and what it lets go at the end.

Everything long-lived is built in ``before_serving``, inside the app's nursery, because the
downloads and the background tasks (eviction, listing expiry, the metrics publisher) are
trio tasks that must outlive any one request.  Start-up also tidies the cache first: partial
downloads a previous run left, manifest records of an older layout.
"""

from __future__ import annotations

import logging
import time
from functools import partial

import httpx
import trio
from quart_trio import QuartTrio

from .._config import Config
from ..cluster import Cluster
from ..core import (
    BackgroundTasks,
    BlobService,
    CacheKeeper,
    DownloadRegistry,
    ManifestService,
    Store,
    Usage,
)
from ..upstream import Upstream
from ._cluster import cluster_owners, cluster_tags, start_cluster, stop_cluster
from ._metrics import render_own
from ._peers import publish_periodically, withdraw
from ._state import STATE_KEY, TASKS_KEY, ProxyState, proxy_state

log = logging.getLogger("streamsync_trio.http")


def install_lifecycle(
    app: QuartTrio, config: Config, transport: httpx.AsyncBaseTransport | None
) -> None:
    """Build the proxy's state when ``app`` starts serving; close it when it stops."""

    @app.before_serving
    async def start() -> None:
        store, usage = await _open_store(config)
        tasks = BackgroundTasks(app.nursery)
        app.extensions[TASKS_KEY] = tasks
        cluster = await start_cluster(app.nursery, config, tasks)  # None without [cluster]
        state = _build_state(app.nursery, tasks, config, store, transport, cluster)
        app.extensions[STATE_KEY] = state
        state.peers_dir.mkdir(exist_ok=True)
        tasks.start("listing expiry", state.passthrough_cache.expire_periodically)
        tasks.start(
            "metrics publisher", publish_periodically, state.peers_dir, partial(render_own, state)
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
        state = proxy_state(app)
        withdraw(state.peers_dir)
        await stop_cluster(state.cluster)
        for upstream in state.upstreams.values():
            await upstream.aclose()


async def _open_store(config: Config) -> tuple[Store, Usage]:
    """The cache, tidied: partials of a previous run removed, manifest records migrated (once;
    it logs what it did), its usage scanned."""
    store = Store(config.storage_root)
    removed = await trio.to_thread.run_sync(store.remove_leftover_partials)
    if removed:
        log.warning("removed %d partial download(s) left by a previous run", removed)
    await trio.to_thread.run_sync(store.migrate_manifests)
    usage = await trio.to_thread.run_sync(store.scan)
    return store, usage


def _build_state(
    nursery: trio.Nursery,
    tasks: BackgroundTasks,
    config: Config,
    store: Store,
    transport: httpx.AsyncBaseTransport | None,
    cluster: Cluster | None = None,
) -> ProxyState:
    """The downloads, with the eviction that keeps the cache under its cap if it has one."""
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
        nursery,
        chunk_size=config.chunk_size,
        on_commit=(lambda _: keeper.blob_committed()) if keeper is not None else None,
        owners=cluster_owners(cluster, store, nursery),  # None: this machine's lease files
    )
    if keeper is not None:
        keeper.blob_committed()  # the cap may have shrunk since the last run
    return ProxyState(
        config=config,
        store=store,
        downloads=downloads,
        blobs=BlobService(store, downloads, max_blob_size=config.max_blob_size),
        manifests=ManifestService(store, nursery, cluster_tags(cluster)),  # None: alone
        upstreams={u.name: Upstream(u, transport=transport) for u in config.upstreams},
        started_at=time.time(),
        cluster=cluster,
    )
