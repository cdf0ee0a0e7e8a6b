"""Tag answers shared through Redis, so a fleet asks the upstream once per tag per ``tag_ttl``.

The core's seam is ``core.SharedTags`` (``core/_tag_sharing``); this is its Redis side.  Keys
(``<prefix>`` is ``streamsync:``; an operator can read them with redis-cli):

* ``tag:<upstream>:<repo>:<tag>:<class>`` -> ``"<digest> <media type>"``, ``PX`` = ``tag_ttl``.
  ``<class>`` is the client's ``Accept`` class (``*`` for the broad answer): a registry
  answers a narrow ``Accept`` with another document, so classes never share an entry.
  (Repositories and tags have no ``:``, so the key reads unambiguously from the right.)
* ``manifest:<digest>`` -> the manifest itself, ``PX`` = ``tag_ttl`` plus a grace, so a node
  that lacks it does not fetch it either; written before the tag key, in one script.
* ``tagflight:<upstream>:<repo>:<tag>:<class>`` -> ``"<node_url> <nonce>"``, ``SET NX PX``: the
  fleet's single-flight for a cold tag.  Its holder asks the upstream and publishes; the
  others poll the tag key (bounded), then go to the upstream themselves.

Correctness never rests on any of it: the manifest service checks a shared body against its
digest and validates it like an upstream answer before use.  Redis failing or not answering
(bounded, like every command of ``cluster``) means "nothing shared": the node asks the
upstream, counted in :attr:`RedisSharedTags.stats`; after a failure Redis is left alone for
:attr:`RedisSharedTags.backoff` seconds, so a Redis that hangs costs one timeout, not one per
tag.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable
from dataclasses import dataclass, field

import coredis
import trio

from ..core import SharedTag, TagKey
from ..upstream import MAX_MANIFEST_BYTES
from ._leases import DEFAULT_PREFIX, format_value
from ._redis import DEFAULT_TIMEOUT, Redis, RedisUnavailable, bounded

log = logging.getLogger("streamsync_trio.cluster")

# KEYS[1] the tag, ARGV[1] the prefix of body keys, ARGV[2] the largest body to return (a
# bigger one is nobody's manifest and is not sent).  One round trip: value, body, ms left.
# (The body key is computed here, so this needs one Redis, not Redis Cluster; as the leases.)
_READ = """
local value = redis.call('GET', KEYS[1])
if not value then return false end
local ttl = redis.call('PTTL', KEYS[1])
local digest = string.match(value, '^(%S+) ')
if not digest then return {value, false, ttl} end
local body = ARGV[1] .. digest
if redis.call('STRLEN', body) > tonumber(ARGV[2]) then return {value, false, ttl} end
return {value, redis.call('GET', body), ttl}
"""
# KEYS: body, tag, flight.  ARGV: body, body ms, tag value, tag ms, our flight value or ''.
_PUBLISH = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
if ARGV[5] ~= '' and redis.call('GET', KEYS[3]) == ARGV[5] then
  redis.call('DEL', KEYS[3])
end
return 1
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# A shared manifest by its digest, unless it is larger than any manifest (a value no node of
# ours wrote is not read whole).
_BODY = """
if redis.call('STRLEN', KEYS[1]) > tonumber(ARGV[1]) then return false end
return redis.call('GET', KEYS[1])
"""

FALLBACK_REASONS = ("unavailable", "invalid", "wait")


@dataclass
class TagShareStats:
    """For ``/metrics``: answers found in Redis, answers published, and lookups that ended
    at the upstream for a reason of the fleet's: Redis unavailable, an entry that failed the
    checks (also counted as a hit), another node's answer not arriving in time."""

    hits: int = 0
    publishes: int = 0
    fallbacks: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FALLBACK_REASONS, 0))


