"""End to end with authentication: real Distribution with ``auth: token`` and ``htpasswd``,
its blob GETs redirected to a "CDN" of the tests' own, the proxy as a process.

Distribution's own ``redirect`` storage middleware sends every blob GET to the CDN (another
origin); the CDN redirects once more to a signed URL (``?X-Amz-Signature=...``) and serves
the bytes there.  What each party received is recorded, so the tests can say: credentials
went to the registry and its token realm only, never to the CDN nor to a realm the CDN
names; the signature never reached a log line or an error; failed auth and a throttling
token server cost the upstream one exchange, not one per client request.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import trio

from ..labs.authlab import (
    Cdn,
    Recorder,
    Signer,
    TokenIssuer,
    bcrypt_htpasswd,
    htpasswd_config,
    serving,
)
from ..labs.e2elab import (
    OCI_MANIFEST,
    Image,
    Registry,
    Relay,
    build_image,
    pull,
    registry,
    require_tools,
    skopeo,
    unavailable,
)
from ..labs.proclab import free_port, start, stop, wait_ready, write_config

pytestmark = pytest.mark.e2e
KiB = 1024
REPO = "team/app"
SCOPE = f"repository:{REPO}:pull"
USER, PASSWORD = "puller", "correct horse battery"
PROXY_AGENT = "streamsync-trio"


@dataclass
class Proxy:
    url: str
    log: Path

    async def get(self, path: str, accept: str = OCI_MANIFEST) -> httpx.Response:
        async with httpx.AsyncClient(timeout=30) as client:
            return await client.get(f"{self.url}{path}", headers={"Accept": accept})

    async def metric(self, name: str, **labels: str) -> float:
        """The sum of a counter's samples whose labels include ``labels``."""
        text = (await self.get("/metrics")).text
        total = 0.0
        for match in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.MULTILINE):
            if all(f'{key}="{value}"' in match[1] for key, value in labels.items()):
                total += float(match[2])
        return total


@dataclass
class AuthLab:
    workdir: Path
    registry: Registry
    relay: Relay  # between the proxies and the registry: what the registry was asked
    cdn: Cdn
    evil: Recorder
    issuer: TokenIssuer | None
    monkeypatch: pytest.MonkeyPatch
    logs: list[Path] = field(default_factory=list)

    async def push(self, name: str, layer_sizes: list[int]) -> Image:
        image = await trio.to_thread.run_sync(build_image, self.workdir / name, layer_sizes, name)
        host = self.registry.url.removeprefix("http://")
        await skopeo(
            "copy",
            "--dest-tls-verify=false",
            f"--dest-creds={USER}:{PASSWORD}",
            f"oci:{image.layout}:{image.tag}",
            f"docker://{host}/{REPO}:{image.tag}",
        )
        return image

    @asynccontextmanager
    async def proxy(self, password: str, launcher: str = "hypercorn") -> AsyncIterator[Proxy]:
        """The proxy as a process, logging at debug level, with ``USER`` and ``password``."""
        index = len(self.logs)
        variable = f"AUTHLAB_PASSWORD_{index}"
        self.monkeypatch.setenv(variable, password)
        config = write_config(
            self.workdir / f"proxy{index}.toml",
            self.workdir / f"cache{index}",
            f"http://127.0.0.1:{self.relay.port}",
            username=USER,
            password_env=variable,
        )
        with config.open("a") as toml:
            toml.write('[log]\nlevel = "debug"\n')
        log = self.workdir / f"proxy{index}.log"
        self.logs.append(log)
        port = free_port()
        process = start(self.workdir, port, config, launcher=launcher, output=log)
        try:
            await wait_ready(f"http://127.0.0.1:{port}", process)
            yield Proxy(f"http://127.0.0.1:{port}", log)
        finally:
            stop(process)

    def secret_in_logs(self) -> list[str]:
        """Log lines (of every proxy started) that carry the CDN's signature."""
        return [
            line
            for log in self.logs
            for line in log.read_text(errors="replace").splitlines()
            if self.cdn.signature in line
        ]


