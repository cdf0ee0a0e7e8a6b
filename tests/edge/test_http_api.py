"""The OCI distribution API as a client sees it, in process: Quart's test client, fake upstream.

Each test starts the real app (lifespan included, so the app nursery exists) with
``app.test_app()`` and talks to it with ``test_client()``.  Failures in the middle of a body are
not tested here: the in-process client cannot report an aborted body (design.md §7); the real
hypercorn tests cover them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from quart.typing import TestClientProtocol as QuartTestClient
from werkzeug.datastructures import Headers

from streamsync_trio import ConfigError, create_app, parse_config
from streamsync_trio._reference import parse_digest
from streamsync_trio.edge._state import ProxyState

from ..labs.fakes import UPSTREAM, FakeRegistry, Fault, digest_of, make_config

REPO = "library/app"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_V2 = "application/vnd.docker.distribution.manifest.v2+json"
MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()
BLOB = os.urandom(100_000)
BLOB_DIGEST = digest_of(BLOB)
UNKNOWN_DIGEST = "sha256:" + "0" * 64


@dataclass
class Answer:
    """What the app sent: status, the headers exactly as sent, and the body."""

    status: int
    headers: Headers
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Proxy:
    client: QuartTestClient
    state: ProxyState
    fake: FakeRegistry

    async def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | Headers | None = None,
        query: dict[str, str] | None = None,
    ) -> Answer:
        # The raw connection rather than ``client.get``: that one rebuilds a Response from
        # the received bytes, which rewrites Content-Length in the very headers the app sent
        # (to 0 for every HEAD).
        connection = self.client.request(path, method=method, headers=headers, query_string=query)
        body = bytearray()
        async with connection:
            await connection.send_complete()
            with contextlib.suppress(trio.EndOfChannel):
                while True:
                    body += await connection.receive()
        sent: Any = connection  # quart-trio's TestHTTPConnection; its protocol omits these
        assert sent.status_code is not None and sent.headers is not None
        return Answer(sent.status_code, sent.headers, bytes(body))

    async def get(self, path: str, **options: Any) -> Answer:
        return await self.request("GET", path, **options)

    async def head(self, path: str, **options: Any) -> Answer:
        return await self.request("HEAD", path, **options)

    async def wait_stored(self, digest: str) -> None:
        with trio.fail_after(5):
            while self.state.store.blob_size(parse_digest(digest)) is None:
                await trio.sleep(0.005)

    def stored_files(self) -> list[Path]:
        return [p for p in (self.state.store.root / "blobs").rglob("*") if p.is_file()]


@asynccontextmanager
async def serving(
    tmp_path: Path,
    fake: FakeRegistry | None = None,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    **upstream: Any,
) -> AsyncIterator[Proxy]:
    """The app, started, over ``fake``: by default one with ``MANIFEST`` (tag 1) and ``BLOB``."""
    if fake is None:
        fake = FakeRegistry()
        fake.add_manifest(REPO, "1", MANIFEST)
        fake.add_blob(BLOB)
    app = create_app(make_config(tmp_path / "cache", **upstream), transport=transport or fake)
    async with app.test_app() as test_app:
        yield Proxy(test_app.test_client(), app.extensions["streamsync"], fake)


def assert_api_headers(answer: Answer) -> None:
    assert answer.headers["Docker-Distribution-API-Version"] == "registry/2.0"


def assert_oci_error(answer: Answer, status: int, code: str) -> dict[str, Any]:
    """Status, JSON content type and the OCI error body; returns the one error."""
    assert answer.status == status
    assert answer.headers["Content-Type"] == "application/json"
    assert_api_headers(answer)
    document = answer.json()
    assert set(document) == {"errors"}
    (error,) = document["errors"]
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    return dict(error)


# -- the base endpoint ------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v2/", "/v2"])
async def test_base_endpoint(tmp_path: Path, path: str) -> None:
    async with serving(tmp_path) as proxy:
        response = await proxy.get(path)
        head = await proxy.head(path)
    assert response.status == 200
    assert response.json() == {}
    assert response.headers["Content-Type"] == "application/json"
    assert_api_headers(response)
    assert head.status == 200
    assert_api_headers(head)
    assert proxy.fake.requests == []  # answered locally


# -- manifests --------------------------------------------------------------------------------


@pytest.mark.parametrize("reference", ["1", digest_of(MANIFEST)], ids=["tag", "digest"])
async def test_manifest_get_and_head(tmp_path: Path, reference: str) -> None:
    async with serving(tmp_path) as proxy:
        path = f"/v2/{REPO}/manifests/{reference}"
        got = await proxy.get(path)
        head = await proxy.head(path)
    for response in (got, head):
        assert response.status == 200
        assert response.headers["Content-Type"] == OCI_MANIFEST
        assert response.headers["Docker-Content-Digest"] == digest_of(MANIFEST)
        assert response.headers["Content-Length"] == str(len(MANIFEST))
        assert_api_headers(response)
    assert got.body == MANIFEST
    assert head.body == b""
    assert len(proxy.fake.manifest_requests()) == 1  # the HEAD came from the cache


async def test_manifest_accept_reaches_the_upstream_and_the_type_comes_back(
    tmp_path: Path,
) -> None:
    fake = FakeRegistry()
    body = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_V2}).encode()
    fake.add_manifest(REPO, "v2", body, media_type=DOCKER_V2)
    async with serving(tmp_path, fake) as proxy:
        response = await proxy.get(f"/v2/{REPO}/manifests/v2", headers={"Accept": DOCKER_V2})
    assert response.headers["Content-Type"] == DOCKER_V2
    assert response.body == body
    assert fake.manifest_requests()[0].headers["Accept"] == DOCKER_V2


async def test_every_accept_line_reaches_the_upstream(tmp_path: Path) -> None:
    """containers/image and Docker send one Accept line per media type; Distribution answers
    404 to an OCI manifest request that lists Docker types only, so losing all lines but the
    first made podman and docker fail on OCI images."""
    fake = FakeRegistry()
    fake.add_manifest(REPO, "1", MANIFEST)
    async with serving(tmp_path, fake) as proxy:
        lines = Headers([("Accept", DOCKER_V2), ("Accept", f"{OCI_MANIFEST}; q=0.5")])
        response = await proxy.get(f"/v2/{REPO}/manifests/1", headers=lines)
    assert response.status == 200
    assert response.headers["Content-Type"] == OCI_MANIFEST
    (request,) = fake.manifest_requests()
    assert request.headers.get_list("Accept", split_commas=True) == [
        DOCKER_V2,
        f"{OCI_MANIFEST}; q=0.5",
    ]


async def test_a_head_by_tag_costs_no_upstream_get(tmp_path: Path) -> None:
    """Docker Hub counts manifest GETs against the pull limit, not HEADs."""
    async with serving(tmp_path) as proxy:
        head = await proxy.head(f"/v2/{REPO}/manifests/1")
        assert head.status == 200
        assert head.headers["Docker-Content-Digest"] == digest_of(MANIFEST)
        assert head.headers["Content-Length"] == str(len(MANIFEST))
        assert head.headers["Content-Type"] == OCI_MANIFEST
        assert (len(proxy.fake.manifest_requests("HEAD")), len(proxy.fake.manifest_requests())) == (
            1,
            0,
        )
        got = await proxy.get(f"/v2/{REPO}/manifests/1")
        assert got.body == MANIFEST
        # The body by digest, once; the tag was not asked again.
        [get] = proxy.fake.manifest_requests()
        assert get.url.path.endswith(digest_of(MANIFEST))


async def test_an_upstream_404_keeps_its_code_and_reason(tmp_path: Path) -> None:
    async with serving(tmp_path) as proxy:
        answer = await proxy.get("/v2/library/other/manifests/1")
    error = assert_oci_error(answer, 404, "MANIFEST_UNKNOWN")
    assert "manifest_unknown" in error["message"]  # the fake's own message
    assert UPSTREAM in error["message"]


@pytest.mark.parametrize("query", ["?ns=registry.fake.test", ""], ids=["containerd ns", "prefix"])
async def test_manifest_by_ns_or_prefix(tmp_path: Path, query: str) -> None:
    path = f"/v2/{REPO}/manifests/1{query}" if query else f"/v2/{UPSTREAM}/{REPO}/manifests/1"
    async with serving(tmp_path) as proxy:
        response = await proxy.get(path)
    assert response.status == 200
    assert response.body == MANIFEST
    assert proxy.fake.manifest_requests()[0].url.path == f"/v2/{REPO}/manifests/1"


# -- blobs ------------------------------------------------------------------------------------


def assert_blob_headers(response: Answer, length: int) -> None:
    assert response.headers["Content-Length"] == str(length)
    assert response.headers["Docker-Content-Digest"] == BLOB_DIGEST
    assert response.headers["Accept-Ranges"] == "bytes"
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert_api_headers(response)


async def test_blob_get_streams_then_serves_from_the_cache(tmp_path: Path) -> None:
    async with serving(tmp_path) as proxy:
        path = f"/v2/{REPO}/blobs/{BLOB_DIGEST}"
        first = await proxy.get(path)
        assert first.status == 200
        assert_blob_headers(first, len(BLOB))
        assert first.body == BLOB
        await proxy.wait_stored(BLOB_DIGEST)
        before = len(proxy.fake.requests)
        second = await proxy.get(path)
        assert (second.status, second.body) == (200, BLOB)
        assert_blob_headers(second, len(BLOB))
        assert len(proxy.fake.requests) == before
        assert len(proxy.fake.blob_gets(BLOB_DIGEST)) == 1


async def test_uncached_blob_head_does_not_download(tmp_path: Path) -> None:
    async with serving(tmp_path) as proxy:
        response = await proxy.head(f"/v2/{REPO}/blobs/{BLOB_DIGEST}")
        await trio.sleep(0.05)  # a download started by mistake would have begun by now
        assert response.status == 200
        assert_blob_headers(response, len(BLOB))
        assert response.body == b""
        assert proxy.fake.blob_gets(BLOB_DIGEST) == []
        assert [r.method for r in proxy.fake.requests] == ["HEAD"]
        assert proxy.stored_files() == []
        assert len(proxy.state.downloads) == 0


async def test_cached_blob_head_asks_nobody(tmp_path: Path) -> None:
    async with serving(tmp_path) as proxy:
        path = f"/v2/{REPO}/blobs/{BLOB_DIGEST}"
        await proxy.get(path)
        await proxy.wait_stored(BLOB_DIGEST)
        before = len(proxy.fake.requests)
        response = await proxy.head(path)
        assert response.status == 200
        assert_blob_headers(response, len(BLOB))
        assert response.body == b""
        assert len(proxy.fake.requests) == before


SIZE = len(BLOB)
RANGES = [
    ("bytes=0-9", 0, 10),
    ("bytes=1000-1999", 1000, 2000),
    ("bytes=99990-", 99990, SIZE),
    ("bytes=-5", SIZE - 5, SIZE),
    ("bytes=50000-999999", 50000, SIZE),
]


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "streaming"])
@pytest.mark.parametrize(("header", "start", "end"), RANGES)
async def test_range_is_206_with_content_range(
    tmp_path: Path, cached: bool, header: str, start: int, end: int
) -> None:
    async with serving(tmp_path) as proxy:
        path = f"/v2/{REPO}/blobs/{BLOB_DIGEST}"
        if cached:
            await proxy.get(path)
            await proxy.wait_stored(BLOB_DIGEST)
        response = await proxy.get(path, headers={"Range": header})
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes {start}-{end - 1}/{SIZE}"
        assert_blob_headers(response, end - start)
        assert response.body == BLOB[start:end]
        # However the range was served, the whole blob ends up cached, once.
        await proxy.wait_stored(BLOB_DIGEST)
        assert len(proxy.fake.blob_gets(BLOB_DIGEST)) == 1


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "streaming"])
@pytest.mark.parametrize(
    "header",
    ["bytes=100000-", "bytes=200000-300000", "bytes=9-5", "bytes=x", "bytes=0-1,4-5"],
    ids=["at end", "beyond", "reversed", "garbled", "multi"],
)
async def test_unsatisfiable_range_is_416(tmp_path: Path, cached: bool, header: str) -> None:
    async with serving(tmp_path) as proxy:
        path = f"/v2/{REPO}/blobs/{BLOB_DIGEST}"
        if cached:
            await proxy.get(path)
            await proxy.wait_stored(BLOB_DIGEST)
        response = await proxy.get(path, headers={"Range": header})
        assert_oci_error(response, 416, "UNSUPPORTED")
        assert response.headers["Content-Range"] == f"bytes */{SIZE}"


async def test_two_range_fields_are_a_multi_range_and_416(tmp_path: Path) -> None:
    async with serving(tmp_path) as proxy:
        headers = Headers([("Range", "bytes=0-1"), ("Range", "bytes=5-6")])
        response = await proxy.get(f"/v2/{REPO}/blobs/{BLOB_DIGEST}", headers=headers)
    assert_oci_error(response, 416, "UNSUPPORTED")


async def test_other_range_units_get_the_whole_blob(tmp_path: Path) -> None:
    async with serving(tmp_path) as proxy:
        response = await proxy.get(
            f"/v2/{REPO}/blobs/{BLOB_DIGEST}", headers={"Range": "items=0-1"}
        )
    assert response.status == 200
    assert response.body == BLOB


# -- tags/list and referrers ------------------------------------------------------------------


class Paginating(httpx.AsyncBaseTransport):
    """The fake, answering tags/list in sorted pages of ``per_page`` with a ``Link`` to the
    next, as Docker Hub does, and referrers from ``referrers`` (or 404 when None, as on
    Distribution 2.8, which has no referrers API)."""

    def __init__(
        self,
        fake: FakeRegistry,
        per_page: int = 2,
        *,
        content_type: str = "application/json",
        referrers: dict[str, list[dict[str, Any]]] | None = None,
    ) -> None:
        self.fake = fake
        self.per_page = per_page
        self.content_type = content_type
        self.referrers = referrers

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if "/referrers/" in path:
            self.fake.requests.append(request)
            if self.referrers is None:
                return httpx.Response(404, text="404 page not found\n")
            manifests = self.referrers.get(path.rsplit("/", 1)[1], [])
            document = {"schemaVersion": 2, "mediaType": INDEX, "manifests": manifests}
            return httpx.Response(200, json=document, headers={"Content-Type": INDEX})
        response = await self.fake.handle_async_request(request)
        if not path.endswith("/tags/list") or response.status_code != 200:
            return response
        tags = sorted(json.loads(await response.aread())["tags"])
        last = request.url.params.get("last")
        after = [tag for tag in tags if last is None or tag > last]
        page = after[: self.per_page]
        headers = {"Content-Type": self.content_type}
        if len(after) > self.per_page:
            headers["Link"] = f'<{path}?n={self.per_page}&last={page[-1]}>; rel="next"'
        document = {"name": "upstream/name", "tags": page}
        return httpx.Response(200, content=json.dumps(document).encode(), headers=headers)


INDEX = "application/vnd.oci.image.index.v1+json"
TAGS = ["1", "10", "2", "a", "B", "latest", "v1.0"]


def tagged_fake(repo: str = REPO) -> FakeRegistry:
    fake = FakeRegistry()
    for tag in TAGS:
        fake.add_manifest(repo, tag, MANIFEST)
    return fake


async def test_tags_list_is_collected_once_and_served_from_the_cache(tmp_path: Path) -> None:
    fake = tagged_fake()
    async with serving(tmp_path, fake, transport=Paginating(fake, per_page=3)) as proxy:
        path = f"/v2/{REPO}/tags/list"
        response = await proxy.get(path, query={"x": "1"})
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/json"
        assert_api_headers(response)
        assert response.json() == {"name": REPO, "tags": sorted(TAGS)}
        assert "Link" not in response.headers
        # The upstream's pages, followed by their Links, our stray parameter never sent.
        asked = [dict(r.url.params) for r in proxy.fake.requests]
        assert asked == [{}, {"n": "3", "last": "2"}, {"n": "3", "last": "latest"}]
        # Every n/last from the one collected list, for ten seconds (issue 14: one entry,
        # not one per distinct query).
        for n in range(1, 9):
            page = await proxy.get(path, query={"n": str(n)})
            assert page.json()["tags"] == sorted(TAGS)[:n]
        assert len(proxy.fake.requests) == 3
        assert len(proxy.state.passthrough_cache) == 1


async def test_tags_list_pages_name_the_repository_the_client_asked_for(tmp_path: Path) -> None:
    fake = tagged_fake()
    async with serving(tmp_path, fake, transport=Paginating(fake)) as proxy:
        name = f"{UPSTREAM}/{REPO}"
        walked: list[str] = []
        url: str | None = f"/v2/{name}/tags/list?n=3"
        while url is not None:
            path, _, query = url.partition("?")
            response = await proxy.get(path, query=dict(p.split("=") for p in query.split("&")))
            assert response.status == 200
            assert response.json()["name"] == name  # not the upstream's "upstream/name"
            walked += response.json()["tags"]
            link = response.headers.get("Link")
            url = link.split(">")[0].removeprefix("<") if link else None
            if link:
                assert link.startswith(f"</v2/{name}/tags/list?n=3&last=")
                assert link.endswith('>; rel="next"')
    assert walked == sorted(TAGS)


async def test_tags_list_with_implicit_library_reports_the_short_name(tmp_path: Path) -> None:
    fake = tagged_fake("library/alpine")
    async with serving(tmp_path, fake, implicit_library=True) as proxy:
        response = await proxy.get(f"/v2/{UPSTREAM}/alpine/tags/list", query={"n": "1"})
    assert response.json() == {"name": f"{UPSTREAM}/alpine", "tags": ["1"]}
    assert response.headers["Link"] == f'</v2/{UPSTREAM}/alpine/tags/list?n=1&last=1>; rel="next"'
    assert [r.url.path for r in fake.requests] == ["/v2/library/alpine/tags/list"]


async def test_tags_list_n_zero_is_empty_without_link(tmp_path: Path) -> None:
    fake = tagged_fake()
    async with serving(tmp_path, fake) as proxy:
        response = await proxy.get(f"/v2/{REPO}/tags/list", query={"n": "0"})
        head = await proxy.head(f"/v2/{REPO}/tags/list", query={"n": "2", "last": "2"})
    assert response.json() == {"name": REPO, "tags": []}
    assert "Link" not in response.headers
    expected = json.dumps({"name": REPO, "tags": ["B", "a"]}).encode()
    assert (head.status, head.body, head.headers["Content-Length"]) == (
        200,
        b"",
        str(len(expected)),
    )


async def test_tags_list_that_is_no_json_list_is_refused(tmp_path: Path) -> None:
    fake = tagged_fake()
    html = Paginating(fake, content_type="text/html")
    async with serving(tmp_path, fake, transport=html) as proxy:
        response = await proxy.get(f"/v2/{REPO}/tags/list")
    assert_oci_error(response, 502, "UNAVAILABLE")


class Hostile(httpx.AsyncBaseTransport):
    """tags/list with a ``<script>`` in a tag-shaped JSON and a ``Link`` to another host."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        links = '<https://evil.example/v2/x/tags/list?last=a>; rel="next"'
        document = {"name": "<script>alert(1)</script>", "tags": ["b", "a"]}
        headers = {"Content-Type": "application/json", "Link": links}
        return httpx.Response(200, json=document, headers=headers)


