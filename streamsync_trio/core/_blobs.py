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

Small stored blobs (image configs: a few KiB, asked for by every client of a pull) are also
kept in memory for a few seconds (:class:`SmallBlobs`), so the edge can answer them without
a subscriber, a file read or a worker thread (:meth:`BlobService.hot`).  The same three
decisions hold there: only a blob linked to the repository, stored, and checked by this
process (``DownloadRegistry.trusted``) is answered, and it counts as a ``hit``.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
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
from ._trusted import Identity, file_identity

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


@dataclass(slots=True)
class _SmallEntry:
    data: bytes
    identity: Identity
    until: float


class SmallBlobs:
    """Small stored blobs in memory, for ``fresh_for`` seconds after their file was read.

    An entry is used only while the file at the blob's path is still the file read (same
    device, inode and size: one ``stat``) and this process still trusts that file (checked
    on a first serve, ``_trusted``).  A blob evicted, quarantined or replaced is never
    answered from here.  After ``fresh_for`` the next request opens the file again through
    the store, which marks its last use: the clock eviction goes by, which therefore lags a
    hot small blob's use by at most ``fresh_for``.  Bounded by ``max_bytes``; least recently
    used first out.
    """

    LARGEST = 64 * 1024  # a blob larger than this is streamed, never kept here

    def __init__(
        self,
        *,
        max_bytes: int = 16 * 1024 * 1024,
        fresh_for: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_bytes = max_bytes
        self._fresh_for = fresh_for
        self._clock = clock
        self._entries: OrderedDict[Digest, _SmallEntry] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: Digest, identity: Identity) -> bytes | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if entry.identity != identity or self._clock() >= entry.until:
            self.drop(digest)
            return None
        self._entries.move_to_end(digest)
        return entry.data

    def put(self, digest: Digest, data: bytes, identity: Identity) -> None:
        self.drop(digest)
        self._entries[digest] = _SmallEntry(data, identity, self._clock() + self._fresh_for)
        self.bytes += len(data)
        while self.bytes > self._max_bytes:
            self.drop(next(iter(self._entries)))

    def drop(self, digest: Digest) -> None:
        entry = self._entries.pop(digest, None)
        if entry is not None:
            self.bytes -= len(entry.data)


def _read_exactly(fd: int, size: int) -> bytes | None:
    """The ``size`` bytes of the open file, or None when it has fewer (in a worker thread)."""
    data = os.pread(fd, size + 1, 0)
    return data if len(data) == size else None


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
    small: SmallBlobs = field(default_factory=SmallBlobs)

    async def hot(self, upstream: Upstream, repo: str, digest: Digest) -> bytes | None:
        """The whole of a small stored blob, when :meth:`open` would serve it from the store
        with no question asked (linked to ``repo``, stored, trusted); None: ask :meth:`open`.

        From memory when it is there and still the file on disk (one ``stat``); otherwise
        read, as :meth:`open` would, through the store (last use marked, held while read) in
        a worker thread, and kept.  Counts nothing (the caller counts the GET as a hit, as
        :meth:`admit` would)."""
        if not self.store.is_linked(upstream.name, repo, digest):
            return None
        try:
            identity = file_identity(os.stat(self.store.blob_path(digest)))
        except OSError:
            return None
        if identity[2] > SmallBlobs.LARGEST or not self.downloads.trusted.trusts(digest, identity):
            return None
        data = self.small.get(digest, identity)
        if data is not None:
            return data
        fd = self.store.open_blob(digest)
        if fd is None:
            return None
        try:
            if file_identity(os.fstat(fd)) != identity:
                return None  # replaced between the stat and the open: let open() judge
            data = await trio.to_thread.run_sync(_read_exactly, fd, identity[2])
        except OSError:
            return None  # open() meets the same problem and reports it
        finally:
            os.close(fd)
            self.store.release(digest)
        if data is not None:
            self.small.put(digest, data, identity)
        return data

    async def open(
        self,
        upstream: Upstream,
        repo: str,
        digest: Digest,
        *,
        head: bool = False,
        on_source: Callable[[Source], None] = _ignore,
        forwardable: bool = True,
    ) -> BlobRead | BlobHead:
        """The blob ``digest`` of ``repo`` at ``upstream``: a read of it, or for a ``head``
        of a blob not stored, only its size.

        ``on_source`` is told where the bytes come from as soon as that is decided (maybe
        more than once, the last word counts), so that a request failing later is still
        logged with it.  ``forwardable`` is False for a request from another node of a
        cluster (a download it starts never reads from a third node).  Raises
        :class:`RegistryError` (the upstream's 404 or 401, a size refused, a cache that
        cannot be read).
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
        return await self._subscribe(upstream, repo, digest, known, on_source, forwardable)

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
        forwardable: bool = True,
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
            forwardable=forwardable,  # False: a cluster peer asks (see Claim.source)
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
