"""Manifest caching: tags with a TTL and HEAD revalidation, digests forever, stale on outage.

A ManifestService over a Store in ``tmp_path`` and an Upstream over the fake registry, its
fetches running in a nursery the test owns.  Tag records carry wall-clock times (they outlive
the process), so tests that cross a TTL move ``time.time`` with the ``wall`` fixture.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from streamsync_trio import RegistryError, UpstreamConfig
from streamsync_trio._reference import Digest, parse_digest
from streamsync_trio.core._manifests import (
    DEFAULT_ACCEPT,
    Accept,
    CachedManifest,
    ManifestService,
    referenced_digests,
)
from streamsync_trio.core._store import Store
from streamsync_trio.upstream._client import Upstream

from ..labs.fakes import FakeRegistry, Fault, digest_of

HOST = "registry.fake.test"
REPO = "library/app"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_V2 = "application/vnd.docker.distribution.manifest.v2+json"


def manifest_body(marker: str, media_type: str = OCI_MANIFEST) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": media_type, "marker": marker}).encode()


V1 = manifest_body("v1")
V2 = manifest_body("v2")


class WallClock:
    """Stands in for ``time.time``: tag records are stamped and aged with it."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def wall(monkeypatch: pytest.MonkeyPatch) -> WallClock:
    clock = WallClock()
    monkeypatch.setattr("time.time", clock)
    return clock


@dataclass
class Lab:
    fake: FakeRegistry
    store: Store
    service: ManifestService
    upstream: Upstream
    nursery: trio.Nursery

    async def get(
        self, reference: str = "1", accept: str | list[str] = "", *, head: bool = False
    ) -> CachedManifest:
        lines = [accept] if isinstance(accept, str) else accept
        return await self.service.get(
            self.upstream, REPO, reference, Accept.parse(lines), head=head
        )

    async def fails(
        self, reference: str = "1", accept: str | list[str] = "", *, head: bool = False
    ) -> RegistryError:
        with pytest.raises(RegistryError) as error:
            await self.get(reference, accept, head=head)
        return error.value

    def counts(self) -> tuple[int, int]:
        """(manifest GETs, manifest HEADs) the upstream has seen."""
        return len(self.fake.manifest_requests("GET")), len(self.fake.manifest_requests("HEAD"))


@asynccontextmanager
async def open_lab(
    tmp_path: Path,
    *,
    fake: FakeRegistry | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    **settings: Any,
) -> AsyncIterator[Lab]:
    fake = fake or FakeRegistry()
    config = UpstreamConfig(name=HOST, url=f"https://{HOST}", **settings)
    upstream = Upstream(config, transport=transport or fake)
    store = Store(tmp_path / "cache")
    try:
        async with trio.open_nursery() as nursery:
            yield Lab(fake, store, ManifestService(store, nursery), upstream, nursery)
    finally:
        await upstream.aclose()


class Delayed(httpx.AsyncBaseTransport):
    """The fake, but every manifest answer takes ``delay`` seconds."""

    def __init__(self, fake: FakeRegistry, delay: float) -> None:
        self.fake = fake
        self.delay = delay

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if "/manifests/" in request.url.path:
            await trio.sleep(self.delay)
        return await self.fake.handle_async_request(request)


# -- tags -------------------------------------------------------------------------------------


async def test_tag_is_fetched_once_then_served_from_cache(tmp_path: Path) -> None:
    async with open_lab(tmp_path, tag_ttl=300) as lab:
        lab.fake.add_manifest(REPO, "1", V1)
        results = [await lab.get() for _ in range(3)]
        assert lab.counts() == (1, 0)
        assert lab.service.upstream_fetches == 1
    assert results == [CachedManifest.of(V1, OCI_MANIFEST, digest_of(V1))] * 3
    assert lab.store.read_manifest(parse_digest(digest_of(V1))) == (V1, OCI_MANIFEST)
    record = lab.store.read_tag(HOST, REPO, "1")
    assert record is not None and (record.digest, record.media_type) == (
        digest_of(V1),
        OCI_MANIFEST,
    )
    # The default Accept asks for every manifest type the proxy can serve.
    assert lab.fake.manifest_requests()[0].headers["Accept"] == DEFAULT_ACCEPT


async def test_tag_is_revalidated_with_head_once_its_ttl_has_passed(
    tmp_path: Path, wall: WallClock
) -> None:
    async with open_lab(tmp_path, tag_ttl=60) as lab:
        lab.fake.add_manifest(REPO, "1", V1)
        await lab.get()
        wall.now += 59
        assert (await lab.get()).body == V1
        assert lab.counts() == (1, 0)
        wall.now += 2
        assert (await lab.get()).body == V1
        assert lab.counts() == (1, 1)  # a HEAD, and no GET: the digest did not move
        # The revalidation restarted the TTL.
        wall.now += 59
        await lab.get()
        assert lab.counts() == (1, 1)


