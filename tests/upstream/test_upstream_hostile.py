"""An upstream that misbehaves on purpose: nothing it sends is unbounded, nothing leaks.

Each test stands for one finding of the adversarial round (issue 14): huge or endless token
bodies, documents dripping a byte at a time, gzip bombs, a redirect target that asks for
credentials, a throttling token server, a wrong password, a denied repository.  The network is
an ``httpx.MockTransport`` whose handler plays the hostile party and records what it received.
"""

from __future__ import annotations

import base64
import gzip
import json
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from streamsync_trio import RegistryError, UpstreamConfig
from streamsync_trio.upstream._client import MAX_TOKEN_RESPONSE, Upstream

from ..labs.wirelab import upstream_reading

HOST = "registry.fake.test"
REALM = "https://auth.fake.test/token"
CDN = "cdn.fake.test"
REPO = "library/app"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST}).encode()
DIGEST = "sha256:" + "a" * 64
PASSWORD_ENV = "STREAMSYNC_TEST_HOSTILE_PASSWORD"
PASSWORD = "hunter2-but-longer"

Handler = Callable[[httpx.Request], Coroutine[Any, Any, httpx.Response]]


def upstream_over(handler: Handler, **settings: Any) -> AbstractAsyncContextManager[Upstream]:
    config = UpstreamConfig(name=HOST, url=f"https://{HOST}", **settings)
    return upstream_reading(config, httpx.MockTransport(handler))


def challenge() -> httpx.Response:
    header = f'Bearer realm="{REALM}",service="fake",scope="repository:{REPO}:pull"'
    return httpx.Response(401, headers={"WWW-Authenticate": header})


async def endless(piece: bytes, delay: float = 0.0) -> AsyncIterator[bytes]:
    while True:
        if delay:
            await trio.sleep(delay)
        yield piece


async def streamed(data: bytes, piece: int = 65536) -> AsyncIterator[bytes]:
    """A body as the network delivers it (a mock transport would read bytes eagerly)."""
    for start in range(0, len(data), piece):
        yield data[start : start + piece]


# -- tokens ------------------------------------------------------------------------------------


async def test_a_huge_token_body_is_refused_after_a_bounded_read() -> None:
    """Was: a 100 MB token body read whole, cached, and re-sent as a 100 MB header."""
    served = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal served
        async for piece in endless(b"x" * 65536):
            served += len(piece)
            yield piece

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.fake.test":
            return httpx.Response(200, content=body())
        return challenge()

    async with upstream_over(handler) as upstream:
        with pytest.raises(RegistryError) as error:
            await upstream.get_manifest(REPO, "1", OCI_MANIFEST)
    assert error.value.status == 502
    assert "auth.fake.test" in error.value.message
    assert served <= MAX_TOKEN_RESPONSE + 2 * 65536


async def test_a_token_too_long_for_a_header_is_refused() -> None:
    requests: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        if request.url.host == "auth.fake.test":
            return httpx.Response(200, json={"token": "t" * 40_000})
        return challenge()

    async with upstream_over(handler) as upstream:
        with pytest.raises(RegistryError) as error:
            await upstream.get_manifest(REPO, "1", OCI_MANIFEST)
    assert error.value.status == 502
    assert "unusable token" in error.value.message
    assert all(len(r.headers.get("Authorization", "")) < 1000 for r in requests)


@pytest.mark.parametrize("status", [429, 503])
async def test_a_throttling_token_server_is_honoured_like_the_registry(
    status: int, autojump_clock: trio.testing.MockClock
) -> None:
    """Was: 502 without Retry-After, and five client requests made five token requests."""
    token_requests = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal token_requests
        if request.url.host == "auth.fake.test":
            token_requests += 1
            return httpx.Response(status, headers={"Retry-After": "20"})
        return challenge()

    async with upstream_over(handler) as upstream:
        for _ in range(5):
            with pytest.raises(RegistryError) as error:
                await upstream.get_manifest(REPO, "1", OCI_MANIFEST)
            assert error.value.status in (status, 429)
            assert int(error.value.headers["Retry-After"]) > 0
        assert token_requests == 1
        assert upstream.stats.token_requests == {str(status): 1}
        await trio.sleep(21)
        with pytest.raises(RegistryError):
            await upstream.get_manifest(REPO, "1", OCI_MANIFEST)
        assert token_requests == 2


