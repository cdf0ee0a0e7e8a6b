"""Talking to one upstream registry: auth, timeouts, and honest error mapping.

The rest of the proxy never sees httpx: it gets bytes, sizes and :class:`RegistryError`.  That
keeps the streaming core free of HTTP and lets every upstream fault reach the client as the
status a registry client understands (404 stays 404, a dead upstream is 502, a slow one 504).

Auth follows the registry token protocol: on a 401 with ``WWW-Authenticate: Bearer ...`` we fetch
a token from the realm (anonymously, or with the configured basic credentials), cache it per scope
until shortly before it expires, and retry once.  Credentials are only ever sent to the upstream
host itself and to the realm its challenge names; httpx drops ``Authorization`` on redirects to
another origin (blob GETs are commonly redirected to signed object-storage URLs).
"""

from __future__ import annotations

import base64
import email.utils
import json
import logging
import math
import re
import ssl
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

from .._config import UpstreamConfig
from .._errors import RegistryError, upstream_timeout, upstream_unavailable
from .._threads import run_interruptible
from ._readahead import read_ahead
from ._wire import BLOCKING_BODY, RECEIVE_SIZE, SocketBody, WireTransport, environment_mounts

log = logging.getLogger("streamsync_trio.upstream")

USER_AGENT = "streamsync-trio/0.1"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # the distribution spec's recommended manifest limit
_TOKEN_EXPIRY_MARGIN = 10.0  # renew this many seconds early so a token never dies mid-request
_DEFAULT_TOKEN_LIFETIME = 60.0  # the token spec's default for a missing expires_in
_DEFAULT_RATE_LIMIT_PAUSE = 2.0  # a 429 without Retry-After still means "not now"
_MAX_COOLDOWN = 300.0  # never trust a Retry-After to silence an upstream for longer
# A token response is a small JSON document; Docker Hub's are about 2 KB.  Bigger tokens
# would be re-sent as a header on every request, and most servers refuse headers over 8-16 KB.
MAX_TOKEN_RESPONSE = 64 * 1024
MAX_TOKEN = 16 * 1024
# How long a refusal is remembered, so a wrong password or a denied repository costs the
# upstream one exchange per this many seconds instead of one per client request (lockouts,
# rate limits).  Short, because access can be granted at any moment.
_DENIAL_MEMORY = 15.0
_MAX_REMEMBERED_DENIALS = 1024

# How long one blocking read of ``BlockingBlob.chunks`` waits before it looks again (the
# connection's read timeout still counts every wait since the last byte).
_THREAD_READ_SLICE = 1.0

_CHALLENGE_PARAM_RE = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # lower-case: "bearer" or "basic"
    params: dict[str, str]


