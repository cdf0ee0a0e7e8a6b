"""Membership: heartbeat keys in a real Redis, live sets, and members from a list or DNS."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
import trio

from streamsync_trio.cluster import (
    Heartbeat,
    Members,
    Redis,
    _membership,
    connect,
    heartbeat_key,
    live_members,
    member_urls,
)

from ..labs.redislab import RedisServer

NODE_A = "http://127.0.0.2:5000"
NODE_B = "http://127.0.0.3:5000"
NODE_C = "http://127.0.0.4:5000"


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    async with connect(redis_server.url, command_timeout=0.5) as client:
        yield client


async def eventually(condition: Callable[[], bool], within: float) -> float:
    """Seconds until ``condition()`` held, polling; fails the test after ``within``."""
    started = trio.current_time()
    with trio.fail_after(within):
        while not condition():
            await trio.sleep(0.02)
    return trio.current_time() - started


async def test_a_beating_node_is_live_and_a_silent_one_is_not(redis: Redis) -> None:
    assert await live_members(redis, []) == ()
    beat = Heartbeat(redis, NODE_A, ttl=3)
    assert beat.alive is False
    assert await beat.beat() is True
    assert beat.alive and beat.renewals == 1 and beat.last_rtt is not None
    assert 2900 < int(await redis.pttl(heartbeat_key(NODE_A))) <= 3000
    assert await live_members(redis, [NODE_C, NODE_B, NODE_A]) == (NODE_A,)
    await Heartbeat(redis, NODE_C, ttl=3).beat()
    assert await live_members(redis, [NODE_C, NODE_B, NODE_A, NODE_C]) == (NODE_C, NODE_A)
    await beat.leave()
    assert beat.alive is False
    assert await live_members(redis, [NODE_A, NODE_C]) == (NODE_C,)


async def test_a_dead_node_drops_out_within_its_ttl(redis: Redis) -> None:
    beat = Heartbeat(redis, NODE_A, ttl=0.6)
    async with trio.open_nursery() as nursery:
        await nursery.start(beat.run)
        assert beat.alive
        await trio.sleep(1.5)  # renewed every 0.2 s, so never gone meanwhile
        assert await live_members(redis, [NODE_A]) == (NODE_A,)
        assert beat.renewals >= 5
        nursery.cancel_scope.cancel()  # the node dies without leaving
    stopped = trio.current_time()
    with trio.fail_after(3):
        while await live_members(redis, [NODE_A]):
            await trio.sleep(0.02)
    assert trio.current_time() - stopped <= 0.6 + 0.3  # the TTL, plus polling on a busy machine


async def test_the_heartbeat_survives_redis_going_away(redis_server: RedisServer) -> None:
    async with connect(redis_server.url, command_timeout=0.3) as redis:
        beat = Heartbeat(redis, NODE_A, ttl=0.6)
        async with trio.open_nursery() as nursery:
            await nursery.start(beat.run)
            assert beat.alive
            redis_server.stop()
            await eventually(lambda: not beat.alive, within=3)
            assert beat.last_error is not None and beat.failures >= 1
            await trio.sleep(0.5)  # keeps failing, keeps running
            assert not beat.alive and beat.failures >= 2
            redis_server.start()  # a fresh Redis on the same port: the key is gone
            await eventually(lambda: beat.alive, within=5)
            assert beat.last_error is None
            assert await live_members(redis, [NODE_A, NODE_B]) == (NODE_A,)
            nursery.cancel_scope.cancel()


async def test_a_node_whose_redis_is_down_starts_not_alive(redis_server: RedisServer) -> None:
    redis_server.stop()
    async with connect(redis_server.url, command_timeout=0.3) as redis:
        beat = Heartbeat(redis, NODE_A, ttl=0.6)
        async with trio.open_nursery() as nursery:
            await nursery.start(beat.run)  # starts anyway: the node serves degraded
            assert beat.alive is False and beat.failures == 1
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("addresses", "urls"),
    [
        ([], ()),
        (["10.0.0.6", "10.0.0.5", "10.0.0.5"], ("http://10.0.0.5:5000", "http://10.0.0.6:5000")),
        (["fd00::5", "::1"], ("http://[::1]:5000", "http://[fd00::5]:5000")),
        (["fe80::1%eth0"], ("http://[fe80::1]:5000",)),
        (["0:0:0:0:0:0:0:1"], ("http://[::1]:5000",)),
    ],
)
def test_member_urls(addresses: list[str], urls: tuple[str, ...]) -> None:
    assert member_urls(addresses, 5000, "http") == urls


async def test_static_members() -> None:
    members = Members([NODE_A, NODE_B])
    assert await members.current() == (NODE_A, NODE_B)


async def test_members_from_dns() -> None:
    members = Members(dns=("localhost", 5000), scheme="https")
    assert "https://127.0.0.1:5000" in await members.current()


async def test_a_failed_lookup_keeps_the_last_answer(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    answers: list[tuple[str, ...] | OSError] = [(NODE_A, NODE_B), OSError("SERVFAIL"), (NODE_C,)]
    lookups: list[tuple[str, int, str]] = []

    async def resolve(name: str, port: int, scheme: str) -> tuple[str, ...]:
        lookups.append((name, port, scheme))
        answer = answers.pop(0)
        if isinstance(answer, OSError):
            raise answer
        return answer

    monkeypatch.setattr(_membership, "resolve_members", resolve)
    members = Members(dns=("svc.test", 5000), refresh=3)
    assert await members.current() == (NODE_A, NODE_B)
    assert await members.current() == (NODE_A, NODE_B)  # cached: one lookup per refresh
    assert len(lookups) == 1
    await trio.sleep(3)
    assert await members.current() == (NODE_A, NODE_B)  # SERVFAIL: the last good answer
    assert await members.current() == (NODE_A, NODE_B)  # and no lookup per call meanwhile
    assert len(lookups) == 2
    await trio.sleep(3)
    assert await members.current() == (NODE_C,)
    assert lookups == [("svc.test", 5000, "http")] * 3