async def test_a_wrong_password_is_not_resent_on_every_request(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    token_requests = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal token_requests
        if request.url.host == "auth.fake.test":
            token_requests += 1
            return httpx.Response(401, json={"details": "incorrect username or password"})
        return challenge()

    async with upstream_over(handler, username="robot", password_env=PASSWORD_ENV) as upstream:
        for repo in (REPO, "library/other", REPO):
            with pytest.raises(RegistryError) as error:
                await upstream.get_manifest(repo, "1", OCI_MANIFEST)
            assert error.value.status == 401
        assert token_requests == 1  # the realm refused these credentials: for every scope
        await trio.sleep(16)
        with pytest.raises(RegistryError):
            await upstream.get_manifest(REPO, "1", OCI_MANIFEST)
        assert token_requests == 2


async def test_a_denied_repository_is_remembered_briefly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.url.host}{request.url.path}")
        if request.url.host == "auth.fake.test":
            return httpx.Response(200, json={"token": "t"})
        if request.headers.get("Authorization") == "Bearer t":
            return httpx.Response(403, json={"errors": [{"code": "DENIED", "message": "no"}]})
        return challenge()

    async with upstream_over(handler) as upstream:
        for _ in range(3):
            with pytest.raises(RegistryError) as error:
                await upstream.get_manifest(REPO, "1", OCI_MANIFEST)
            assert (error.value.status, error.value.code) == (403, "DENIED")
        assert len(seen) == 3  # challenge, token, refusal: once
        await trio.sleep(16)
        with pytest.raises(RegistryError):
            await upstream.get_manifest(REPO, "1", OCI_MANIFEST)
        assert len(seen) == 4  # the token is still valid: one request


# -- slow and endless documents ------------------------------------------------------------------


async def test_a_dripping_manifest_is_cut_at_the_document_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Was: one byte every 2 s (within read_timeout) held the slot for ever."""

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"Content-Type": OCI_MANIFEST}, content=endless(b" ", delay=2.0)
        )

    async with upstream_over(handler, read_timeout=5.0, document_timeout=12.0) as upstream:
        started = trio.current_time()
        with pytest.raises(RegistryError) as error:
            await upstream.get_manifest(REPO, "1", OCI_MANIFEST)
        assert trio.current_time() - started == pytest.approx(12.0, abs=0.5)
    assert error.value.status == 504
    assert "longer than 12s" in error.value.message


async def test_documents_do_not_queue_behind_blob_downloads(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Was: eight big layers in flight held every slot, and manifests waited behind them."""
    blob_started = trio.Event()
    opened = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal opened
        if "/blobs/" in request.url.path:
            opened += 1
            if opened == 2:
                blob_started.set()
            return httpx.Response(
                200, headers={"Content-Length": "1000000"}, content=endless(b"z", delay=1.0)
            )
        return httpx.Response(200, headers={"Content-Type": OCI_MANIFEST}, content=MANIFEST)

    async with upstream_over(handler, max_concurrent=2) as upstream, trio.open_nursery() as nursery:

        async def download() -> None:
            async with upstream.open_blob(REPO, DIGEST) as stream:
                async for _ in stream.chunks:
                    pass

        nursery.start_soon(download)
        nursery.start_soon(download)
        await blob_started.wait()
        with trio.fail_after(1):
            manifest = await upstream.get_manifest(REPO, "1", OCI_MANIFEST)
        assert manifest.body == MANIFEST
        nursery.cancel_scope.cancel()


# -- compression ---------------------------------------------------------------------------------


