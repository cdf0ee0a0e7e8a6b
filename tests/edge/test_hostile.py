"""Hostile and malformed requests, sent as raw bytes to the app under a real hypercorn.

Each row states what must come back: the status and, where the app (not hypercorn's HTTP
parser) answers, the OCI error code.  After the whole table the server must still answer,
nothing may have been written outside the cache root, and no request may have hung.
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from streamsync_trio import RegistryError
from streamsync_trio._reference import parse_digest, validate_name
from streamsync_trio.edge._ranges import parse_range

from ..labs.fakes import digest_of
from ..labs.httplab import real_time_fake, running_proxy

BLOB_BYTES = b"a small public blob"  # known to the fake upstream: range rows need a size
BLOB = digest_of(BLOB_BYTES)
HEX = "a" * 64
LONG = "a" * 300

# (what it is, method, request target, extra header lines, status, OCI code or None)
HOSTILE: list[tuple[str, str, str, list[str], int, str | None]] = [
    ("dot-dot in name", "GET", "/v2/../../etc/passwd/manifests/v1", [], 400, "NAME_INVALID"),
    ("encoded dot-dot", "GET", "/v2/%2e%2e/%2e%2e/etc/manifests/v1", [], 400, "NAME_INVALID"),
    ("dot-dot as blob name", "GET", f"/v2/a/../../blobs/{BLOB}", [], 400, "NAME_INVALID"),
    ("encoded slash dot-dot", "GET", "/v2/a%2f..%2f..%2fb/manifests/v1", [], 400, "NAME_INVALID"),
    ("backslashes", "GET", "/v2/a\\..\\..\\b/manifests/v1", [], 400, "NAME_INVALID"),
    ("encoded backslash", "GET", "/v2/a%5c..%5cb/manifests/v1", [], 400, "NAME_INVALID"),
    ("absolute name", "GET", "/v2//etc/passwd/manifests/v1", [], 404, "NOT_FOUND"),
    ("NUL in name", "GET", "/v2/a%00b/manifests/v1", [], 400, "NAME_INVALID"),
    ("upper-case name", "GET", "/v2/Library/Alpine/manifests/v1", [], 400, "NAME_INVALID"),
    ("unicode name", "GET", "/v2/%C3%A9t%C3%A9/manifests/v1", [], 400, "NAME_INVALID"),
    ("trailing separator", "GET", "/v2/a-/manifests/v1", [], 400, "NAME_INVALID"),
    ("empty component", "GET", "/v2/a//b/manifests/v1", [], 400, "NAME_INVALID"),
    ("over-long name", "GET", f"/v2/{LONG}/manifests/v1", [], 400, "NAME_INVALID"),
    ("dot-dot tag", "GET", "/v2/a/manifests/..", [], 404, "MANIFEST_UNKNOWN"),
    ("over-long tag", "GET", f"/v2/a/manifests/{'t' * 129}", [], 404, "MANIFEST_UNKNOWN"),
    ("tag with slash", "GET", "/v2/a/manifests/v1%2f..", [], 404, "NOT_FOUND"),
    ("tag leading dash", "GET", "/v2/a/manifests/-v1", [], 404, "MANIFEST_UNKNOWN"),
    ("short digest", "GET", "/v2/a/blobs/sha256:abc", [], 400, "DIGEST_INVALID"),
    ("upper-case hex", "GET", f"/v2/a/blobs/sha256:{'A' * 64}", [], 400, "DIGEST_INVALID"),
    ("unsupported algorithm", "GET", f"/v2/a/blobs/md5:{'a' * 32}", [], 400, "DIGEST_INVALID"),
    ("digest without colon", "GET", f"/v2/a/blobs/{HEX}", [], 400, "DIGEST_INVALID"),
    ("digest traversal", "GET", "/v2/a/blobs/sha256:..%2f..%2fx", [], 404, "NOT_FOUND"),
    ("sha512 wrong length", "GET", f"/v2/a/blobs/sha512:{HEX}", [], 400, "DIGEST_INVALID"),
    ("over-long digest", "GET", f"/v2/a/blobs/sha256:{'a' * 5000}", [], 400, "DIGEST_INVALID"),
    ("manifest digest bad", "GET", "/v2/a/manifests/sha256:zz", [], 400, "DIGEST_INVALID"),
    ("referrers bad digest", "GET", "/v2/a/referrers/sha256:zz", [], 400, "DIGEST_INVALID"),
    ("garbled range", "GET", f"/v2/a/blobs/{BLOB}", ["Range: bytes=abc"], 416, "UNSUPPORTED"),
    ("multi range", "GET", f"/v2/a/blobs/{BLOB}", ["Range: bytes=0-1,3-4"], 416, "UNSUPPORTED"),
    ("range past end", "GET", f"/v2/a/blobs/{BLOB}", ["Range: bytes=999-"], 416, "UNSUPPORTED"),
    (
        "20-digit range",
        "GET",
        f"/v2/a/blobs/{BLOB}",
        [f"Range: bytes={'9' * 20}-"],
        416,
        "UNSUPPORTED",
    ),
    ("unknown ns", "GET", "/v2/a/manifests/v1?ns=evil.example", [], 404, "NAME_UNKNOWN"),
    ("ns traversal", "GET", "/v2/a/manifests/v1?ns=..%2f..", [], 404, "NAME_UNKNOWN"),
    ("unknown prefix", "GET", "/v2/evil.example/a/manifests/v1", [], 404, "NAME_UNKNOWN"),
    ("push upload", "POST", "/v2/a/blobs/uploads/", [], 405, "UNSUPPORTED"),
    ("push chunk", "PATCH", "/v2/a/blobs/uploads/123", [], 405, "UNSUPPORTED"),
    ("put manifest", "PUT", "/v2/a/manifests/v1", [], 405, "UNSUPPORTED"),
    ("delete blob", "DELETE", f"/v2/a/blobs/{BLOB}", [], 405, "UNSUPPORTED"),
    ("unknown method", "BREW", "/v2/a/manifests/v1", [], 405, "UNSUPPORTED"),
    ("PROPFIND", "PROPFIND", "/v2/", [], 405, "UNSUPPORTED"),
    ("TRACE", "TRACE", "/v2/", [], 405, "UNSUPPORTED"),
    ("no endpoint", "GET", "/v2/a/b/c", [], 404, "NOT_FOUND"),
    ("outside the API", "GET", "/etc/passwd", [], 404, "NOT_FOUND"),
    ("traversal outside API", "GET", "/v2/../../../../etc/passwd", [], 404, "NOT_FOUND"),
    ("huge header", "GET", "/v2/", [f"X-Big: {'x' * 200_000}"], 431, None),
    ("many headers", "GET", "/v2/", [f"X-H{i}: {'y' * 100}" for i in range(2000)], 431, None),
    (
        "duplicated Range",
        "GET",
        f"/v2/a/blobs/{BLOB}",
        ["Range: bytes=0-1", "Range: bytes=2-3"],
        416,
        "UNSUPPORTED",
    ),
    ("header injection", "GET", "/v2/a/manifests/v1%0d%0aX-Evil:%201", [], 404, "NOT_FOUND"),
    ("over-long URL", "GET", "/v2/" + "a/" * 20_000 + "manifests/v1", [], 400, "NAME_INVALID"),
]


async def raw_request(port: int, method: str, target: str, headers: list[str]) -> tuple[int, bytes]:
    """Send one request as raw bytes; return (status, body).  Anything slow is a failure."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", *headers]
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            try:
                await stream.send_all(raw)
            except trio.BrokenResourceError:
                pass  # the server may close before reading everything it refuses
            received = bytearray()
            while b"\r\n\r\n" not in received:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                received += chunk
            head, _, body = bytes(received).partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(body) < length:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                body += chunk
    return int(head.split(b" ")[1]), body


