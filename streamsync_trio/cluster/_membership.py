"""Which nodes are in the cluster and which of them are alive.

Members come from the config: a list of node URLs, or a DNS name (a Kubernetes headless
Service) whose addresses are the members.  A member is live while its heartbeat key
``<prefix>node:<node_url>`` exists in Redis; each node renews its own key every third of
``heartbeat_ttl``, so a node that dies (kill -9, machine gone, partition) drops out of every
other node's live set within one TTL, with no one having to notice or announce it.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import secrets
import socket
from collections.abc import Iterable

import coredis.exceptions
import trio

from ._leases import DEFAULT_PREFIX
from ._redis import DEFAULT_TIMEOUT, Redis, RedisUnavailable, bounded

log = logging.getLogger("streamsync_trio.cluster")

DNS_TIMEOUT = 5.0  # seconds for one lookup of members_dns; the last good answer stays meanwhile


def heartbeat_key(node_url: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}node:{node_url}"


class Heartbeat:
    """Keeps this node's heartbeat key alive, and knows whether it currently is.

    :meth:`run` never stops for a Redis failure: a node cut off from Redis keeps serving and
    keeps trying, and :attr:`alive` says False until a renewal succeeds again (peers stop
    seeing us at most ``ttl`` after the last success, so we stop claiming to be seen).
    """

    def __init__(
        self,
        redis: Redis,
        node_url: str,
        ttl: float,
        *,
        prefix: str = DEFAULT_PREFIX,
        command_timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self._redis = redis
        self.node_url = node_url
        self.key = heartbeat_key(node_url, prefix)
        self.ttl = ttl
        # Renew three times per TTL: two renewals in a row may fail before peers drop us.
        self.interval = ttl / 3
        # No longer than one interval, so a stuck Redis cannot make us miss the next beat.
        self._command_timeout = min(command_timeout, self.interval)
        self._value = f"{node_url} {secrets.token_hex(8)}"  # which process beat last
        self.alive = False
        self.last_error: str | None = None
        self.last_rtt: float | None = None  # seconds of the last successful renewal
        self.renewals = 0
        self.failures = 0

    async def beat(self) -> bool:
        """One renewal; records the outcome rather than raising, so the loop survives."""
        started = trio.current_time()
        command = self._redis.set(self.key, self._value, px=max(1, round(self.ttl * 1000)))
        try:
            await bounded(command, self._command_timeout)
        except (RedisUnavailable, coredis.exceptions.RedisError) as exc:
            if self.alive or self.last_error is None:
                log.warning("cluster heartbeat of %s failed: %s", self.node_url, exc)
            self.alive = False
            self.last_error = str(exc)
            self.failures += 1
            return False
        if not self.alive and self.last_error is not None:
            log.info("cluster heartbeat of %s renewed again", self.node_url)
        self.alive = True
        self.last_error = None
        self.last_rtt = trio.current_time() - started
        self.renewals += 1
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Beat every ``ttl / 3`` until cancelled; started after the first attempt, so a node
        whose Redis is up is live before it serves its first request."""
        await self.beat()
        task_status.started()
        while True:
            await trio.sleep(self.interval)
            await self.beat()

    async def leave(self) -> None:
        """On a clean shutdown: drop our key at once rather than one TTL later (best effort;
        an unreachable Redis just lets it expire)."""
        try:
            await bounded(self._redis.delete([self.key]), self._command_timeout)
        except (RedisUnavailable, coredis.exceptions.RedisError):
            pass
        self.alive = False


async def live_members(
    redis: Redis,
    members: Iterable[str],
    *,
    prefix: str = DEFAULT_PREFIX,
    command_timeout: float = DEFAULT_TIMEOUT,
) -> tuple[str, ...]:
    """The members whose heartbeat key exists, in the order given; one MGET, whatever N."""
    candidates = tuple(dict.fromkeys(members))
    if not candidates:
        return ()
    keys = [heartbeat_key(member, prefix) for member in candidates]
    values = await bounded(redis.mget(keys), command_timeout)
    return tuple(m for m, value in zip(candidates, values, strict=True) if value is not None)


def member_urls(addresses: Iterable[str], port: int, scheme: str) -> tuple[str, ...]:
    """Node URLs for resolved addresses, sorted so every node lists them alike (IPv6 in
    brackets, as in a URL).  These must equal each node's ``node_url`` string for that node
    to count as live, so nodes set ``node_url`` to ``scheme://<pod IP>:<port>``."""
    urls = set()
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        host = f"[{ip.compressed}]" if ip.version == 6 else ip.compressed
        urls.add(f"{scheme}://{host}:{port}")
    return tuple(sorted(urls))


async def resolve_members(name: str, port: int, scheme: str) -> tuple[str, ...]:
    """The members a DNS name stands for now; raises OSError (or trio.TooSlowError after
    ``DNS_TIMEOUT``) when the lookup fails, so the caller keeps its last good list."""
    with trio.fail_after(DNS_TIMEOUT):
        infos = await trio.socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    return member_urls((str(info[4][0]) for info in infos), port, scheme)


class Members:
    """The configured member list, or the DNS answer for ``members_dns`` refreshed at most
    once per ``refresh`` seconds, keeping the last good answer through lookup failures."""

    def __init__(
        self,
        static: Iterable[str] = (),
        dns: tuple[str, int] | None = None,
        *,
        scheme: str = "http",
        refresh: float = 3.0,
    ) -> None:
        self._static = tuple(static)
        self._dns = dns
        self._scheme = scheme
        self._refresh = refresh
        self._resolved: tuple[str, ...] = ()
        self._resolved_at = -math.inf

    async def current(self) -> tuple[str, ...]:
        if self._dns is None:
            return self._static
        if trio.current_time() - self._resolved_at >= self._refresh:
            name, port = self._dns
            try:
                self._resolved = await resolve_members(name, port, self._scheme)
            except (OSError, trio.TooSlowError) as exc:
                log.warning("cluster members_dns %s:%d: %s", name, port, exc)
            # Failed lookups wait for the next refresh too: no DNS query per request.
            self._resolved_at = trio.current_time()
        return self._resolved
