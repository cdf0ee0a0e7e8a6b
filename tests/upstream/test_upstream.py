"""The upstream client: anonymous and authenticated fetches, credential hygiene, error mapping.

The network is :class:`tests.fakes.FakeRegistry` (or, for answers it cannot give, an
``httpx.MockTransport``), so every request the client makes is recorded and inspected.
"""

from __future__ import annotations

import base64
import email.utils
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from streamsync_trio import RegistryError, UpstreamConfig
from streamsync_trio.upstream._client import (
    MAX_MANIFEST_BYTES,
    USER_AGENT,
    BlobStream,
    Challenge,
    Upstream,
    parse_challenge,
    parse_retry_after,
)

from ..labs.fakes import CDN, FakeRegistry, Fault, digest_of
from ..labs.wirelab import upstream_reading

HOST = "registry.fake.test"
REPO = "library/app"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ACCEPT = f"{OCI_MANIFEST}, application/vnd.oci.image.index.v1+json"
MANIFEST = b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json"}'
BLOB = os.urandom(200_000)  # several of the fake's 64 KiB chunks
BLOB_DIGEST = digest_of(BLOB)
USERNAME = "robot"
PASSWORD = "s3cret-Pa55word"
PASSWORD_ENV = "STREAMSYNC_TEST_UPSTREAM_PASSWORD"


def basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def open_upstream(
    transport: httpx.AsyncBaseTransport, **settings: Any
) -> AbstractAsyncContextManager[Upstream]:
    return upstream_reading(UpstreamConfig(name=HOST, url=f"https://{HOST}", **settings), transport)


def stocked(**options: Any) -> FakeRegistry:
    """A fake registry holding one manifest (tag ``1``) and one blob in ``REPO``."""
    fake = FakeRegistry(**options)
    fake.add_manifest(REPO, "1", MANIFEST)
    fake.add_blob(BLOB)
    return fake


