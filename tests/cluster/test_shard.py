"""``placement = "shard"``: a node keeps only the digests it is the home of (rendezvous over
the live members); the others it streams through to its clients from the home, without a
copy.  Real apps on loopback ports, one real Redis, one fake upstream (``_nodes``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest
import trio

from streamsync_trio._reference import parse_digest
from streamsync_trio.cluster import home

from ..labs.fakes import FakeRegistry
from ..labs.httplab import fetch
from ..labs.redislab import RedisServer
from ._nodes import Node, cluster_of, settled

MiB = 1024 * 1024
UPSTREAM = "registry.fake.test"
THROUGH = "streamsync_cluster_streamed_through_total"
RECEIVED = "streamsync_cluster_peer_bytes_total{direction=received}"
SENT = "streamsync_cluster_peer_bytes_total{direction=sent}"


def blob(size: int, seed: bytes) -> bytes:
    block = hashlib.sha256(seed + size.to_bytes(8, "big")).digest()
    return (block * (size // len(block) + 1))[:size]


def by_role(nodes: list[Node], digest: str) -> tuple[Node, list[Node]]:
    """The digest's home among the nodes, and the others."""
    url = home(digest, [node.url for node in nodes])
    return next(n for n in nodes if n.url == url), [n for n in nodes if n.url != url]


def nothing_left(node: Node) -> bool:
    """No copy in any form: no stored blob, no partial, no download in flight."""
    store = node.state.store
    return (
        store.usage().blobs == 0
        and not any(store.partial_dir.iterdir())
        and len(node.state.downloads) == 0
    )


