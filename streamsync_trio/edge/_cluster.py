"""Cluster mode at the edge: started with the app, shown on ``/metrics`` and ``/_status``.

Without a ``[cluster]`` table none of this runs and nothing of it shows: the app is exactly
the single-node proxy.  With one, the node connects to Redis (started even while Redis is
down: the first command connects, and misses go to the upstream meanwhile), beats its
heartbeat as a supervised background task (a task that dies shows on ``/readyz``; Redis being
away does not make the node unready, since it still serves, degraded), and its downloads ask
:class:`~streamsync_trio.cluster.RedisOwners` where their bytes come from.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .._config import Config
from ..cluster import Cluster, RedisOwners, RedisSharedTags, run_cluster
from ..core import BackgroundTasks, Download, LeaseFiles, Owners, SharedTags, Store

log = logging.getLogger("streamsync_trio.cluster")


async def start_cluster(
    nursery: trio.Nursery, config: Config, tasks: BackgroundTasks
) -> Cluster | None:
    """This node's part in the cluster, heartbeat beating; None without ``[cluster]``."""
    if config.cluster is None:
        return None
    cluster: Cluster = await nursery.start(run_cluster, config.cluster, config.cluster.secret())
    # Once before serving, so a node whose Redis is up is live before its first request.
    await cluster.heartbeat.beat()
    tasks.start("cluster heartbeat", cluster.heartbeat.run)
    log.info(
        "cluster node %s: members %s, Redis %s (%s)",
        cluster.node_url,
        ", ".join(config.cluster.members) or "from DNS",
        config.cluster.redis_url,
        "reachable" if cluster.heartbeat.alive else f"unreachable: {cluster.heartbeat.last_error}",
    )
    return cluster


def cluster_owners(cluster: Cluster | None, store: Store, nursery: trio.Nursery) -> Owners | None:
    """Who owns a digest: the lease files of this machine, wrapped in cluster mode."""
    if cluster is None:
        return None
    return RedisOwners(LeaseFiles(store), cluster, nursery)


def cluster_tags(cluster: Cluster | None) -> SharedTags | None:
    """Tag answers shared through the cluster's Redis; None (each node alone) without it."""
    if cluster is None:
        return None
    return RedisSharedTags(cluster.redis, cluster.node_url)


def shared_tag_metrics(shared: SharedTags | None) -> Iterator[Metric]:
    """Tags resolved through the fleet: answers found in Redis, answers published, and
    lookups that went to the upstream for a reason of the fleet's (by reason)."""
    if not isinstance(shared, RedisSharedTags):
        return
    stats = shared.stats
    counts = {"hit": stats.hits, "published": stats.publishes}
    yield _labelled(
        "streamsync_cluster_shared_tags", "Tag answers found in Redis or published", "event", counts
    )
    yield _labelled(
        "streamsync_cluster_shared_tag_fallbacks",
        "Tag lookups that went to the upstream: Redis unavailable, an entry failing the "
        "checks (also a hit), another node's answer not in time",
        "reason",
        stats.fallbacks,
    )


async def stop_cluster(cluster: Cluster | None) -> None:
    """Leave at once on a clean stop, rather than one heartbeat TTL later."""
    if cluster is not None:
        await cluster.heartbeat.leave()


def cluster_metrics(cluster: Cluster | None) -> Iterator[Metric]:
    """The cluster's families (names in the module docstring of ``cluster/_node``)."""
    if cluster is None:
        return
    stats = cluster.stats
    peer_bytes = CounterMetricFamily(
        "streamsync_cluster_peer_bytes",
        "Blob bytes between nodes: received into our downloads, sent on the peer endpoint",
        labels=["direction"],
    )
    peer_bytes.add_metric(["received"], stats.peer_bytes_received)
    peer_bytes.add_metric(["sent"], stats.peer_bytes_sent)
    yield peer_bytes
    yield _labelled("streamsync_cluster_leases", "Redis leases by event", "event", stats.leases)
    yield _labelled(
        "streamsync_cluster_routes",
        "Where download attempts read from (peer, upstream under our lease or without, "
        "upstream because Redis was unavailable)",
        "route",
        stats.routes,
    )
    yield _labelled(
        "streamsync_cluster_peer_requests",
        "Requests on the peer endpoint by result",
        "result",
        stats.peer_requests,
    )
    yield CounterMetricFamily(
        "streamsync_cluster_degraded_misses",
        "Downloads that went to the upstream because Redis was unavailable",
        value=stats.degraded_misses,
    )
    yield CounterMetricFamily(
        "streamsync_cluster_peer_failures",
        "Peers that failed a download of ours (then avoided by it)",
        value=stats.peer_failures,
    )
    heartbeat = cluster.heartbeat
    yield GaugeMetricFamily(
        "streamsync_cluster_alive", "1 while our heartbeat renews", value=int(heartbeat.alive)
    )
    yield GaugeMetricFamily(
        "streamsync_cluster_redis_rtt_seconds",
        "Round trip of the last heartbeat renewal",
        value=heartbeat.last_rtt if heartbeat.last_rtt is not None else float("nan"),
    )
    yield GaugeMetricFamily(
        "streamsync_cluster_live_members", "Members live when last looked", value=len(cluster.live)
    )


def _labelled(name: str, documentation: str, label: str, counts: dict[str, int]) -> Metric:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, count in counts.items():
        family.add_metric([value], count)
    return family


async def refresh_members(cluster: Cluster | None) -> None:
    """The live members now, for the status page; Redis away leaves the last answer."""
    if cluster is None:
        return
    try:
        await cluster.live_now()
    except Exception as exc:  # RedisUnavailable, a DNS failure: the page still renders
        log.debug("status: cannot refresh the live members: %s", exc)


def cluster_status(cluster: Cluster | None) -> dict[str, Any] | None:
    """The ``cluster`` section of ``/_status.json`` (None without ``[cluster]``)."""
    if cluster is None:
        return None
    heartbeat, stats = cluster.heartbeat, cluster.stats
    return {
        "node_url": cluster.node_url,
        "placement": cluster.config.placement,
        "alive": heartbeat.alive,
        "redis_url": cluster.config.redis_url,
        "redis_rtt_seconds": heartbeat.last_rtt,
        "redis_error": heartbeat.last_error,
        "members": [
            {"url": url, "live": url in cluster.live, "self": url == cluster.node_url}
            for url in cluster.known
        ],
        "counts": {
            "peer_bytes_received": stats.peer_bytes_received,
            "peer_bytes_sent": stats.peer_bytes_sent,
            "leases": dict(stats.leases),
            "routes": dict(stats.routes),
            "degraded_misses": stats.degraded_misses,
            "peer_failures": stats.peer_failures,
            "peer_requests": dict(stats.peer_requests),
        },
    }


def download_owner(cluster: Cluster | None, download: Download) -> dict[str, Any]:
    """Which node owns an in-flight download, and where its bytes come from now."""
    if cluster is None:
        return {}
    claim = cluster.claims.get(download.digest)
    if claim is None:  # followed from another process of this node
        return {"owner": cluster.node_url, "source": None}
    return {"owner": claim.owner, "source": claim.route}
