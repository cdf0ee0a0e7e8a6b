"""Manifest negotiation: every client gets what the upstream would answer it directly.

``DistributionLike`` answers the way CNCF Distribution 2.8 does (its ``GetManifest``): the tag's
own document to a client that accepts its type; to a client that refuses an OCI type, 404; to
one that refuses a Docker manifest list (by tag), the linux/amd64 child.  Clients are modelled
on what they send: Docker one ``Accept`` line per type in a random order, containerd one
comma-joined line with ``*/*``, containers/image (podman, buildah, skopeo) one line per type.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from streamsync_trio import RegistryError, UpstreamConfig
from streamsync_trio.core._manifests import CachedManifest, ManifestService
from streamsync_trio.core._negotiation import (
    DOCKER_LIST,
    DOCKER_V1_SIGNED,
    DOCKER_V2,
    OCI_INDEX,
    OCI_MANIFEST,
    Accept,
    manifest_media_type,
)
from streamsync_trio.core._store import Store
from streamsync_trio.upstream._client import Upstream

HOST = "registry.fake.test"
REPO = "library/app"

DOCKER_LINES = [
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/json",
    DOCKER_V2,
    DOCKER_LIST,
    OCI_MANIFEST,
    OCI_INDEX,
]
CONTAINERD_LINE = f"{DOCKER_V2}, {DOCKER_LIST}, {OCI_MANIFEST}, {OCI_INDEX}, */*"
PODMAN_LINES = [OCI_MANIFEST, DOCKER_V2, DOCKER_V1_SIGNED, DOCKER_LIST, OCI_INDEX]


def digest_of(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


def document(media_type: str, **fields: object) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": media_type, **fields}).encode()


def image(media_type: str, arch: str) -> bytes:
    config = {"mediaType": "application/vnd.oci.image.config.v1+json", "size": 2}
    return document(media_type, config={**config, "digest": digest_of(arch.encode())}, layers=[])


def index(media_type: str, children: dict[str, bytes]) -> bytes:
    manifests = [
        {
            "mediaType": json.loads(body)["mediaType"],
            "digest": digest_of(body),
            "size": len(body),
            "platform": {"architecture": arch, "os": "linux"},
        }
        for arch, body in children.items()
    ]
    return document(media_type, manifests=manifests)


class DistributionLike(httpx.AsyncBaseTransport):
    """Distribution 2.8's manifest negotiation, with every request recorded."""

    def __init__(self) -> None:
        self.documents: dict[str, tuple[bytes, str]] = {}  # digest -> (body, media type)
        self.tags: dict[str, str] = {}  # tag -> digest
        self.requests: list[httpx.Request] = []

    def push(self, tag: str | None, body: bytes) -> str:
        media_type = json.loads(body)["mediaType"]
        digest = digest_of(body)
        self.documents[digest] = (body, media_type)
        if tag is not None:
            self.tags[tag] = digest
        return digest

    def gets(self, reference: str | None = None) -> list[httpx.Request]:
        return [
            r
            for r in self.requests
            if r.method == "GET" and (reference is None or r.url.path.endswith(f"/{reference}"))
        ]

    def heads(self) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == "HEAD"]

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        await trio.sleep(0.002)  # long enough for concurrent clients to meet in flight
        supports = {
            item.split(";")[0].strip()
            for line in request.headers.get_list("Accept")
            for item in line.split(",")
        }
        reference = request.url.path.rsplit("/", 1)[-1]
        by_tag = ":" not in reference
        digest = self.tags.get(reference) if by_tag else reference
        if digest is None or digest not in self.documents:
            return _error(404, "MANIFEST_UNKNOWN", "manifest unknown")
        body, media_type = self.documents[digest]
        if media_type in (OCI_MANIFEST, OCI_INDEX) and media_type not in supports:
            kind = "manifests" if media_type == OCI_MANIFEST else "indexes"
            message = f"OCI {kind[:-2] if kind == 'indexes' else 'manifest'} found, but accept "
            return _error(404, "MANIFEST_UNKNOWN", message + f"header does not support {kind}")
        if by_tag and media_type == DOCKER_LIST and DOCKER_LIST not in supports:
            child = next(
                m for m in json.loads(body)["manifests"] if m["platform"]["architecture"] == "amd64"
            )
            digest = child["digest"]
            body, media_type = self.documents[digest]
        headers = {
            "Content-Type": media_type,
            "Docker-Content-Digest": digest,
            "Content-Length": str(len(body)),
        }
        content = b"" if request.method == "HEAD" else body
        return httpx.Response(200, headers=headers, content=content)