@asynccontextmanager
async def auth_lab(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> AsyncIterator[AuthLab]:
    """Distribution with ``auth: token`` (``kind="token"``) or ``htpasswd``, redirecting
    its blobs to the CDN, with a relay in front; the CDN's evil realm is listening too."""
    require_tools()
    if shutil.which("openssl") is None:
        unavailable("openssl not installed (apt-get install openssl)")
    async with AsyncExitStack() as stack:
        evil = Recorder()
        evil.port = await stack.enter_async_context(serving(evil.handle))
        # The CDN reads the blobs from where e2elab.registry() keeps Distribution's storage.
        cdn = Cdn(tmp_path / "registry-data", f"http://127.0.0.1:{evil.port}/token")
        cdn.port = await stack.enter_async_context(serving(cdn.handle))
        issuer: TokenIssuer | None = None
        if kind == "token":
            signer = await trio.to_thread.run_sync(Signer.create, tmp_path / "issuer")
            issuer = TokenIssuer(signer, USER, PASSWORD)
            issuer.port = await stack.enter_async_context(serving(issuer.handle))
            auth = issuer.registry_config()
        else:
            auth = htpasswd_config(bcrypt_htpasswd(tmp_path / "htpasswd", USER, PASSWORD))
        upstream = stack.enter_context(registry(tmp_path, auth + cdn.registry_config()))
        relay = Relay(int(upstream.url.rsplit(":", 1)[1]))
        await stack.enter_async_context(relay.running())
        yield AuthLab(tmp_path, upstream, relay, cdn, evil, issuer, monkeypatch)


def error_message(response: httpx.Response) -> str:
    return str(response.json()["errors"][0]["message"])


@pytest.mark.parametrize("launcher", ["hypercorn", "serve"])
async def test_token_auth_pull_asks_the_issuer_once_and_keeps_credentials_and_signature_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, launcher: str
) -> None:
    async with auth_lab(tmp_path, monkeypatch, "token") as lab:
        assert lab.issuer is not None
        image = await lab.push("v1", [600 * KiB, 300 * KiB])
        async with lab.proxy(PASSWORD, launcher) as proxy:
            blobs = await pull(proxy.url, f"{REPO}:v1", tmp_path / "pulled")
            assert {digest: blobs.get(digest) for digest in image.layers} == image.layers
            assert image.config_digest in blobs
            # Every blob really came by way of the CDN's signed URL...
            signed = [seen for seen in lab.cdn.requests if lab.cdn.signature in seen.target]
            assert {seen.target.split("/")[-2] for seen in signed} >= {
                digest.removeprefix("sha256:") for digest in image.blobs()
            }
            # ...with one token for the one scope, cached for every manifest and blob request.
            proxy_tokens = [r for r in lab.issuer.requests if r.user_agent.startswith(PROXY_AGENT)]
            assert [(r.scopes, r.status) for r in proxy_tokens] == [((SCOPE,), 200)]
            assert lab.cdn.with_authorization() == []
            assert (
                await proxy.metric("streamsync_upstream_token_requests_total", outcome="200") == 1
            )
            # Two hops per blob: registry -> CDN -> its signed URL.
            redirects = await proxy.metric("streamsync_upstream_redirects_total")
            assert redirects >= 2 * len(image.blobs())
    log = proxy.log.read_text(errors="replace")
    assert "localhost" in log  # the debug log did cover the CDN hops...
    assert lab.secret_in_logs() == []  # ...and never showed their signed query


