"""One process of the lease race: ``python -m tests.cluster._racer REDIS_URL DIGEST NODE_URL``.

It connects, prints ``ready``, waits for a line on stdin (so all processes start together),
then claims the digest's lease from 50 tasks at once and prints the leases it won as JSON.
"""

from __future__ import annotations

import json
import sys
from functools import partial

import trio
import trio.testing

from streamsync_trio.cluster import Lease, RedisLeases, connect

TASKS = 50


async def race(redis_url: str, digest: str, node_url: str) -> list[Lease]:
    won: list[Lease] = []
    async with connect(redis_url) as redis:
        leases = RedisLeases(redis, node_url, ttl=30)
        await leases.holder(digest)  # connected before the start signal
        print("ready", flush=True)
        await trio.to_thread.run_sync(sys.stdin.readline)
        go = trio.Event()

        async def claim() -> None:
            await go.wait()
            lease = await leases.acquire(digest)
            if lease is not None:
                won.append(lease)

        async with trio.open_nursery() as nursery:
            for _ in range(TASKS):
                nursery.start_soon(claim)
            await trio.testing.wait_all_tasks_blocked()  # all 50 waiting on go
            go.set()
    return won


def main() -> None:
    redis_url, digest, node_url = sys.argv[1:4]
    won = trio.run(partial(race, redis_url, digest, node_url))
    print(json.dumps([lease.value for lease in won]), flush=True)


if __name__ == "__main__":
    main()