async def test_tags_list_is_ours_whatever_the_upstream_says(tmp_path: Path) -> None:
    hostile = Hostile()
    async with serving(tmp_path, transport=hostile) as proxy:
        response = await proxy.get(f"/v2/{REPO}/tags/list")
    assert response.body == json.dumps({"name": REPO, "tags": ["a", "b"]}).encode()
    assert response.headers["Content-Type"] == "application/json"
    assert "Link" not in response.headers
    assert [r.url.host for r in hostile.requests] == [UPSTREAM]  # the Link was not followed


@pytest.mark.parametrize("query", [{"n": "-1"}, {"n": "x"}, {"last": "<script>"}])
async def test_tags_list_bad_query_is_400(tmp_path: Path, query: dict[str, str]) -> None:
    async with serving(tmp_path) as proxy:
        response = await proxy.get(f"/v2/{REPO}/tags/list", query=query)
    assert_oci_error(response, 400, "UNSUPPORTED")
    assert proxy.fake.requests == []


async def test_tags_list_of_an_unknown_repository_is_the_upstream_404(tmp_path: Path) -> None:
    async with serving(tmp_path) as proxy:
        response = await proxy.get("/v2/no/such/tags/list")
    assert_oci_error(response, 404, "NAME_UNKNOWN")


SUBJECT = "sha256:" + "5" * 64