async def test_a_node_that_is_not_the_home_streams_the_blob_through_without_a_copy(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeRegistry(chunk_delay=0.002)
    data = blob(4 * MiB, b"shard")
    digest = fake.add_blob(data)
    async with (
        cluster_of(tmp_path, fake, redis_server.url, monkeypatch, 3, placement="shard") as nodes,
        httpx.AsyncClient(timeout=30) as client,
    ):
        owner, [other, third] = by_role(nodes, digest)
        response, body = await fetch(client, other.blob_url(digest))
        assert response.status_code == 200 and body == data
        assert len(fake.blob_gets(digest)) == 1
        # The home fetched it from the upstream (asked by the other node) and keeps it;
        # the other node verified it, streamed it to its client and kept nothing.
        assert await settled(owner, digest) == data
        assert await settled(other, digest) is None
        assert nothing_left(other) and nothing_left(third)
        mine, theirs = await other.metrics(client), await owner.metrics(client)
        assert (mine[THROUGH], mine[RECEIVED]) == (1, len(data))
        assert (theirs[THROUGH], theirs[SENT]) == (0, len(data))
        assert theirs[f"streamsync_upstream_bytes_total{{upstream={UPSTREAM}}}"] == len(data)

        # A later request on that node streams from the home again, out of its cache.
        response, body = await fetch(client, other.blob_url(digest))
        assert response.status_code == 200 and body == data
        assert len(fake.blob_gets(digest)) == 1
        assert nothing_left(other)
        mine, theirs = await other.metrics(client), await owner.metrics(client)
        assert (mine[THROUGH], mine[RECEIVED], theirs[SENT]) == (2, 2 * len(data), 2 * len(data))
        assert mine.get(f"streamsync_upstream_bytes_total{{upstream={UPSTREAM}}}", 0) == 0

        # The home's own clients get its copy; the third node never kept anything.
        response, body = await fetch(client, owner.blob_url(digest))
        assert response.status_code == 200 and body == data
        assert len(fake.blob_gets(digest)) == 1 and nothing_left(third)


async def test_a_damaged_body_from_the_home_never_completes_on_the_other_node(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeRegistry()
    data = blob(2 * MiB, b"damaged")
    digest = fake.add_blob(data)
    async with (
        cluster_of(tmp_path, fake, redis_server.url, monkeypatch, placement="shard") as nodes,
        httpx.AsyncClient(timeout=30) as client,
    ):
        owner, [other] = by_role(nodes, digest)
        response, body = await fetch(client, owner.blob_url(digest))
        assert response.status_code == 200 and body == data
        assert await settled(owner, digest) == data
        # The home's copy rots in place (same file, same size: it still trusts it).
        with owner.state.store.blob_path(parse_digest(digest)).open("r+b") as file:
            file.seek(MiB)
            file.write(bytes([data[MiB] ^ 0xFF]))
        received = bytearray()
        with pytest.raises(httpx.HTTPError):
            async with client.stream("GET", other.blob_url(digest)) as response:
                assert response.status_code == 200
                async for chunk in response.aiter_raw():
                    received += chunk
        # Cut short of its length: the other node's client never gets a complete body.
        assert len(received) < len(data) and data.startswith(bytes(received[:MiB]))
        assert nothing_left(other) and len(fake.blob_gets(digest)) == 1
        mine = await other.metrics(client)
        assert mine[THROUGH] == 0
        assert (
            mine[
                f"streamsync_download_failures_total{{reason=digest_mismatch,upstream={UPSTREAM}}}"
            ]
            == 1
        )


async def test_a_slow_client_on_the_other_node_finishes_after_the_partial_is_gone(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeRegistry()
    data = blob(32 * MiB, b"slow reader")  # far more than the sockets between us buffer
    digest = fake.add_blob(data)
    async with (
        cluster_of(tmp_path, fake, redis_server.url, monkeypatch, placement="shard") as nodes,
        httpx.AsyncClient(timeout=60) as client,
    ):
        owner, [other] = by_role(nodes, digest)
        received = bytearray()
        async with client.stream("GET", other.blob_url(digest)) as response:
            assert response.status_code == 200
            chunks = response.aiter_raw()
            async for chunk in chunks:
                received += chunk
                if len(received) >= MiB:
                    break
            # The client waits; the node's download ends meanwhile and drops its partial.
            with trio.fail_after(30):
                while not nothing_left(other):
                    await trio.sleep(0.05)
            mine = await other.metrics(client)
            assert mine[THROUGH] == 1
            # Its response had not read all of the blob yet: the rest comes from the
            # descriptor it holds on the removed partial.
            assert mine["streamsync_served_bytes_total{source=stream}"] < len(data)
            async for chunk in chunks:
                received += chunk
        assert bytes(received) == data
        assert await settled(owner, digest) == data
        assert await settled(other, digest) is None and nothing_left(other)
        assert len(fake.blob_gets(digest)) == 1


async def test_without_its_home_a_node_fetches_from_the_upstream_and_keeps_only_as_new_home(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeRegistry()
    data = blob(MiB, b"home gone")
    digest = fake.add_blob(data)
    ttl = 6.0  # its key outlives the kill by 2/3 to 3/3 of it: room for the first pull
    async with (
        cluster_of(
            tmp_path, fake, redis_server.url, monkeypatch, placement="shard", heartbeat_ttl=ttl
        ) as nodes,
        httpx.AsyncClient(timeout=30) as client,
    ):
        owner, [other] = by_role(nodes, digest)
        owner.kill()  # like kill -9: its heartbeat key lives on for up to one TTL
        killed_at = trio.current_time()
        response, body = await fetch(client, other.blob_url(digest))
        assert response.status_code == 200 and body == data
        assert trio.current_time() - killed_at < ttl * 2 / 3  # the dead home still live
        # Degraded: from the upstream itself, and still no copy (the home may be back soon).
        assert await settled(other, digest) is None
        assert len(fake.blob_gets(digest)) == 1 and nothing_left(other)
        assert (await other.metrics(client))[THROUGH] == 1
        # Once the home's heartbeat expired, this node is the digest's home: it keeps it.
        await trio.sleep(max(0.0, killed_at + ttl + 0.5 - trio.current_time()))
        response, body = await fetch(client, other.blob_url(digest))
        assert response.status_code == 200 and body == data
        assert len(fake.blob_gets(digest)) == 2 and await settled(other, digest) == data
        assert (await other.metrics(client))[THROUGH] == 1