def _error(status: int, code: str, message: str) -> httpx.Response:
    return httpx.Response(status, json={"errors": [{"code": code, "message": message}]})


@dataclass
class Lab:
    upstream_fake: DistributionLike
    service: ManifestService
    upstream: Upstream

    async def ask(self, reference: str, lines: list[str], *, head: bool = False) -> CachedManifest:
        return await self.service.get(
            self.upstream, REPO, reference, Accept.parse(lines), head=head
        )

    async def direct(self, reference: str, lines: list[str]) -> httpx.Response:
        """What the upstream answers this client directly (not recorded)."""
        request = httpx.Request(
            "GET",
            f"https://{HOST}/v2/{REPO}/manifests/{reference}",
            headers=[("Accept", line) for line in lines],
        )
        response = await self.upstream_fake.handle_async_request(request)
        self.upstream_fake.requests.pop()
        await response.aread()
        return response


@asynccontextmanager
async def open_lab(tmp_path: Path) -> AsyncIterator[Lab]:
    fake = DistributionLike()
    upstream = Upstream(UpstreamConfig(name=HOST, url=f"https://{HOST}"), transport=fake)
    try:
        async with trio.open_nursery() as nursery:
            yield Lab(fake, ManifestService(Store(tmp_path / "cache"), nursery), upstream)
    finally:
        await upstream.aclose()


AMD64_V2 = image(DOCKER_V2, "amd64")
ARM64_V2 = image(DOCKER_V2, "arm64")
LIST = index(DOCKER_LIST, {"amd64": AMD64_V2, "arm64": ARM64_V2})
AMD64_OCI = image(OCI_MANIFEST, "amd64")
ARM64_OCI = image(OCI_MANIFEST, "arm64")
OCI_IDX = index(OCI_INDEX, {"amd64": AMD64_OCI, "arm64": ARM64_OCI})

SHAPES = {
    "oci-index": [OCI_IDX, AMD64_OCI, ARM64_OCI],
    "docker-list": [LIST, AMD64_V2, ARM64_V2],
    "docker-v2": [AMD64_V2],
    "oci-image": [AMD64_OCI],
}
CLIENTS = {
    "docker": DOCKER_LINES,
    "containerd": [CONTAINERD_LINE],
    "podman": PODMAN_LINES,
    "docker v2 only": [DOCKER_V2],
    "oci only": [f"{OCI_MANIFEST}, {OCI_INDEX}"],
    "lists, no oci": [DOCKER_V2, DOCKER_LIST],
    "oci manifest first, one line": [f"{OCI_MANIFEST}, {DOCKER_V2}"],
}


def stock(fake: DistributionLike, shape: str) -> None:
    tagged, *children = SHAPES[shape]
    for child in children:
        fake.push(None, child)
    fake.push("1", tagged)


# -- Accept parsing ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "types"),
    [
        ([], None),
        ([""], None),
        (["*/*"], None),
        (["application/*"], None),
        ([f"{OCI_INDEX};q=0, */*;q=0.1"], None),
        ([OCI_INDEX, DOCKER_V2], {OCI_INDEX, DOCKER_V2}),
        ([f"{OCI_INDEX};q=0", DOCKER_V2], {DOCKER_V2}),
        ([f"{OCI_INDEX}; q=0.000", f"{DOCKER_V2}; q=0.5"], {DOCKER_V2}),
        ([f"{OCI_INDEX};q=bogus"], {OCI_INDEX}),
        ([f" {OCI_INDEX.upper()} ,, {DOCKER_V2} ,"], {OCI_INDEX, DOCKER_V2}),
    ],
)
def test_every_accept_line_and_item_counts(lines: list[str], types: set[str] | None) -> None:
    accept = Accept.parse(lines)
    assert accept.types == (None if types is None else frozenset(types))