def parse_challenge(header: str) -> Challenge | None:
    """Parse a ``WWW-Authenticate`` value such as ``Bearer realm="...",service="..."``."""
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    params = {
        key.lower(): (quoted if quoted is not None and quoted != "" else bare or quoted or "")
        for key, quoted, bare in _CHALLENGE_PARAM_RE.findall(rest)
    }
    return Challenge(scheme.lower(), params)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` (delta-seconds or HTTP-date); None if unusable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class UpstreamStats:
    """What one upstream did for us: plain counters, read by the metrics collector."""

    # outcome: the HTTP status ("200", "404", ...) or what went wrong before one
    # ("connect_error", "timeout", "transport_error", "cooldown", "queue_full")
    requests: dict[str, int] = field(default_factory=dict)
    # time from sending a request to having the response headers, as histogram buckets
    latency_buckets: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    latency_count: int = 0
    latency_sum: float = 0.0
    # requests to the token realm by outcome, and redirect hops followed (a CDN, S3)
    token_requests: dict[str, int] = field(default_factory=dict)
    redirects: int = 0

    def count(self, outcome: str) -> None:
        self.requests[outcome] = self.requests.get(outcome, 0) + 1

    def count_token(self, outcome: str) -> None:
        self.token_requests[outcome] = self.token_requests.get(outcome, 0) + 1

    def observe(self, seconds: float) -> None:
        self.latency_count += 1
        self.latency_sum += seconds
        for index, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.latency_buckets[index] += 1


@dataclass(frozen=True, slots=True)
class Manifest:
    body: bytes
    media_type: str
    upstream_digest: str | None  # what the upstream claimed in Docker-Content-Digest


@dataclass(frozen=True, slots=True)
class ManifestHead:
    digest: str | None
    media_type: str
    size: int | None


@dataclass(slots=True)
class BlobStream:
    """An open upstream blob body starting at ``offset``: ``chunks``, or, when the bytes
    come straight from a socket, ``blocking`` for a worker thread to read (the core's
    ``BlockingBody``; ``chunks`` then reads it too, one thread hop per piece)."""

    total_size: int | None  # size of the whole blob, when the upstream told us
    offset: int  # where the body really starts (0 if the upstream ignored our Range)
    chunks: AsyncIterator[bytes]
    blocking: BlockingBlob | None = None


class BlockingBlob:
    """A :class:`~._wire.SocketBody` whose failures are registry errors, as in ``chunks``."""

    def __init__(self, body: SocketBody, mapped: Callable[[httpx.HTTPError], RegistryError]):
        self._body = body
        self._mapped = mapped

    def readinto(self, buffer: memoryview, timeout: float) -> int | None:
        try:
            return self._body.readinto(buffer, timeout)
        except httpx.HTTPError as exc:
            raise self._mapped(exc) from exc

    def interrupt(self) -> None:
        self._body.interrupt()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as pieces of up to 1 MiB, each read in a worker thread."""
        buffer = memoryview(bytearray(RECEIVE_SIZE))
        while True:
            count = await run_interruptible(
                partial(self.readinto, buffer, _THREAD_READ_SLICE), self.interrupt
            )
            if count == 0:
                return
            if count:
                yield bytes(buffer[:count])


@dataclass(frozen=True, slots=True)
class Passthrough:
    status: int
    body: bytes
    headers: dict[str, str]


class Upstream:
    """A client for one configured upstream registry."""

    def __init__(
        self,
        config: UpstreamConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        blob_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """``transport`` replaces the network for every request (tests); blob bodies go
        through ``blob_transport`` when given, else through the large-buffer
        :class:`WireTransport` when the network is real, else through ``transport``."""
        self.config = config
        self.name = config.name
        # One context for both clients: tokens, manifests and blobs trust the same CAs
        # (``SSL_CERT_FILE``/``SSL_CERT_DIR`` from the environment, as httpx reads them).
        context = httpx.create_ssl_context()
        self._client = _http_client(config, transport, context)
        if blob_transport is None and transport is not None:
            self._blob_client = self._client
        else:
            # Blob bodies are most of the bytes: read them with large buffers (issue 11).
            # Where the environment routes a URL through a proxy, httpx's own proxy
            # transport fetches it instead (the wire transport never tunnels).
            mounts = environment_mounts(context, _limits(config))
            wire = blob_transport or WireTransport(context)
            self._blob_client = _http_client(config, wire, context, mounts)
        self._tokens: dict[str, tuple[str, float]] = {}
        self._basic_required = False
        self._token_locks: dict[str, trio.Lock] = {}
        # A blob download holds its slot for the whole transfer: the cap bounds upstream
        # connections, the queue bounds how many requests may wait for one.  Manifests,
        # tokens and listings have slots of their own, so eight large layers in flight never
        # make a pull wait for its next manifest.
        self._slots = {
            "blob": trio.Semaphore(config.max_concurrent),
            "document": trio.Semaphore(config.max_concurrent),
        }
        self._queued = 0
        self._denied: dict[str, tuple[float, RegistryError]] = {}
        self._origin = _origin(httpx.URL(config.url))
        self._cooldown_until = -math.inf
        self.stats = UpstreamStats()

    async def aclose(self) -> None:
        await self._client.aclose()
        if self._blob_client is not self._client:
            await self._blob_client.aclose()

    # -- public operations -------------------------------------------------------------------

    async def get_manifest(self, repo: str, reference: str, accept: str) -> Manifest:
        request_headers = {"Accept": accept}
        with self._deadline("manifest"):
            return await self._get_manifest(repo, reference, request_headers)

    async def _get_manifest(
        self, repo: str, reference: str, request_headers: dict[str, str]
    ) -> Manifest:
        async with self._open(
            "GET", f"/v2/{repo}/manifests/{reference}", repo, request_headers
        ) as response:
            await self._check(response, "MANIFEST_UNKNOWN", reference)
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > MAX_MANIFEST_BYTES:
                raise upstream_unavailable(self.name, "manifest larger than 4 MiB")
            body = await self._small_body(response, "manifest")
            return Manifest(
                body,
                _media_type(response),
                response.headers.get("Docker-Content-Digest"),
            )

    async def head_manifest(self, repo: str, reference: str, accept: str) -> ManifestHead:
        with self._deadline("manifest HEAD"):
            return await self._head_manifest(repo, reference, accept)

    async def _head_manifest(self, repo: str, reference: str, accept: str) -> ManifestHead:
        async with self._open(
            "HEAD", f"/v2/{repo}/manifests/{reference}", repo, {"Accept": accept}
        ) as response:
            self._raise_for_status(response, "MANIFEST_UNKNOWN", reference)
            length = response.headers.get("Content-Length")
            return ManifestHead(
                response.headers.get("Docker-Content-Digest"),
                _media_type(response),
                int(length) if length and length.isdigit() else None,
            )

    async def head_blob(self, repo: str, digest: str) -> int | None:
        with self._deadline("blob HEAD"):
            async with self._open("HEAD", f"/v2/{repo}/blobs/{digest}", repo, {}) as response:
                self._raise_for_status(response, "BLOB_UNKNOWN", digest)
                length = response.headers.get("Content-Length")
                return int(length) if length and length.isdigit() else None

    @asynccontextmanager
    async def open_blob(self, repo: str, digest: str, offset: int = 0) -> AsyncIterator[BlobStream]:
        """Open the blob body; yields once the upstream's status and headers are in."""
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        async with self._open(
            "GET", f"/v2/{repo}/blobs/{digest}", repo, headers, kind="blob"
        ) as response:
            await self._check(response, "BLOB_UNKNOWN", digest)
            total: int | None = None
            start = 0
            if response.status_code == 206:
                match = re.fullmatch(
                    r"bytes (\d+)-(\d+)/(\d+|\*)", response.headers.get("Content-Range", "")
                )
                if match is None:
                    raise upstream_unavailable(self.name, "206 without a usable Content-Range")
                start = int(match.group(1))
                total = int(match.group(3)) if match.group(3) != "*" else None
            else:
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
            socket_body = response.extensions.get(BLOCKING_BODY)
            if isinstance(socket_body, SocketBody):
                blocking = BlockingBlob(socket_body, self._transport_error)
                yield BlobStream(total, start, blocking.chunks(), blocking)
                return
            # Received ahead by a task of its own: the socket keeps filling while the core
            # hashes and writes the previous pieces in a worker thread.
            async with read_ahead(self._raw_chunks(response)) as chunks:
                yield BlobStream(total, start, chunks)

    async def passthrough(
        self,
        repo: str,
        path: str,
        params: dict[str, str],
        accept: str = "application/json",
    ) -> Passthrough:
        """GET one page of a small JSON listing (tags/list, referrers), unparsed.

        A 200 or a 404 is an answer (``_listings`` parses it, and a 404 may say "no such
        repository" or "no referrers API here", which the client must hear as 404); any
        other status is an error mapped as for every request.  Only the headers the
        listing needs come back: its ``Content-Type`` and its pagination ``Link``.
        """
        with self._deadline("listing page"):
            async with self._open("GET", path, repo, {"Accept": accept}, params) as r:
                if r.status_code not in (200, 404):
                    await self._check(r, "NAME_UNKNOWN", repo)  # raises for any error status
                    raise upstream_unavailable(self.name, f"listing answered {r.status_code}")
                body = await self._small_body(r, "response")
                headers = {"Content-Type": r.headers.get("Content-Type", "application/json")}
                if "Link" in r.headers:
                    headers["Link"] = ", ".join(r.headers.get_list("Link"))
                return Passthrough(r.status_code, body, headers)

    # -- plumbing ----------------------------------------------------------------------------

    async def _small_body(self, response: httpx.Response, what: str) -> bytes:
        """Read a JSON-sized body whole, refusing more than 4 MiB (a hostile upstream could
        otherwise make us buffer anything).

        We ask for identity, but an upstream may compress anyway; then the body is inflated
        here, never more than the limit at a time (httpx would inflate a whole received
        piece at once: 64 KiB of a gzip bomb is 64 MiB), and any other encoding is refused.
        """
        inflate = _bounded_decoder(response.headers.get("Content-Encoding", ""))
        if response.is_stream_consumed:
            # An in-memory response (an httpx mock transport) comes already read and decoded.
            inflate = _bounded_decoder("identity")
        if inflate is None:
            raise upstream_unavailable(self.name, f"{what} in an unsupported Content-Encoding")
        body = bytearray()
        try:
            chunks = _received(response)
            try:
                async for chunk in chunks:
                    body += inflate(chunk, MAX_MANIFEST_BYTES + 1 - len(body))
                    if len(body) > MAX_MANIFEST_BYTES:
                        raise upstream_unavailable(self.name, f"{what} larger than 4 MiB")
            finally:
                # Leaving the loop early (too large) must close httpx's generator now, not
                # whenever the garbage collector gets to it.
                close = getattr(chunks, "aclose", None)
                if close is not None:
                    await close()
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from exc
        except zlib.error:
            raise upstream_unavailable(self.name, f"{what}: corrupt compressed body") from None
        return bytes(body)

    async def _raw_chunks(self, response: httpx.Response) -> AsyncIterator[bytes]:
        # aiter_raw: the bytes exactly as sent, so they hash to the digest.
        try:
            async for chunk in response.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from exc

    @contextmanager
    def _deadline(self, what: str) -> Iterator[None]:
        """Bound a whole small exchange, queueing included: ``read_timeout`` only bounds the
        gap between bytes, so a document dripping one byte at a time would otherwise hold
        its slot, and its client, for ever."""
        timeout = self.config.document_timeout
        with trio.move_on_after(timeout) as deadline:
            yield
        if deadline.cancelled_caught:
            self.stats.count("timeout")
            raise upstream_timeout(self.name, f"{what} took longer than {timeout:g}s")

    @asynccontextmanager
    async def _open(
        self,
        method: str,
        path: str,
        repo: str,
        headers: dict[str, str],
        params: dict[str, str] | None = None,
        *,
        kind: str = "document",
    ) -> AsyncIterator[httpx.Response]:
        """One upstream exchange, within the upstream's concurrency cap and cool-down."""
        self._refuse_while_cooling_down()
        scope = f"repository:{repo}:pull"
        self._refuse_remembered_denial(scope)
        if self._queued >= self.config.max_queue:
            self.stats.count("queue_full")
            raise RegistryError(
                429,
                "TOOMANYREQUESTS",
                f"too many requests queued for upstream {self.name}",
                headers={"Retry-After": "1"},
            )
        slots = self._slots[kind]
        self._queued += 1
        try:
            await slots.acquire()
        finally:
            self._queued -= 1
        try:
            # The upstream may have asked us to back off while we queued.
            self._refuse_while_cooling_down()
            response = await self._send(method, path, scope, headers, params, kind)
            if response.status_code == 401:
                response = await self._answer_challenge(
                    response, method, path, scope, headers, params, kind
                )
            try:
                self._note_backoff_request(response)
                self._remember_denial(scope, response)
                yield response
            finally:
                await response.aclose()
        finally:
            slots.release()

    async def _answer_challenge(
        self,
        response: httpx.Response,
        method: str,
        path: str,
        scope: str,
        headers: dict[str, str],
        params: dict[str, str] | None,
        kind: str,
    ) -> httpx.Response:
        """Authenticate after a 401 and send again, if the 401 came from the upstream itself.

        Credentials go only to the upstream and to the token realm its own challenge names.
        A 401 from a host a redirect led to (a CDN, a bucket) names a realm we have no reason
        to trust: answering it would hand the upstream's password to whoever that host
        chose, so it is an error, sent nowhere.
        """
        try:
            if _origin(response.url) != self._origin:
                host = response.url.host
                raise upstream_unavailable(
                    self.name,
                    f"{host}, where it redirected us, refused access (401); "
                    "no credentials are sent there",
                )
            challenge = parse_challenge(response.headers.get("WWW-Authenticate", ""))
            self._forget_rejected_token(scope, response.request)
            retry = challenge is not None and await self._authenticate(challenge, scope)
        except BaseException:
            await response.aclose()
            raise
        if not retry:
            # Still open: the caller reads the upstream's explanation from its body (a
            # closed streamed response cannot be read, only an in-memory one could).
            return response
        await response.aclose()
        return await self._send(method, path, scope, headers, params, kind)

    def _refuse_remembered_denial(self, scope: str) -> None:
        remembered = self._denied.get(scope)
        if remembered is None:
            return
        until, error = remembered
        if until <= trio.current_time():
            del self._denied[scope]
            return
        self.stats.count("denial_remembered")
        raise RegistryError(error.status, error.code, error.message, headers=error.headers)

    def _remember_denial(self, scope: str, response: httpx.Response) -> None:
        """After authenticating, the upstream still refuses: remember that briefly.  (A
        refusal from a redirect target, such as an expired signed URL, says nothing about
        the repository.)"""
        if response.status_code not in (401, 403) or _origin(response.url) != self._origin:
            return
        status = response.status_code
        error = RegistryError(
            status,
            "UNAUTHORIZED" if status == 401 else "DENIED",
            f"upstream {self.name} refused access ({status}); "
            f"not asked again for {_DENIAL_MEMORY:g}s",
        )
        self._remember(scope, error)

    def _remember(self, key: str, error: RegistryError) -> None:
        now = trio.current_time()
        if len(self._denied) >= _MAX_REMEMBERED_DENIALS:
            self._denied = {k: v for k, v in self._denied.items() if v[0] > now}
            while len(self._denied) >= _MAX_REMEMBERED_DENIALS:
                del self._denied[next(iter(self._denied))]
        self._denied[key] = (now + _DENIAL_MEMORY, error)

    def _refuse_while_cooling_down(self) -> None:
        remaining = self._cooldown_until - trio.current_time()
        if remaining > 0:
            self.stats.count("cooldown")
            raise RegistryError(
                429,
                "TOOMANYREQUESTS",
                f"upstream {self.name} asked us to back off",
                headers={"Retry-After": str(math.ceil(remaining))},
            )

    def _note_backoff_request(self, response: httpx.Response) -> None:
        """After a 429 (or a 503 with Retry-After), send nothing until the upstream's time.

        Every request in the meantime is answered 429 here without touching the upstream,
        so a fleet of clients retrying cannot turn one rate limit into a ban.
        """
        if response.status_code not in (429, 503):
            return
        delay = parse_retry_after(response.headers.get("Retry-After"))
        if delay is None:
            if response.status_code == 503:
                return
            delay = _DEFAULT_RATE_LIMIT_PAUSE
        delay = min(delay, _MAX_COOLDOWN)
        self._cooldown_until = max(self._cooldown_until, trio.current_time() + delay)
        log.warning(
            "upstream %s answered %s: pausing it for %.0fs", self.name, response.status_code, delay
        )

    async def _send(
        self,
        method: str,
        path: str,
        scope: str,
        headers: dict[str, str],
        params: dict[str, str] | None,
        kind: str,
    ) -> httpx.Response:
        headers = dict(headers)
        authorization = self._authorization(scope)
        if authorization:
            headers["Authorization"] = authorization
        client = self._blob_client if kind == "blob" else self._client
        request = client.build_request(method, path, headers=headers, params=params)
        started = trio.current_time()
        try:
            response = await client.send(request, stream=True)
        except httpx.HTTPError as exc:
            error = self._transport_error(exc)
            self.stats.count(
                "timeout"
                if error.status == 504
                else "connect_error"
                if isinstance(exc, httpx.ConnectError)
                else "transport_error"
            )
            raise error from exc
        self.stats.observe(trio.current_time() - started)
        self.stats.count(str(response.status_code))
        self.stats.redirects += len(response.history)
        return response

    def _forget_rejected_token(self, scope: str, request: httpx.Request) -> None:
        """The upstream refused a token we still thought valid (it restarted, rotated keys,
        or its clock runs ahead of ours): drop it, so the retry fetches a new one."""
        cached = self._tokens.get(scope)
        if cached is not None and request.headers.get("Authorization") == f"Bearer {cached[0]}":
            del self._tokens[scope]

    def _authorization(self, scope: str) -> str | None:
        token = self._tokens.get(scope)
        if token is not None and token[1] > trio.current_time():
            return f"Bearer {token[0]}"
        if self._basic_required:
            return self._basic_header()
        return None

    def _basic_header(self) -> str | None:
        password = self.config.password
        if self.config.username is None or password is None:
            return None
        raw = f"{self.config.username}:{password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    async def _authenticate(self, challenge: Challenge, scope: str) -> bool:
        """React to a 401 challenge; True when a retry may now succeed."""
        if challenge.scheme == "basic":
            if self._basic_required or self._basic_header() is None:
                return False
            self._basic_required = True
            return True
        if challenge.scheme != "bearer" or "realm" not in challenge.params:
            return False
        # One token fetch per scope at a time: fifty clients hitting a cold scope together
        # must not become fifty token requests.
        lock = self._token_locks.setdefault(scope, trio.Lock())
        async with lock:
            cached = self._tokens.get(scope)
            if cached is not None and cached[1] > trio.current_time():
                return True
            token, lifetime = await self._fetch_token(challenge, scope)
        self._tokens[scope] = (token, trio.current_time() + max(lifetime - _TOKEN_EXPIRY_MARGIN, 1))
        return True

    async def _fetch_token(self, challenge: Challenge, scope: str) -> tuple[str, float]:
        realm = challenge.params["realm"]
        if urlsplit(realm).scheme not in ("http", "https"):
            raise upstream_unavailable(self.name, "token realm is not an http(s) URL")
        # A realm that refused our credentials refuses them for every scope: one key for all.
        failure_key = f"token:{realm}" if self._basic_header() is not None else f"token:{scope}"
        self._refuse_remembered_denial(failure_key)
        params = {"scope": challenge.params.get("scope") or scope}
        if "service" in challenge.params:
            params["service"] = challenge.params["service"]
        headers = {}
        basic = self._basic_header()
        if basic is not None:
            headers["Authorization"] = basic
        with self._deadline("token request"):
            status, body, response = await self._token_exchange(realm, params, headers)
        host = httpx.URL(realm).host
        self.stats.count_token(str(status))
        if status != 200:
            raise self._token_failure(status, response, host, failure_key)
        try:
            data: Any = json.loads(body)
            token = data.get("token") or data.get("access_token")
            lifetime = float(data.get("expires_in") or _DEFAULT_TOKEN_LIFETIME)
        except (ValueError, AttributeError, TypeError):
            token, lifetime = None, 0.0
        if not isinstance(token, str) or not token:
            raise upstream_unavailable(self.name, f"token server {host} returned no token")
        if len(token) > MAX_TOKEN or not token.isascii() or not token.isprintable():
            raise upstream_unavailable(self.name, f"token server {host} returned an unusable token")
        if not math.isfinite(lifetime) or lifetime <= 0:
            lifetime = _DEFAULT_TOKEN_LIFETIME
        return token, lifetime

    async def _token_exchange(
        self, realm: str, params: dict[str, str], headers: dict[str, str]
    ) -> tuple[int, bytes, httpx.Response]:
        """GET the realm, reading at most ``MAX_TOKEN_RESPONSE`` bytes of its answer."""
        try:
            # No redirects: a redirected realm must not carry our credentials elsewhere.
            request = self._client.build_request("GET", realm, params=params, headers=headers)
            response = await self._client.send(request, stream=True, follow_redirects=False)
            try:
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_TOKEN_RESPONSE:
                        host = httpx.URL(realm).host
                        raise upstream_unavailable(
                            self.name,
                            f"token server {host} sent more than {MAX_TOKEN_RESPONSE} bytes",
                        )
            finally:
                await response.aclose()
        except httpx.HTTPError as exc:
            self.stats.count_token("transport_error")
            raise self._transport_error(exc) from exc
        return response.status_code, bytes(body), response

    def _token_failure(
        self, status: int, response: httpx.Response, host: str, failure_key: str
    ) -> RegistryError:
        """The token server's refusal or throttling, passed on the way the registry's would be."""
        log.warning("upstream %s: token server %s answered %s", self.name, host, status)
        if status in (429, 503):
            # Throttled: honour it like the registry's own 429 (cool-down and Retry-After),
            # so a fleet of clients cannot turn one rate limit into many token requests.
            self._note_backoff_request(response)
            wait = parse_retry_after(response.headers.get("Retry-After"))
            extra = {"Retry-After": str(math.ceil(wait))} if wait is not None else {}
            return RegistryError(
                status,
                "TOOMANYREQUESTS" if status == 429 else "UNAVAILABLE",
                f"upstream {self.name}: token server {host} answered {status}",
                headers=extra,
            )
        if status in (401, 403):
            error = RegistryError(
                401,
                "UNAUTHORIZED",
                f"upstream {self.name}: token server {host} refused the request ({status}); "
                f"not asked again for {_DENIAL_MEMORY:g}s",
            )
            self._remember(failure_key, error)
            return error
        return upstream_unavailable(
            self.name, f"token server {host} answered {status} to a token request"
        )

    async def _check(self, response: httpx.Response, not_found_code: str, what: str) -> None:
        """``_raise_for_status``, with the upstream's own error code and message when it sent
        one: a registry explains its 4xx in an OCI error body, and that explanation is what a
        client (and its operator) needs, not our paraphrase."""
        if _is_success(response):
            return
        body = b""
        if response.request.method != "HEAD":
            body = await self._error_body(response)
        self._raise_for_status(response, not_found_code, what, body)

    async def _error_body(self, response: httpx.Response) -> bytes:
        """At most ``_MAX_ERROR_BODY`` bytes of an error response; a transport failure while
        reading it only costs the explanation, never the status."""
        body = bytearray()
        try:
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) >= _MAX_ERROR_BODY:
                    break
        except httpx.HTTPError:
            pass
        return bytes(body[:_MAX_ERROR_BODY])

    def _raise_for_status(
        self, response: httpx.Response, not_found_code: str, what: str, body: bytes = b""
    ) -> None:
        if _is_success(response):
            return
        status = response.status_code
        # Passed on as whole seconds, whatever form the upstream used (an HTTP-date too), so
        # clients and the producer's retry both read one format.
        wait = parse_retry_after(response.headers.get("Retry-After"))
        extra = {"Retry-After": str(math.ceil(wait))} if wait is not None else {}
        if _origin(response.url) != self._origin and status >= 400:
            # A redirect target (a CDN, a bucket) refusing or failing is the upstream's
            # problem, not the client's access: 502, naming the host that answered.
            raise upstream_unavailable(
                self.name, f"{response.url.host}, where it redirected us, answered {status}"
            )
        said = upstream_error_detail(body)
        code = said[0] if said is not None else None
        reason = f": {said[1]}" if said is not None and said[1] else ""
        if status == 404:
            raise RegistryError(
                404,
                code or not_found_code,
                f"{what} not found at upstream {self.name}{reason}",
            )
        if status in (401, 403):
            raise RegistryError(
                401 if status == 401 else 403,
                "UNAUTHORIZED" if status == 401 else "DENIED",
                f"upstream {self.name} refused access ({status}){reason}",
            )
        if status == 429:
            raise RegistryError(
                429,
                "TOOMANYREQUESTS",
                f"upstream {self.name} is rate limiting{reason}",
                headers=extra,
            )
        if 400 <= status < 500:
            # The upstream's judgement of the request, passed on as it was made: a 400
            # MANIFEST_INVALID stays a 400, so a client is not sent retrying a 502.
            raise RegistryError(
                status,
                code or _CODE_FOR_STATUS.get(status, "UNKNOWN"),
                f"upstream {self.name} answered {status}{reason}",
            )
        if status == 503:
            raise RegistryError(
                503,
                "UNAVAILABLE",
                f"upstream {self.name} is unavailable (503){reason}",
                headers=extra,
            )
        if status == 504:
            raise upstream_timeout(self.name, "gateway timeout (504)")
        raise upstream_unavailable(self.name, f"unexpected status {status}{reason}")

    def _transport_error(self, exc: httpx.HTTPError) -> RegistryError:
        # Name the host that failed when it is not the registry (its CDN, its token server):
        # the operator must not go looking for a fault in the wrong place.  Only the host:
        # a redirect target's URL is signed, and its query works as a credential.
        where = ""
        try:
            host = exc.request.url.host
        except RuntimeError:  # an error raised before any request existed
            host = ""
        if host and _origin(exc.request.url) != self._origin:
            where = f" at {host}"
        if isinstance(exc, httpx.TimeoutException):
            kind = "connect" if isinstance(exc, httpx.ConnectTimeout) else "read"
            return upstream_timeout(self.name, f"{kind} timeout{where}")
        if isinstance(exc, httpx.ConnectError):
            return upstream_unavailable(self.name, f"cannot connect{where}")
        return upstream_unavailable(self.name, f"{type(exc).__name__}{where}: {_redacted(exc)}")


_MAX_ERROR_BODY = 16 * 1024  # an OCI error document is a few hundred bytes
_MAX_ERROR_MESSAGE = 200
_ERROR_CODE_RE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
_CODE_FOR_STATUS = {
    400: "UNSUPPORTED",
    405: "UNSUPPORTED",
    406: "UNSUPPORTED",
    410: "NAME_UNKNOWN",
    413: "SIZE_INVALID",
    416: "UNSUPPORTED",
}


def _limits(config: UpstreamConfig) -> httpx.Limits:
    # Every in-flight blob holds a connection for its whole transfer; documents and tokens
    # have slots of their own beside them.
    return httpx.Limits(max_connections=2 * config.max_concurrent + 4, max_keepalive_connections=16)


def _http_client(
    config: UpstreamConfig,
    transport: httpx.AsyncBaseTransport | None,
    context: ssl.SSLContext,
    mounts: dict[str, httpx.AsyncBaseTransport | None] | None = None,
) -> httpx.AsyncClient:
    timeout = httpx.Timeout(
        connect=config.connect_timeout,
        read=config.read_timeout,
        write=config.read_timeout,
        pool=config.connect_timeout,
    )
    return httpx.AsyncClient(
        base_url=config.url,
        timeout=timeout,
        follow_redirects=True,
        limits=_limits(config),
        # Compression gains a proxy nothing (blobs are compressed already, manifests are
        # small) and a compressed body can expand a thousandfold: ask for identity.
        headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
        transport=transport,
        mounts=mounts,
        verify=context,
        http2=False,
    )


def _received(response: httpx.Response) -> AsyncIterator[bytes]:
    if response.is_stream_consumed:
        return _one(response.content)
    return response.aiter_raw()


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


def _bounded_decoder(encoding: str) -> Callable[[bytes, int], bytes] | None:
    """A function inflating one received piece into at most ``limit`` bytes, or None."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return lambda data, limit: data
    if encoding not in ("gzip", "x-gzip", "deflate"):
        return None
    # wbits: 16+ for a gzip wrapper, 32+ for zlib-or-gzip (what servers send as "deflate")
    inflater = zlib.decompressobj(
        16 + zlib.MAX_WBITS if "gzip" in encoding else 32 + zlib.MAX_WBITS
    )

    def inflate(data: bytes, limit: int) -> bytes:
        # max_length bounds the output; the input it did not consume means the result is
        # over the limit already, which the caller refuses.
        return inflater.decompress(data, max(1, limit))

    return inflate


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    port = url.port or {"http": 80, "https": 443}.get(url.scheme)
    return (url.scheme, url.host, port)


def _redacted(exc: httpx.HTTPError) -> str:
    """An httpx error's text without URL queries (signed redirect URLs carry credentials)."""
    return re.sub(r"(https?://[^\s'\"?]*)\?[^\s'\"]*", r"\1?<redacted>", str(exc))


def _is_success(response: httpx.Response) -> bool:
    status = response.status_code
    return status in (200, 206) or (status < 300 and response.request.method == "HEAD")


def upstream_error_detail(body: bytes) -> tuple[str | None, str] | None:
    """The first (code, message) of an OCI error document, made safe to repeat.

    The code is kept only when it looks like one (upper-case identifier), and the message is
    cut to one short line of printable text: both end up in our own JSON and in logs, and an
    upstream must not be able to put anything else there.
    """
    try:
        document = json.loads(body)
        first = document["errors"][0]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    if not isinstance(first, dict):
        return None
    code = first.get("code")
    message = first.get("message")
    safe_code = code if isinstance(code, str) and _ERROR_CODE_RE.fullmatch(code) else None
    text = message if isinstance(message, str) else ""
    text = "".join(ch if ch.isprintable() else " " for ch in text)[:_MAX_ERROR_MESSAGE].strip()
    if safe_code is None and not text:
        return None
    return safe_code, text


def _media_type(response: httpx.Response) -> str:
    content_type: str = response.headers.get("Content-Type", "application/octet-stream")
    return content_type.split(";")[0].strip()