async def test_hostile_requests_get_clear_errors_and_harm_nothing(tmp_path: Path) -> None:
    fake = real_time_fake()
    fake.add_blob(BLOB_BYTES)
    cache = tmp_path / "cache"
    before = set(os.listdir(tmp_path))
    async with running_proxy(tmp_path, fake) as proxy:
        port = int(proxy.url.rsplit(":", 1)[1])
        failures = []
        for what, method, target, headers, status, code in HOSTILE:
            got_status, body = await raw_request(port, method, target, headers)
            got_code = None
            if code is not None:
                try:
                    got_code = json.loads(body)["errors"][0]["code"]
                except (ValueError, KeyError, IndexError):
                    got_code = f"not OCI JSON: {body[:80]!r}"
            if (got_status, got_code) != (status, code):
                failures.append(f"{what}: expected {status} {code}, got {got_status} {got_code}")
        assert failures == []
        # Still healthy, and nothing was asked of the upstream for any of it.
        status, body = await raw_request(port, "GET", "/v2/", [])
        assert (status, body) == (200, b"{}")
        # The upstream was asked about the one well-formed blob only, never about garbage.
        assert {r.url.path for r in fake.requests} <= {f"/v2/a/blobs/{BLOB}"}
    assert set(os.listdir(tmp_path)) - before <= {cache.name}
    stored = [p for p in (cache / "blobs").rglob("*") if p.is_file()]
    assert [p.name for p in stored] == [BLOB.removeprefix("sha256:")]


def test_the_table_is_large_enough() -> None:
    assert len(HOSTILE) >= 40


NAME_ALPHABET = string.ascii_letters + string.digits + "._-/\\%:\x00é "


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=NAME_ALPHABET, max_size=300))
def test_any_name_is_rejected_or_a_safe_relative_path(name: str) -> None:
    try:
        accepted = validate_name(name)
    except RegistryError as error:
        assert (error.status, error.code) == (400, "NAME_INVALID")
        return
    parts = accepted.split("/")
    assert all(part and part not in (".", "..") and part[0].isalnum() for part in parts)
    assert not accepted.startswith("/")
    assert "\\" not in accepted and "\x00" not in accepted


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=string.printable, max_size=250))
def test_any_digest_is_rejected_or_verifiable(text: str) -> None:
    try:
        digest = parse_digest(text)
    except RegistryError as error:
        assert (error.status, error.code) == (400, "DIGEST_INVALID")
        return
    assert digest.algorithm in ("sha256", "sha512")
    assert set(digest.hex) <= set("0123456789abcdef")


@settings(max_examples=1000, deadline=None)
@given(
    st.one_of(
        st.none(),
        st.text(max_size=60),
        st.builds(
            lambda a, b: f"bytes={a}-{b}",
            st.one_of(st.just(""), st.integers(0, 10**20).map(str)),
            st.one_of(st.just(""), st.integers(0, 10**20).map(str)),
        ),
    ),
    st.integers(0, 10**12),
)
def test_any_range_is_ignored_satisfied_or_416(header: str | None, size: int) -> None:
    try:
        span = parse_range(header, size)
    except RegistryError as error:
        assert error.status == 416
        assert error.headers["Content-Range"] == f"bytes */{size}"
        return
    if span is not None:
        start, end = span
        assert 0 <= start < end <= size


@pytest.mark.parametrize("header", ["bytes=0-0", "bytes=-1", "bytes=5-"])
def test_edge_ranges_of_a_one_byte_blob(header: str) -> None:
    if header == "bytes=5-":
        with pytest.raises(RegistryError):
            parse_range(header, 1)
    else:
        assert parse_range(header, 1) == (0, 1)
