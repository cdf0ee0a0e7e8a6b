"""Who fetches a digest from the upstream: one lease per digest in Redis.

A lease is the key ``<prefix>lease:<digest>`` set with ``SET NX PX``; its value is the owner's
``node_url``, a space and a nonce, so an operator running ``redis-cli GET`` sees which node is
downloading, and two leases of the same node (a restart, another worker) still differ.  Renew
and release are Lua scripts that compare the value first: a node whose lease expired and was
taken by another can never extend or delete the new owner's lease.

Correctness never rests on this: two owners at once (a paused process, a partition) cost
duplicate upstream bytes, because every node verifies digests and commits atomically.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable
from dataclasses import dataclass

import coredis
from coredis.commands.script import Script

from ._redis import DEFAULT_TIMEOUT, Redis, bounded

DEFAULT_PREFIX = "streamsync:"

# KEYS[1] the lease, ARGV[1] the value the caller holds, ARGV[2] the new TTL in ms.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# ARGV[1] the stale holder's value, ARGV[2] ours, ARGV[3] the TTL in ms.
_TAKE_OVER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""


@dataclass(frozen=True)
class Lease:
    """One holding of a digest's lease (or, from :meth:`RedisLeases.holder`, someone's)."""

    digest: str
    node_url: str
    nonce: str

    @property
    def value(self) -> str:
        return format_value(self.node_url, self.nonce)


def format_value(node_url: str, nonce: str) -> str:
    """``http://10.0.0.5:5000 9f2c...``: readable with redis-cli; node URLs have no spaces."""
    return f"{node_url} {nonce}"


def parse_value(digest: str, value: bytes | str) -> Lease | None:
    """The lease a stored value describes; None for a value no node of ours wrote."""
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    node_url, sep, nonce = text.partition(" ")
    if not sep or not node_url or not nonce or " " in nonce:
        return None
    return Lease(digest=digest, node_url=node_url, nonce=nonce)


class RedisLeases:
    """Per-digest leases for one node.  Every method is one Redis round trip (about 1 ms
    here) bounded by ``timeout``, and raises :class:`RedisUnavailable` when Redis fails."""

    def __init__(
        self,
        redis: Redis,
        node_url: str,
        ttl: float,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self._redis = redis
        self.node_url = node_url
        self.ttl_ms = max(1, round(ttl * 1000))
        self._prefix = prefix
        self._timeout = timeout
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._take_over = redis.register_script(_TAKE_OVER)

    def key(self, digest: str) -> str:
        return f"{self._prefix}lease:{digest}"

    def _new(self, digest: str) -> Lease:
        return Lease(digest=digest, node_url=self.node_url, nonce=secrets.token_hex(8))

    async def acquire(self, digest: str) -> Lease | None:
        """Take the digest's lease if nobody holds it; None if someone does."""
        lease = self._new(digest)
        command = self._redis.set(
            self.key(digest), lease.value, condition=coredis.PureToken.NX, px=self.ttl_ms
        )
        return lease if await bounded(command, self._timeout) else None

    async def holder(self, digest: str) -> Lease | None:
        """Who holds the digest's lease now (None: nobody), e.g. to stream from them."""
        value = await bounded(self._redis.get(self.key(digest)), self._timeout)
        return None if value is None else parse_value(digest, value)

    async def renew(self, lease: Lease) -> bool:
        """Extend our lease by the TTL; False if it is not ours (any more)."""
        return await self._script(self._renew, lease.digest, lease.value, self.ttl_ms) == 1

    async def release(self, lease: Lease) -> bool:
        """Delete our lease (download committed or failed); False if it is not ours."""
        return await self._script(self._release, lease.digest, lease.value) == 1

    async def take_over(self, stale: Lease) -> Lease | None:
        """Replace a lease whose holder is known dead (its heartbeat expired) before the
        lease's own TTL runs out.  Compare-and-set, so of several nodes that saw the same
        dead holder only one wins; None if the lease changed meanwhile."""
        lease = self._new(stale.digest)
        args = (stale.value, lease.value, self.ttl_ms)
        return lease if await self._script(self._take_over, stale.digest, *args) == 1 else None

    async def _script(self, script: Script[bytes], digest: str, *args: str | int) -> int:
        command: Awaitable[object] = script(keys=[self.key(digest)], args=args)
        result = await bounded(command, self._timeout)
        return result if isinstance(result, int) else 0