def referrer(artifact_type: str) -> dict[str, Any]:
    return {
        "mediaType": OCI_MANIFEST,
        "digest": digest_of(artifact_type.encode()),
        "size": 10,
        "artifactType": artifact_type,
    }


async def test_referrers_are_an_oci_index_filtered_on_request(tmp_path: Path) -> None:
    fake = FakeRegistry()
    sbom, sig = referrer("application/vnd.example.sbom"), referrer("application/vnd.example.sig")
    transport = Paginating(fake, referrers={SUBJECT: [sbom, sig]})
    async with serving(tmp_path, fake, transport=transport) as proxy:
        whole = await proxy.get(f"/v2/{REPO}/referrers/{SUBJECT}")
        only = await proxy.get(
            f"/v2/{REPO}/referrers/{SUBJECT}", query={"artifactType": sig["artifactType"]}
        )
        none = await proxy.get(f"/v2/{REPO}/referrers/{digest_of(b'other')}")
    assert whole.status == 200
    assert whole.headers["Content-Type"] == INDEX
    assert whole.json() == {"schemaVersion": 2, "mediaType": INDEX, "manifests": [sbom, sig]}
    assert "OCI-Filters-Applied" not in whole.headers
    assert only.json()["manifests"] == [sig]
    assert only.headers["OCI-Filters-Applied"] == "artifactType"
    assert none.json()["manifests"] == []
    # One upstream request per subject: the filter is applied here, on the cached list.
    assert len(fake.requests) == 2


