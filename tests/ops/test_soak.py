"""Soak: 200 concurrent clients over 30 blobs, with early disconnects and upstream drops.

The app runs under a real hypercorn on loopback; the upstream is the fake, in real time, with
a third of the blobs dropping their first connection at a random byte.  Afterwards every
completed response must be byte-correct, every cached blob must verify, and nothing may be
left over: no download, no partial file, no extra file descriptor.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import httpx
import trio

from ..labs.corelab import open_fds
from ..labs.fakes import FakeRegistry, Fault
from ..labs.httplab import running_proxy

CLIENTS = 200
BLOBS = 30
SEED = 20261128


async def test_soak_many_clients_disconnects_and_drops(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    fake = FakeRegistry(chunk_delay=0.002)
    blobs = {}
    for i in range(BLOBS):
        data = rng.randbytes(rng.randint(50_000, 3_000_000))
        digest = fake.add_blob(data)
        blobs[digest] = data
        if i % 3 == 0:
            fake.faults[digest] = [Fault(drop_at=rng.randint(1, len(data) - 1))]
    digests = sorted(blobs)

    completed: list[tuple[str, bytes]] = []
    aborted_by_client = 0
    failed: list[str] = []

    async with running_proxy(tmp_path, fake, max_retries=4, max_concurrent=16) as proxy:
        limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            # Warm up the client's and server's lazily created resources, then count fds.
            await client.get(f"{proxy.url}/v2/")
            baseline = open_fds()

            async def one_client(index: int) -> None:
                nonlocal aborted_by_client
                plan = random.Random(SEED + index)
                digest = plan.choice(digests)
                hang_up_after = (
                    plan.randint(1, len(blobs[digest])) if plan.random() < 0.25 else None
                )
                await trio.sleep(plan.uniform(0, 2.0))
                received = bytearray()
                try:
                    async with client.stream("GET", proxy.blob_url(digest)) as response:
                        assert response.status_code == 200
                        async for chunk in response.aiter_raw():
                            received += chunk
                            if hang_up_after is not None and len(received) >= hang_up_after:
                                aborted_by_client += 1
                                return
                except httpx.HTTPError as exc:
                    failed.append(f"{digest}: {exc!r}")
                    return
                completed.append((digest, bytes(received)))

            with trio.fail_after(100):
                async with trio.open_nursery() as nursery:
                    for index in range(CLIENTS):
                        nursery.start_soon(one_client, index)
                await proxy.wait_idle(timeout=30)

            assert failed == []
            assert len(completed) + aborted_by_client == CLIENTS
            assert all(body == blobs[digest] for digest, body in completed)
            # Each blob was fetched once, plus one resume per injected drop.
            for digest in {d for d, _ in completed}:
                expected = 2 if digest in fake.faults else 1
                assert len(fake.blob_gets(digest)) == expected, digest
            await client.aclose()
            with trio.fail_after(10):
                while open_fds() > baseline:
                    await trio.sleep(0.05)

        store = proxy.state.store
        for stored in (store.root / "blobs" / "sha256").iterdir():
            assert hashlib.sha256(stored.read_bytes()).hexdigest() == stored.name
        assert list(store.partial_dir.iterdir()) == []
        assert len(proxy.state.downloads) == 0
