"""Tag answers shared between the nodes of a fleet: the seam, with nothing of Redis in it.

Why: every node resolves a tag with the upstream once per ``tag_ttl``, so a fleet of N nodes
asks N times, and on Docker Hub every manifest GET counts against the pull limit.  When a
:class:`SharedTags` is given to :class:`~streamsync_trio.core.ManifestService`, a node asks
the fleet before the upstream, and tells the fleet what the upstream answered.

What is shared is a hint, never trusted: the manifest service checks a shared body against
its digest, size bound and media type exactly as it checks an upstream answer, and resolves
with the upstream whenever the fleet has nothing usable.  An implementation must not raise
for its own failures (an unreachable coordinator is "nothing shared": the caller goes to the
upstream), and must bound every wait.

``cluster`` implements it with Redis (``cluster/_tags``); the core never imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = ["SharedTag", "SharedTags", "TagKey"]


@dataclass(frozen=True, slots=True)
class TagKey:
    """One tag as one class of clients sees it: ``accept_class`` is ``Accept.record_key``
    ('' for the broad answer), since a registry answers a narrow ``Accept`` with another
    document, and a client must never get one it refuses."""

    upstream: str
    repo: str
    tag: str
    accept_class: str


@dataclass(frozen=True, slots=True)
class SharedTag:
    """What one node resolved a tag to: the digest, its media type and the manifest itself
    (so a node that lacks the manifest does not fetch it either), and for how many more
    seconds the answer is fresh (a node adopting it must not keep it longer than the node
    that fetched it would)."""

    digest: str
    media_type: str
    body: bytes
    fresh_for: float = 0.0


class SharedTags(Protocol):
    async def lookup(self, key: TagKey, *, wait: bool) -> SharedTag | None:
        """The fleet's answer, if one is fresh.  None: resolve it with the upstream.

        With ``wait``, a miss takes the fleet's single-flight for ``key``: either this caller
        gets it (None at once; it then must :meth:`publish` or :meth:`abandon`), or another
        node holds it and the lookup waits a bounded time for that node's answer (None at
        the deadline: resolve it anyway, and publish or abandon as well)."""
        ...

    async def publish(self, key: TagKey, answer: SharedTag, ttl: float) -> None:
        """Share what the upstream answered, fresh for ``ttl`` seconds; ends our
        single-flight for ``key``."""
        ...

    async def abandon(self, key: TagKey) -> None:
        """End our single-flight for ``key`` without an answer (the upstream failed), so
        the nodes waiting for it go to the upstream at once."""
        ...

    async def manifest(self, digest: str) -> bytes | None:
        """A manifest some node shared with a tag it resolved, if it is still there.

        Docker and containerd resolve a tag with a HEAD, then GET the manifest by digest:
        without this every node would GET it from the upstream once.  Never trusted: the
        caller checks it against the digest and has the upstream confirm (a HEAD) that the
        repository holds it."""
        ...

    async def share_manifest(self, digest: str, body: bytes, ttl: float) -> None:
        """Share a manifest this node fetched by digest, for at least ``ttl`` seconds, so the
        fleet's other nodes :meth:`manifest` it instead of fetching it too."""
        ...

    def rejected(self, key: TagKey | str, why: str) -> None:
        """A shared answer (for a tag, or a manifest by its digest) failed the checks an
        upstream answer gets (counted; then the upstream is asked and its answer published
        over it)."""
        ...
