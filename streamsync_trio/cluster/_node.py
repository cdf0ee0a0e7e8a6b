"""One node's part in a cluster: its Redis, leases, heartbeat, members, peer client, counts.

Built once per process at start (``edge/_lifecycle``) from the ``[cluster]`` table and a
connected Redis client, and shared by the claims (``_owners``), the peer endpoint, the
metrics and the status page.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

import httpx
import trio

from .._config import ClusterConfig
from .._reference import Digest
from ._leases import RedisLeases
from ._membership import Heartbeat, Members, live_members
from ._peer import PeerClient
from ._redis import Redis, connect


def _zeros(*names: str) -> dict[str, int]:
    return dict.fromkeys(names, 0)


@dataclass
class ClusterStats:
    """What the cluster did, for ``/metrics`` and ``/_status`` (the README's cluster metrics)."""

    peer_bytes_received: int = 0  # read from peers into downloads of ours
    peer_bytes_sent: int = 0  # sent to peers on the peer endpoint
    leases: dict[str, int] = field(
        default_factory=lambda: _zeros("acquired", "taken_over", "lost", "released")
    )
    # One per decision of an attempt: from a peer, from the upstream under our lease,
    # from the upstream without one (asked by a peer whose holder is elsewhere, or the
    # holder failed us), from the upstream because Redis did not answer.
    routes: dict[str, int] = field(
        default_factory=lambda: _zeros("peer", "upstream_leased", "upstream_unleased", "degraded")
    )
    degraded_misses: int = 0  # downloads that went to the upstream while Redis was away
    peer_failures: int = 0  # peers that failed a download of ours (then avoided by it)
    # placement = "shard": verified blobs this node streamed through to its clients and did
    # not keep (it is not their home).
    streamed_through: int = 0
    peer_requests: dict[str, int] = field(
        default_factory=lambda: _zeros("served", "unauthorized", "refused")
    )


class ClaimView(Protocol):
    """What the status page and the peer endpoint read of a claim of ours (``_owners``)."""

    @property
    def peer(self) -> str | None:
        """The node this download reads from now, if any."""
        ...

    @property
    def owner(self) -> str | None:
        """The node holding the digest's lease, as last seen."""
        ...

    @property
    def route(self) -> str:
        """Where the bytes come from, in words."""
        ...


class Cluster:
    """This node in the cluster ``config`` describes, coordinating through ``redis``.

    ``peer_transport`` replaces the network for peer reads (tests inject faults with it).
    """

    def __init__(
        self,
        config: ClusterConfig,
        redis: Redis,
        secret: bytes,
        *,
        peer_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = config
        self.node_url = config.node_url
        self.redis = redis
        self.secret = secret
        self.leases = RedisLeases(redis, config.node_url, config.lease_ttl)
        self.heartbeat = Heartbeat(redis, config.node_url, config.heartbeat_ttl)
        self.members = Members(
            config.members,
            config.members_dns,
            scheme=urlsplit(config.node_url).scheme,
            refresh=config.heartbeat_ttl,
        )
        self.stats = ClusterStats()
        self.peers = PeerClient(secret, transport=peer_transport, on_bytes=self._received)
        # The members and the live ones as last seen (for the status page).
        self.known: tuple[str, ...] = config.members
        self.live: tuple[str, ...] = ()
        self.claims: dict[Digest, ClaimView] = {}  # the downloads this process owns

    def relaying(self, digest: Digest) -> bool:
        """Whether our download of ``digest`` reads from a peer now: a peer asking us for it
        is refused (one hop, no loops), so it decides again."""
        claim = self.claims.get(digest)
        return claim is not None and claim.peer is not None

    def _received(self, count: int) -> None:
        self.stats.peer_bytes_received += count

    async def live_now(self, *also: str) -> tuple[str, ...]:
        """The members whose heartbeat exists now, and of ``also`` (a lease holder our
        member list may lack: lists can disagree during a change, and a live owner must not
        look dead to us); one MGET.  Raises ``RedisUnavailable``."""
        self.known = await self.members.current()
        live = await live_members(self.redis, self.known + also)
        self.live = tuple(m for m in live if m in self.known)
        return live

    async def aclose(self) -> None:
        await self.peers.aclose()


async def run_cluster(
    config: ClusterConfig,
    secret: bytes,
    *,
    peer_transport: httpx.AsyncBaseTransport | None = None,
    task_status: trio.TaskStatus[Cluster] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Hold the Redis client and the peer client for the life of the app (a task of its
    nursery, so the clients are entered and left by one task); started at once, even while
    Redis is down (the first command connects)."""
    async with connect(config.redis_url) as redis:
        cluster = Cluster(config, redis, secret, peer_transport=peer_transport)
        try:
            task_status.started(cluster)
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await cluster.aclose()