def test_the_forwarded_header_keeps_every_value_and_is_bounded() -> None:
    assert Accept.parse(DOCKER_LINES).header == ", ".join(DOCKER_LINES)
    assert Accept.parse([]).header.count(",") == 3  # no Accept: every type we serve
    huge = Accept.parse([f"application/x-{i}" for i in range(10_000)])
    assert len(huge.header) <= 4096
    assert huge.types is not None and len(huge.types) <= 64


def test_a_wildcard_names_every_type_upstream() -> None:
    for lines in (["*/*"], ["application/*"], [f"{DOCKER_V2}, */*;q=0.1"]):
        accept = Accept.parse(lines)
        assert accept.types is None
        for media_type in (OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_V2):
            assert media_type in accept.header
        assert lines[0].split(",")[0] in accept.header  # the client's own values stay


async def test_a_wildcard_client_first_does_not_change_what_others_get(tmp_path: Path) -> None:
    """curl sends "Accept: */*".  Asked alone, Distribution answers that 404 for an index (and
    Docker Hub may substitute a child); cached as the tag's answer, it would be served to
    every client.  The proxy names every type upstream, so the answer is the index."""
    async with open_lab(tmp_path) as lab:
        stock(lab.upstream_fake, "oci-index")
        assert (await lab.ask("1", ["*/*"])).body == OCI_IDX
        for lines in CLIENTS.values():
            direct = await lab.direct("1", lines)
            if direct.status_code == 200:
                assert (await lab.ask("1", lines)).body == direct.content
        assert len(lab.upstream_fake.gets()) <= 3  # the index once; narrow clients their own


def test_clients_sending_one_set_in_any_order_share_a_record() -> None:
    shuffled = DOCKER_LINES[:]
    random.Random(7).shuffle(shuffled)
    assert Accept.parse(shuffled).record_key == Accept.parse(DOCKER_LINES).record_key == ""
    narrow = Accept.parse([DOCKER_V2, DOCKER_LIST])
    assert narrow.record_key == Accept.parse([f"{DOCKER_LIST}, {DOCKER_V2}"]).record_key != ""


# -- every client gets what the upstream would send it ----------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("client", CLIENTS)
async def test_each_client_gets_exactly_the_upstreams_answer(
    tmp_path: Path, shape: str, client: str
) -> None:
    """Cold, then warm, after every other kind of client has asked first."""
    async with open_lab(tmp_path) as lab:
        stock(lab.upstream_fake, shape)
        for other, lines in [*CLIENTS.items(), (client, CLIENTS[client])]:
            direct = await lab.direct("1", lines)
            if direct.status_code != 200:
                with pytest.raises(RegistryError) as error:
                    await lab.ask("1", lines)
                assert error.value.status == direct.status_code, other
                assert "does not support" in error.value.message
                continue
            answer = await lab.ask("1", lines)
            assert answer.body == direct.content, other
            assert answer.media_type == direct.headers["Content-Type"], other
            assert answer.digest == direct.headers["Docker-Content-Digest"], other


