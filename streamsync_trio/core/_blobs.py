"""The blob service: who may read a blob under which repository, from where, and how it counts.

This is the proxy's decorator around the store and the downloads (Distribution's
``proxyblobstore`` plays the same part): the HTTP edge hands it (upstream, repository,
digest) and gets back what to send, with no HTTP in either direction.  Three decisions live
here, and only here:

* Scoping.  Knowing a digest is not access: a blob stored (or in flight, or fetched by
  another worker) for repository X is served under Y only once the upstream confirms it,
  asked as Y.  A confirmed blob is linked to Y, so the question is asked once.
* Where the bytes come from: the store, a download in flight (joined), or a new download.
  Between looking in the store and subscribing there is no checkpoint, so a download
  committing concurrently is seen in one of the two, never in neither.
* Accounting: a blob GET is a ``hit`` (stored), a ``join`` (a download in flight, here or
  in another worker) or a ``miss`` (it started the download).  Counted only once the
  response is really going out (:meth:`BlobService.admit`), so a refused request counts as
  nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import trio

from .._errors import RegistryError, blob_unknown
from .._reference import Digest
from ..upstream import Upstream
from ._downloads import Subscriber
from ._limits import SizeBound
from ._negative import remembering
from ._registry import DownloadRegistry
from ._retry import RetryPolicy
from ._store import Store

log = logging.getLogger("streamsync_trio.blobs")

# Where a response's bytes come from, for the access log: the store, a download in flight,
# or (a HEAD answered from the upstream's own HEAD) the upstream.
Source = Literal["cache", "stream", "upstream"]
Result = Literal["hit", "join", "miss"]


def _ignore(source: Source) -> None:
    pass


@dataclass(frozen=True, slots=True)
class BlobHead:
    """A HEAD answered without reading the blob: its size, from a download in flight or from
    the upstream's HEAD, already checked against the blob's size bound."""

    size: int


@dataclass(slots=True)
class BlobRead:
    """One response's read of a blob: the subscriber that yields its bytes, and what the
    service needs to settle it (:meth:`BlobService.admit`).  The caller closes the
    subscriber if it gives up before the response goes out."""

    subscriber: Subscriber
    source: Source  # "cache" or "stream"
    result: Result
    upstream: str
    repo: str
    digest: Digest
    # Already linked to this repository; otherwise linked on admission, once the upstream's
    # answer (to this repository) is in.
    known: bool


@dataclass
class BlobService:
    """Blob reads for the proxy: scoping, the choice of source, the hit/join/miss counts.

    ``max_blob_size``: the cache-wide bound for a blob no stored manifest describes, used
    when its upstream sets none.
    """

    store: Store
    downloads: DownloadRegistry
    max_blob_size: int | None = None
    requests: dict[Result, int] = field(default_factory=lambda: {"hit": 0, "join": 0, "miss": 0})

    async def open(
        self,
        upstream: Upstream,
        repo: str,
        digest: Digest,
        *,
        head: bool = False,
        on_source: Callable[[Source], None] = _ignore,
    ) -> BlobRead | BlobHead:
        """The blob ``digest`` of ``repo`` at ``upstream``: a read of it, or for a ``head``
        of a blob not stored, only its size.

        ``on_source`` is told where the bytes come from as soon as that is decided (maybe
        more than once, the last word counts), so that a request failing later is still
        logged with it.  Raises :class:`RegistryError` (the upstream's 404 or 401, a size
        refused, a cache that cannot be read).
        """
        known = await self._scope(upstream, repo, digest)
        # From here to the subscription there is no checkpoint (see the module's opening).
        try:
            stored = self.downloads.open_stored(digest)
        except OSError as exc:
            log.error("cannot open cached blob %s: %s", self.store.blob_path(digest), exc)
            raise RegistryError(500, "UNKNOWN", "cache read failed") from None
        on_source("stream")
        if stored is not None:
            on_source("cache")
            return BlobRead(stored, "cache", "hit", upstream.name, repo, digest, known)
        if head:
            return BlobHead(await self._head_size(upstream, repo, digest, on_source))
        return await self._subscribe(upstream, repo, digest, known, on_source)

    async def admit(self, read: BlobRead, *, count: bool) -> None:
        """The response for ``read`` is going out (the upstream answered, the request is
        valid): link the blob to its repository if it was not, and count a GET (``count``)."""
        if not read.known:
            await trio.to_thread.run_sync(self.store.link, read.upstream, read.repo, [read.digest])
            read.known = True
        if count:
            self.requests[read.result] += 1

    def bound(self, upstream: Upstream, repo: str, digest: Digest) -> SizeBound:
        """How large this blob may be: what the repository's stored manifests declare, or else
        the upstream's (or the cache's) ``max_blob_size``.  Synchronous (one small read), so a
        caller between ``open_stored`` and ``subscribe`` stays without a checkpoint."""
        return SizeBound(
            declared=self.store.declared_size(upstream.name, repo, digest),
            maximum=upstream.config.max_blob_size or self.max_blob_size,
        )

    async def _scope(self, upstream: Upstream, repo: str, digest: Digest) -> bool:
        """Whether ``repo`` may read ``digest`` without asking (already linked, or the
        download in flight is its own); when the blob is held for another repository only,
        confirm with the upstream first (raises its 404) and link it."""
        origin = (upstream.name, repo)
        in_flight = self.downloads.get(digest)
        if self.store.is_linked(upstream.name, repo, digest) or (
            in_flight is not None and in_flight.origin == origin
        ):
            return True
        if in_flight is None and self.store.blob_size(digest) is None:
            return False  # nothing held: the download this request starts is the check
        await self._head(upstream, repo, digest)
        await trio.to_thread.run_sync(self.store.link, upstream.name, repo, [digest])
        return True

    async def _head_size(
        self, upstream: Upstream, repo: str, digest: Digest, on_source: Callable[[Source], None]
    ) -> int:
        """The size a HEAD of a blob not stored reports: the download's, else the upstream's;
        refused as a GET would refuse it."""
        download = self.downloads.get(digest)
        size = download.size if download is not None else None
        if size is None:
            on_source("upstream")
            size = await self._head(upstream, repo, digest)
        if size is None:
            raise blob_unknown(str(digest))
        # The length a GET would refuse is not passed on either.
        refusal = self.bound(upstream, repo, digest).refusal(size)
        if refusal is not None:
            raise refusal
        return size

    async def _subscribe(
        self,
        upstream: Upstream,
        repo: str,
        digest: Digest,
        known: bool,
        on_source: Callable[[Source], None],
    ) -> BlobRead:
        """Join the download of ``digest``, or start it as this repository (then the
        upstream's answer is the confirmation)."""
        joining = self.downloads.get(digest) is not None
        subscriber = self.downloads.subscribe(
            digest,
            partial(upstream.open_blob, repo, str(digest)),
            stall_timeout=upstream.config.read_timeout,
            retry=RetryPolicy(max_retries=upstream.config.max_retries),
            origin=(upstream.name, repo),
            group=upstream.name,
            bound=self.bound(upstream, repo, digest),
        )
        download = subscriber.download
        source: Source = "stream"
        if download.verified:
            source = "cache"  # another worker committed it just now
            on_source(source)
        joining = joining or download.followed
        if not known and (download.followed or download.verified):
            # Another worker fetched it, maybe for another repository: knowing a digest is
            # not access, so the upstream confirms it for this one, as above.
            try:
                await self._head(upstream, repo, digest)
            except BaseException:
                subscriber.close()
                raise
        result: Result = "hit" if source == "cache" else "join" if joining else "miss"
        return BlobRead(subscriber, source, result, upstream.name, repo, digest, known)

    async def _head(self, upstream: Upstream, repo: str, digest: Digest) -> int | None:
        """The upstream's HEAD of a blob, unless it said 404 for this repository moments ago
        (to a HEAD or to a download: the downloads' negative cache is shared)."""
        return await remembering(
            self.downloads.not_found,
            ((upstream.name, repo), digest),
            partial(upstream.head_blob, repo, str(digest)),
        )
