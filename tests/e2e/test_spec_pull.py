"""The OCI distribution spec's pull and content-discovery requirements, read from its text.

Each test quotes the spec (opencontainers/distribution-spec ``spec.md``) it checks.  They run
against three targets: Distribution 2.8 itself (the control: if it fails a test, either the
test or Distribution is wrong, and where Distribution is, the test says so with a strict
xfail), the proxy in front of it, and the proxy addressed through its upstream prefix
(``/v2/upstream.spec.test/spec/pull/...``).  The content is pushed once per module
(``speclab``); the tests only read.
"""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Iterator
from urllib.parse import urljoin

import httpx
import pytest

from ..labs.speclab import (
    ALL_MANIFEST_TYPES,
    OCI_INDEX,
    OTHER_REPO,
    SBOM_TYPE,
    SpecLab,
    Target,
    error_codes,
    next_link,
    spec_lab,
)

pytestmark = pytest.mark.e2e

TARGETS = ["distribution", "proxy", "proxy-prefixed"]
SHAPES = ["oci-image", "oci-index", "docker-v2s2", "docker-list"]
UNKNOWN_DIGEST = "sha256:" + hashlib.sha256(b"never pushed").hexdigest()


def on_distribution(reason: str) -> pytest.MarkDecorator:
    """Where Distribution 2.8 breaks a MUST: expected to fail there, and only there."""
    return pytest.mark.xfail(strict=True, reason=f"Distribution 2.8: {reason}")


def targets(**xfails: pytest.MarkDecorator) -> list[object]:
    """``TARGETS``, with the marks given by target (``proxy_prefixed=`` for ``proxy-prefixed``)."""
    params: list[object] = []
    for target in TARGETS:
        mark = xfails.get(target.replace("-", "_"))
        params.append(pytest.param(target, marks=mark) if mark is not None else target)
    return params


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SpecLab]:
    with spec_lab(tmp_path_factory.mktemp("spec")) as running:
        yield running


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as http:
        yield http


def pick(lab: SpecLab, target_id: str) -> Target:
    return lab.targets()[target_id]


def assert_not_found(response: httpx.Response, *codes: str) -> None:
    """404; and when the body is JSON (which the spec leaves optional), one of ``codes``."""
    assert response.status_code == 404, response.text
    found = error_codes(response)
    if found is not None and response.request.method != "HEAD":
        assert set(found) & set(codes), f"{found} is none of {codes}"


# -- base -------------------------------------------------------------------------------------


@pytest.mark.parametrize("target_id", TARGETS)
def test_base_endpoint(lab: SpecLab, client: httpx.Client, target_id: str) -> None:
    """ "To check whether or not the registry implements this specification, perform a GET
    request to ... /v2/.  If the response is 200 OK, then the registry implements this
    specification." """
    assert client.get(f"{pick(lab, target_id).url}/v2/").status_code == 200


