"""The Redis connection and its failure mode: one exception for "Redis did not answer".

coredis is built on anyio, so it runs under trio natively (redis-py's asyncio client does not).
Every command is bounded in time here: a Redis that stops answering (paused, partitioned)
must turn into :class:`RedisUnavailable` within ``timeout`` seconds so that the caller can fall
back to single-flight per machine, never into a request that hangs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager

import coredis
import coredis.exceptions
import trio

DEFAULT_TIMEOUT = 2.0  # seconds for one command; Redis answers in about a millisecond here

type Redis = coredis.Redis[bytes]


class RedisUnavailable(Exception):
    """Redis could not be reached or did not answer in time; cluster coordination is off
    until it answers again (cache hits and single-machine single-flight carry on)."""


@asynccontextmanager
async def connect(url: str, command_timeout: float = DEFAULT_TIMEOUT) -> AsyncIterator[Redis]:
    """A client for the app's lifetime.  Entering needs no server: the first command
    connects, so a node starts (degraded) while Redis is down."""
    client: Redis = coredis.Redis.from_url(
        url,
        connect_timeout=command_timeout,
        stream_timeout=command_timeout,
        decode_responses=False,
    )
    async with client:
        yield client


async def bounded[T](command: Awaitable[T], limit: float = DEFAULT_TIMEOUT) -> T:
    """Await one Redis command within ``limit`` seconds; any way it fails becomes
    :class:`RedisUnavailable` (a command error is a bug and propagates as it is)."""
    try:
        with trio.fail_after(limit):
            return await command
    except trio.TooSlowError:
        raise RedisUnavailable(f"Redis did not answer within {limit:g} s") from None
    except (coredis.exceptions.ConnectionError, TimeoutError, OSError) as exc:
        raise RedisUnavailable(f"Redis unreachable: {exc}") from exc
