"""Who fetches a digest across machines: the core's ``Owners`` seam, on Redis.

:class:`RedisOwners` wraps the lease files of this machine (``core/_lease``):

* Another process on this machine owns the digest: followed through the cache directory, as
  on one machine (its own claim decides where its bytes come from).
* This process claims it: a :class:`ClusterClaim`.  Its source (``Claim.source``) decides
  on *every* attempt of the producer where the bytes come from, from what Redis says now
  (the lease holder, the live members; ``_route``): the owner node (``_peer``, ``Range:
  bytes=<offset>-``), or the upstream under a lease of ours (acquired, or taken over from a
  holder whose heartbeat is gone) renewed every ``lease_ttl / 3``.  So a resume re-routes: a
  follower whose owner died does not spend its retries on the dead node, it avoids it,
  waits at most about one heartbeat TTL for its key to expire, takes the lease over (or
  follows whoever did) and resumes at its own offset.
* Redis unavailable: the upstream directly, single-flight per machine only, counted.

Correctness never rests on Redis: a lost lease is counted, not fatal, and two owners at once
cost duplicate upstream bytes at worst, since every node verifies the digest and commits by
atomic rename.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Hashable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import trio

from .._errors import RegistryError, upstream_unavailable
from .._reference import Digest
from ..core import BlobBody, BlobSource, Claim, Download, Elsewhere, Owners
from ._leases import Lease
from ._membership import live_members
from ._node import Cluster
from ._peer import PeerBody
from ._redis import RedisUnavailable
from ._rendezvous import home
from ._route import Acquire, FromPeer, TakeOver, route

log = logging.getLogger("streamsync_trio.cluster")

# Decisions one attempt may make before it settles for the upstream without a lease: lost
# races for the lease, peers that refuse, and waits for a failed holder's heartbeat to go.
_DECISIONS = 12


class RedisOwners:
    """The :class:`~streamsync_trio.core.Owners` of a cluster node (see the module's
    docstring); ``nursery`` runs lease renewals and releases (the app's)."""

    def __init__(self, local: Owners, cluster: Cluster, nursery: trio.Nursery) -> None:
        self._local = local
        self.cluster = cluster
        self._nursery = nursery

    def claim(self, digest: Digest) -> Claim | Elsewhere | None:
        answer = self._local.claim(digest)
        if answer is None or isinstance(answer, Elsewhere):
            return answer
        claim = ClusterClaim(answer, self, digest)
        self.cluster.claims[digest] = claim
        return claim

    def start_soon(self, task: Callable[[], Awaitable[None]]) -> None:
        self._nursery.start_soon(task)


class ClusterClaim:
    """This process owns the local download of a digest; where its bytes come from is
    decided per attempt (see the module's docstring)."""

    def __init__(self, local: Claim, owners: RedisOwners, digest: Digest) -> None:
        self._local = local
        self._owners = owners
        self._cluster = owners.cluster
        self.digest = digest
        self._lease: Lease | None = None
        self._renewal = trio.CancelScope()
        self._avoid: set[str] = set()
        self._patience_until: float | None = None  # waiting for a failed holder's key to go
        self._degraded = False
        self.peer: str | None = None  # the node we read from now, if any
        self.owner: str | None = None  # the lease holder as last seen
        self.route = "deciding"  # for the status page

    @property
    def partial(self) -> Path:
        return self._local.partial

    def source(self, upstream: BlobSource, download: Download, *, forwardable: bool) -> BlobSource:
        return partial(self._open, upstream, download.origin, forwardable)

    def publish_size(self, size: int) -> None:
        self._local.publish_size(size)

    async def keeps(self, download: Download) -> bool:
        """``replicate``: always.  ``shard``: only when this node is the digest's home among
        the members live now (one MGET, when the blob is verified: membership may have
        changed while it downloaded); Redis away: among the members live when last seen.

        A node that fetched from the upstream itself because the home did not answer does
        not keep a copy either: the disk of each node holds its share of the working set
        and no more, which is what shard mode is sized by.  A home that is really gone
        leaves the live members within one heartbeat TTL, and the new home (rendezvous
        moves only its digests) keeps what it fetches from then on."""
        if not await self._local.keeps(download):
            return False
        cluster = self._cluster
        if cluster.config.placement != "shard":
            return True
        try:
            live: Collection[str] = await cluster.live_now()
        except RedisUnavailable:
            live = cluster.live
        kept = home(str(self.digest), {*live, cluster.node_url}) == cluster.node_url
        if not kept:
            cluster.stats.streamed_through += 1
        return kept

    def abandon(self) -> None:
        try:
            self._local.abandon()
        finally:
            self._let_go()

    def release(self) -> None:
        try:
            self._local.release()
        finally:
            self._let_go()

    # -- per attempt ------------------------------------------------------------------------

    @asynccontextmanager
    async def _open(
        self, upstream: BlobSource, origin: Hashable, forwardable: bool, offset: int
    ) -> AsyncIterator[BlobBody]:
        """One attempt's body: from a peer, or from the upstream (see ``_decide``)."""
        names = _names(origin)
        for _ in range(_DECISIONS):
            peer = await self._decide(forwardable and names is not None)
            self.peer = peer
            if peer is None or names is None:
                async with upstream(offset) as body:
                    yield body
                return
            try:
                opened = await self._cluster.peers.open(peer, *names, str(self.digest), offset)
            except RegistryError as error:
                self._failed(peer, error)
                continue
            async with self._watching(peer, opened):
                yield opened
            return
        self.peer = None  # every peer refused us: the upstream, as a last resort
        self._count("upstream_unleased")
        self.route = "upstream (no lease)"
        async with upstream(offset) as body:
            yield body

    @asynccontextmanager
    async def _watching(self, peer: str, opened: PeerBody) -> AsyncIterator[None]:
        """Read from ``peer`` while its heartbeat lasts.  A peer that stops (SIGSTOP, a
        machine gone without a reset) would otherwise hold us for the whole stall timeout;
        its heartbeat key expires within one TTL, and then this attempt ends (transient) and
        the next one takes the lease over."""
        watcher = trio.CancelScope()
        try:
            with trio.CancelScope() as scope:
                # In the app's nursery, not one around the yield: a nursery would wrap the
                # errors of the producer's body in an ExceptionGroup.
                self._owners.start_soon(partial(self._watch, peer, scope, watcher))
                try:
                    yield
                finally:
                    watcher.cancel()
            if scope.cancelled_caught:
                raise upstream_unavailable(f"peer {peer}", "its heartbeat expired")
        except RegistryError as error:
            # The peer dropped, stalled, died, or sent a body short of its length.
            self._failed(peer, error)
            raise
        finally:
            self.peer = None
            await _close(opened)

    async def _watch(self, peer: str, reading: trio.CancelScope, own: trio.CancelScope) -> None:
        cluster = self._cluster
        with own:
            while True:
                await trio.sleep(cluster.config.heartbeat_ttl / 3)
                try:
                    alive = await live_members(cluster.redis, [peer])
                except RedisUnavailable:
                    continue  # no news is no proof of death: the stall timeout still holds
                if not alive:
                    reading.cancel()
                    return

    async def _decide(self, forwardable: bool) -> str | None:
        """The peer to read from, or None for the upstream (under our lease if we got it)."""
        if self._lease is not None:
            self._count("upstream_leased")
            return None  # ours, even if Redis lost it meanwhile: we carry on
        if self._degraded:
            self._count("degraded")
            return None
        try:
            return await self._ask_redis(forwardable)
        except RedisUnavailable as exc:
            log.warning("download %s: Redis unavailable (%s); from the upstream", self.digest, exc)
            self._degraded = True
            self._cluster.stats.degraded_misses += 1
            self._count("degraded")
            self.route = "upstream (degraded)"
            return None

    async def _ask_redis(self, forwardable: bool) -> str | None:
        cluster, digest = self._cluster, str(self.digest)
        for _ in range(_DECISIONS):
            holder = await cluster.leases.holder(digest)
            live = await cluster.live_now(*([] if holder is None else [holder.node_url]))
            self.owner = None if holder is None else holder.node_url
            where = route(
                digest,
                cluster.node_url,
                holder,
                live,
                asked_by_peer=not forwardable,
                avoid=self._avoid,
            )
            if isinstance(where, FromPeer):
                # With no lease yet, the digest's home we ask now is the owner to be.
                self.owner = where.node_url
                self._count("peer")
                self.route = f"peer {where.node_url}"
                return where.node_url
            if isinstance(where, Acquire | TakeOver):
                if await self._take(where):
                    return None
                continue  # someone else won meanwhile: decide again
            if forwardable and holder is not None and await self._wait_for(holder):
                continue
            break
        self._count("upstream_unleased")
        self.route = "upstream (no lease)"
        return None

    async def _take(self, where: Acquire | TakeOver) -> bool:
        leases, digest = self._cluster.leases, str(self.digest)
        if isinstance(where, Acquire):
            lease, event = await leases.acquire(digest), "acquired"
        else:
            lease, event = await leases.take_over(where.stale), "taken_over"
        if lease is None:
            return False
        self._lease = lease
        self.owner = self._cluster.node_url
        self.route = "upstream"
        self._cluster.stats.leases[event] += 1
        self._count("upstream_leased")
        self._owners.start_soon(partial(self._renew, lease))
        return True

    async def _wait_for(self, holder: Lease) -> bool:
        """A live holder we avoid (it failed us): wait, once per download and at most about
        one heartbeat TTL, for its key to expire (then we take over and the others follow
        us) rather than all fetching the rest from the upstream.  False: patience is out."""
        ttl = self._cluster.config.heartbeat_ttl
        now = trio.current_time()
        if self._patience_until is None:
            self._patience_until = now + ttl * 4 / 3
        if holder.node_url not in self._avoid or now >= self._patience_until:
            return False
        self.route = f"waiting for {holder.node_url} to expire"
        await trio.sleep(ttl / 3)
        return True

    def _failed(self, peer: str, error: RegistryError) -> None:
        log.warning("download %s: %s; avoiding it", self.digest, error.message)
        self._avoid.add(peer)
        self._cluster.stats.peer_failures += 1

    def _count(self, route_name: str) -> None:
        self._cluster.stats.routes[route_name] += 1

    # -- the lease ---------------------------------------------------------------------------

    async def _renew(self, lease: Lease) -> None:
        """Keep our lease while the download runs; losing it is counted, not fatal."""
        interval = self._cluster.config.lease_ttl / 3
        with self._renewal:
            while True:
                await trio.sleep(interval)
                try:
                    if not await self._cluster.leases.renew(lease):
                        self._cluster.stats.leases["lost"] += 1
                        log.warning("download %s: lost its cluster lease", self.digest)
                        return
                except RedisUnavailable as exc:
                    log.warning("download %s: cannot renew its lease: %s", self.digest, exc)

    def _let_go(self) -> None:
        """After the local claim went: stop renewing, release the Redis lease (in the
        background, bounded, errors caught) and forget this claim."""
        owners, claims = self._owners, self._cluster.claims
        if claims.get(self.digest) is self:
            del claims[self.digest]
        self._renewal.cancel()
        lease, self._lease = self._lease, None
        if lease is not None:
            owners.start_soon(partial(self._release, lease))

    async def _release(self, lease: Lease) -> None:
        try:
            if await self._cluster.leases.release(lease):
                self._cluster.stats.leases["released"] += 1
        except RedisUnavailable as exc:
            # It expires by itself within lease_ttl; peers asking us meanwhile get the blob.
            log.warning("download %s: cannot release its lease: %s", self.digest, exc)


def _names(origin: Hashable) -> tuple[str, str] | None:
    """(upstream name, repository) of a proxy download's origin; None for any other origin
    (then there is nothing to ask a peer for, and the bytes come from the upstream)."""
    if isinstance(origin, tuple) and len(origin) == 2:
        name, repo = origin
        if isinstance(name, str) and isinstance(repo, str):
            return name, repo
    return None


async def _close(body: PeerBody) -> None:
    with trio.CancelScope(shield=True):
        await body.aclose()
