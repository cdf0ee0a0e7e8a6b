"""Where a node without a digest gets its bytes from: a pure decision, re-made per attempt.

The producer of a local download asks this before its first upstream request and again
before every resume, with what Redis says now (the lease holder) and the live members.  So a
follower whose owner died does not spend its retries on the dead node: the next attempt
sees the holder's heartbeat gone and takes the lease over, resuming from the upstream at
its own offset; and a follower whose owner finished meanwhile asks the digest's home.

Peer requests are never forwarded: a node asked by a peer serves from its cache or
in-flight download, or fetches from the upstream itself.  One hop, no loops.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from ._leases import Lease
from ._rendezvous import home


@dataclass(frozen=True)
class FromPeer:
    """Stream from this node (``Range: bytes=<offset>-``, signed): it holds the lease, or
    it is the digest's home and may have the blob stored."""

    node_url: str


@dataclass(frozen=True)
class Acquire:
    """Nobody holds the lease: take it (``SET NX``) and fetch from the upstream; if someone
    else won meanwhile, decide again."""


@dataclass(frozen=True)
class TakeOver:
    """The holder's heartbeat is gone (killed, partitioned, paused), or it is a dead
    process of this very node: replace its lease (compare-and-set), then the upstream."""

    stale: Lease


@dataclass(frozen=True)
class FromUpstream:
    """Fetch from the upstream without a lease: asked by a peer, or the holder is alive but
    did not answer us.  Costs duplicate upstream bytes at worst, never wrong bytes."""


type Route = FromPeer | Acquire | TakeOver | FromUpstream


def route(
    digest: str,
    me: str,
    holder: Lease | None,
    live: Collection[str],
    *,
    asked_by_peer: bool = False,
    avoid: Collection[str] = (),
) -> Route:
    """Decide where this node reads ``digest`` from.

    ``me`` is this node's ``node_url``; ``holder`` the lease in Redis now; ``live`` the
    members whose heartbeat exists; ``avoid`` peers that failed us during this download.
    Called by the process that already holds this machine's flock for the digest, so a
    holder with our own URL is never a live sibling process: it is a dead one of ours.
    """
    if holder is not None:
        if holder.node_url == me or holder.node_url not in live:
            return TakeOver(holder)
        if asked_by_peer or holder.node_url in avoid:
            return FromUpstream()
        return FromPeer(holder.node_url)
    if not asked_by_peer:
        preferred = home(digest, [m for m in live if m not in avoid] + [me])
        if preferred is not None and preferred != me:
            return FromPeer(preferred)
    return Acquire()