async def test_zero_ttl_revalidates_every_time_without_downloading_again(tmp_path: Path) -> None:
    async with open_lab(tmp_path, tag_ttl=0) as lab:
        lab.fake.add_manifest(REPO, "1", V1)
        for _ in range(4):
            assert (await lab.get()).body == V1
        assert lab.counts() == (1, 3)
        assert lab.service.upstream_fetches == 1


async def test_a_moved_tag_is_fetched_again(tmp_path: Path) -> None:
    async with open_lab(tmp_path, tag_ttl=0) as lab:
        lab.fake.add_manifest(REPO, "1", V1)
        assert (await lab.get()).digest == digest_of(V1)
        lab.fake.add_manifest(REPO, "1", V2)
        moved = await lab.get()
        assert (moved.body, moved.digest) == (V2, digest_of(V2))
        assert lab.counts() == (2, 1)
        # The old manifest stays available by digest, from the cache.
        lab.fake.down = True
        assert (await lab.get(digest_of(V1))).body == V1


async def test_a_lying_docker_content_digest_is_refused(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        headers = {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": digest_of(V2)}
        return httpx.Response(200, content=V1, headers=headers)

    async with open_lab(tmp_path, transport=httpx.MockTransport(handler)) as lab:
        error = await lab.fails()
    assert (error.status, error.code) == (502, "UNAVAILABLE")
    assert lab.store.read_tag(HOST, REPO, "1") is None
    assert lab.store.read_manifest(parse_digest(digest_of(V1))) is None


@pytest.mark.parametrize(
    "reference", ["-dash", ".dot", "t" * 129, "a+b"], ids=["dash", "dot", "long", "plus"]
)
async def test_invalid_tags_never_reach_the_upstream(tmp_path: Path, reference: str) -> None:
    async with open_lab(tmp_path) as lab:
        error = await lab.fails(reference)
    # The spec: a tag that cannot exist is not found (MANIFEST_INVALID is for pushes).
    assert (error.status, error.code) == (404, "MANIFEST_UNKNOWN")
    assert lab.fake.requests == []


@pytest.mark.parametrize(
    "reference", ["sha256:abc", "md5:" + "0" * 32, "sha256:" + "A" * 64, "x:y"]
)
async def test_invalid_digests_never_reach_the_upstream(tmp_path: Path, reference: str) -> None:
    async with open_lab(tmp_path) as lab:
        error = await lab.fails(reference)
    assert (error.status, error.code) == (400, "DIGEST_INVALID")
    assert lab.fake.requests == []


async def test_unknown_tag_is_404(tmp_path: Path) -> None:
    async with open_lab(tmp_path) as lab:
        error = await lab.fails("nope")
    assert (error.status, error.code) == (404, "MANIFEST_UNKNOWN")


# -- digests ----------------------------------------------------------------------------------


async def test_digest_is_fetched_once_and_cached_forever(tmp_path: Path, wall: WallClock) -> None:
    async with open_lab(tmp_path, tag_ttl=0) as lab:
        digest = lab.fake.add_manifest(REPO, "1", V1)
        first = await lab.get(digest)
        assert first == CachedManifest.of(V1, OCI_MANIFEST, digest)
        assert lab.fake.manifest_requests()[0].url.path == f"/v2/{REPO}/manifests/{digest}"
        wall.now += 10 * 365 * 86400
        lab.fake.down = True
        assert await lab.get(digest) == first
        assert len(lab.fake.requests) == 1


async def test_a_digest_learnt_through_its_tag_needs_no_request(tmp_path: Path) -> None:
    async with open_lab(tmp_path) as lab:
        digest = lab.fake.add_manifest(REPO, "1", V1)
        await lab.get("1")
        lab.fake.down = True
        assert (await lab.get(digest)).body == V1
        assert len(lab.fake.requests) == 1


async def test_manifest_bytes_must_match_the_requested_digest(tmp_path: Path) -> None:
    async with open_lab(tmp_path) as lab:
        digest = lab.fake.add_manifest(REPO, "1", V1)
        lab.fake.manifests[(REPO, digest)] = (V2, OCI_MANIFEST)  # wrong bytes for the digest
        error = await lab.fails(digest)
        assert (error.status, error.code) == (502, "DIGEST_INVALID")
        assert lab.store.read_manifest(parse_digest(digest)) is None
        assert lab.store.read_manifest(parse_digest(digest_of(V2))) is None
        # The failure is not remembered: once the upstream is right, so is the answer.
        lab.fake.manifests[(REPO, digest)] = (V1, OCI_MANIFEST)
        assert (await lab.get(digest)).body == V1


async def test_sha512_digests_are_verified_with_sha512(tmp_path: Path) -> None:
    digest = "sha512:" + hashlib.sha512(V1).hexdigest()
    async with open_lab(tmp_path) as lab:
        lab.fake.manifests[(REPO, digest)] = (V1, OCI_MANIFEST)
        assert (await lab.get(digest)).digest == digest
        lab.fake.manifests[(REPO, "sha512:" + "0" * 128)] = (V1, OCI_MANIFEST)
        error = await lab.fails("sha512:" + "0" * 128)
    assert error.code == "DIGEST_INVALID"


# -- upstream trouble -------------------------------------------------------------------------


def go_down(fake: FakeRegistry) -> None:
    fake.down = True


def fault(status: int, **headers: str) -> Callable[[FakeRegistry], None]:
    return lambda fake: fake.manifest_faults.append(Fault(status=status, headers=headers))


@pytest.mark.parametrize(
    "trouble",
    [go_down, fault(503), fault(503, **{"Retry-After": "5"}), fault(429), fault(500), fault(504)],
    ids=["down", "503", "503 retry-after", "429", "500", "504"],
)
async def test_cached_tag_is_served_stale_when_the_upstream_is_unreachable(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    trouble: Callable[[FakeRegistry], None],
) -> None:
    async with open_lab(tmp_path, tag_ttl=0) as lab:
        lab.fake.add_manifest(REPO, "1", V1)
        fresh = await lab.get()
        trouble(lab.fake)
        with caplog.at_level(logging.WARNING, logger="streamsync_trio.manifests"):
            assert await lab.get() == fresh
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("stale" in r.getMessage() and REPO in r.getMessage() for r in warnings)


@pytest.mark.parametrize(
    ("trouble", "status", "code"),
    [
        (lambda fake: fake.manifests.clear(), 404, "MANIFEST_UNKNOWN"),
        (fault(401), 401, "UNAUTHORIZED"),
        (fault(403), 403, "DENIED"),
    ],
    ids=["tag deleted", "401", "403"],
)
async def test_cached_tag_is_not_served_when_the_upstream_says_no(
    tmp_path: Path, trouble: Callable[[FakeRegistry], None], status: int, code: str
) -> None:
    async with open_lab(tmp_path, tag_ttl=0) as lab:
        lab.fake.add_manifest(REPO, "1", V1)
        await lab.get()
        trouble(lab.fake)
        error = await lab.fails()
    assert (error.status, error.code) == (status, code)


async def test_upstream_down_without_a_cached_tag_is_502(tmp_path: Path) -> None:
    async with open_lab(tmp_path) as lab:
        lab.fake.add_manifest(REPO, "1", V1)
        lab.fake.down = True
        tag_error = await lab.fails()
        digest_error = await lab.fails(digest_of(V1))
        # Nothing is left pending: the next request after recovery succeeds.
        lab.fake.down = False
        assert (await lab.get()).body == V1
    assert (tag_error.status, tag_error.code) == (502, "UNAVAILABLE")
    assert (digest_error.status, digest_error.code) == (502, "UNAVAILABLE")


# -- single flight ----------------------------------------------------------------------------


@pytest.mark.parametrize("by", ["tag", "digest"])
async def test_concurrent_requests_share_one_upstream_fetch(tmp_path: Path, by: str) -> None:
    fake = FakeRegistry()
    digest = fake.add_manifest(REPO, "1", V1)
    reference = "1" if by == "tag" else digest
    results: list[CachedManifest] = []
    async with open_lab(tmp_path, fake=fake, transport=Delayed(fake, 0.2)) as lab:

        async def one() -> None:
            results.append(await lab.get(reference))

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(one)
    assert results == [CachedManifest.of(V1, OCI_MANIFEST, digest)] * 10
    assert lab.counts() == (1, 0)


async def test_a_client_that_gives_up_does_not_cancel_the_fetch_for_others(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    fake = FakeRegistry()
    fake.add_manifest(REPO, "1", V1)
    async with open_lab(tmp_path, fake=fake, transport=Delayed(fake, 5)) as lab:
        patient: list[CachedManifest] = []

        async def impatient() -> None:
            with trio.move_on_after(1):
                await lab.get()

        async def waiting() -> None:
            await trio.sleep(0.5)
            patient.append(await lab.get())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(impatient)
            nursery.start_soon(waiting)
        assert [m.body for m in patient] == [V1]
        assert lab.counts() == (1, 0)
        # And the result was cached although its first requester had left.
        assert (await lab.get()).body == V1
        assert lab.counts() == (1, 0)


# -- content negotiation ----------------------------------------------------------------------

INDEX = manifest_body("index", OCI_INDEX)
SCHEMA2 = manifest_body("amd64", DOCKER_V2)


class Negotiating(httpx.AsyncBaseTransport):
    """An upstream whose tag ``1`` is an index, or a single manifest to clients refusing indexes.

    That is what Docker Hub does for a multi-platform image and an old client.
    """

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        accept = request.headers.get("Accept", "")
        reference = request.url.path.rsplit("/", 1)[-1]
        if reference in ("1", digest_of(INDEX)) and (OCI_INDEX in accept or "*/*" in accept):
            body, media_type = INDEX, OCI_INDEX
        elif reference in ("1", digest_of(SCHEMA2)):
            body, media_type = SCHEMA2, DOCKER_V2
        else:
            return httpx.Response(404, json={"errors": [{"code": "MANIFEST_UNKNOWN"}]})
        headers = {"Content-Type": media_type, "Docker-Content-Digest": digest_of(body)}
        content = b"" if request.method == "HEAD" else body
        return httpx.Response(200, content=content, headers=headers)

    def gets(self) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == "GET"]


ALL_TYPES = f"{OCI_INDEX}, {OCI_MANIFEST}, {DOCKER_LIST}, {DOCKER_V2}"


async def test_a_cached_type_the_client_refuses_is_refetched_with_its_accept(
    tmp_path: Path,
) -> None:
    upstream = Negotiating()
    async with open_lab(tmp_path, transport=upstream, tag_ttl=300) as lab:
        index = await lab.get(accept=ALL_TYPES)
        assert (index.body, index.media_type) == (INDEX, OCI_INDEX)
        single = await lab.get(accept=DOCKER_V2)
        assert (single.body, single.media_type) == (SCHEMA2, DOCKER_V2)
        assert [r.headers["Accept"] for r in upstream.gets()] == [ALL_TYPES, DOCKER_V2]
        # Within the TTL, clients accepting the cached type are served from the cache.
        assert (await lab.get(accept=f"{DOCKER_V2};q=0.9")).body == SCHEMA2
        assert (await lab.get(accept="*/*")).media_type in (OCI_INDEX, DOCKER_V2)
        assert len(upstream.gets()) == 2


async def test_a_narrow_accept_does_not_change_what_other_clients_get(tmp_path: Path) -> None:
    upstream = Negotiating()
    async with open_lab(tmp_path, transport=upstream, tag_ttl=300) as lab:
        assert (await lab.get(accept=ALL_TYPES)).media_type == OCI_INDEX
        assert (await lab.get(accept=DOCKER_V2)).media_type == DOCKER_V2
        # A multi-platform client (containerd on arm64) asks again, within the TTL.
        assert (await lab.get(accept=ALL_TYPES)).media_type == OCI_INDEX


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("", None),
        ("*/*", None),
        (f"{OCI_INDEX}, */*;q=0.1", None),
        (OCI_INDEX, frozenset({OCI_INDEX})),
        (f" {OCI_INDEX} ; q=1 ,{DOCKER_V2},", frozenset({OCI_INDEX, DOCKER_V2})),
        (OCI_INDEX.upper(), frozenset({OCI_INDEX})),
    ],
)
def test_accepted_types(accept: str, expected: frozenset[str] | None) -> None:
    assert Accept.parse([accept]).types == expected