@pytest.fixture
def with_password(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Upstream settings with basic credentials whose password is in the environment."""
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    return {"username": USERNAME, "password_env": PASSWORD_ENV}


async def read_blob(upstream: Upstream, offset: int = 0) -> tuple[BlobStream, bytes]:
    async with upstream.open_blob(REPO, BLOB_DIGEST, offset) as body:
        data = b"".join([chunk async for chunk in body.chunks])
    return body, data


async def streamed(*chunks: bytes) -> AsyncIterator[bytes]:
    """A response body httpx has not read yet (``content=bytes`` is read at construction)."""
    for chunk in chunks:
        yield chunk


def hosts_and_auth(fake: FakeRegistry) -> list[tuple[str, str, str | None]]:
    return [(r.method, r.url.host, r.headers.get("Authorization")) for r in fake.requests]


# -- anonymous ----------------------------------------------------------------------------------


@pytest.mark.both_readers
async def test_anonymous_manifest_and_blob() -> None:
    fake = stocked()
    async with open_upstream(fake) as upstream:
        manifest = await upstream.get_manifest(REPO, "1", ACCEPT)
        head = await upstream.head_manifest(REPO, "1", ACCEPT)
        size = await upstream.head_blob(REPO, BLOB_DIGEST)
        body, data = await read_blob(upstream)
    assert (manifest.body, manifest.media_type) == (MANIFEST, OCI_MANIFEST)
    assert manifest.upstream_digest == digest_of(MANIFEST)
    assert (head.digest, head.media_type, head.size) == (
        digest_of(MANIFEST),
        OCI_MANIFEST,
        len(MANIFEST),
    )
    assert size == len(BLOB)
    assert (body.total_size, body.offset, data) == (len(BLOB), 0, BLOB)
    assert fake.tokens_issued == 0
    requests = fake.requests
    assert [(r.method, r.url.path) for r in requests] == [
        ("GET", f"/v2/{REPO}/manifests/1"),
        ("HEAD", f"/v2/{REPO}/manifests/1"),
        ("HEAD", f"/v2/{REPO}/blobs/{BLOB_DIGEST}"),
        ("GET", f"/v2/{REPO}/blobs/{BLOB_DIGEST}"),
    ]
    assert all(r.headers["User-Agent"] == USER_AGENT for r in requests)
    assert all("Authorization" not in r.headers for r in requests)
    assert requests[0].headers["Accept"] == ACCEPT
    assert requests[1].headers["Accept"] == ACCEPT
    # Blob bytes must hash to the digest: no content coding, no Range from 0.
    assert requests[3].headers["Accept-Encoding"] == "identity"
    assert "Range" not in requests[3].headers


async def test_media_type_parameters_are_dropped() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, content=MANIFEST, headers={"Content-Type": f"{OCI_MANIFEST}; charset=utf-8"}
        )

    async with open_upstream(httpx.MockTransport(handler)) as upstream:
        manifest = await upstream.get_manifest(REPO, "1", ACCEPT)
    assert (manifest.media_type, manifest.upstream_digest) == (OCI_MANIFEST, None)


# -- bearer tokens --------------------------------------------------------------------------------


async def test_bearer_challenge_fetches_a_token_and_retries() -> None:
    fake = stocked(auth="bearer")
    async with open_upstream(fake) as upstream:
        manifest = await upstream.get_manifest(REPO, "1", ACCEPT)
    assert manifest.body == MANIFEST
    assert fake.tokens_issued == 1
    first, token, retry = fake.requests
    assert (first.url.host, "Authorization" in first.headers) == (HOST, False)
    assert token.url.host == "auth.fake.test"
    assert dict(token.url.params) == {"scope": f"repository:{REPO}:pull", "service": "fake"}
    assert "Authorization" not in token.headers  # anonymous token: no credentials configured
    assert (retry.url.path, retry.headers["Authorization"]) == (first.url.path, "Bearer tok-1")


async def test_token_is_cached_per_scope() -> None:
    fake = stocked(auth="bearer")
    fake.add_manifest("other/repo", "1", MANIFEST)
    async with open_upstream(fake) as upstream:
        await upstream.get_manifest(REPO, "1", ACCEPT)
        assert fake.tokens_issued == 1
        before = len(fake.requests)
        # Same scope: every operation goes straight through with the cached token.
        await upstream.head_manifest(REPO, "1", ACCEPT)
        assert await upstream.head_blob(REPO, BLOB_DIGEST) == len(BLOB)
        _, data = await read_blob(upstream)
        assert data == BLOB
        assert fake.tokens_issued == 1
        assert [a for _, _, a in hosts_and_auth(fake)[before:]] == ["Bearer tok-1"] * 3
        # Another repository is another scope: a token of its own.
        await upstream.get_manifest("other/repo", "1", ACCEPT)
        assert fake.tokens_issued == 2
        assert fake.requests[-1].headers["Authorization"] == "Bearer tok-2"
        await upstream.get_manifest(REPO, "1", ACCEPT)
        assert fake.requests[-1].headers["Authorization"] == "Bearer tok-1"
        assert fake.tokens_issued == 2


async def test_token_is_renewed_shortly_before_it_expires(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = stocked(auth="bearer", token_lifetime=30)  # renewed 10 s early: after 20 s
    async with open_upstream(fake) as upstream:
        await upstream.get_manifest(REPO, "1", ACCEPT)
        await trio.sleep(19)
        await upstream.get_manifest(REPO, "1", ACCEPT)
        assert fake.tokens_issued == 1
        await trio.sleep(2)
        await upstream.get_manifest(REPO, "1", ACCEPT)
        assert fake.tokens_issued == 2
        assert fake.requests[-1].headers["Authorization"] == "Bearer tok-2"


async def test_concurrent_requests_on_a_cold_scope_fetch_one_token() -> None:
    fake = stocked(auth="bearer")
    results: list[bytes] = []
    async with open_upstream(fake) as upstream:

        async def one() -> None:
            results.append((await upstream.get_manifest(REPO, "1", ACCEPT)).body)

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(one)
    assert results == [MANIFEST] * 20
    assert fake.tokens_issued == 1


async def test_a_token_the_upstream_rejects_is_replaced() -> None:
    fake = stocked(auth="bearer")
    async with open_upstream(fake) as upstream:
        await upstream.get_manifest(REPO, "1", ACCEPT)
        # The upstream forgets its tokens (restart, key rotation, clock skew on expiry).
        fake._valid_tokens.clear()
        manifest = await upstream.get_manifest(REPO, "1", ACCEPT)
    assert manifest.body == MANIFEST
    assert fake.tokens_issued == 2


async def test_basic_credentials_go_to_the_token_realm_only(with_password: dict[str, Any]) -> None:
    fake = stocked(auth="bearer", credentials=(USERNAME, PASSWORD))
    async with open_upstream(fake, **with_password) as upstream:
        assert (await upstream.get_manifest(REPO, "1", ACCEPT)).body == MANIFEST
        _, data = await read_blob(upstream)
    assert data == BLOB
    assert hosts_and_auth(fake) == [
        ("GET", HOST, None),
        ("GET", "auth.fake.test", basic(USERNAME, PASSWORD)),
        ("GET", HOST, "Bearer tok-1"),
        ("GET", HOST, "Bearer tok-1"),
    ]


@pytest.mark.parametrize("password", [None, "wrong"], ids=["env unset", "wrong password"])
async def test_token_realm_refusing_credentials_is_401(
    monkeypatch: pytest.MonkeyPatch, password: str | None
) -> None:
    if password is None:
        monkeypatch.delenv(PASSWORD_ENV, raising=False)
    else:
        monkeypatch.setenv(PASSWORD_ENV, password)
    fake = stocked(auth="bearer", credentials=(USERNAME, PASSWORD))
    async with open_upstream(fake, username=USERNAME, password_env=PASSWORD_ENV) as upstream:
        with pytest.raises(RegistryError) as error:
            await upstream.get_manifest(REPO, "1", ACCEPT)
    assert (error.value.status, error.value.code) == (401, "UNAUTHORIZED")
    assert fake.tokens_issued == 0


def token_lab(
    token_answer: Callable[[httpx.Request], httpx.Response],
    realm: str = "https://auth.test/token",
) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    """A registry that wants ``Bearer good`` and a realm that answers with ``token_answer``."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == "auth.test":
            return token_answer(request)
        if request.url.host != HOST:
            return httpx.Response(200, text="elsewhere")
        if request.headers.get("Authorization") == "Bearer good":
            return httpx.Response(200, content=MANIFEST, headers={"Content-Type": OCI_MANIFEST})
        challenge = f'Bearer realm="{realm}",service="svc"'
        return httpx.Response(401, headers={"WWW-Authenticate": challenge})

    return httpx.MockTransport(handler), seen


def answer(
    status: int, body: Any = None, **headers: str
) -> Callable[[httpx.Request], httpx.Response]:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return lambda request: httpx.Response(status, content=content, headers=headers)


@pytest.mark.parametrize(
    "token_answer",
    [answer(200, {"token": "good", "expires_in": 300}), answer(200, {"access_token": "good"})],
    ids=["token", "access_token"],
)
async def test_token_answer_forms(token_answer: Callable[[httpx.Request], httpx.Response]) -> None:
    transport, seen = token_lab(token_answer)
    async with open_upstream(transport) as upstream:
        assert (await upstream.get_manifest(REPO, "1", ACCEPT)).body == MANIFEST
    token_request = seen[1]
    # No scope in the challenge: the client asks for its own pull scope.
    assert dict(token_request.url.params) == {"scope": f"repository:{REPO}:pull", "service": "svc"}


async def test_token_without_expires_in_lives_60_seconds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    transport, seen = token_lab(answer(200, {"token": "good"}))

    def token_requests() -> int:
        return sum(r.url.host == "auth.test" for r in seen)

    async with open_upstream(transport) as upstream:
        await upstream.get_manifest(REPO, "1", ACCEPT)
        await trio.sleep(49)  # 60 s minus the 10 s safety margin
        await upstream.get_manifest(REPO, "1", ACCEPT)
        assert token_requests() == 1
        await trio.sleep(2)
        await upstream.get_manifest(REPO, "1", ACCEPT)
        assert token_requests() == 2


@pytest.mark.parametrize(
    ("token_answer", "realm", "status", "code"),
    [
        (answer(200, {}), "https://auth.test/token", 502, "UNAVAILABLE"),
        (answer(200, {"token": ""}), "https://auth.test/token", 502, "UNAVAILABLE"),
        (answer(200, {"token": 5}), "https://auth.test/token", 502, "UNAVAILABLE"),
        (answer(200, ["good"]), "https://auth.test/token", 502, "UNAVAILABLE"),
        (answer(200, b"<html>"), "https://auth.test/token", 502, "UNAVAILABLE"),
        (answer(401, {}), "https://auth.test/token", 401, "UNAUTHORIZED"),
        (answer(403, {}), "https://auth.test/token", 401, "UNAUTHORIZED"),
        (answer(500, {}), "https://auth.test/token", 502, "UNAVAILABLE"),
        (answer(200, {"token": "good"}), "ftp://auth.test/token", 502, "UNAVAILABLE"),
        (answer(200, {"token": "good"}), "/token", 502, "UNAVAILABLE"),
    ],
    ids=[
        "no token",
        "empty token",
        "token not a string",
        "json list",
        "not json",
        "realm 401",
        "realm 403",
        "realm 500",
        "ftp realm",
        "relative realm",
    ],
)
async def test_token_failures(
    token_answer: Callable[[httpx.Request], httpx.Response], realm: str, status: int, code: str
) -> None:
    transport, _ = token_lab(token_answer, realm)
    async with open_upstream(transport) as upstream:
        with pytest.raises(RegistryError) as error:
            await upstream.get_manifest(REPO, "1", ACCEPT)
    assert (error.value.status, error.value.code) == (status, code)


async def test_token_realm_redirect_is_not_followed(with_password: dict[str, Any]) -> None:
    transport, seen = token_lab(answer(302, {}, Location="https://evil.test/collect"))
    async with open_upstream(transport, **with_password) as upstream:
        with pytest.raises(RegistryError) as error:
            await upstream.get_manifest(REPO, "1", ACCEPT)
    assert error.value.status == 502
    assert [r.url.host for r in seen] == [HOST, "auth.test"]


# -- basic auth -----------------------------------------------------------------------------------


async def test_basic_auth_upstream(with_password: dict[str, Any]) -> None:
    fake = stocked(auth="basic", credentials=(USERNAME, PASSWORD))
    async with open_upstream(fake, **with_password) as upstream:
        assert (await upstream.get_manifest(REPO, "1", ACCEPT)).body == MANIFEST
        # Once the upstream asked for basic auth, later requests carry it at once.
        assert await upstream.head_blob(REPO, BLOB_DIGEST) == len(BLOB)
    credentials = basic(USERNAME, PASSWORD)
    assert hosts_and_auth(fake) == [
        ("GET", HOST, None),
        ("GET", HOST, credentials),
        ("HEAD", HOST, credentials),
    ]
    assert fake.tokens_issued == 0


@pytest.mark.parametrize("auth", ["basic", "bearer"])
async def test_auth_required_without_credentials_configured_is_401(auth: str) -> None:
    fake = stocked(auth=auth, credentials=(USERNAME, PASSWORD))
    async with open_upstream(fake) as upstream:
        with pytest.raises(RegistryError) as error:
            await upstream.get_manifest(REPO, "1", ACCEPT)
    assert (error.value.status, error.value.code) == (401, "UNAUTHORIZED")


# -- redirects --------------------------------------------------------------------------------


@pytest.mark.parametrize("auth", [None, "bearer", "basic"])
@pytest.mark.both_readers
async def test_blob_redirects_never_carry_credentials_to_another_host(
    with_password: dict[str, Any], auth: str | None
) -> None:
    fake = stocked(auth=auth, credentials=(USERNAME, PASSWORD), redirect_blobs=True)
    settings = with_password if auth else {}
    async with open_upstream(fake, **settings) as upstream:
        assert await upstream.head_blob(REPO, BLOB_DIGEST) == len(BLOB)
        body, data = await read_blob(upstream)
        _, tail = await read_blob(upstream, offset=1000)
    assert (body.total_size, data, tail) == (len(BLOB), BLOB, BLOB[1000:])
    cdn = [r for r in fake.requests if r.url.host == "cdn.fake.test"]
    assert [r.method for r in cdn] == ["HEAD", "GET", "GET"]
    assert all(str(r.url).startswith(CDN) for r in cdn)
    assert all("Authorization" not in r.headers for r in cdn)
    assert cdn[2].headers["Range"] == "bytes=1000-"  # the Range survives the redirect
    if auth is not None:  # the registry itself did get the credentials
        registry = [r for r in fake.requests if r.url.host == HOST]
        assert "Authorization" in registry[-1].headers


# -- credentials stay secret ------------------------------------------------------------------


async def test_credentials_never_reach_logs_or_errors(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    settings = {"username": USERNAME, "password_env": PASSWORD_ENV}
    errors: list[RegistryError] = []

    async def failing(operation: Awaitable[object]) -> None:
        with pytest.raises(RegistryError) as error:
            await operation
        errors.append(error.value)

    fake = stocked(auth="bearer", credentials=(USERNAME, PASSWORD), redirect_blobs=True)
    async with open_upstream(fake, **settings) as upstream:
        await upstream.get_manifest(REPO, "1", ACCEPT)
        await read_blob(upstream)
        await failing(upstream.get_manifest(REPO, "missing", ACCEPT))
        fake.manifest_faults.append(Fault(status=500))
        await failing(upstream.get_manifest(REPO, "1", ACCEPT))
        fake.faults[BLOB_DIGEST] = [Fault(drop_at=1000)]
        await failing(read_blob(upstream))
        fake.manifest_faults.append(Fault(status=429, headers={"Retry-After": "1"}))
        await failing(upstream.head_manifest(REPO, "1", ACCEPT))
        fake.down = True
        await failing(upstream.head_blob(REPO, BLOB_DIGEST))
    # A rejected password and a basic-auth upstream, logged as warnings.
    basic_fake = stocked(auth="basic", credentials=(USERNAME, PASSWORD))
    async with open_upstream(basic_fake, **settings) as upstream:
        await upstream.get_manifest(REPO, "1", ACCEPT)
    monkeypatch.setenv(PASSWORD_ENV, "wrong-" + PASSWORD)
    refusing = stocked(auth="bearer", credentials=(USERNAME, PASSWORD))
    async with open_upstream(refusing, **settings) as upstream:
        await failing(upstream.get_manifest(REPO, "1", ACCEPT))

    assert len(errors) == 6
    assert caplog.records  # the check below is not vacuous
    secrets = [PASSWORD, basic(USERNAME, PASSWORD).removeprefix("Basic "), "tok-1", "tok-2"]
    exposed = [caplog.text]
    for error in errors:
        exposed += [str(error), repr(error), error.message, error.to_json().decode()]
        exposed += [json.dumps(error.headers), json.dumps(error.detail)]
    for secret in secrets:
        for text in exposed:
            assert secret not in text


# -- error mapping ----------------------------------------------------------------------------


async def op_get_manifest(upstream: Upstream) -> object:
    return await upstream.get_manifest(REPO, "1", ACCEPT)


async def op_head_manifest(upstream: Upstream) -> object:
    return await upstream.head_manifest(REPO, "1", ACCEPT)


async def op_head_blob(upstream: Upstream) -> object:
    return await upstream.head_blob(REPO, BLOB_DIGEST)


async def op_get_blob(upstream: Upstream) -> object:
    return await read_blob(upstream)


Operation = Callable[[Upstream], Awaitable[object]]
OPERATIONS: dict[str, tuple[Operation, str]] = {
    "manifest GET": (op_get_manifest, "MANIFEST_UNKNOWN"),
    "manifest HEAD": (op_head_manifest, "MANIFEST_UNKNOWN"),
    "blob HEAD": (op_head_blob, "BLOB_UNKNOWN"),
    "blob GET": (op_get_blob, "BLOB_UNKNOWN"),
}


@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.both_readers
async def test_not_found_upstream_is_404(operation: str) -> None:
    run, not_found_code = OPERATIONS[operation]
    async with open_upstream(FakeRegistry()) as upstream:
        with pytest.raises(RegistryError) as error:
            await run(upstream)
    assert (error.value.status, error.value.code) == (404, not_found_code)


CHALLENGES = {
    "without challenge": {},
    "bearer without realm": {"WWW-Authenticate": 'Bearer service="x"'},
    "unknown scheme": {"WWW-Authenticate": 'Negotiate realm="x"'},
    "basic, no credentials": {"WWW-Authenticate": 'Basic realm="x"'},
}
STATUS_CASES: list[tuple[str, int, dict[str, str], int, str, dict[str, str]]] = [
    *[(f"401 {k}", 401, v, 401, "UNAUTHORIZED", {}) for k, v in CHALLENGES.items()],
    ("403", 403, {}, 403, "DENIED", {}),
    ("429", 429, {"Retry-After": "7"}, 429, "TOOMANYREQUESTS", {"Retry-After": "7"}),
    ("429 without Retry-After", 429, {}, 429, "TOOMANYREQUESTS", {}),
    ("503", 503, {"Retry-After": "3"}, 503, "UNAVAILABLE", {"Retry-After": "3"}),
    ("503 without Retry-After", 503, {}, 503, "UNAVAILABLE", {}),
    ("500", 500, {}, 502, "UNAVAILABLE", {}),
    ("502", 502, {}, 502, "UNAVAILABLE", {}),
    ("504", 504, {}, 504, "UNAVAILABLE", {}),
]


def always(status: int, headers: dict[str, str]) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    """An upstream that answers every request with ``status`` and an OCI error body."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        body = {"errors": [{"code": "X", "message": "x"}]}
        return httpx.Response(status, json=body, headers=headers)

    return httpx.MockTransport(handler), seen


@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize(
    ("upstream_status", "upstream_headers", "status", "code", "headers"),
    [case[1:] for case in STATUS_CASES],
    ids=[case[0] for case in STATUS_CASES],
)
@pytest.mark.both_readers
async def test_upstream_status_mapping(
    operation: str,
    upstream_status: int,
    upstream_headers: dict[str, str],
    status: int,
    code: str,
    headers: dict[str, str],
) -> None:
    transport, seen = always(upstream_status, upstream_headers)
    async with open_upstream(transport) as upstream:
        with pytest.raises(RegistryError) as error:
            await OPERATIONS[operation][0](upstream)
    assert (error.value.status, error.value.code, error.value.headers) == (status, code, headers)
    assert HOST in error.value.message  # the client learns which upstream failed
    assert len(seen) == 1  # no retry without a usable challenge


def explaining(status: int, code: object, message: object) -> httpx.MockTransport:
    """An upstream answering every request with ``status`` and one OCI error."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json={"errors": [{"code": code, "message": message}]})

    return httpx.MockTransport(handler)


@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize(
    ("upstream_status", "upstream_code", "code_for_head"),
    [
        (404, "NAME_UNKNOWN", None),
        (400, "MANIFEST_INVALID", "UNSUPPORTED"),
        (418, "TEAPOT", "UNKNOWN"),
        (410, "GONE", "NAME_UNKNOWN"),
    ],
)
async def test_an_upstream_4xx_keeps_its_status_code_and_message(
    operation: str, upstream_status: int, upstream_code: str, code_for_head: str | None
) -> None:
    """A registry explains its 4xx in an error body; the client gets that explanation, with
    the same status, instead of a 502 that sends it retrying (HEAD answers carry no body, so
    there the status decides the code)."""
    transport = explaining(upstream_status, upstream_code, "the reason, from upstream")
    async with open_upstream(transport) as upstream:
        with pytest.raises(RegistryError) as error:
            await OPERATIONS[operation][0](upstream)
    head = operation.endswith("HEAD")
    expected_code = (code_for_head or OPERATIONS[operation][1]) if head else upstream_code
    assert (error.value.status, error.value.code) == (upstream_status, expected_code)
    assert HOST in error.value.message
    assert ("the reason, from upstream" in error.value.message) is not head


@pytest.mark.parametrize(
    ("code", "message", "expected_code", "expected_text"),
    [
        ("lower_case", "fine", "MANIFEST_UNKNOWN", "fine"),
        (["NOT", "A", "STRING"], 7, "MANIFEST_UNKNOWN", None),
        ("A" * 65, "x\r\nInjected: header\x00" + "y" * 500, "MANIFEST_UNKNOWN", "x  Injected"),
    ],
)
async def test_what_an_upstream_error_may_put_in_ours_is_bounded(
    code: object, message: object, expected_code: str, expected_text: str | None
) -> None:
    async with open_upstream(explaining(404, code, message)) as upstream:
        with pytest.raises(RegistryError) as error:
            await op_get_manifest(upstream)
    assert error.value.code == expected_code
    assert len(error.value.message) < 300
    assert all(ch.isprintable() for ch in error.value.message)
    if expected_text is not None:
        assert expected_text in error.value.message


@pytest.mark.parametrize("operation", OPERATIONS)
async def test_unreachable_upstream_is_502(operation: str) -> None:
    fake = stocked()
    fake.down = True
    async with open_upstream(fake) as upstream:
        with pytest.raises(RegistryError) as error:
            await OPERATIONS[operation][0](upstream)
    assert (error.value.status, error.value.code) == (502, "UNAVAILABLE")
    assert "cannot connect" in error.value.message


@pytest.mark.parametrize(
    ("exception", "status", "words"),
    [
        (httpx.ConnectTimeout("slow"), 504, "connect timeout"),
        (httpx.ReadTimeout("slow"), 504, "read timeout"),
        (httpx.PoolTimeout("busy"), 504, "read timeout"),
        (httpx.ConnectError("refused"), 502, "cannot connect"),
        (httpx.RemoteProtocolError("garbage"), 502, "RemoteProtocolError"),
    ],
)
@pytest.mark.parametrize("operation", OPERATIONS)
async def test_transport_errors(
    operation: str, exception: httpx.HTTPError, status: int, words: str
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exception

    async with open_upstream(httpx.MockTransport(handler)) as upstream:
        with pytest.raises(RegistryError) as error:
            await OPERATIONS[operation][0](upstream)
    assert error.value.status == status
    assert words in error.value.message


@pytest.mark.both_readers
async def test_connection_drop_mid_blob_is_502() -> None:
    fake = stocked()
    fake.faults[BLOB_DIGEST] = [Fault(drop_at=100_000)]
    received = bytearray()
    async with open_upstream(fake) as upstream:
        with pytest.raises(RegistryError) as error:
            async with upstream.open_blob(REPO, BLOB_DIGEST) as body:
                async for chunk in body.chunks:
                    received += chunk
    assert error.value.status == 502
    assert bytes(received) == BLOB[:100_000]


# -- ranges -----------------------------------------------------------------------------------


@pytest.mark.both_readers
async def test_open_blob_at_an_offset_sends_range_and_reads_206() -> None:
    fake = stocked()
    async with open_upstream(fake) as upstream:
        body, data = await read_blob(upstream, offset=70_000)
    assert (body.offset, body.total_size, data) == (70_000, len(BLOB), BLOB[70_000:])
    assert fake.blob_gets(BLOB_DIGEST)[0].headers["Range"] == "bytes=70000-"


@pytest.mark.both_readers
async def test_open_blob_when_the_upstream_ignores_range() -> None:
    fake = stocked()
    fake.faults[BLOB_DIGEST] = [Fault(ignore_range=True)]
    async with open_upstream(fake) as upstream:
        body, data = await read_blob(upstream, offset=70_000)
    assert (body.offset, body.total_size, data) == (0, len(BLOB), BLOB)


@pytest.mark.parametrize(
    ("content_range", "offset", "total"),
    [
        ("bytes 10-99/100", 10, 100),
        ("bytes 10-99/*", 10, None),
        ("bytes */100", None, None),
        ("bytes 10-99", None, None),
        ("", None, None),
    ],
)
@pytest.mark.both_readers
async def test_206_content_range_parsing(
    content_range: str, offset: int | None, total: int | None
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        headers = {"Content-Range": content_range} if content_range else {}
        return httpx.Response(206, content=streamed(b"x" * 90), headers=headers)

    async with open_upstream(httpx.MockTransport(handler)) as upstream:
        if offset is None:
            with pytest.raises(RegistryError) as error:
                await read_blob(upstream, offset=10)
            assert (error.value.status, error.value.code) == (502, "UNAVAILABLE")
        else:
            body, data = await read_blob(upstream, offset=10)
            assert (body.offset, body.total_size, data) == (offset, total, b"x" * 90)


@pytest.mark.both_readers
async def test_blob_without_content_length_has_unknown_size() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=streamed(b"abc", b"def"))

    async with open_upstream(httpx.MockTransport(handler)) as upstream:
        body, data = await read_blob(upstream)
    assert (body.total_size, body.offset, data) == (None, 0, b"abcdef")


# -- size limits and passthrough ----------------------------------------------------------------


async def test_oversized_manifests_and_listings_are_refused() -> None:
    big = b"x" * (MAX_MANIFEST_BYTES + 1)
    pieces = [big[start : start + (1 << 20)] for start in range(0, len(big), 1 << 20)]

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/declared"):
            return httpx.Response(200, content=big)  # with Content-Length
        return httpx.Response(200, content=streamed(*pieces))  # chunked, no length

    async with open_upstream(httpx.MockTransport(handler)) as upstream:
        operations = [
            upstream.get_manifest(REPO, "declared", ACCEPT),
            upstream.get_manifest(REPO, "streamed", ACCEPT),
            upstream.passthrough(REPO, f"/v2/{REPO}/tags/list", {}),
        ]
        for operation in operations:
            with pytest.raises(RegistryError) as error:
                await operation
            assert error.value.status == 502
            assert "4 MiB" in error.value.message


async def test_passthrough_returns_the_upstream_answer() -> None:
    fake = stocked()
    async with open_upstream(fake) as upstream:
        answer_ = await upstream.passthrough(REPO, f"/v2/{REPO}/tags/list", {"n": "10"})
        missing = await upstream.passthrough("no/such", "/v2/no/such/tags/list", {})
    assert answer_.status == 200
    assert json.loads(answer_.body) == {"name": REPO, "tags": ["1"]}
    assert answer_.headers == {"Content-Type": "application/json"}
    assert fake.requests[0].url.params["n"] == "10"
    # A 404 (and its OCI body) is the upstream's answer to pass on, not a failure.
    assert missing.status == 404
    assert json.loads(missing.body)["errors"][0]["code"] == "NAME_UNKNOWN"


async def test_passthrough_keeps_link_header() -> None:
    link = f'</v2/{REPO}/tags/list?n=1&last=1>; rel="next"'

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"tags": ["1"]}, headers={"Link": link})

    async with open_upstream(httpx.MockTransport(handler)) as upstream:
        answer_ = await upstream.passthrough(REPO, f"/v2/{REPO}/tags/list", {"n": "1"})
    assert answer_.headers == {"Content-Type": "application/json", "Link": link}


async def test_passthrough_sends_its_accept_and_keeps_every_link_line() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["Accept"])
        links = [("Link", '</a>; rel="prev"'), ("Link", '</b>; rel="next"')]
        return httpx.Response(200, json={"manifests": []}, headers=links)

    index = "application/vnd.oci.image.index.v1+json"
    async with open_upstream(httpx.MockTransport(handler)) as upstream:
        answer_ = await upstream.passthrough(REPO, f"/v2/{REPO}/referrers/x", {}, accept=index)
    assert seen == [index]
    assert answer_.headers["Link"] == '</a>; rel="prev", </b>; rel="next"'