async def test_referrers_without_upstream_support_stay_404(tmp_path: Path) -> None:
    """The upstream has no referrers API (Distribution 2.8 answers a plain-text 404): the
    client must get a 404, since that is what tells it to fall back to the referrers tag
    schema; an empty 200 would hide every referrer pushed that way."""
    fake = FakeRegistry()
    async with serving(tmp_path, fake, transport=Paginating(fake)) as proxy:
        response = await proxy.get(f"/v2/{REPO}/referrers/{SUBJECT}")
    assert_oci_error(response, 404, "UNSUPPORTED")


# -- what a read-only cache refuses -----------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v2/x/blobs/uploads/"),
        ("POST", f"/v2/{REPO}/blobs/uploads/?digest={BLOB_DIGEST}"),
        ("PATCH", f"/v2/{REPO}/blobs/uploads/3f2a-uuid"),
        ("PUT", f"/v2/{REPO}/blobs/uploads/3f2a-uuid?digest={BLOB_DIGEST}"),
        ("GET", f"/v2/{REPO}/blobs/uploads/3f2a-uuid"),
        ("DELETE", f"/v2/{REPO}/blobs/uploads/3f2a-uuid"),
        ("PUT", f"/v2/{REPO}/manifests/latest"),
        ("DELETE", f"/v2/{REPO}/manifests/{digest_of(MANIFEST)}"),
        ("DELETE", f"/v2/{REPO}/blobs/{BLOB_DIGEST}"),
    ],
)
async def test_push_methods_are_405_unsupported(tmp_path: Path, method: str, path: str) -> None:
    async with serving(tmp_path) as proxy:
        response = await proxy.request(method, path)
    assert_oci_error(response, 405, "UNSUPPORTED")
    assert proxy.fake.requests == []