async def test_a_mixed_fleet_makes_one_upstream_get_per_manifest(tmp_path: Path) -> None:
    """Docker and containerd resolve with HEAD and fetch by digest; podman GETs the tag.
    Concurrently, on a cold multi-platform image: one GET of the index, none by tag twice."""
    async with open_lab(tmp_path) as lab:
        stock(lab.upstream_fake, "oci-index")
        index_digest = digest_of(OCI_IDX)
        got: list[CachedManifest] = []

        async def resolve_then_fetch(lines: list[str]) -> None:
            shuffled = random.Random(len(got)).sample(lines, len(lines))
            head = await lab.ask("1", shuffled, head=True)
            assert head.digest == index_digest
            got.append(await lab.ask(head.digest, lines))
            got.append(await lab.ask(digest_of(ARM64_OCI), lines))

        async def fetch_tag(lines: list[str]) -> None:
            got.append(await lab.ask("1", lines))
            got.append(await lab.ask(digest_of(ARM64_OCI), lines))

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(resolve_then_fetch, DOCKER_LINES)
                nursery.start_soon(resolve_then_fetch, [CONTAINERD_LINE])
                nursery.start_soon(fetch_tag, PODMAN_LINES)
        assert len(got) == 18
        assert {m.digest for m in got} == {index_digest, digest_of(ARM64_OCI)}
        paths = Counter(r.url.path.rsplit("/", 1)[-1] for r in lab.upstream_fake.gets())
        # Each document once, whether the tag's GET or the digest's GET fetched the index.
        assert sum(paths.values()) == 2
        assert paths[digest_of(ARM64_OCI)] == 1
        assert len(lab.upstream_fake.heads()) <= 1
        # And again, warm: nothing at all.
        before = len(lab.upstream_fake.requests)
        for lines in (DOCKER_LINES, [CONTAINERD_LINE], PODMAN_LINES):
            assert (await lab.ask("1", lines, head=True)).digest == index_digest
            assert (await lab.ask("1", lines)).body == OCI_IDX
        assert len(lab.upstream_fake.requests) == before


async def test_a_head_by_tag_is_answered_by_a_head_upstream(tmp_path: Path) -> None:
    async with open_lab(tmp_path) as lab:
        stock(lab.upstream_fake, "docker-list")
        head = await lab.ask("1", DOCKER_LINES, head=True)
        assert (head.body, head.media_type, head.size) == (None, DOCKER_LIST, len(LIST))
        assert head.digest == digest_of(LIST)
        assert (len(lab.upstream_fake.heads()), len(lab.upstream_fake.gets())) == (1, 0)
        # The body when a client needs it: by digest, once.
        full = await lab.ask("1", PODMAN_LINES)
        assert full.body == LIST
        assert [r.url.path.rsplit("/", 1)[-1] for r in lab.upstream_fake.gets()] == [head.digest]
        assert (await lab.ask(head.digest, DOCKER_LINES)).body == LIST
        assert len(lab.upstream_fake.requests) == 2


async def test_a_narrow_client_waits_for_a_broad_fetch_it_can_use(tmp_path: Path) -> None:
    async with open_lab(tmp_path) as lab:
        stock(lab.upstream_fake, "docker-v2")
        answers: list[CachedManifest] = []

        async def ask(lines: list[str]) -> None:
            answers.append(await lab.ask("1", lines))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, PODMAN_LINES)
            await trio.sleep(0.001)
            nursery.start_soon(ask, [DOCKER_V2])
        assert [a.body for a in answers] == [AMD64_V2, AMD64_V2]
        assert len(lab.upstream_fake.gets()) == 1


async def test_by_digest_a_refused_type_gets_the_upstreams_answer(tmp_path: Path) -> None:
    async with open_lab(tmp_path) as lab:
        stock(lab.upstream_fake, "oci-image")
        digest = digest_of(AMD64_OCI)
        assert (await lab.ask(digest, PODMAN_LINES)).body == AMD64_OCI
        # Distribution refuses an OCI manifest to a client listing Docker types only.
        with pytest.raises(RegistryError) as error:
            await lab.ask(digest, [DOCKER_V2, DOCKER_LIST])
        assert (error.value.status, error.value.code) == (404, "MANIFEST_UNKNOWN")
        assert "does not support" in error.value.message


# -- what is not a manifest is never cached ----------------------------------------------------