@pytest.mark.parametrize(
    ("upstream_status", "status"),
    [(400, 400), (401, 401), (403, 403), (429, 429), (500, 502), (503, 503), (204, 502)],
)
async def test_passthrough_failures_raise(upstream_status: int, status: int) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(upstream_status, json={"errors": []})

    async with open_upstream(httpx.MockTransport(handler)) as upstream:
        with pytest.raises(RegistryError) as error:
            await upstream.passthrough(REPO, f"/v2/{REPO}/tags/list", {})
    assert error.value.status == status


# -- WWW-Authenticate parsing -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
            'scope="repository:library/alpine:pull"',
            Challenge(
                "bearer",
                {
                    "realm": "https://auth.docker.io/token",
                    "service": "registry.docker.io",
                    "scope": "repository:library/alpine:pull",
                },
            ),
        ),
        (
            'bearer Realm="https://a/t", scope="repository:a:pull,push"',
            Challenge("bearer", {"realm": "https://a/t", "scope": "repository:a:pull,push"}),
        ),
        (
            "Bearer realm=https://a/t,service=s",
            Challenge("bearer", {"realm": "https://a/t", "service": "s"}),
        ),
        ('Basic realm="Registry Realm"', Challenge("basic", {"realm": "Registry Realm"})),
        ("Basic", Challenge("basic", {})),
        ("", None),
        ("   ", None),
    ],
)
def test_parse_challenge(header: str, expected: Challenge | None) -> None:
    assert parse_challenge(header) == expected