# -- client errors ----------------------------------------------------------------------------

CLIENT_ERRORS = [
    ("/v2/UPPER/manifests/1", 400, "NAME_INVALID"),
    (f"/v2/a..b/blobs/{BLOB_DIGEST}", 400, "NAME_INVALID"),
    ("/v2/library//app/manifests/1", 400, "NAME_INVALID"),
    ("/v2/-app/tags/list", 400, "NAME_INVALID"),
    ("/v2/" + "a" * 256 + "/manifests/1", 400, "NAME_INVALID"),
    (f"/v2/{UPSTREAM}/Library/app/manifests/1", 400, "NAME_INVALID"),
    (f"/v2/{REPO}/blobs/sha256:abc", 400, "DIGEST_INVALID"),
    (f"/v2/{REPO}/blobs/sha256:{'A' * 64}", 400, "DIGEST_INVALID"),
    (f"/v2/{REPO}/blobs/md5:{'0' * 32}", 400, "DIGEST_INVALID"),
    (f"/v2/{REPO}/blobs/latest", 400, "DIGEST_INVALID"),
    (f"/v2/{REPO}/manifests/sha256:{'0' * 63}", 400, "DIGEST_INVALID"),
    (f"/v2/{REPO}/referrers/not-a-digest", 400, "DIGEST_INVALID"),
    (f"/v2/{REPO}/blobs/{UNKNOWN_DIGEST}", 404, "BLOB_UNKNOWN"),
    (f"/v2/{REPO}/manifests/nope", 404, "MANIFEST_UNKNOWN"),
    (f"/v2/{REPO}/manifests/{UNKNOWN_DIGEST}", 404, "MANIFEST_UNKNOWN"),
    (f"/v2/{REPO}/manifests/1?ns=quay.io", 404, "NAME_UNKNOWN"),
    (f"/v2/{REPO}/blobs/{BLOB_DIGEST}?ns=quay.io", 404, "NAME_UNKNOWN"),
    (f"/v2/quay.io/{REPO}/manifests/1", 404, "NAME_UNKNOWN"),
    (f"/v2/{REPO}/catalog", 404, "NOT_FOUND"),
    ("/v3/", 404, "NOT_FOUND"),
]


