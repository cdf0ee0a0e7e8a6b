"""Tags across the fleet: N nodes ask the upstream once per tag and Accept class per tag_ttl.

Three real apps under hypercorn, one real Redis, one fake upstream that counts manifest
requests (``_nodes``).  What is pinned: one upstream GET for a tag resolved by many clients on
every node, cold and again after the TTL; an entry in Redis that is wrong is never served;
Redis down means each node asks the upstream itself (counted); a narrow ``Accept`` never gets
another class's document.  ``RedisSharedTags`` alone: the bounded wait for a node that holds
the single-flight and never answers, and the hand-over when it gives up.
"""

from __future__ import annotations

import json
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import httpx
import pytest
import trio

from streamsync_trio.cluster import RedisSharedTags, connect
from streamsync_trio.core import SharedTag, TagKey

from ..labs.fakes import FakeRegistry, digest_of, image_manifest
from ..labs.redislab import RedisServer
from ._nodes import REPO, Node, cluster_of

UPSTREAM = "registry.fake.test"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_V2 = "application/vnd.docker.distribution.manifest.v2+json"
BROAD = TagKey(UPSTREAM, REPO, "latest", "")


def fleet(
    tmp_path: Path,
    fake: httpx.AsyncBaseTransport,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    count: int = 3,
    tag_ttl: float = 300.0,
) -> AbstractAsyncContextManager[list[Node]]:
    """``_nodes.cluster_of`` with the upstream's ``tag_ttl`` set (the same on every node)."""
    return cluster_of(tmp_path, fake, redis_url, monkeypatch, count, upstream={"tag_ttl": tag_ttl})


def manifest(seed: str) -> bytes:
    return image_manifest(digest_of(seed.encode()), [digest_of(seed.encode() * 2)])


def tag_url(node: Node, tag: str = "latest") -> str:
    return f"{node.url}/v2/{REPO}/manifests/{tag}"


async def pull_everywhere(
    client: httpx.AsyncClient, nodes: list[Node], per_node: int, headers: dict[str, str]
) -> list[httpx.Response]:
    """``per_node`` clients on every node resolving the tag at once."""
    responses: list[httpx.Response] = []

    async def pull(node: Node) -> None:
        responses.append(await client.get(tag_url(node), headers=headers))

    async with trio.open_nursery() as nursery:
        for node in nodes:
            for _ in range(per_node):
                nursery.start_soon(pull, node)
    return responses


async def counts(client: httpx.AsyncClient, nodes: list[Node], name: str) -> list[float]:
    return [(await node.metrics(client)).get(name, 0.0) for node in nodes]


