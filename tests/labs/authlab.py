"""Auth lab: the parts around a real Distribution that an authenticated pull meets.

* :class:`Signer` makes an RSA key and a self-signed certificate with the ``openssl`` CLI and
  signs RS256 JWTs with it.  Distribution 2.8 (``registry/auth/token/token.go``) takes the
  signing key from the token's ``x5c`` header when that chain verifies up to its
  ``rootcertbundle``; a self-signed certificate that is also the bundle is such a chain.  It
  checks ``iss`` and ``aud`` (a string, the ``service``), ``exp`` and ``nbf`` (60 s leeway) and
  finds the granted actions in ``access``.
* :class:`TokenIssuer` is the ``realm``: it checks Basic credentials, grants what the right
  user asks for, refuses anyone else with 401, can be told to throttle (429 + Retry-After), and
  records every request.
* :class:`Cdn` is where Distribution's ``redirect`` storage middleware sends blob GETs (another
  origin: ``localhost`` rather than ``127.0.0.1``, another port).  Like a CDN in front of S3 it
  first redirects to a signed URL of its own (``?X-Amz-Signature=...``), then serves the bytes
  from the registry's storage directory; it records every request's headers and can be told to
  challenge (401 naming :class:`Recorder`, a third server, as its realm) or to drop connections.

The servers are a few lines of h11 on trio, so a handler decides everything, down to closing
the connection without an answer.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import h11
import trio

MAX_REQUEST_HEAD = 64 * 1024


@dataclass(frozen=True)
class Request:
    method: str
    target: str  # path and query, as received
    headers: dict[str, str]  # names in lower case

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.target).query)


@dataclass(frozen=True)
class Response:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


# A handler's None closes the connection without an answer, as a failing server does.
Handler = Callable[[Request], Awaitable[Response | None]]


async def _next_event(connection: h11.Connection, stream: trio.SocketStream) -> object:
    while True:
        event = connection.next_event()
        if event is not h11.NEED_DATA:
            return event
        connection.receive_data(await stream.receive_some(65536))


async def _serve_connection(handler: Handler, stream: trio.SocketStream) -> None:
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
    async with stream:
        try:
            while True:
                event = await _next_event(connection, stream)
                if not isinstance(event, h11.Request):
                    return
                # Requests to these servers are GETs and HEADs: any body is read and dropped.
                while not isinstance(await _next_event(connection, stream), h11.EndOfMessage):
                    pass
                request = Request(
                    event.method.decode(),
                    event.target.decode(),
                    {name.decode(): value.decode() for name, value in event.headers},
                )
                response = await handler(request)
                if response is None:
                    return
                headers = [*response.headers, ("Content-Length", str(len(response.body)))]
                await stream.send_all(
                    connection.send(h11.Response(status_code=response.status, headers=headers))
                )
                if request.method != "HEAD" and response.body:
                    await stream.send_all(connection.send(h11.Data(data=response.body)))
                await stream.send_all(connection.send(h11.EndOfMessage()))
                if connection.our_state is h11.MUST_CLOSE:
                    return
                connection.start_next_cycle()
        except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            return


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[int]:
    """Serve ``handler`` on a free loopback port (yielded) until the block ends."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, partial(_serve_connection, handler), 0, host="127.0.0.1")
        )
        try:
            yield int(listeners[0].socket.getsockname()[1])
        finally:
            nursery.cancel_scope.cancel()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class Signer:
    key: Path
    certificate: Path  # PEM; Distribution's rootcertbundle

    @classmethod
    def create(cls, directory: Path) -> Signer:
        directory.mkdir(parents=True, exist_ok=True)
        key, certificate = directory / "issuer.key", directory / "issuer.pem"
        subprocess.run(
            [
                *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
                *("-subj", "/CN=authlab token issuer"),
                *("-keyout", str(key), "-out", str(certificate)),
            ],
            check=True,
            capture_output=True,
        )
        return cls(key, certificate)

    def chain(self) -> list[str]:
        """The ``x5c`` header: the certificate's DER, in standard base64 (PEM's body)."""
        lines = self.certificate.read_text().splitlines()
        return ["".join(line for line in lines if not line.startswith("-----"))]

    async def sign(self, claims: dict[str, object]) -> str:
        header = {"typ": "JWT", "alg": "RS256", "x5c": self.chain()}
        signing_input = (
            f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        )
        # RS256 is RSASSA-PKCS1-v1_5 over SHA-256, which is what `openssl dgst -sign` makes.
        result = await trio.run_process(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            stdin=signing_input.encode(),
            capture_stdout=True,
            capture_stderr=True,
        )
        return f"{signing_input}.{_b64url(result.stdout)}"


@dataclass(frozen=True)
class TokenRequest:
    user_agent: str
    scopes: tuple[str, ...]
    authorization: str | None
    status: int