@pytest.mark.parametrize(("path", "status", "code"), CLIENT_ERRORS)
async def test_client_errors(tmp_path: Path, path: str, status: int, code: str) -> None:
    async with serving(tmp_path) as proxy:
        response = await proxy.get(path)
    assert_oci_error(response, status, code)
    if status == 400:
        assert proxy.fake.requests == []  # refused before anything was asked upstream


async def test_unknown_blob_head_is_404(tmp_path: Path) -> None:
    async with serving(tmp_path) as proxy:
        response = await proxy.head(f"/v2/{REPO}/blobs/{UNKNOWN_DIGEST}")
    assert response.status == 404
    assert response.headers["Content-Type"] == "application/json"
    assert proxy.stored_files() == []


# -- upstream errors --------------------------------------------------------------------------

MANIFEST_PATH = f"/v2/{REPO}/manifests/1"
BLOB_PATH = f"/v2/{REPO}/blobs/{BLOB_DIGEST}"


@pytest.mark.parametrize(
    "path", [MANIFEST_PATH, BLOB_PATH, f"/v2/{REPO}/tags/list"], ids=["manifest", "blob", "tags"]
)
async def test_upstream_refusing_us_is_401(tmp_path: Path, path: str) -> None:
    fake = FakeRegistry(auth="basic", credentials=("robot", "pw"))
    fake.add_manifest(REPO, "1", MANIFEST)
    fake.add_blob(BLOB)
    async with serving(tmp_path, fake) as proxy:
        response = await proxy.get(path)
        head = await proxy.head(path)
    assert_oci_error(response, 401, "UNAUTHORIZED")
    assert head.status == 401
    # RFC 7235 wants a challenge on every 401: ours, never the upstream's (it is ours alone).
    for answer in (response, head):
        assert answer.headers["WWW-Authenticate"] == 'Basic realm="streamsync-trio"'


