"""Authenticating requests between nodes: HMAC-SHA256 with the shared peer secret.

A peer request is served from this node's cache or in-flight download and never forwarded
again, so whoever could forge one could make a node fetch from its upstream on their behalf
and read what its credentials allow.  The signature covers the method, the request target
(path and query), a timestamp and a nonce; a signature older or newer than ``max_skew``
seconds is refused, so a captured header is useless after a short window.  Pure functions:
the caller supplies the clock, the secret and the nonce source.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

HEADER = "Streamsync-Peer"  # the one request header that carries the whole proof
MAX_SKEW = 30.0  # seconds a peer's clock may differ from ours (NTP keeps it far smaller)
MAX_HEADER = 256  # bytes; a longer header is refused before any parsing
_HEADER_FORMAT = re.compile(r"v1 t=([0-9]{1,12}) n=([0-9a-f]{16,64}) s=([0-9a-f]{64})")


class PeerAuthError(Exception):
    """A peer request failed verification; the message says which check, for the log (the
    client gets a plain 401: the reason would help a forger)."""


@dataclass(frozen=True)
class PeerProof:
    """What a verified header vouched for: the caller may log the nonce or keep it to refuse
    replays within the skew window."""

    timestamp: int
    nonce: str


def signature(secret: bytes, method: str, target: str, timestamp: int, nonce: str) -> str:
    """Hex HMAC-SHA256 over the canonical request.  Fields are joined with newlines, which
    none of them can contain (methods and targets are HTTP tokens, the others digits and
    hex), so two different requests never produce the same signed text."""
    message = f"{method.upper()}\n{target}\n{timestamp}\n{nonce}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def sign(
    secret: bytes, method: str, target: str, now: float, nonce: str | None = None
) -> dict[str, str]:
    """The header a node adds to a request to a peer; ``target`` is the path with its query,
    exactly as it goes on the request line."""
    nonce = secrets.token_hex(16) if nonce is None else nonce
    timestamp = int(now)
    mac = signature(secret, method, target, timestamp, nonce)
    return {HEADER: f"v1 t={timestamp} n={nonce} s={mac}"}


def verify(
    secret: bytes,
    method: str,
    target: str,
    header: str | None,
    now: float,
    max_skew: float = MAX_SKEW,
) -> PeerProof:
    """Check a peer's header against the request it arrived on; raise :class:`PeerAuthError`
    unless the secret, method, target and timestamp all match."""
    if header is None:
        raise PeerAuthError("no peer signature")
    if len(header) > MAX_HEADER:
        raise PeerAuthError("peer signature header too long")
    match = _HEADER_FORMAT.fullmatch(header)
    if match is None:
        raise PeerAuthError("malformed peer signature")
    timestamp, nonce, mac = int(match[1]), match[2], match[3]
    if abs(now - timestamp) > max_skew:
        raise PeerAuthError(f"peer signature timestamp {timestamp} is outside ±{max_skew:g} s")
    expected = signature(secret, method, target, timestamp, nonce)
    if not hmac.compare_digest(expected, mac):
        raise PeerAuthError("peer signature does not match")
    return PeerProof(timestamp=timestamp, nonce=nonce)
