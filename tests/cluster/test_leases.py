"""Per-digest leases in a real Redis: one winner, only the owner renews or releases."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from streamsync_trio.cluster import Lease, Redis, RedisLeases, RedisUnavailable, connect

from ..labs.redislab import RedisServer

REPO_ROOT = Path(__file__).resolve().parents[2]
DIGEST = "sha256:" + "5e" * 32
NODE_A = "http://127.0.0.2:5000"
NODE_B = "http://127.0.0.3:5000"


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    async with connect(redis_server.url) as client:
        yield client


def test_three_processes_of_fifty_tasks_one_winner(redis_server: RedisServer) -> None:
    nodes = [f"http://127.0.0.{i}:5000" for i in (2, 3, 4)]
    racers = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.cluster._racer", redis_server.url, DIGEST, node],
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for node in nodes
    ]
    try:
        for racer in racers:
            assert racer.stdout is not None
            assert racer.stdout.readline() == "ready\n"
        for racer in racers:  # all connected: start them as close together as we can
            assert racer.stdin is not None
            racer.stdin.write("go\n")
            racer.stdin.flush()
        won = [json.loads(racer.communicate(timeout=60)[0]) for racer in racers]
    finally:
        for racer in racers:
            if racer.poll() is None:
                racer.kill()
                racer.wait()
    assert [racer.returncode for racer in racers] == [0, 0, 0]
    winners = [value for values in won for value in values]
    assert len(winners) == 1, won
    stored = redis_cli(redis_server, "GET", f"streamsync:lease:{DIGEST}")
    assert stored == winners[0]
    node_url, nonce = stored.split(" ")
    assert node_url in nodes and len(nonce) == 16  # what an operator sees with redis-cli


def redis_cli(server: RedisServer, *args: str) -> str:
    command = ["redis-cli", "-h", "127.0.0.1", "-p", str(server.port), *args]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()


async def test_only_the_owner_renews_or_releases(redis: Redis) -> None:
    a = RedisLeases(redis, NODE_A, ttl=1.0)
    b = RedisLeases(redis, NODE_B, ttl=1.0)
    lease = await a.acquire(DIGEST)
    assert lease is not None and lease.node_url == NODE_A
    assert await b.acquire(DIGEST) is None
    assert await a.acquire(DIGEST) is None  # not re-entrant: one download per digest
    assert await b.holder(DIGEST) == lease
    impostors = [
        Lease(DIGEST, NODE_B, "0" * 16),
        Lease(DIGEST, NODE_A, "0" * 16),  # the owner's URL, another process's nonce
        Lease(DIGEST, NODE_B, lease.nonce),
    ]
    for impostor in impostors:
        assert await b.renew(impostor) is False
        assert await b.release(impostor) is False
        assert await a.renew(impostor) is False
        assert await a.release(impostor) is False
    assert await b.holder(DIGEST) == lease  # still there, untouched
    await trio.sleep(0.5)
    assert await a.renew(lease) is True
    ttl = int(await redis.pttl(a.key(DIGEST)))
    assert 900 < ttl <= 1000  # renewed to the full TTL, not merely kept
    assert await a.release(lease) is True
    assert await a.holder(DIGEST) is None
    assert await a.release(lease) is False  # twice is not an error, just not ours any more
    assert await a.renew(lease) is False  # and renew cannot resurrect it
    assert await a.holder(DIGEST) is None
    assert await b.acquire(DIGEST) is not None


async def test_expiry_lets_another_node_take_over(redis: Redis) -> None:
    a = RedisLeases(redis, NODE_A, ttl=0.3)
    b = RedisLeases(redis, NODE_B, ttl=5)
    old = await a.acquire(DIGEST)
    assert old is not None
    assert await b.acquire(DIGEST) is None
    await trio.sleep(0.45)  # A paused past its TTL without renewing
    new = await b.acquire(DIGEST)
    assert new is not None and new.node_url == NODE_B
    # A wakes up: its renew and release must not touch B's lease.
    assert await a.renew(old) is False
    assert await a.release(old) is False
    assert await a.holder(DIGEST) == new


async def test_take_over_from_a_dead_holder_has_one_winner(redis: Redis) -> None:
    dead = await RedisLeases(redis, NODE_A, ttl=30).acquire(DIGEST)
    assert dead is not None
    contenders = [RedisLeases(redis, f"http://127.0.1.{i}:5000", ttl=30) for i in range(20)]
    won: list[Lease] = []

    async def take(leases: RedisLeases) -> None:
        stale = await leases.holder(DIGEST)
        assert stale == dead
        lease = await leases.take_over(stale)
        if lease is not None:
            won.append(lease)

    async with trio.open_nursery() as nursery:
        for leases in contenders:
            nursery.start_soon(take, leases)
    assert len(won) == 1
    assert await contenders[0].holder(DIGEST) == won[0]
    ttl = int(await redis.pttl(contenders[0].key(DIGEST)))
    assert 29_000 < ttl <= 30_000  # the new holder gets a fresh TTL
    assert await contenders[0].take_over(dead) is None  # the stale value is gone


async def test_leases_of_different_digests_are_independent(redis: Redis) -> None:
    a = RedisLeases(redis, NODE_A, ttl=5)
    b = RedisLeases(redis, NODE_B, ttl=5)
    assert await a.acquire(DIGEST) is not None
    assert await b.acquire("sha256:" + "77" * 32) is not None
    assert await a.holder("sha256:" + "00" * 32) is None


async def test_a_stopped_redis_is_unavailable(redis_server: RedisServer) -> None:
    async with connect(redis_server.url, command_timeout=0.5) as redis:
        leases = RedisLeases(redis, NODE_A, ttl=5, timeout=0.5)
        assert await leases.acquire(DIGEST) is not None
        redis_server.stop()
        for call in (leases.acquire(DIGEST), leases.holder(DIGEST)):
            with trio.fail_after(5), pytest.raises(RedisUnavailable, match="unreachable"):
                await call


async def test_a_paused_redis_is_unavailable_within_the_timeout(
    redis_server: RedisServer,
) -> None:
    async with connect(redis_server.url) as redis:
        leases = RedisLeases(redis, NODE_A, ttl=5, timeout=0.3)
        assert await leases.holder(DIGEST) is None  # connected
        assert redis_server.process is not None
        pid = redis_server.process.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            started = trio.current_time()
            with pytest.raises(RedisUnavailable, match=r"did not answer within 0\.3 s"):
                await leases.acquire(DIGEST)
            assert trio.current_time() - started < 2
        finally:
            os.kill(pid, signal.SIGCONT)