@pytest.mark.parametrize(
    ("status", "headers", "expected", "code"),
    [
        (503, {"Retry-After": "3"}, 503, "UNAVAILABLE"),
        (503, {}, 503, "UNAVAILABLE"),
        (429, {"Retry-After": "9"}, 429, "TOOMANYREQUESTS"),
        (500, {}, 502, "UNAVAILABLE"),
    ],
)
@pytest.mark.parametrize("what", ["manifest", "blob"])
async def test_upstream_failures_reach_the_client(
    tmp_path: Path, what: str, status: int, headers: dict[str, str], expected: int, code: str
) -> None:
    fake = FakeRegistry()
    fake.add_manifest(REPO, "1", MANIFEST)
    fake.add_blob(BLOB)
    if what == "manifest":
        fake.manifest_faults.append(Fault(status=status, headers=headers))
    else:
        fake.faults[BLOB_DIGEST] = [Fault(status=status, headers=headers)]
    async with serving(tmp_path, fake, max_retries=0) as proxy:
        response = await proxy.get(MANIFEST_PATH if what == "manifest" else BLOB_PATH)
        assert_oci_error(response, expected, code)
        assert response.headers.get("Retry-After") == headers.get("Retry-After")
        assert proxy.stored_files() == []
        assert list(proxy.state.store.partial_dir.iterdir()) == []


