"""Which live member is a digest's home: rendezvous (highest-random-weight) hashing.

Every node ranks the members for a digest by a hash of (member, digest) and takes the
highest.  Nodes that agree on the live set agree on the home without talking to each other,
and when one member joins or leaves only the digests it wins or won move, about 1/N of them;
hash-modulo-N would remap most digests on every membership change.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def weight(member: str, digest: str) -> int:
    """A member's score for a digest: 64 bits of BLAKE2b, uniform and stable across
    processes and Python versions (``hash()`` is salted per process, so it cannot be used)."""
    data = member.encode() + b"\0" + digest.encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def ranked(digest: str, members: Iterable[str]) -> list[str]:
    """The members in the order a digest prefers them: the home first, then the node that
    becomes home if the first one dies, and so on.  Ties (a 2^-64 chance) break by name so
    every node still agrees."""
    return sorted(set(members), key=lambda member: (weight(member, digest), member), reverse=True)


def home(digest: str, members: Iterable[str]) -> str | None:
    """The digest's home among ``members``, or None when there are none."""
    best: tuple[int, str] | None = None
    for member in set(members):
        score = (weight(member, digest), member)
        if best is None or score > best:
            best = score
    return None if best is None else best[1]