async def test_a_tag_pulled_on_every_node_is_fetched_once_per_ttl(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeRegistry()
    first, second = manifest("first"), manifest("second")
    fake.add_manifest(REPO, "latest", first)
    async with (
        fleet(tmp_path, fake, redis_server.url, monkeypatch, tag_ttl=2.0) as nodes,
        httpx.AsyncClient(timeout=30) as client,
    ):
        cold = await pull_everywhere(client, nodes, 4, {})
        assert [(r.status_code, r.content) for r in cold] == [(200, first)] * 12
        assert len(fake.manifest_requests("GET")) == 1  # one upstream GET for 3 nodes
        assert len(fake.manifest_requests("HEAD")) == 0
        hits = await counts(client, nodes, "streamsync_cluster_shared_tags_total{event=hit}")
        published = await counts(
            client, nodes, "streamsync_cluster_shared_tags_total{event=published}"
        )
        assert sorted(hits) == [0, 1, 1] and sorted(published) == [0, 0, 1]
        fake.add_manifest(REPO, "latest", second)  # the tag moves upstream
        within = await pull_everywhere(client, nodes, 2, {})
        assert {r.content for r in within} == {first}  # within the TTL: the cached answer
        assert len(fake.manifest_requests("GET")) == 1
        await trio.sleep(2.1)
        after = await pull_everywhere(client, nodes, 4, {})
        assert [(r.status_code, r.content) for r in after] == [(200, second)] * 12
        # One node revalidated (a HEAD: the digest moved), then one GET for the fleet.
        assert len(fake.manifest_requests("HEAD")) == 1
        assert len(fake.manifest_requests("GET")) == 2


async def test_an_adopted_answer_is_no_fresher_than_where_it_was_fetched(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeRegistry()
    first, second = manifest("early"), manifest("late")
    fake.add_manifest(REPO, "latest", first)
    async with (
        fleet(tmp_path, fake, redis_server.url, monkeypatch, count=2, tag_ttl=2.0) as nodes,
        httpx.AsyncClient(timeout=30) as client,
    ):
        assert (await client.get(tag_url(nodes[0]))).content == first  # fetched at t0
        await trio.sleep(1.2)
        assert (await client.get(tag_url(nodes[1]))).content == first  # adopted at t0 + 1.2
        fake.add_manifest(REPO, "latest", second)
        await trio.sleep(1.0)
        # t0 + 2.2: past tag_ttl since the upstream answered, though not since node 1 took
        # the answer; tag_ttl bounds how stale a tag can be on every node.
        assert (await client.get(tag_url(nodes[1]))).content == second
        assert len(fake.manifest_requests("GET")) == 2


@pytest.mark.parametrize("poison", ["another manifest's body", "not a manifest"])
async def test_a_wrong_entry_in_redis_is_never_served(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, poison: str
) -> None:
    fake = FakeRegistry()
    real = manifest("real")
    real_digest = fake.add_manifest(REPO, "latest", real)
    if poison == "not a manifest":  # matches its digest, but is no manifest
        body = b"<html>an error page, cached by mistake</html>"
        digest = digest_of(body)
    else:  # a valid manifest stored under the real digest
        body, digest = manifest("planted"), real_digest
    async with connect(redis_server.url) as redis:
        keys = RedisSharedTags(redis, "http://planter")
        await redis.set(keys.tag_key(BROAD), f"{digest} {OCI_MANIFEST}", px=60_000)
        await redis.set(keys.body_key(digest), body, px=60_000)
        async with (
            fleet(tmp_path, fake, redis_server.url, monkeypatch, count=2) as nodes,
            httpx.AsyncClient(timeout=30) as client,
        ):
            for node in nodes:
                response = await client.get(tag_url(node))
                assert response.status_code == 200 and response.content == real
                assert response.headers["Docker-Content-Digest"] == real_digest
            # The first node asked the upstream and published over the bad entry; the
            # second took that answer.
            assert len(fake.manifest_requests("GET")) == 1
            name = "streamsync_cluster_shared_tag_fallbacks_total{reason=invalid}"
            assert await counts(client, nodes, name) == [1, 0]
            assert await redis.get(keys.tag_key(BROAD)) == f"{real_digest} {OCI_MANIFEST}".encode()


async def test_without_redis_each_node_asks_the_upstream_and_counts_it(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeRegistry()
    body = manifest("degraded")
    fake.add_manifest(REPO, "latest", body)
    async with (
        fleet(tmp_path, fake, redis_server.url, monkeypatch) as nodes,
        httpx.AsyncClient(timeout=30) as client,
    ):
        redis_server.stop()
        answers = await pull_everywhere(client, nodes, 2, {})
        assert [(r.status_code, r.content) for r in answers] == [(200, body)] * 6
        assert len(fake.manifest_requests("GET")) == 3  # degraded: one per node
        name = "streamsync_cluster_shared_tag_fallbacks_total{reason=unavailable}"
        assert all(count >= 1 for count in await counts(client, nodes, name))
        redis_server.start()


class Negotiating(httpx.AsyncBaseTransport):
    """The fake upstream answering a tag as registries do: the index to a client that
    accepts one, else the platform's Docker manifest (a narrow Accept gets another
    document)."""

    def __init__(self, fake: FakeRegistry, tag: str, narrow_digest: str) -> None:
        self.fake = fake
        self.tag = tag
        self.narrow_digest = narrow_digest

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        suffix = f"/manifests/{self.tag}"
        if request.url.path.endswith(suffix) and OCI_INDEX not in request.headers["Accept"]:
            path = request.url.path.removesuffix(self.tag) + self.narrow_digest
            request = httpx.Request(
                request.method, request.url.copy_with(path=path), headers=request.headers
            )
        return await self.fake.handle_async_request(request)


async def test_accept_classes_never_share_an_answer(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeRegistry()
    docker = json.dumps({**json.loads(manifest("amd64")), "mediaType": DOCKER_V2}).encode()
    docker_digest = digest_of(docker)
    fake.manifests[(REPO, docker_digest)] = (docker, DOCKER_V2)
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [{"mediaType": DOCKER_V2, "digest": docker_digest, "size": len(docker)}],
        }
    ).encode()
    fake.add_manifest(REPO, "latest", index, OCI_INDEX)
    upstream = Negotiating(fake, "latest", docker_digest)
    async with (
        fleet(tmp_path, upstream, redis_server.url, monkeypatch) as [broad, *narrow],
        httpx.AsyncClient(timeout=30) as client,
    ):
        response = await client.get(tag_url(broad))
        assert response.headers["Content-Type"] == OCI_INDEX and response.content == index
        answers = await pull_everywhere(client, narrow, 3, {"Accept": DOCKER_V2})
        for answer in answers:
            assert answer.status_code == 200
            assert answer.headers["Content-Type"] == DOCKER_V2 and answer.content == docker
        # One GET per class for the fleet: the broad one, and one for both narrow nodes.
        assert len(fake.manifest_requests("GET")) == 2


async def test_a_node_waits_for_the_fleet_a_bounded_time_then_takes_over(
    redis_server: RedisServer,
) -> None:
    async with connect(redis_server.url) as redis:
        first = RedisSharedTags(redis, "http://first", wait=0.5, poll=0.01)
        second = RedisSharedTags(redis, "http://second", wait=0.5, poll=0.01)
        assert await first.lookup(BROAD, wait=True) is None  # cold: the flight is first's
        start = trio.current_time()
        assert await second.lookup(BROAD, wait=True) is None  # first never answers
        assert 0.5 <= trio.current_time() - start < 1.5
        assert second.stats.fallbacks["wait"] == 1
        # first gives up (its upstream failed): a waiting node takes the flight at once.
        await second.publish(BROAD, SharedTag("sha256:" + "0" * 64, OCI_MANIFEST, b"{}"), 0.001)
        await trio.sleep(0.01)  # that answer (a wait that ran out) has expired already

        async def give_up_soon() -> None:
            await trio.sleep(0.1)
            await first.abandon(BROAD)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(give_up_soon)
            start = trio.current_time()
            assert await second.lookup(BROAD, wait=True) is None
            assert trio.current_time() - start < 0.4
        assert second.stats.fallbacks["wait"] == 1  # it did not wait out the bound
        assert await redis.get(second.flight_key(BROAD)) is not None  # second's now
        # What the flight's holder publishes, the others get, with what is left of its TTL.
        answer = SharedTag("sha256:" + "1" * 64, OCI_MANIFEST, b'{"x": 1}')
        await second.publish(BROAD, answer, 30)
        assert await redis.get(second.flight_key(BROAD)) is None  # published: flight over
        found = await first.lookup(BROAD, wait=True)
        assert found is not None and (found.digest, found.body) == (answer.digest, answer.body)
        assert 29 < found.fresh_for <= 30
        assert (first.stats.hits, second.stats.publishes) == (1, 2)


async def test_a_docker_style_pull_on_every_node_gets_the_manifest_from_the_upstream_once(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Docker and containerd: HEAD by tag, then GET by digest.  Only the first node GETs.
    fake = FakeRegistry()
    body = manifest("docker-style")
    fake.add_manifest(REPO, "latest", body)
    digest = str(digest_of(body))
    async with (
        fleet(tmp_path, fake, redis_server.url, monkeypatch) as nodes,
        httpx.AsyncClient(timeout=30) as client,
    ):
        for node in nodes:
            head = await client.head(tag_url(node), headers={"Accept": OCI_MANIFEST})
            assert head.status_code == 200
            assert head.headers["Docker-Content-Digest"] == digest
            got = await client.get(tag_url(node, digest), headers={"Accept": OCI_MANIFEST})
            assert (got.status_code, got.content) == (200, body)
            assert got.headers["Content-Type"] == OCI_MANIFEST
        assert len(fake.manifest_requests("GET")) == 1
        hits = await counts(client, nodes, "streamsync_cluster_shared_tags_total{event=hit}")
        assert sum(hits) >= 2  # the two later nodes took the body from the fleet
        # Knowing a digest is not access: another repository's client still gets a 404,
        # although the fleet has the body.
        other = await client.get(
            f"{nodes[2].url}/v2/other/repo/manifests/{digest}", headers={"Accept": OCI_MANIFEST}
        )
        assert other.status_code == 404