async def test_identity_is_asked_and_a_gzip_bomb_is_refused_without_inflating_it() -> None:
    bomb = gzip.compress(b"\0" * (256 * 1024 * 1024), compresslevel=9)  # 256 MiB in ~250 KiB
    requests: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        headers = {"Content-Type": OCI_MANIFEST, "Content-Encoding": "gzip"}
        return httpx.Response(200, headers=headers, content=streamed(bomb))

    async with upstream_over(handler) as upstream:
        with pytest.raises(RegistryError) as error:
            await upstream.get_manifest(REPO, "1", OCI_MANIFEST)
    assert requests[0].headers["Accept-Encoding"] == "identity"
    assert error.value.status == 502
    assert "larger than 4 MiB" in error.value.message


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_compressed_manifest_within_bounds_is_read(encoding: str) -> None:
    import zlib

    packed = gzip.compress(MANIFEST) if encoding == "gzip" else zlib.compress(MANIFEST)

    async def handler(request: httpx.Request) -> httpx.Response:
        headers = {"Content-Type": OCI_MANIFEST, "Content-Encoding": encoding}
        return httpx.Response(200, headers=headers, content=streamed(packed))

    async with upstream_over(handler) as upstream:
        assert (await upstream.get_manifest(REPO, "1", OCI_MANIFEST)).body == MANIFEST


async def test_an_unknown_content_encoding_is_refused() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        headers = {"Content-Type": OCI_MANIFEST, "Content-Encoding": "br"}
        return httpx.Response(200, headers=headers, content=streamed(b"\x1b\x00"))

    async with upstream_over(handler) as upstream:
        with pytest.raises(RegistryError) as error:
            await upstream.get_manifest(REPO, "1", OCI_MANIFEST)
    assert "Content-Encoding" in error.value.message


# -- redirects -----------------------------------------------------------------------------------


@pytest.mark.both_readers
async def test_credentials_never_answer_a_challenge_from_a_redirect_target(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Was: the CDN's 401 named a realm, and the upstream's Basic credentials went there."""
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    received: list[tuple[str, str]] = []
    secret = base64.b64encode(f"robot:{PASSWORD}".encode()).decode()

    async def handler(request: httpx.Request) -> httpx.Response:
        received.append((request.url.host, request.headers.get("Authorization", "")))
        if request.url.host == HOST:
            if request.headers.get("Authorization") != f"Basic {secret}":
                return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'})
            location = f"https://{CDN}/bucket/blob?X-Signature=topsecret"
            return httpx.Response(307, headers={"Location": location})
        if request.url.host == CDN:
            header = 'Bearer realm="https://evil.fake.test/token",service="x"'
            return httpx.Response(401, headers={"WWW-Authenticate": header})
        return httpx.Response(200, json={"token": "stolen"})

    async with upstream_over(handler, username="robot", password_env=PASSWORD_ENV) as upstream:
        with pytest.raises(RegistryError) as error:
            async with upstream.open_blob(REPO, DIGEST):
                pass
    assert error.value.status == 502
    assert CDN in error.value.message
    assert "topsecret" not in error.value.message
    assert "evil.fake.test" not in {host for host, _ in received}
    assert all(header == "" for host, header in received if host != HOST)
    assert upstream.stats.redirects >= 1


async def test_a_failing_cdn_is_named_and_its_signed_url_is_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == HOST:
            location = f"https://{CDN}/bucket/blob?X-Amz-Signature=topsecret"
            return httpx.Response(307, headers={"Location": location})
        raise httpx.ConnectError("connection refused", request=request)

    with caplog.at_level(logging.DEBUG):
        async with upstream_over(handler) as upstream:
            with pytest.raises(RegistryError) as error:
                async with upstream.open_blob(REPO, DIGEST):
                    pass
    assert CDN in error.value.message
    assert "topsecret" not in error.value.message
    assert "topsecret" not in caplog.text


def test_log_lines_never_carry_a_signed_urls_query() -> None:
    from streamsync_trio._logging import RedactURLQueries

    record = logging.LogRecord(
        "httpx",
        logging.INFO,
        __file__,
        1,
        'HTTP Request: %s %s "%s"',
        ("GET", f"https://{CDN}/b/blob?X-Amz-Signature=topsecret&X-Amz-Credential=k", "302"),
        None,
    )
    assert RedactURLQueries().filter(record)
    message = record.getMessage()
    assert "topsecret" not in message and "X-Amz-Credential" not in message
    assert f"https://{CDN}/b/blob?<redacted>" in message
    relative = logging.LogRecord("a", logging.INFO, __file__, 1, "GET /v2/x?ns=docker.io", (), None)
    RedactURLQueries().filter(relative)
    assert relative.getMessage() == "GET /v2/x?ns=docker.io"  # paths keep their query