# -- backing off --------------------------------------------------------------------------------


def test_parse_retry_after_http_date_in_the_future() -> None:
    when = email.utils.formatdate(time.time() + 120, usegmt=True)
    delay = parse_retry_after(when)
    assert delay is not None and 115 <= delay <= 120


@pytest.mark.parametrize(
    ("status", "headers", "pause"),
    [
        (429, {"Retry-After": "7"}, 7),
        (429, {}, 2),  # a rate limit without Retry-After still means "not now"
        (503, {"Retry-After": "4"}, 4),
        (503, {}, 0),  # a plain 503 is a failure, not a request to wait
    ],
)
async def test_the_upstream_is_left_alone_while_it_asked_to_wait(
    autojump_clock: trio.testing.MockClock, status: int, headers: dict[str, str], pause: int
) -> None:
    fake = stocked()
    fake.manifest_faults.append(Fault(status=status, headers=headers))
    async with open_upstream(fake) as upstream:
        with pytest.raises(RegistryError):
            await upstream.get_manifest(REPO, "1", ACCEPT)
        if pause:
            await trio.sleep(pause - 0.5)
            with pytest.raises(RegistryError) as error:
                await upstream.head_blob(REPO, BLOB_DIGEST)
            # Refused here, without a request, telling the client how long to wait.
            assert (error.value.status, error.value.headers) == (429, {"Retry-After": "1"})
            assert len(fake.requests) == 1
            await trio.sleep(0.5)
        assert await upstream.head_blob(REPO, BLOB_DIGEST) == len(BLOB)
    assert len(fake.requests) == 2