# -- pulling manifests ------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("by", ["tag", "digest"])
@pytest.mark.parametrize("target_id", TARGETS)
def test_get_manifest(
    lab: SpecLab, client: httpx.Client, target_id: str, by: str, shape: str
) -> None:
    """ "A GET request to an existing manifest URL MUST provide the expected manifest, with a
    response code that MUST be 200 OK.  A successful response MUST contain the digest of the
    uploaded blob in the header Docker-Content-Digest."  "In a successful response, the
    Content-Type header will indicate the type of the returned manifest." """
    manifest = lab.content.manifests[shape]
    reference = manifest.tag if by == "tag" else manifest.digest
    response = client.get(
        pick(lab, target_id).v2(f"manifests/{reference}"),
        headers={"Accept": ", ".join(ALL_MANIFEST_TYPES)},
    )
    assert response.status_code == 200, response.text
    assert response.content == manifest.body
    assert response.headers["Docker-Content-Digest"] == manifest.digest
    assert response.headers["Content-Type"].split(";")[0] == manifest.media_type


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("target_id", TARGETS)
def test_get_manifest_with_only_its_own_type_accepted(
    lab: SpecLab, client: httpx.Client, target_id: str, shape: str
) -> None:
    """ "The client SHOULD include an Accept header indicating which manifest content types
    it supports."  A client naming exactly the manifest's type gets that manifest."""
    manifest = lab.content.manifests[shape]
    response = client.get(
        pick(lab, target_id).v2(f"manifests/{manifest.tag}"),
        headers={"Accept": manifest.media_type},
    )
    assert response.status_code == 200, response.text
    assert response.headers["Docker-Content-Digest"] == manifest.digest


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("target_id", TARGETS)
def test_get_manifest_with_one_accept_line_per_type(
    lab: SpecLab, client: httpx.Client, target_id: str, shape: str
) -> None:
    """The same ``Accept``, sent as one header line per media type (RFC 9110 5.3: several
    lines are one comma-separated list), the way containers/image and Docker send it."""
    manifest = lab.content.manifests[shape]
    lines = [("Accept", media_type) for media_type in ALL_MANIFEST_TYPES]
    response = client.get(pick(lab, target_id).v2(f"manifests/{manifest.tag}"), headers=lines)
    assert response.status_code == 200, response.text
    assert response.content == manifest.body
    assert response.headers["Content-Type"].split(";")[0] == manifest.media_type


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("by", ["tag", "digest"])
@pytest.mark.parametrize("target_id", TARGETS)
def test_head_manifest(
    lab: SpecLab, client: httpx.Client, target_id: str, by: str, shape: str
) -> None:
    """ "A HEAD request to an existing blob or manifest URL MUST return 200 OK.  A successful
    response MUST contain the digest of the uploaded blob or manifest in the header
    Docker-Content-Digest.  A successful response MUST contain the size in bytes of the
    uploaded blob or manifest in the header Content-Length." """
    manifest = lab.content.manifests[shape]
    reference = manifest.tag if by == "tag" else manifest.digest
    response = client.head(
        pick(lab, target_id).v2(f"manifests/{reference}"),
        headers={"Accept": ", ".join(ALL_MANIFEST_TYPES)},
    )
    assert response.status_code == 200
    assert response.headers["Docker-Content-Digest"] == manifest.digest
    assert response.headers["Content-Length"] == str(len(manifest.body))
    assert response.content == b""


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("reference", ["missing-tag", UNKNOWN_DIGEST])
@pytest.mark.parametrize("target_id", TARGETS)
def test_unknown_manifest_is_404(
    lab: SpecLab, client: httpx.Client, target_id: str, reference: str, method: str
) -> None:
    """ "If the manifest is not found in the repository, the response code MUST be 404 Not
    Found."  (and "If the blob or manifest is not found in the repository, the response code
    MUST be 404 Not Found" for HEAD)."""
    url = pick(lab, target_id).v2(f"manifests/{reference}")
    assert_not_found(client.request(method, url, headers={"Accept": OCI_INDEX}), "MANIFEST_UNKNOWN")


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("target_id", TARGETS)
def test_a_reference_that_is_no_tag_is_404(
    lab: SpecLab, client: httpx.Client, target_id: str, method: str
) -> None:
    """ "<tag-or-digest> MUST be either (a) the digest of the manifest or (b) a tag" matching
    ``[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}``.  ``.INVALID_MANIFEST_NAME`` is neither, so no
    manifest can be found by it: 404 (the conformance suite's "HEAD request to nonexistent
    manifest should return 404" uses exactly this reference), ``MANIFEST_UNKNOWN`` if coded."""
    url = pick(lab, target_id).v2("manifests/.INVALID_MANIFEST_NAME")
    assert_not_found(client.request(method, url), "MANIFEST_UNKNOWN")


