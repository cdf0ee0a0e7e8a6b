"""Cluster mode end to end in one process: two or three real apps on loopback ports, one
real Redis, one fake upstream that counts blob requests (``_nodes``).

The multi-process tests with a real Distribution, kill -9 and SIGSTOP are in
tests/e2e/test_cluster.py; these pin the app's own behaviour: one upstream fetch for a blob
pulled on several nodes, the peer endpoint's authentication, an owner that dies mid-flight,
and Redis going away.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import httpx
import pytest
import trio

from streamsync_trio.cluster import RedisLeases, connect, heartbeat_key, home, peer_path, sign

from ..labs.fakes import FakeRegistry, Fault, digest_of
from ..labs.httplab import fetch
from ..labs.redislab import RedisServer
from ._nodes import REPO, Counted, Node, cluster_of, settled

MiB = 1024 * 1024
UPSTREAM = "registry.fake.test"


def blob(size: int, seed: bytes = b"") -> bytes:
    block = hashlib.sha256(seed + size.to_bytes(8, "big")).digest()
    return (block * (size // len(block) + 1))[:size]


def upstream_bytes(fake: FakeRegistry, digest: str, data: bytes) -> int:
    """What the fake sent for ``digest``: each GET from its Range start to the end."""
    total = 0
    for request in fake.blob_gets(digest):
        start = request.headers.get("Range", "bytes=0-").removeprefix("bytes=").split("-")[0]
        total += len(data) - int(start or 0)
    return total


async def test_a_blob_pulled_on_every_node_is_fetched_from_the_upstream_once(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeRegistry(chunk_delay=0.005)  # 64 KiB per 5 ms: "mid-flight" is real
    data = blob(4 * MiB)
    digest = fake.add_blob(data)
    async with (
        cluster_of(tmp_path, fake, redis_server.url, monkeypatch, count=3) as nodes,
        httpx.AsyncClient(timeout=30) as client,
    ):
        bodies: list[bytes] = []

        async def pull(url: str, delay: float) -> None:
            await trio.sleep(delay)
            response, body = await fetch(client, url)
            assert response.status_code == 200
            bodies.append(body)

        async with trio.open_nursery() as nursery:
            for index, node in enumerate(nodes):
                nursery.start_soon(pull, node.blob_url(digest), 0.1 * index)
        assert bodies == [data] * 3
        assert len(fake.blob_gets(digest)) == 1  # one upstream fetch for the cluster
        metrics = [await node.metrics(client) for node in nodes]
        fetched = [
            m.get(f"streamsync_upstream_bytes_total{{upstream={UPSTREAM}}}", 0) for m in metrics
        ]
        received = [m["streamsync_cluster_peer_bytes_total{direction=received}"] for m in metrics]
        sent = [m["streamsync_cluster_peer_bytes_total{direction=sent}"] for m in metrics]
        # Upstream bytes count the upstream only: one node fetched the blob, two read it
        # from that node (one of them maybe through the other's cache, never twice).
        assert sorted(fetched) == [0, 0, len(data)]
        assert sorted(received) == [0, len(data), len(data)]
        assert sum(sent) == 2 * len(data)
        assert sum(m["streamsync_cluster_leases_total{event=acquired}"] for m in metrics) == 1
        for node in nodes:  # replicate: every node keeps its copy
            assert await settled(node, digest) == data
        status = (await client.get(f"{nodes[0].url}/_status.json")).json()
        cluster = status["cluster"]
        assert cluster["alive"] and cluster["node_url"] == nodes[0].url
        assert [m["live"] for m in cluster["members"]] == [True, True, True]


async def test_the_peer_endpoint_wants_a_fresh_signature_of_exactly_its_request(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeRegistry()
    data = blob(MiB)
    digest = fake.add_blob(data)
    async with (
        cluster_of(tmp_path, fake, redis_server.url, monkeypatch, count=1) as [node],
        httpx.AsyncClient(timeout=30) as client,
    ):
        path = peer_path(UPSTREAM, REPO, digest)
        secret = node.state.config.cluster.secret()  # type: ignore[union-attr]
        now = time.time()
        refused = [
            {},
            sign(b"another secret", "GET", path, now),
            sign(secret, "GET", path, now - 120),  # stale
            sign(secret, "GET", peer_path(UPSTREAM, "other/repo", digest), now),  # another path
        ]
        for headers in refused:
            response = await client.get(node.url + path, headers=headers)
            assert response.status_code == 401, headers
            assert response.json()["errors"][0]["code"] == "UNAUTHORIZED"
        assert fake.blob_gets(digest) == []  # nothing was fetched for them
        headers = {**sign(secret, "GET", path, now), "Range": f"bytes={MiB // 2}-"}
        response = await client.get(node.url + path, headers=headers)
        assert response.status_code == 206 and response.content == data[MiB // 2 :]
        assert response.headers["Content-Range"] == f"bytes {MiB // 2}-{MiB - 1}/{MiB}"
        metrics = await node.metrics(client)
        assert metrics["streamsync_cluster_peer_requests_total{result=unauthorized}"] == 4
        assert metrics["streamsync_cluster_peer_requests_total{result=served}"] == 1
        assert metrics["streamsync_cluster_peer_bytes_total{direction=sent}"] == MiB // 2
        # Client traffic is not peer traffic.
        assert metrics["streamsync_served_bytes_total{source=stream}"] == 0


async def test_when_the_owner_dies_mid_flight_the_follower_takes_over_at_its_own_offset(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeRegistry(chunk_delay=0.01)  # 6.4 MB/s: 8 MiB take about 1.3 s
    data = blob(8 * MiB, b"owner dies")
    digest = fake.add_blob(data)
    counted = Counted(fake)
    async with (
        cluster_of(tmp_path, counted, redis_server.url, monkeypatch, heartbeat_ttl=1.0) as nodes,
        httpx.AsyncClient(timeout=30) as client,
    ):
        # The digest's home fetches it; the client pulls through the other node.
        owner = next(n for n in nodes if n.url == home(digest, [m.url for m in nodes]))
        follower = next(n for n in nodes if n is not owner)
        async with client.stream("GET", follower.blob_url(digest)) as response:
            assert response.status_code == 200
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) >= 3 * MiB and owner.scope.cancel_called is False:
                    owner.kill()  # like kill -9: no lease release, heartbeat left to expire
        assert bytes(body) == data
        [first, *resumed] = fake.blob_gets(digest)
        assert "Range" not in first.headers and len(resumed) == 1
        assert resumed[0].headers["Range"].startswith("bytes=")  # at its own offset, not 0
        # What the dead owner fetched ahead of the follower, plus the rest from the follower.
        assert len(data) <= counted.sent < 1.1 * len(data)
        metrics = await follower.metrics(client)
        assert metrics["streamsync_cluster_leases_total{event=taken_over}"] == 1
        assert metrics["streamsync_cluster_peer_failures_total"] == 1
        assert await settled(follower, digest) == data


async def test_without_redis_a_node_serves_misses_from_the_upstream_and_counts_them(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeRegistry()
    data = blob(MiB, b"degraded")
    digest = fake.add_blob(data)
    async with (
        cluster_of(tmp_path, fake, redis_server.url, monkeypatch) as nodes,
        httpx.AsyncClient(timeout=30) as client,
    ):
        redis_server.stop()
        for node in nodes:
            response, body = await fetch(client, node.blob_url(digest))
            assert response.status_code == 200 and body == data
        assert len(fake.blob_gets(digest)) == 2  # single-flight per machine only
        for node in nodes:
            metrics = await node.metrics(client)
            assert metrics["streamsync_cluster_degraded_misses_total"] == 1
            assert metrics["streamsync_cluster_routes_total{route=degraded}"] == 1
            # Still ready: a cache hit and a miss are both served.
            assert (await client.get(f"{node.url}/readyz")).status_code == 200
        redis_server.start()


async def test_a_peer_request_is_never_forwarded_to_a_third_node(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeRegistry()
    data = blob(MiB, b"one hop")
    digest = fake.add_blob(data)
    async with (
        cluster_of(tmp_path, fake, redis_server.url, monkeypatch) as [asked, holder],
        httpx.AsyncClient(timeout=30) as client,
        connect(redis_server.url) as redis,
    ):
        # The live node ``holder`` holds the digest's lease (as if downloading it).
        assert await RedisLeases(redis, holder.url, 30).acquire(digest) is not None
        path = peer_path(UPSTREAM, REPO, digest)
        secret = asked.state.config.cluster.secret()  # type: ignore[union-attr]
        response = await client.get(
            asked.url + path, headers=sign(secret, "GET", path, time.time())
        )
        assert response.status_code == 200 and response.content == data
        assert len(fake.blob_gets(digest)) == 1  # ``asked`` fetched it itself
        metrics = await asked.metrics(client)
        assert metrics["streamsync_cluster_routes_total{route=peer}"] == 0
        assert metrics["streamsync_cluster_routes_total{route=upstream_unleased}"] == 1
        assert (await holder.metrics(client))[
            "streamsync_cluster_peer_requests_total{result=served}"
        ] == 0


async def test_a_follower_leaves_an_owner_whose_heartbeat_stops_before_its_stall_timeout(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeRegistry(chunk_delay=0.005)
    data = blob(6 * MiB, b"owner stops")
    digest = fake.add_blob(data)
    fake.faults[digest] = [Fault(stall_at=2 * MiB)]  # the owner's body stops: so do its peers'
    async with (
        cluster_of(tmp_path, fake, redis_server.url, monkeypatch, heartbeat_ttl=0.6) as nodes,
        httpx.AsyncClient(timeout=30) as client,
        connect(redis_server.url) as redis,
    ):
        owner = next(n for n in nodes if n.url == home(digest, [m.url for m in nodes]))
        follower = next(n for n in nodes if n is not owner)
        frozen_at = 0.0
        async with client.stream("GET", follower.blob_url(digest)) as response:
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) >= 2 * MiB - 64 * 1024 and not frozen_at:
                    # As if SIGSTOPped: it keeps its connections but beats no more.
                    heartbeat = owner.state.cluster.heartbeat  # type: ignore[union-attr]
                    monkeypatch.setattr(heartbeat, "beat", _no_beat)
                    await redis.delete([heartbeat_key(owner.url)])
                    frozen_at = time.monotonic()
        recovered = time.monotonic() - frozen_at
        assert bytes(body) == data
        # Within a heartbeat interval or two, not the 5 s stall timeout (read_timeout).
        assert recovered < 3.0, recovered
        metrics = await follower.metrics(client)
        assert metrics["streamsync_cluster_leases_total{event=taken_over}"] == 1


async def _no_beat() -> bool:
    return False


async def test_the_lease_is_renewed_while_the_download_runs_and_released_after_it(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeRegistry(chunk_delay=0.02)  # 3 MiB in about 1 s: several lease TTLs
    data = blob(3 * MiB, b"renewed")
    digest = fake.add_blob(data)
    async with (
        cluster_of(tmp_path, fake, redis_server.url, monkeypatch, count=1, lease_ttl=0.3) as [node],
        httpx.AsyncClient(timeout=30) as client,
        connect(redis_server.url) as redis,
    ):
        leases = RedisLeases(redis, node.url, 0.3)
        holders = []
        async with client.stream("GET", node.blob_url(digest)) as response:
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                holders.append(await leases.holder(digest))
        assert bytes(body) == data
        # Held by this node all along (a lease of 0.3 s, renewed every 0.1 s) ...
        during = holders[: len(holders) * 3 // 4]
        assert len(during) > 10 and all(h is not None and h.node_url == node.url for h in during)
        with trio.fail_after(5):  # ... and released, in the background, once committed.
            while await leases.holder(digest) is not None:
                await trio.sleep(0.01)
        metrics = await node.metrics(client)
        assert metrics["streamsync_cluster_leases_total{event=acquired}"] == 1
        assert metrics["streamsync_cluster_leases_total{event=lost}"] == 0
        assert metrics["streamsync_cluster_leases_total{event=released}"] == 1


async def test_a_live_owner_missing_from_our_member_list_is_followed_not_taken_over(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeRegistry(chunk_delay=0.005)
    async with (
        # Node 1 does not list node 0 (lists disagree while a member is being added).
        cluster_of(tmp_path, fake, redis_server.url, monkeypatch, lists=[(0, 1), (1,)]) as nodes,
        httpx.AsyncClient(timeout=30) as client,
    ):
        urls = [node.url for node in nodes]
        seed = 0
        while home(digest := digest_of(data := blob(3 * MiB, b"%d" % seed)), urls) != urls[0]:
            seed += 1  # a blob node 0 owns (as node 0 sees it: its own home)
        fake.add_blob(data)
        bodies: list[bytes] = []

        async def pull(node: Node) -> None:
            response, body = await fetch(client, node.blob_url(digest))
            assert response.status_code == 200
            bodies.append(body)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pull, nodes[0])
            await trio.sleep(0.2)  # node 0 holds the lease and is downloading
            nursery.start_soon(pull, nodes[1])
        assert bodies == [data, data]
        assert len(fake.blob_gets(digest)) == 1
        metrics = await nodes[1].metrics(client)
        assert metrics["streamsync_cluster_leases_total{event=taken_over}"] == 0
        assert metrics["streamsync_cluster_peer_bytes_total{direction=received}"] == len(data)


async def test_the_status_page_shows_the_members_and_who_owns_a_download(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeRegistry(chunk_delay=0.02)  # 64 KiB per 20 ms: 2 MiB take about 0.6 s
    data = blob(2 * MiB, b"status")
    digest = fake.add_blob(data)
    async with (
        cluster_of(tmp_path, fake, redis_server.url, monkeypatch, count=2) as nodes,
        httpx.AsyncClient(timeout=30) as client,
    ):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch, client, nodes[0].blob_url(digest))
            await trio.sleep(0.2)  # the download is in flight on node 0
            page = (await client.get(f"{nodes[0].url}/_status")).text
            snapshot = (await client.get(f"{nodes[0].url}/_status.json")).json()
        [download] = snapshot["downloads"]
        section = page[page.index("<h2>cluster</h2>") :]
        assert f"{nodes[0].url} (this node)" in section
        assert section.count('class="live">live<') == 2
        assert digest[:19] in section
        assert f"<td>{download['owner']}</td>" in section
        assert download["owner"] in (nodes[0].url, nodes[1].url)
        # Without [cluster] the page has no such section (tests/edge/test_status_page.py).
        assert "placement <b>replicate</b>" in section
