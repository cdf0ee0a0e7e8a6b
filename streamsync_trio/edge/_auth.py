"""Optional client authentication: HTTP Basic against an htpasswd file of bcrypt hashes.

Only bcrypt entries are accepted: the other htpasswd schemes (apr1 MD5, SHA-1, crypt, plain)
are fast to brute-force, and a proxy holding a team's credentials should not invite that.

bcrypt is slow on purpose (a check costs tens to hundreds of milliseconds), and one
``docker pull`` sends dozens of requests with the same header.  So checks run in a worker
thread, and a header that verified is remembered (by its SHA-256, never in clear) for a short
while.  Failures are never cached, and an unknown user costs a bcrypt check too, so timing
does not tell which user names exist.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
from collections import OrderedDict
from pathlib import Path

import bcrypt
import trio

from .._config import ConfigError
from .._errors import RegistryError

_BCRYPT_PREFIXES = (b"$2a$", b"$2b$", b"$2y$")
_CACHE_SECONDS = 60.0
_CACHE_ENTRIES = 1024


@functools.cache
def _dummy_hash() -> bytes:
    """A valid hash that unknown users are checked against, so they cost the same time."""
    return bcrypt.hashpw(b"no such user", bcrypt.gensalt(rounds=10))


class Htpasswd:
    def __init__(self, users: dict[str, bytes], realm: str) -> None:
        self._users = users
        self.realm = realm
        self._verified: OrderedDict[bytes, tuple[str, float]] = OrderedDict()

    @classmethod
    def load(cls, path: Path, realm: str) -> Htpasswd:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"auth.htpasswd: cannot read {path}: {exc}") from None
        users: dict[str, bytes] = {}
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            user, separator, hashed = line.partition(":")
            if not separator or not user:
                raise ConfigError(f"auth.htpasswd: {path} line {number}: expected user:hash")
            if not hashed.encode().startswith(_BCRYPT_PREFIXES):
                raise ConfigError(
                    f"auth.htpasswd: {path} line {number}: only bcrypt hashes are accepted "
                    "(htpasswd -B)"
                )
            if user in users:
                raise ConfigError(f"auth.htpasswd: {path} line {number}: user {user!r} twice")
            users[user] = hashed.encode()
        if not users:
            raise ConfigError(f"auth.htpasswd: {path} has no users")
        return cls(users, realm)

    def challenge(self) -> RegistryError:
        return RegistryError(
            401,
            "UNAUTHORIZED",
            "authentication required",
            headers={"WWW-Authenticate": f'Basic realm="{self.realm}", charset="UTF-8"'},
        )

    def verified_user(self, authorization: str | None) -> str | None:
        """The user of a header that verified within the last minute, or None (not known:
        :meth:`user_for` decides).  No bcrypt, no thread: for the edge's fast path."""
        if not authorization:
            return None
        key = hashlib.sha256(authorization.encode("utf-8", "surrogateescape")).digest()
        cached = self._verified.get(key)
        if cached is not None and cached[1] > trio.current_time():
            return cached[0]
        return None

    async def user_for(self, authorization: str | None) -> str | None:
        """The authenticated user for an ``Authorization`` header, or None."""
        user = self.verified_user(authorization)
        if user is not None or not authorization:
            return user
        key = hashlib.sha256(authorization.encode("utf-8", "surrogateescape")).digest()
        now = trio.current_time()
        user = await trio.to_thread.run_sync(self._verify, authorization)
        if user is not None:
            self._verified[key] = (user, now + _CACHE_SECONDS)
            self._verified.move_to_end(key)
            while len(self._verified) > _CACHE_ENTRIES:
                self._verified.popitem(last=False)
        return user

    def _verify(self, authorization: str) -> str | None:
        scheme, _, encoded = authorization.strip().partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return None
        user, separator, password = decoded.partition(":")
        if not separator:
            return None
        hashed = self._users.get(user)
        ok = bcrypt.checkpw(password.encode(), hashed or _dummy_hash())
        return user if ok and hashed is not None else None