@pytest.mark.parametrize(
    "target_id",
    targets(
        distribution=on_distribution(
            "500 UNKNOWN: it looks the reference up as a tag (a path with a ':' in it)"
        )
    ),
)
def test_a_malformed_digest_is_400_or_404(
    lab: SpecLab, client: httpx.Client, target_id: str
) -> None:
    """A digest reference of the wrong form is no manifest: the conformance suite accepts
    404 or 400 for ``sha256:baddigeststring`` (end-3's failures are 404; ``DIGEST_INVALID``
    is the code for a bad digest)."""
    response = client.get(pick(lab, target_id).v2("manifests/sha256:baddigeststring"))
    assert response.status_code in (400, 404)
    codes = error_codes(response)
    if codes is not None:
        assert set(codes) & {"DIGEST_INVALID", "MANIFEST_UNKNOWN", "MANIFEST_INVALID"}


@pytest.mark.parametrize("target_id", TARGETS)
def test_manifest_of_an_unknown_repository_is_404(
    lab: SpecLab, client: httpx.Client, target_id: str
) -> None:
    """ "If the manifest is not found in the repository, the response code MUST be 404"."""
    url = pick(lab, target_id).v2("manifests/latest", repo="spec/no-such-repo")
    assert_not_found(client.get(url), "NAME_UNKNOWN", "MANIFEST_UNKNOWN")


# -- pulling blobs ----------------------------------------------------------------------------


@pytest.mark.parametrize("target_id", TARGETS)
def test_get_blob(lab: SpecLab, client: httpx.Client, target_id: str) -> None:
    """ "A GET request to an existing blob URL MUST provide the expected blob, with a
    response code that MUST be 200 OK.  A successful response MUST contain the digest of the
    uploaded blob in the header Docker-Content-Digest.  If present, the value of this header
    MUST be a digest matching that of the response body." """
    for digest, data in lab.content.blobs.items():
        response = client.get(pick(lab, target_id).v2(f"blobs/{digest}"))
        assert response.status_code == 200
        assert response.content == data
        assert response.headers["Docker-Content-Digest"] == digest
        assert "sha256:" + hashlib.sha256(response.content).hexdigest() == digest


@pytest.mark.parametrize("target_id", TARGETS)
def test_head_blob(lab: SpecLab, client: httpx.Client, target_id: str) -> None:
    """ "A HEAD request to an existing blob or manifest URL MUST return 200 OK ... MUST
    contain the digest ... in the header Docker-Content-Digest ... MUST contain the size in
    bytes ... in the header Content-Length." """
    for digest, data in lab.content.blobs.items():
        response = client.head(pick(lab, target_id).v2(f"blobs/{digest}"))
        assert response.status_code == 200
        assert response.headers["Docker-Content-Digest"] == digest
        assert response.headers["Content-Length"] == str(len(data))
        assert response.content == b""


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [("bytes=10-99", 10, 100), ("bytes=299000-", 299000, None), ("bytes=-7", -7, None)],
    ids=["closed", "open", "suffix"],
)
@pytest.mark.parametrize("target_id", TARGETS)
def test_blob_range(
    lab: SpecLab, client: httpx.Client, target_id: str, header: str, start: int, end: int | None
) -> None:
    """ "A registry SHOULD support the Range request header in accordance with RFC 9110
    (section 14)": 206 with the part and a ``Content-Range`` (RFC 9110 14.4, 15.3.7)."""
    data = lab.content.blobs[lab.content.big_blob]
    response = client.get(
        pick(lab, target_id).v2(f"blobs/{lab.content.big_blob}"), headers={"Range": header}
    )
    part = data[start:end]
    first = start if start >= 0 else len(data) + start
    assert response.status_code == 206
    assert response.content == part
    assert response.headers["Content-Range"] == f"bytes {first}-{first + len(part) - 1}/{len(data)}"


@pytest.mark.parametrize(
    "target_id",
    targets(
        distribution=on_distribution(
            "its 416 declares the whole blob's Content-Length but sends a 33-byte text body, "
            "so the message is cut short (RFC 9112 6.3)"
        )
    ),
)
def test_unsatisfiable_blob_range_is_416(
    lab: SpecLab, client: httpx.Client, target_id: str
) -> None:
    """RFC 9110 15.5.17: a range past the end is 416, with ``Content-Range: bytes */size``."""
    size = len(lab.content.blobs[lab.content.big_blob])
    response = client.get(
        pick(lab, target_id).v2(f"blobs/{lab.content.big_blob}"),
        headers={"Range": f"bytes={size}-"},
    )
    assert response.status_code == 416
    assert response.headers["Content-Range"] == f"bytes */{size}"


