"""Cluster mode: Redis leases, membership heartbeats, rendezvous homes, peer request auth,
the ``Owners`` of a node (``_owners``: where each download's bytes come from) and the peer
reader (``_peer``).
May import the top level, upstream and core (never edge or ops): edge and ops wire it in.
"""

from ._leases import Lease, RedisLeases, format_value, parse_value
from ._membership import Heartbeat, Members, heartbeat_key, live_members, member_urls
from ._node import Cluster, ClusterStats, run_cluster
from ._owners import ClusterClaim, RedisOwners
from ._peer import PEER_PREFIX, PeerBody, PeerClient, PeerUnavailable, peer_path
from ._peerauth import HEADER, MAX_SKEW, PeerAuthError, PeerProof, sign, verify
from ._redis import Redis, RedisUnavailable, bounded, connect
from ._rendezvous import home, ranked, weight
from ._route import Acquire, FromPeer, FromUpstream, Route, TakeOver, route
from ._tags import RedisSharedTags, TagShareStats

__all__ = [
    "PEER_PREFIX",
    "Cluster",
    "ClusterClaim",
    "ClusterStats",
    "PeerBody",
    "PeerClient",
    "PeerUnavailable",
    "RedisOwners",
    "RedisSharedTags",
    "TagShareStats",
    "peer_path",
    "run_cluster",
    "Acquire",
    "FromPeer",
    "FromUpstream",
    "Route",
    "TakeOver",
    "route",
    "HEADER",
    "MAX_SKEW",
    "Heartbeat",
    "Lease",
    "Members",
    "PeerAuthError",
    "PeerProof",
    "Redis",
    "RedisLeases",
    "RedisUnavailable",
    "bounded",
    "connect",
    "format_value",
    "heartbeat_key",
    "home",
    "live_members",
    "member_urls",
    "parse_value",
    "ranked",
    "sign",
    "verify",
    "weight",
]