@pytest.mark.parametrize("path", [MANIFEST_PATH, BLOB_PATH], ids=["manifest", "blob"])
async def test_unreachable_upstream_is_502(tmp_path: Path, path: str) -> None:
    async with serving(tmp_path, max_retries=0) as proxy:
        proxy.fake.down = True
        response = await proxy.get(path)
        head = await proxy.head(path)
    assert_oci_error(response, 502, "UNAVAILABLE")
    assert head.status == 502


# -- credentials written into an upstream URL -------------------------------------------------


async def test_credentials_in_an_upstream_url_are_refused_or_never_shown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "hunter2-in-the-url"
    toml_like = {
        "storage": {"root": str(tmp_path / "cache")},
        "upstream": [{"name": UPSTREAM, "url": f"https://robot:{secret}@{UPSTREAM}"}],
    }
    try:
        config = parse_config(toml_like)
    except ConfigError as error:  # refusing it, naming the key but not the secret, is fine
        assert "upstream[0].url" in str(error)
        assert secret not in str(error)
        return
    caplog.set_level(logging.DEBUG)
    app = create_app(config, transport=FakeRegistry())
    async with app.test_app() as test_app:
        proxy = Proxy(test_app.test_client(), app.extensions["streamsync"], FakeRegistry())
        pages = [await proxy.get("/_status.json"), await proxy.get("/_status")]
    assert [page.status for page in pages] == [200, 200]
    for text in [caplog.text, repr(config), *(page.body.decode() for page in pages)]:
        assert secret not in text