@pytest.mark.parametrize("target_id", targets())
def test_a_416_body_in_json_carries_a_spec_code(
    lab: SpecLab, client: httpx.Client, target_id: str
) -> None:
    """ "A 4XX response code from the registry MAY return a body in any format.  If the
    response body is in JSON format, it MUST have the following format ... The code field
    MUST be one of the following" (the table of 14 codes)."""
    size = len(lab.content.blobs[lab.content.big_blob])
    with client.stream(
        "GET",
        pick(lab, target_id).v2(f"blobs/{lab.content.big_blob}"),
        headers={"Range": f"bytes={size}-"},
    ) as response:
        assert response.status_code == 416
        if response.headers.get("Content-Type", "").startswith("application/json"):
            response.read()
            error_codes(response)


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("target_id", TARGETS)
def test_unknown_blob_is_404(
    lab: SpecLab, client: httpx.Client, target_id: str, method: str
) -> None:
    """ "If the blob is not found in the repository, the response code MUST be 404 Not
    Found." """
    response = client.request(method, pick(lab, target_id).v2(f"blobs/{UNKNOWN_DIGEST}"))
    assert_not_found(response, "BLOB_UNKNOWN")


@pytest.mark.parametrize("target_id", TARGETS)
def test_a_blob_of_another_repository_is_404(
    lab: SpecLab, client: httpx.Client, target_id: str
) -> None:
    """ "If the blob is not found *in the repository*, the response code MUST be 404": a
    blob the registry holds for another repository is not in this one (read there first, so
    the proxy has it cached)."""
    target = pick(lab, target_id)
    digest = lab.content.other_blob
    assert client.get(target.v2(f"blobs/{digest}", repo=OTHER_REPO)).status_code == 200
    assert_not_found(client.get(target.v2(f"blobs/{digest}")), "BLOB_UNKNOWN")
    assert_not_found(client.head(target.v2(f"blobs/{digest}")), "BLOB_UNKNOWN")


@pytest.mark.parametrize("target_id", TARGETS)
def test_blob_of_an_unknown_repository_is_404(
    lab: SpecLab, client: httpx.Client, target_id: str
) -> None:
    url = pick(lab, target_id).v2(f"blobs/{lab.content.big_blob}", repo="spec/no-such-repo")
    assert_not_found(client.get(url), "NAME_UNKNOWN", "BLOB_UNKNOWN")


@pytest.mark.parametrize("target_id", TARGETS)
def test_a_malformed_blob_digest_is_an_error(
    lab: SpecLab, client: httpx.Client, target_id: str
) -> None:
    """A digest not of the form ``algorithm:encoded`` names no blob: 400 ``DIGEST_INVALID``
    or 404 (end-2's failure status)."""
    response = client.get(pick(lab, target_id).v2("blobs/sha256:abc"))
    assert response.status_code in (400, 404)
    codes = error_codes(response)
    if codes is not None:
        assert set(codes) & {"DIGEST_INVALID", "BLOB_UNKNOWN"}


# -- listing tags -----------------------------------------------------------------------------


def all_tags(lab: SpecLab) -> list[str]:
    return sorted(lab.content.tags)


@pytest.mark.parametrize("target_id", TARGETS)
def test_tags_list(lab: SpecLab, client: httpx.Client, target_id: str) -> None:
    """ "Assuming a repository is found, this request MUST return a 200 OK response code ...
    the tags MUST be in lexical ... or "ASCIIbetical" order.  Upon success, the response MUST
    be a json body in the following format: {"name": "<name>", "tags": [...]} ... <name> is
    the namespace of the repository" (the one the client asked for)."""
    target = pick(lab, target_id)
    response = client.get(target.v2("tags/list"))
    assert response.status_code == 200
    assert response.headers["Content-Type"].split(";")[0] == "application/json"
    document = response.json()
    assert set(document) == {"name", "tags"}
    assert document["name"] == target.name()
    assert sorted(document["tags"]) == all_tags(lab)