async def test_a_cdn_that_challenges_or_fails_gets_no_credentials_and_its_host_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with auth_lab(tmp_path, monkeypatch, "token") as lab:
        image = await lab.push("v1", [200 * KiB, 200 * KiB])
        challenged, dropped = image.layers
        async with lab.proxy(PASSWORD) as proxy:
            # As in a pull: the manifest first, so the blob requests carry a cached token.
            assert (await proxy.get(f"/v2/{REPO}/manifests/v1")).status_code == 200
            lab.cdn.mode = "challenge"
            response = await proxy.get(f"/v2/{REPO}/blobs/{challenged}")
            assert response.status_code == 502
            assert "localhost" in error_message(response)
            assert lab.cdn.signature not in response.text
            assert lab.evil.requests == []

            lab.cdn.mode = "drop"
            with trio.fail_after(25):
                response = await proxy.get(f"/v2/{REPO}/blobs/{dropped}")
            assert response.status_code in (502, 504)
            assert "localhost" in error_message(response)
            assert lab.cdn.signature not in response.text

            signed = [seen for seen in lab.cdn.requests if lab.cdn.signature in seen.target]
            assert signed  # both modes were met at the signed URL, after two redirects
            assert lab.cdn.with_authorization() == []
    assert lab.secret_in_logs() == []


async def test_htpasswd_pull_and_a_challenging_cdn_never_see_the_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with auth_lab(tmp_path, monkeypatch, "htpasswd") as lab:
        image = await lab.push("v1", [600 * KiB])
        second = await lab.push("v2", [200 * KiB])
        async with lab.proxy(PASSWORD) as proxy:
            blobs = await pull(proxy.url, f"{REPO}:v1", tmp_path / "pulled")
            assert {digest: blobs.get(digest) for digest in image.layers} == image.layers

            lab.cdn.mode = "challenge"
            [layer] = second.layers
            response = await proxy.get(f"/v2/{REPO}/blobs/{layer}")
            assert response.status_code == 502
            assert "localhost" in error_message(response)
            assert lab.cdn.signature not in response.text
            assert lab.evil.requests == []  # the reproduction: Basic credentials here
            assert lab.cdn.with_authorization() == []
    assert lab.secret_in_logs() == []


async def test_htpasswd_wrong_password_is_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with auth_lab(tmp_path, monkeypatch, "htpasswd") as lab, lab.proxy("wrong") as proxy:
        statuses = []
        for _ in range(5):
            response = await proxy.get(f"/v2/{REPO}/manifests/v1")
            statuses.append(response.status_code)
            assert "WWW-Authenticate" in response.headers
        assert statuses == [401] * 5
        # One challenge and one refused Basic attempt; then the refusal is remembered.
        assert lab.relay.count("GET", f"/v2/{REPO}/manifests/v1") <= 2


async def test_token_auth_wrong_password_costs_one_token_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with auth_lab(tmp_path, monkeypatch, "token") as lab:
        assert lab.issuer is not None
        async with lab.proxy("wrong") as proxy:
            with trio.fail_after(10):  # far inside the 15 s the refusal is remembered
                for _ in range(6):
                    response = await proxy.get(f"/v2/{REPO}/manifests/v1")
                    assert response.status_code == 401
                    assert "WWW-Authenticate" in response.headers
            assert [r.status for r in lab.issuer.requests] == [401]
            assert (
                await proxy.metric("streamsync_upstream_token_requests_total", outcome="401") == 1
            )


async def test_a_throttling_token_server_is_honoured_and_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with auth_lab(tmp_path, monkeypatch, "token") as lab:
        assert lab.issuer is not None
        lab.issuer.retry_after = 30
        async with lab.proxy(PASSWORD) as proxy:
            for _ in range(5):
                response = await proxy.get(f"/v2/{REPO}/manifests/v1")
                assert response.status_code == 429
                retry_after = response.headers.get("Retry-After", "")
                assert retry_after.isdigit() and 0 < int(retry_after) <= 30
            assert [r.status for r in lab.issuer.requests] == [429]
            assert (
                await proxy.metric("streamsync_upstream_token_requests_total", outcome="429") == 1
            )