@pytest.mark.parametrize(
    ("body", "content_type", "words"),
    [
        (b'{"schemaVe', OCI_MANIFEST, "not JSON"),
        (b"{}", "application/json", "neither"),
        (b"[]", OCI_MANIFEST, "not a JSON object"),
        (b"<html>hi</html>", "text/html", "not JSON"),
        (document(DOCKER_V2), OCI_MANIFEST, "disagrees"),
        (document(OCI_MANIFEST), "text/html", "not a manifest's"),
        (json.dumps({"schemaVersion": 3, "mediaType": OCI_INDEX}).encode(), OCI_INDEX, "schema"),
        (json.dumps({"mediaType": 5}).encode(), OCI_INDEX, "not a string"),
    ],
)
def test_bad_manifests_are_refused(body: bytes, content_type: str, words: str) -> None:
    with pytest.raises(RegistryError) as error:
        manifest_media_type(body, content_type, HOST)
    assert (error.value.status, error.value.code) == (502, "MANIFEST_INVALID")
    assert words in error.value.message


@pytest.mark.parametrize(
    ("body", "content_type", "expected"),
    [
        (document(OCI_MANIFEST), f"{OCI_MANIFEST}; charset=utf-8", OCI_MANIFEST),
        (document(DOCKER_LIST), "application/json", DOCKER_LIST),
        (json.dumps({"schemaVersion": 2, "manifests": []}).encode(), "", OCI_INDEX),
        (json.dumps({"schemaVersion": 2, "config": {}}).encode(), "application/json", OCI_MANIFEST),
        (json.dumps({"schemaVersion": 2, "config": {}}).encode(), OCI_MANIFEST, OCI_MANIFEST),
    ],
)
def test_manifest_media_type(body: bytes, content_type: str, expected: str) -> None:
    assert manifest_media_type(body, content_type, HOST) == expected


SCHEMA1 = json.dumps(
    {"schemaVersion": 1, "name": REPO, "tag": "1", "fsLayers": [], "signatures": []}
).encode()


@pytest.mark.parametrize("content_type", [DOCKER_V1_SIGNED, "application/json"])
@pytest.mark.parametrize("head", [False, True])
async def test_schema1_is_a_clear_404_never_a_502(
    tmp_path: Path, content_type: str, head: bool
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        headers = {"Content-Type": content_type, "Docker-Content-Digest": "sha256:" + "5" * 64}
        content = b"" if request.method == "HEAD" else SCHEMA1
        return httpx.Response(200, headers=headers, content=content)

    upstream = Upstream(
        UpstreamConfig(name=HOST, url=f"https://{HOST}"), transport=httpx.MockTransport(handler)
    )
    async with trio.open_nursery() as nursery:
        service = ManifestService(Store(tmp_path / "cache"), nursery)
        with pytest.raises(RegistryError) as error:
            await service.get(upstream, REPO, "1", Accept.parse([]), head=head)
    await upstream.aclose()
    # (A HEAD answered as application/json says nothing, so a GET follows and finds schema 1.)
    assert (error.value.status, error.value.code) == (404, "MANIFEST_UNKNOWN")
    assert "schema 1" in error.value.message
    assert not list((tmp_path / "cache" / "manifests").rglob("*"))


async def test_a_truncated_manifest_without_digest_is_not_cached(tmp_path: Path) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        body = document(OCI_MANIFEST) if calls > 1 else b'{"schemaVe'
        return httpx.Response(200, headers={"Content-Type": OCI_MANIFEST}, content=body)

    upstream = Upstream(
        UpstreamConfig(name=HOST, url=f"https://{HOST}"), transport=httpx.MockTransport(handler)
    )
    async with trio.open_nursery() as nursery:
        service = ManifestService(Store(tmp_path / "cache"), nursery)
        with pytest.raises(RegistryError) as error:
            await service.get(upstream, REPO, "1", Accept.parse([]))
        assert error.value.status == 502
        # Nothing was cached: the next request asks again and gets the real document.
        assert (await service.get(upstream, REPO, "1", Accept.parse([]))).body == document(
            OCI_MANIFEST
        )
    await upstream.aclose()