@pytest.mark.parametrize(
    "target_id", targets(distribution=on_distribution("lists tags unsorted (storage order)"))
)
def test_tags_list_is_sorted(lab: SpecLab, client: httpx.Client, target_id: str) -> None:
    """ "If the list is not empty, the tags MUST be in lexical (i.e. case-insensitive
    alphanumeric order) or "ASCIIbetical" (Go's sort.Strings) order."  The tags include
    digits, upper case and ``_``, where the two orders differ from naive ones."""
    response = client.get(pick(lab, target_id).v2("tags/list"))
    tags = response.json()["tags"]
    assert tags in (sorted(tags), sorted(tags, key=str.lower))


@pytest.mark.parametrize(
    "target_id", targets(distribution=on_distribution("ignores n and returns every tag"))
)
def test_tags_list_n(lab: SpecLab, client: httpx.Client, target_id: str) -> None:
    """ "The response to such a request MAY return fewer than <int> results, but only when the
    total number of tags attached to the repository is less than <int> or a Link header is
    provided.  Otherwise, the response MUST include <int> results ... the list returned will
    start at the beginning of the list" (and a subset is no more than ``n``)."""
    target = pick(lab, target_id)
    tags = all_tags(lab)
    for n in range(1, len(tags) + 2):
        response = client.get(target.v2("tags/list"), params={"n": n})
        assert response.status_code == 200
        got = response.json()["tags"]
        assert got == tags[: len(got)], f"n={n}: not the start of the sorted list"
        assert len(got) == min(n, len(tags)) or (len(got) < n and next_link(response)), f"n={n}"


@pytest.mark.parametrize(
    "target_id", targets(distribution=on_distribution("ignores n=0 and returns every tag"))
)
def test_tags_list_n_zero(lab: SpecLab, client: httpx.Client, target_id: str) -> None:
    """ "When n is zero, this endpoint MUST return an empty list, and MUST NOT include a
    Link header." """
    response = client.get(pick(lab, target_id).v2("tags/list"), params={"n": 0})
    assert response.status_code == 200
    assert response.json()["tags"] == []
    assert "Link" not in response.headers