class RedisSharedTags:
    """``core.SharedTags`` on Redis for the node ``node_url``.

    ``wait`` bounds how long a lookup waits for another node resolving the same tag (then
    the upstream is asked anyway); ``flight_ttl`` is how long a resolving node holds the
    single-flight before another may take it (a node that died holding it costs the others
    at most ``wait``); ``poll`` is how often a waiting node looks.
    """

    def __init__(
        self,
        redis: Redis,
        node_url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = DEFAULT_TIMEOUT,
        wait: float = 5.0,
        flight_ttl: float = 10.0,
        poll: float = 0.02,
        body_grace: float = 60.0,
        backoff: float = 1.0,
    ) -> None:
        self._redis = redis
        self.node_url = node_url
        self._prefix = prefix
        self._timeout = timeout
        self.wait = wait
        self._flight_ms = max(1, round(flight_ttl * 1000))
        self._poll = poll
        self._body_grace_ms = round(body_grace * 1000)
        self.backoff = backoff
        self._read_script = redis.register_script(_READ)
        self._publish_script = redis.register_script(_PUBLISH)
        self._release_script = redis.register_script(_RELEASE)
        self._body_script = redis.register_script(_BODY)
        self._held: dict[TagKey, str] = {}  # our single-flights: key -> the value we set
        self._quiet_until = float("-inf")  # trio clock: Redis failed lately, leave it alone
        self.stats = TagShareStats()

    # -- keys ----------------------------------------------------------------------------------

    def tag_key(self, key: TagKey) -> str:
        return f"{self._prefix}tag:{_name(key)}"

    def flight_key(self, key: TagKey) -> str:
        return f"{self._prefix}tagflight:{_name(key)}"

    def body_key(self, digest: str) -> str:
        return f"{self._prefix}manifest:{digest}"

    # -- core.SharedTags -----------------------------------------------------------------------

    async def lookup(self, key: TagKey, *, wait: bool) -> SharedTag | None:
        if self._quiet():
            self.stats.fallbacks["unavailable"] += 1
            return None
        try:
            found = await self._read(key)
            if found is None and wait:
                found = await self._single_flight(key)
        except RedisUnavailable as exc:
            self._failed(exc)
            return None
        if found is not None:
            self.stats.hits += 1
        return found

    async def publish(self, key: TagKey, answer: SharedTag, ttl: float) -> None:
        flight = self._held.pop(key, "")
        if self._quiet() or ttl <= 0 or len(answer.body) > MAX_MANIFEST_BYTES:
            return  # an unreleased flight expires by itself
        ttl_ms = max(1, round(ttl * 1000))
        keys = [self.body_key(answer.digest), self.tag_key(key), self.flight_key(key)]
        value = f"{answer.digest} {answer.media_type}"
        args = (answer.body, ttl_ms + self._body_grace_ms, value, ttl_ms, flight)
        try:
            await self._call(self._publish_script(keys=keys, args=args))
        except RedisUnavailable as exc:
            self._failed(exc)
            return
        self.stats.publishes += 1

    async def abandon(self, key: TagKey) -> None:
        flight = self._held.pop(key, None)
        if flight is None or self._quiet():
            return
        try:
            await self._call(self._release_script(keys=[self.flight_key(key)], args=[flight]))
        except RedisUnavailable as exc:
            self._failed(exc)  # the flight expires by itself

    async def manifest(self, digest: str) -> bytes | None:
        if self._quiet():
            self.stats.fallbacks["unavailable"] += 1
            return None
        try:
            body: object = await self._call(
                self._body_script(keys=[self.body_key(digest)], args=[MAX_MANIFEST_BYTES])
            )
        except RedisUnavailable as exc:
            self._failed(exc)
            return None
        if not isinstance(body, bytes):
            return None
        self.stats.hits += 1
        return body

    async def share_manifest(self, digest: str, body: bytes, ttl: float) -> None:
        if self._quiet() or len(body) > MAX_MANIFEST_BYTES:
            return
        px = max(1, round(ttl * 1000)) + self._body_grace_ms
        try:
            await self._call(self._redis.set(self.body_key(digest), body, px=px))
        except RedisUnavailable as exc:
            self._failed(exc)
            return
        self.stats.publishes += 1

    def rejected(self, key: TagKey | str, why: str) -> None:
        self.stats.fallbacks["invalid"] += 1

    # -- plumbing ------------------------------------------------------------------------------

    async def _read(self, key: TagKey) -> SharedTag | None:
        """The shared answer with its body, or None (nothing shared, or an entry half gone:
        a body expired before its tag, a value no node of ours wrote)."""
        reply: object = await self._call(
            self._read_script(
                keys=[self.tag_key(key)], args=[self.body_key(""), MAX_MANIFEST_BYTES]
            )
        )
        if not isinstance(reply, list) or len(reply) != 3:
            return None
        value, body, ttl_ms = reply
        if not isinstance(value, bytes) or not isinstance(body, bytes):
            return None
        digest, _, media_type = value.decode(errors="replace").partition(" ")
        if not digest or not media_type or not isinstance(ttl_ms, int) or ttl_ms <= 0:
            return None
        return SharedTag(digest, media_type, body, fresh_for=ttl_ms / 1000)

    async def _single_flight(self, key: TagKey) -> SharedTag | None:
        """None when the flight is ours (the caller resolves, then publishes or abandons),
        or when the node holding it did not answer within :attr:`wait` (counted)."""
        deadline = trio.current_time() + self.wait
        while trio.current_time() < deadline:
            value = format_value(self.node_url, secrets.token_hex(8))
            command = self._redis.set(
                self.flight_key(key), value, condition=coredis.PureToken.NX, px=self._flight_ms
            )
            if await self._call(command):
                self._held[key] = value
                return None
            # Another node is asking the upstream: its answer is one upstream round trip away.
            while trio.current_time() < deadline and await self._flying(key):
                await trio.sleep(self._poll)
                found = await self._read(key)
                if found is not None:
                    return found
            found = await self._read(key)  # published between our last two looks?
            if found is not None:
                return found
            # Else the flight was abandoned (its upstream failed) or expired: try to take it.
        self.stats.fallbacks["wait"] += 1
        log.info("no fleet answer for %s within %g s; asking the upstream", _name(key), self.wait)
        return None

    async def _flying(self, key: TagKey) -> bool:
        return bool(await self._call(self._redis.exists([self.flight_key(key)])))

    async def _call[T](self, command: Awaitable[T]) -> T:
        return await bounded(command, self._timeout)

    def _quiet(self) -> bool:
        """Whether Redis failed less than :attr:`backoff` seconds ago: then it is not tried."""
        return trio.current_time() < self._quiet_until

    def _failed(self, exc: RedisUnavailable) -> None:
        self.stats.fallbacks["unavailable"] += 1
        self._quiet_until = trio.current_time() + self.backoff
        log.warning("tag sharing off for %g s: %s", self.backoff, exc)


def _name(key: TagKey) -> str:
    return f"{key.upstream}:{key.repo}:{key.tag}:{key.accept_class or '*'}"