@dataclass
class TokenIssuer:
    """A token realm: Basic credentials in, a JWT for the scopes asked for out."""

    signer: Signer
    username: str
    password: str
    issuer: str = "authlab-issuer"
    service: str = "authlab-registry"
    retry_after: int | None = None  # set: answer every request 429 with this Retry-After
    requests: list[TokenRequest] = field(default_factory=list)
    port: int = 0

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def asked(self, user_agent_prefix: str, scope: str | None = None) -> int:
        """How many token requests came from a client whose User-Agent starts so."""
        return sum(
            1
            for r in self.requests
            if r.user_agent.startswith(user_agent_prefix) and (scope is None or scope in r.scopes)
        )

    def registry_config(self) -> str:
        """The ``auth:`` section making Distribution trust this issuer."""
        return (
            "auth:\n  token:\n"
            f"    realm: {self.realm}\n    service: {self.service}\n"
            f"    issuer: {self.issuer}\n    rootcertbundle: {self.signer.certificate}\n"
        )

    async def handle(self, request: Request) -> Response:
        status, response = await self._answer(request)
        self.requests.append(
            TokenRequest(
                request.headers.get("user-agent", ""),
                tuple(request.query.get("scope", [])),
                request.headers.get("authorization"),
                status,
            )
        )
        return response

    async def _answer(self, request: Request) -> tuple[int, Response]:
        if request.path != "/token":
            return 404, Response(404)
        if self.retry_after is not None:
            return 429, Response(429, [("Retry-After", str(self.retry_after))], b"slow down")
        expected = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        if request.headers.get("authorization") != f"Basic {expected}":
            return 401, Response(
                401, [("WWW-Authenticate", 'Basic realm="authlab"')], b'{"details":"no"}'
            )
        now = int(time.time())
        claims: dict[str, object] = {
            "iss": self.issuer,
            "sub": self.username,
            "aud": self.service,
            "exp": now + 300,
            "nbf": now - 5,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": [_granted(scope) for scope in request.query.get("scope", [])],
        }
        token = await self.signer.sign(claims)
        body = json.dumps({"token": token, "access_token": token, "expires_in": 300})
        return 200, Response(200, [("Content-Type", "application/json")], body.encode())


def _granted(scope: str) -> dict[str, object]:
    """Everything asked for on one ``repository:<name>:<actions>`` scope (the right user)."""
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    return {"type": kind, "name": name, "actions": actions.split(",")}


@dataclass(frozen=True)
class Seen:
    method: str
    target: str
    headers: dict[str, str]


@dataclass
class Recorder:
    """A server that records whatever reaches it and answers 401: the realm a hostile CDN
    names.  Nothing should ever reach it."""

    requests: list[Seen] = field(default_factory=list)
    port: int = 0

    async def handle(self, request: Request) -> Response:
        self.requests.append(Seen(request.method, request.target, request.headers))
        return Response(401)


@dataclass
class Cdn:
    """Blob bytes from the registry's storage directory, behind a signed-URL redirect."""

    storage: Path  # Distribution's filesystem rootdirectory
    evil_realm: str
    mode: str = "serve"  # or "challenge" (401 naming evil_realm), or "drop" (close, no answer)
    signature: str = field(default_factory=lambda: "authlabsig" + secrets.token_hex(16))
    requests: list[Seen] = field(default_factory=list)
    port: int = 0

    @property
    def base_url(self) -> str:
        # "localhost", not "127.0.0.1": another origin, and a host name of its own in errors.
        return f"http://localhost:{self.port}"

    def registry_config(self) -> str:
        """The ``middleware:`` section making Distribution redirect blob GETs here."""
        return (
            "middleware:\n  storage:\n    - name: redirect\n"
            f"      options:\n        baseurl: {self.base_url}\n"
        )

    def with_authorization(self) -> list[Seen]:
        return [seen for seen in self.requests if "authorization" in seen.headers]

    async def handle(self, request: Request) -> Response | None:
        self.requests.append(Seen(request.method, request.target, request.headers))
        if request.query.get("X-Amz-Signature") != [self.signature]:
            signed = (
                f"{self.base_url}{request.path}?X-Amz-Expires=300&X-Amz-Signature={self.signature}"
            )
            return Response(307, [("Location", signed)])
        # The modes act on the signed URL, so the URL a failure concerns carries the secret.
        if self.mode == "drop":
            return None
        if self.mode == "challenge":
            challenge = f'Bearer realm="{self.evil_realm}",service="cdn",scope="blob:read"'
            return Response(401, [("WWW-Authenticate", challenge)])
        path = (self.storage / request.path.lstrip("/")).resolve()
        if not path.is_relative_to(self.storage.resolve()) or not path.is_file():
            return Response(404)
        data = await trio.Path(path).read_bytes()
        return Response(200, [("Content-Type", "application/octet-stream")], data)


def bcrypt_htpasswd(path: Path, username: str, password: str) -> Path:
    """An htpasswd file with one bcrypt entry, as Distribution's ``auth: htpasswd`` reads."""
    import bcrypt

    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    path.write_text(f"{username}:{hashed}\n")
    return path


def htpasswd_config(path: Path) -> str:
    return f"auth:\n  htpasswd:\n    realm: authlab\n    path: {path}\n"


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