@pytest.mark.parametrize(
    "target_id", targets(distribution=on_distribution("ignores last and returns every tag"))
)
def test_tags_list_last(lab: SpecLab, client: httpx.Client, target_id: str) -> None:
    """ "A request of this sort will return up to <int> tags, beginning non-inclusively with
    <tagname> ... When using the last query parameter, the n parameter is OPTIONAL." """
    target = pick(lab, target_id)
    tags = all_tags(lab)
    middle = tags[len(tags) // 2]
    response = client.get(target.v2("tags/list"), params={"last": middle})
    assert response.json()["tags"] == [t for t in tags if t > middle]
    response = client.get(target.v2("tags/list"), params={"n": 2, "last": middle})
    assert response.json()["tags"] == [t for t in tags if t > middle][:2]


@pytest.mark.parametrize(
    "target_id", targets(distribution=on_distribution("ignores n, so there is no page to follow"))
)
def test_tags_list_pages_by_link(lab: SpecLab, client: httpx.Client, target_id: str) -> None:
    """ "A Link header MAY be included in the response when additional tags are available.
    If included, the Link header MUST be set according to RFC 5988 with the Relation Type
    rel="next"."  Following the Links from ``n=3`` walks the whole list, each tag once; the
    Links name the repository as the client did."""
    target = pick(lab, target_id)
    url: str | None = target.v2("tags/list") + "?n=3"
    walked: list[str] = []
    for _ in range(20):
        if url is None:
            break
        response = client.get(url)
        assert response.status_code == 200
        page = response.json()
        assert page["name"] == target.name()
        assert len(page["tags"]) <= 3
        walked += page["tags"]
        link = next_link(response)
        if link is not None:
            assert f"/v2/{target.name()}/tags/list?" in link
        url = urljoin(url, link) if link is not None else None
    assert walked == all_tags(lab)


@pytest.mark.parametrize("target_id", TARGETS)
def test_tags_list_of_an_unknown_repository_is_404(
    lab: SpecLab, client: httpx.Client, target_id: str
) -> None:
    """end-8a: ``GET /v2/<name>/tags/list``, failure ``404``; ``NAME_UNKNOWN`` is "repository
    name not known to registry"."""
    url = pick(lab, target_id).v2("tags/list", repo="spec/no-such-repo")
    assert_not_found(client.get(url), "NAME_UNKNOWN")


# -- referrers --------------------------------------------------------------------------------


@pytest.mark.parametrize("target_id", TARGETS)
def test_referrers_without_the_api_are_404_and_the_tag_schema_answers(
    lab: SpecLab, client: httpx.Client, target_id: str
) -> None:
    """Distribution 2.8 has no referrers API.  "If the registry supports the referrers API,
    the registry MUST NOT return a 404"; one that does not answers 404, and "A client querying
    the referrers API and receiving a 404 Not Found MUST fallback to using an image index
    pushed to a tag described by the referrers tag schema".  So the proxy in front of it must
    pass that 404 on (an empty 200 would stop clients from looking at the tag), and the
    tag ``<alg>-<ref>`` must serve the index listing the artifact."""
    target = pick(lab, target_id)
    subject = lab.content.subject
    response = client.get(target.v2(f"referrers/{subject}"))
    assert response.status_code == 404
    error_codes(response)
    fallback = client.get(
        target.v2(f"manifests/{subject.replace(':', '-')}"), headers={"Accept": OCI_INDEX}
    )
    assert fallback.status_code == 200
    assert fallback.headers["Content-Type"].split(";")[0] == OCI_INDEX
    assert lab.content.artifact is not None
    (listed,) = json.loads(fallback.content)["manifests"]
    assert (listed["digest"], listed["artifactType"]) == (lab.content.artifact.digest, SBOM_TYPE)


@pytest.mark.parametrize(
    "target_id",
    targets(
        distribution=on_distribution(
            "no referrers API, so every referrers path is 404; the 400 MUST is for registries "
            "that implement it"
        )
    ),
)
def test_referrers_with_an_invalid_digest_is_400(
    lab: SpecLab, client: httpx.Client, target_id: str
) -> None:
    """ "If the request is invalid, such as a <digest> with an invalid syntax, a 400 Bad
    Request MUST be returned." """
    response = client.get(pick(lab, target_id).v2("referrers/sha256:not-a-digest"))
    assert response.status_code == 400
    assert error_codes(response) == ["DIGEST_INVALID"]


# -- HTTP itself ------------------------------------------------------------------------------


@pytest.mark.parametrize("target_id", TARGETS)
def test_status_lines_carry_a_reason_phrase(lab: SpecLab, target_id: str) -> None:
    """Not a MUST of either spec (RFC 9112 allows an empty reason phrase), but every other
    registry sends one (``HTTP/1.1 200 OK``), and strict clients have tripped on its absence."""
    host, port = pick(lab, target_id).url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(b"GET /v2/ HTTP/1.1\r\nHost: spec\r\nConnection: close\r\n\r\n")
        status_line = raw.makefile("rb").readline()
    assert status_line == b"HTTP/1.1 200 OK\r\n"


def test_lab_pushes_what_it_says(lab: SpecLab) -> None:
    """The setup itself: every manifest the tests read is in Distribution by tag and digest."""
    for shape, manifest in lab.content.manifests.items():
        for reference in filter(None, (manifest.tag, manifest.digest)):
            response = httpx.get(
                f"{lab.registry_url}/v2/spec/pull/manifests/{reference}",
                headers={"Accept": manifest.media_type},
            )
            assert response.status_code == 200, (shape, reference)