# -- links to referenced content ----------------------------------------------------------------

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"config": {"digest": D1}, "layers": [{"digest": D2}, {"digest": D3}]}, [D1, D2, D3]),
        ({"manifests": [{"digest": D1}, {"digest": D2}]}, [D1, D2]),
        ({"subject": {"digest": D3}, "blobs": [{"digest": D1}]}, [D1, D3]),
        ({"layers": [{"digest": "sha256:short"}, {"digest": 5}, "x", {"digest": D2}]}, [D2]),
        ({"layers": "not a list", "config": []}, []),
        ([D1], []),
        ("not json", []),
    ],
)
def test_referenced_digests(document: object, expected: list[str]) -> None:
    body = document.encode() if isinstance(document, str) else json.dumps(document).encode()
    found = referenced_digests(body)
    assert sorted(str(d) for d in found) == sorted(expected)
    assert all(isinstance(d, Digest) for d in found)


async def test_an_answer_outside_the_clients_accept_is_still_cached(tmp_path: Path) -> None:
    """Registries answer with what they have (an OCI manifest, to a client that listed Docker
    schema 2 only); the same question within the TTL gets the same answer from the cache."""
    async with open_lab(tmp_path, tag_ttl=300) as lab:
        lab.fake.add_manifest(REPO, "1", V1)  # OCI, whatever the Accept
        for _ in range(3):
            assert (await lab.get(accept=DOCKER_V2)).media_type == OCI_MANIFEST
        assert lab.counts() == (1, 0)
