"""Peer request signatures: the right secret, method, target and a recent timestamp."""

from __future__ import annotations

import re

import pytest

from streamsync_trio.cluster import HEADER, MAX_SKEW, PeerAuthError, PeerProof, sign, verify

SECRET = b"correct horse battery staple"
TARGET = "/v2/library/alpine/blobs/sha256:" + "ab" * 32
NOW = 1_790_000_000.0
NONCE = "0123456789abcdef0123456789abcdef"


def header(method: str = "GET", now: float = NOW) -> str:
    return sign(SECRET, method, TARGET, now, nonce=NONCE)[HEADER]


def test_a_signed_request_verifies() -> None:
    value = header()
    assert re.fullmatch(r"v1 t=1790000000 n=[0-9a-f]{32} s=[0-9a-f]{64}", value)
    proof = verify(SECRET, "GET", TARGET, value, now=NOW + 1)
    assert proof == PeerProof(timestamp=1_790_000_000, nonce=NONCE)


def test_each_signature_has_its_own_nonce() -> None:
    first = sign(SECRET, "GET", TARGET, NOW)[HEADER]
    second = sign(SECRET, "GET", TARGET, NOW)[HEADER]
    assert first != second
    for value in (first, second):
        verify(SECRET, "GET", TARGET, value, now=NOW)


def test_the_method_is_case_insensitive() -> None:
    verify(SECRET, "GET", TARGET, header(method="get"), now=NOW)


@pytest.mark.parametrize(
    ("secret", "method", "target", "reason"),
    [
        (b"wrong secret", "GET", TARGET, "does not match"),
        (SECRET[:-1], "GET", TARGET, "does not match"),
        (SECRET, "HEAD", TARGET, "does not match"),
        (SECRET, "GET", TARGET.replace("alpine", "busybox"), "does not match"),
        (SECRET, "GET", TARGET + "?ns=docker.io", "does not match"),
        (SECRET, "GET", "/v2/", "does not match"),
    ],
)
def test_anything_changed_is_refused(secret: bytes, method: str, target: str, reason: str) -> None:
    with pytest.raises(PeerAuthError, match=reason):
        verify(secret, method, target, header(), now=NOW)


@pytest.mark.parametrize("offset", [MAX_SKEW + 1, -(MAX_SKEW + 1), 3600.0, -86400.0])
def test_a_timestamp_outside_the_skew_is_refused(offset: float) -> None:
    with pytest.raises(PeerAuthError, match="outside"):
        verify(SECRET, "GET", TARGET, header(now=NOW + offset), now=NOW)


@pytest.mark.parametrize("offset", [MAX_SKEW, -MAX_SKEW, 0.0])
def test_a_timestamp_within_the_skew_is_accepted(offset: float) -> None:
    verify(SECRET, "GET", TARGET, header(now=NOW + offset), now=NOW)


def test_the_skew_is_the_callers_to_choose() -> None:
    value = header(now=NOW - 5)
    verify(SECRET, "GET", TARGET, value, now=NOW, max_skew=5)
    with pytest.raises(PeerAuthError, match="outside"):
        verify(SECRET, "GET", TARGET, value, now=NOW, max_skew=4)


def test_a_forged_timestamp_does_not_verify() -> None:
    # Moving an old signature's timestamp into the window breaks the MAC: it is signed too.
    old = header(now=NOW - 3600)
    forged = re.sub(r"t=\d+", f"t={int(NOW)}", old)
    with pytest.raises(PeerAuthError, match="does not match"):
        verify(SECRET, "GET", TARGET, forged, now=NOW)


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "v1",
        "v2 t=1790000000 n=0123456789abcdef s=" + "0" * 64,
        "v1 t=1790000000 n=0123 s=" + "0" * 64,  # nonce too short
        "v1 t=1790000000 n=0123456789ABCDEF s=" + "0" * 64,  # not lower-case hex
        "v1 t=-1 n=0123456789abcdef s=" + "0" * 64,
        "v1 t=1790000000 n=0123456789abcdef s=" + "0" * 63,
        "v1 t=1790000000 n=0123456789abcdef s=" + "0" * 64 + " ",
        "v1 t=1790000000 n=0123456789abcdef s=" + "0" * 300,
    ],
)
def test_malformed_headers_are_refused(value: str | None) -> None:
    with pytest.raises(PeerAuthError):
        verify(SECRET, "GET", TARGET, value, now=NOW)
