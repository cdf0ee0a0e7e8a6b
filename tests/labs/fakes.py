"""A programmable fake upstream registry, as an httpx transport.

Every sleep is a ``trio.sleep``, so under the autojump clock a test can script "the upstream
sends 64 KiB every 10 ms, drops the connection at byte k, then answers 503" and run it in no
real time.  Every request is recorded, so tests can assert what the upstream was asked.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio
import trio.lowlevel

from streamsync_trio import Config, UpstreamConfig

REALM = "https://auth.fake.test/token"
CDN = "https://cdn.fake.test"


@dataclass
class Fault:
    """What one upstream answer to a blob GET does wrong (consumed in order, one per request)."""

    status: int | None = None  # answer this status with an OCI error body instead of the blob
    headers: dict[str, str] = field(default_factory=dict)
    drop_at: int | None = None  # raise a connection error after this many body bytes
    stall_at: int | None = None  # stop sending forever after this many body bytes
    corrupt_at: int | None = None  # flip the byte at this blob offset
    ignore_range: bool = False  # answer 200 from byte 0 even when a Range was asked
    short_by: int = 0  # end the body cleanly this many bytes early (lying Content-Length)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class _Body(httpx.AsyncByteStream):
    def __init__(
        self,
        data: bytes,
        start: int,
        chunk_size: int,
        chunk_delay: float,
        fault: Fault,
        owner: FakeRegistry,
    ) -> None:
        owner.open_bodies += 1
        owner.peak_open_bodies = max(owner.peak_open_bodies, owner.open_bodies)
        self._owner: FakeRegistry | None = owner
        self._data = data
        self._start = start
        self._chunk_size = chunk_size
        self._chunk_delay = chunk_delay
        self._fault = fault

    async def __aiter__(self) -> AsyncIterator[bytes]:
        fault = self._fault
        position = self._start
        end = len(self._data) - fault.short_by
        sent = 0
        while position < end:
            if self._chunk_delay:
                await trio.sleep(self._chunk_delay)
            chunk = self._data[position : min(position + self._chunk_size, end)]
            if fault.corrupt_at is not None and position <= fault.corrupt_at < position + len(
                chunk
            ):
                index = fault.corrupt_at - position
                chunk = chunk[:index] + bytes([chunk[index] ^ 0xFF]) + chunk[index + 1 :]
            for limit, action in ((fault.drop_at, "drop"), (fault.stall_at, "stall")):
                if limit is not None and sent + len(chunk) > limit:
                    chunk = chunk[: limit - sent]
                    if chunk:
                        yield chunk
                    if action == "drop":
                        raise httpx.ReadError("connection reset by fake upstream")
                    await trio.sleep_forever()
            yield chunk
            sent += len(chunk)
            position += len(chunk)

    async def aclose(self) -> None:
        if self._owner is not None:
            self._owner.open_bodies -= 1
            self._owner = None


class FakeRegistry(httpx.AsyncBaseTransport):
    def __init__(
        self,
        *,
        chunk_size: int = 64 * 1024,
        chunk_delay: float = 0.0,
        auth: str | None = None,  # None, "bearer" or "basic"
        credentials: tuple[str, str] | None = None,
        redirect_blobs: bool = False,
        token_lifetime: int = 300,
    ) -> None:
        self.chunk_size = chunk_size
        self.chunk_delay = chunk_delay
        self.auth = auth
        self.credentials = credentials
        self.redirect_blobs = redirect_blobs
        self.token_lifetime = token_lifetime
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[tuple[str, str], tuple[bytes, str]] = {}
        self.tags: dict[str, list[str]] = {}
        self.faults: dict[str, list[Fault]] = {}
        # digest -> the only repositories that may read it (others get 404, as on a real
        # registry where the digest belongs to a private repository)
        self.private: dict[str, set[str]] = {}
        self.manifest_faults: list[Fault] = []
        self.requests: list[httpx.Request] = []
        self.tokens_issued = 0
        self._valid_tokens: set[str] = set()
        self.down = False  # every request fails to connect
        self.open_bodies = 0  # blob bodies being sent right now
        self.peak_open_bodies = 0

    # -- content -----------------------------------------------------------------------------

    def add_blob(self, data: bytes) -> str:
        digest = digest_of(data)
        self.blobs[digest] = data
        return digest

    def add_manifest(
        self,
        repo: str,
        tag: str,
        body: bytes,
        media_type: str = "application/vnd.oci.image.manifest.v1+json",
    ) -> str:
        digest = digest_of(body)
        self.manifests[(repo, tag)] = (body, media_type)
        self.manifests[(repo, digest)] = (body, media_type)
        self.tags.setdefault(repo, []).append(tag)
        return digest

    def blob_gets(self, digest: str) -> list[httpx.Request]:
        return [
            r
            for r in self.requests
            if r.method == "GET" and r.url.path.endswith(f"/blobs/{digest}")
        ]

    def manifest_requests(self, method: str = "GET") -> list[httpx.Request]:
        return [r for r in self.requests if r.method == method and "/manifests/" in r.url.path]

    # -- transport ---------------------------------------------------------------------------

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        await trio.lowlevel.checkpoint()
        if self.down:
            raise httpx.ConnectError("connection refused by fake upstream")
        url = request.url
        if url.host == "auth.fake.test":
            return self._token(request)
        if url.host == "cdn.fake.test":
            digest = url.path.rsplit("/", 1)[-1]
            return self._blob(request, digest)
        if not self._authorized(request):
            return self._challenge(request)
        path = url.path
        if path == "/v2/":
            return httpx.Response(200, json={})
        parts = path.removeprefix("/v2/").split("/")
        if len(parts) >= 3 and parts[-2] == "blobs":
            digest = parts[-1]
            if self.redirect_blobs and digest in self.blobs:
                return httpx.Response(307, headers={"Location": f"{CDN}/blob/{digest}"})
            return self._blob(request, digest)
        if len(parts) >= 3 and parts[-2] == "manifests":
            return self._manifest(request, "/".join(parts[:-2]), parts[-1])
        if len(parts) >= 3 and parts[-2:] == ["tags", "list"]:
            repo = "/".join(parts[:-2])
            if repo not in self.tags:
                return _error(404, "NAME_UNKNOWN")
            return httpx.Response(200, json={"name": repo, "tags": self.tags[repo]})
        return _error(404, "NOT_FOUND")

    def _authorized(self, request: httpx.Request) -> bool:
        header: str = request.headers.get("Authorization", "")
        if self.auth == "bearer":
            return header.removeprefix("Bearer ") in self._valid_tokens
        if self.auth == "basic":
            return header == _basic(self.credentials)
        return True

    def _challenge(self, request: httpx.Request) -> httpx.Response:
        if self.auth == "basic":
            challenge = 'Basic realm="fake"'
        else:
            repo = request.url.path.removeprefix("/v2/").rsplit("/", 2)[0]
            challenge = f'Bearer realm="{REALM}",service="fake",scope="repository:{repo}:pull"'
        return _error(401, "UNAUTHORIZED", {"WWW-Authenticate": challenge})

    def _token(self, request: httpx.Request) -> httpx.Response:
        if self.credentials is not None and request.headers.get("Authorization") != _basic(
            self.credentials
        ):
            return httpx.Response(401, json={"details": "bad credentials"})
        self.tokens_issued += 1
        token = f"tok-{self.tokens_issued}"
        self._valid_tokens.add(token)
        return httpx.Response(200, json={"token": token, "expires_in": self.token_lifetime})

    def _blob(self, request: httpx.Request, digest: str) -> httpx.Response:
        faults = self.faults.get(digest) if request.method == "GET" else None
        fault = faults.pop(0) if faults else Fault()
        if fault.status is not None:
            return _error(fault.status, _code_for(fault.status, "BLOB_UNKNOWN"), fault.headers)
        data = self.blobs.get(digest)
        owners = self.private.get(digest)
        if owners is not None and _repo_of(request.url.path) not in owners:
            data = None  # a private blob asked for under another repository
        if data is None:
            return _error(404, "BLOB_UNKNOWN")
        headers = {"Docker-Content-Digest": digest, "Content-Type": "application/octet-stream"}
        if request.method == "HEAD":
            headers["Content-Length"] = str(len(data))
            return httpx.Response(200, headers=headers)
        start = 0
        status = 200
        range_header = request.headers.get("Range")
        if range_header and not fault.ignore_range:
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        headers["Content-Length"] = str(len(data) - start)
        body = _Body(data, start, self.chunk_size, self.chunk_delay, fault, self)
        return httpx.Response(status, headers=headers, stream=body)

    def _manifest(self, request: httpx.Request, repo: str, reference: str) -> httpx.Response:
        if self.manifest_faults:
            fault = self.manifest_faults.pop(0)
            if fault.status is not None:
                return _error(fault.status, _code_for(fault.status, "BLOB_UNKNOWN"), fault.headers)
        found = self.manifests.get((repo, reference))
        owners = self.private.get(reference)
        if owners is not None and repo not in owners:
            found = None
        if found is None:
            return _error(404, "MANIFEST_UNKNOWN")
        body, media_type = found
        headers = {
            "Content-Type": media_type,
            "Docker-Content-Digest": digest_of(body),
            "Content-Length": str(len(body)),
        }
        if request.method == "HEAD":
            return httpx.Response(200, headers=headers)
        return httpx.Response(200, headers=headers, content=body)


def _repo_of(path: str) -> str:
    return path.removeprefix("/v2/").rsplit("/", 2)[0]


def _basic(credentials: tuple[str, str] | None) -> str:
    if credentials is None:
        return ""
    return "Basic " + base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()


def _code_for(status: int, not_found: str) -> str:
    """The code a registry sends with a status (what the proxy now passes through)."""
    codes = {404: not_found, 401: "UNAUTHORIZED", 403: "DENIED", 429: "TOOMANYREQUESTS"}
    return codes.get(status, "UNAVAILABLE")


def _error(status: int, code: str, headers: dict[str, str] | None = None) -> httpx.Response:
    body = json.dumps({"errors": [{"code": code, "message": code.lower()}]}).encode()
    return httpx.Response(
        status, headers={"Content-Type": "application/json", **(headers or {})}, content=body
    )


UPSTREAM = "registry.fake.test"


def make_config(root: Path, **upstream: object) -> Config:
    """A config with one default upstream at the fake registry."""
    settings: dict[str, object] = {
        "name": UPSTREAM,
        "url": f"https://{UPSTREAM}",
        "default": True,
        "read_timeout": 5.0,
    }
    settings.update(upstream)
    return Config(
        storage_root=root,
        chunk_size=256 * 1024,
        upstreams=(UpstreamConfig(**settings),),  # type: ignore[arg-type]
    )


def image_manifest(config: str, layers: list[str]) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config,
                "size": 2,
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer,
                    "size": 1,
                }
                for layer in layers
            ],
        }
    ).encode()
