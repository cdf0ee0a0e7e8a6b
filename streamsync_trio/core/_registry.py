"""The in-flight table: who is fetching which digest, and the life of each entry.

One :class:`~._downloads.Download` per digest while the blob is in flight.  When a request
finds none, the registry asks its :class:`~._owners.Owners` who owns the digest: this
process (then it starts a producer, ``_producer``) or an owner elsewhere (then it follows
that owner, and its subscribers read the owner's bytes).  The registry knows no lease files
and no peers: the lease files of one machine are the default ``Owners`` (``_lease``), and
cluster mode is another implementation of the same interface.

Its contract:

* The producer (or follower) task runs in a nursery that outlives every request (the app's),
  so the client that triggered a download can leave without stopping it.
* Looking up, claiming and joining happen in one scheduling step (no checkpoint), so two
  requests can never both start a producer for one digest, and a request finds either the
  download or the stored blob, never neither.
* Failure (upstream error, retries exhausted, stall, disk error, shutdown) is recorded in the
  download, every subscriber wait is cancelled, the partial is removed and the entry leaves
  the registry, so the next request starts afresh.
* Success fsyncs, renames into the store, and only then drops the registry entry, in the
  same step as it releases the bytes every subscriber held back.  A blob its claim does not
  keep (``Claim.keeps``: cluster shard placement, not this node's digest) is verified the
  same way and then streamed through: the entry goes and the held-back bytes are released in
  one step, and the partial is removed instead of renamed.  Subscribers read by descriptor,
  so the ones that joined finish from the removed file; the next request downloads again.
* A stored blob is served through :class:`~._trusted.StoredBlobs`, which checks it on its
  first serve in this process.
* Only the end of each subscriber's range waits for that step: the last bytes themselves are
  released as soon as the producer has verified the blob (``Download.release``), before the
  fsync, which took 0.46 s of every cold 256 MiB pull (issue 11).  Clients need their bytes
  verified, not the cache durable.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import trio

from .._errors import RegistryError
from .._reference import Digest
from ._downloads import (
    BlobSource,
    Download,
    DownloadStats,
    Subscriber,
    download_event,
    failure_reason,
)
from ._lease import LeaseFiles, mark_passed_through
from ._limits import UNBOUNDED, SizeBound, check_room
from ._limits import disk_free as _disk_free
from ._negative import NegativeCache
from ._owners import Claim, Elsewhere, Owners
from ._producer import Fetch, write_failure
from ._retry import RetryPolicy
from ._trusted import StoredBlobs

if TYPE_CHECKING:
    from ._store import Store

log = logging.getLogger("streamsync_trio.streaming")

# Claiming a digest retries when its owner ends mid-claim; this many times, then 503.
_START_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class _Fetching:
    """How a download this request may start fetches its bytes (see ``subscribe``)."""

    source: BlobSource
    stall_timeout: float
    retry: RetryPolicy
    bound: SizeBound
    forwardable: bool


class DownloadRegistry:
    """Who is downloading which digest, and the producers and followers that do it.

    ``owners`` answers who owns a digest this process has not in flight (default: the lease
    files in ``store``'s directory, shared by the worker processes of one machine).
    """

    def __init__(
        self,
        store: Store,
        nursery: trio.Nursery,
        *,
        chunk_size: int = 1024 * 1024,
        on_commit: Callable[[Download], None] | None = None,
        disk_free: Callable[[], int] | None = None,
        check_stored: bool = True,
        owners: Owners | None = None,
    ) -> None:
        self._store = store
        self._owners: Owners = owners if owners is not None else LeaseFiles(store)
        # Stored blobs, checked on their first serve in this process (see open_stored).
        self._stored = StoredBlobs(store, nursery, enabled=check_stored)
        self.trusted = self._stored.trusted
        self.stored_checks = self._stored.counts
        # Bytes free for us on the cache's file system (a parameter so tests can fill it).
        self._disk_free = disk_free or partial(_disk_free, store.root)
        # Upstream 404s by (origin, digest): a storm of requests for a missing blob costs one
        # upstream request per ``_negative.TTL``.
        self.not_found: NegativeCache[tuple[Hashable, Digest]] = NegativeCache()
        self._on_commit = on_commit
        self._nursery = nursery
        self._chunk_size = chunk_size
        self._downloads: dict[Digest, Download] = {}
        self.stats: dict[str, DownloadStats] = {}  # by group

    def __len__(self) -> int:
        return len(self._downloads)

    def get(self, digest: Digest) -> Download | None:
        return self._downloads.get(digest)

    def in_flight(self) -> list[Download]:
        return list(self._downloads.values())

    def totals(self) -> DownloadStats:
        total = DownloadStats()
        for stats in self.stats.values():
            total.add(stats)
        return total

    def _stats(self, download: Download) -> DownloadStats:
        return self.stats.setdefault(download.group, DownloadStats())

    def open_stored(self, digest: Digest, *, just_committed: bool = False) -> Subscriber | None:
        """A subscriber over the stored blob, or None when it is not stored (see
        :meth:`~._trusted.StoredBlobs.open`: checked on its first serve in this process)."""
        return self._stored.open(digest, just_committed=just_committed)

    def subscribe(
        self,
        digest: Digest,
        source: BlobSource,
        *,
        stall_timeout: float,
        retry: RetryPolicy,
        origin: Hashable = None,
        group: str = "",
        bound: SizeBound = UNBOUNDED,
        forwardable: bool = True,
    ) -> Subscriber:
        """Join the download of ``digest``, starting one (with ``source``) if none is running.

        Synchronous on purpose: looking up, creating and joining happen in one scheduling
        step, so two requests can never both start a producer for one digest.  ``bound``
        applies to a download this call starts.  Raises the upstream's 404 without asking
        it again when it answered so for ``origin`` moments ago.  ``forwardable`` is False
        for a request from another node of a cluster: a download it starts never reads
        from a third node (see ``Claim.source``).
        """
        download = self._downloads.get(digest)
        if download is not None:
            return self._join(download)
        self.not_found.check((origin, digest))
        fetching = _Fetching(source, stall_timeout, retry, bound, forwardable)
        try:
            return self._start(digest, fetching, origin, group)
        except OSError as exc:
            log.error("cannot start the download of %s: %s", digest, exc)
            raise RegistryError(500, "UNKNOWN", "cache write failed") from None

    def _start(
        self, digest: Digest, fetching: _Fetching, origin: Hashable, group: str
    ) -> Subscriber:
        """Own the download, or follow its owner elsewhere (see ``_owners``)."""
        for _ in range(_START_ATTEMPTS):
            answer = self._owners.claim(digest)
            subscriber: Subscriber | None
            if answer is None:
                # The owner elsewhere ended between two steps of the claim: it committed
                # (the blob is in the store now), or it failed (claim again).
                subscriber = self.open_stored(digest, just_committed=True)
            elif isinstance(answer, Elsewhere):
                subscriber = self._follow(digest, answer, origin, group)
            else:
                subscriber = self._own(digest, answer, fetching, origin, group)
            if subscriber is not None:
                return subscriber
        raise RegistryError(
            503, "UNAVAILABLE", "the download kept changing hands", headers={"Retry-After": "1"}
        )

    def _join(self, download: Download) -> Subscriber:
        """A subscriber that counts as a reader of the digest until it closes: after the
        commit it goes on reading the stored blob, which eviction must leave alone."""
        subscriber = Subscriber(download, on_close=partial(self._store.release, download.digest))
        self._store.hold(download.digest)
        return subscriber

    def _drop(self, download: Download) -> None:
        if self._downloads.get(download.digest) is download:
            del self._downloads[download.digest]

    def _finish(self, download: Download, how: str) -> None:
        """The blob is verified and stored: release the last bytes everyone held back.

        Verified, out of the registry, and waiters woken in one step, so a request sees
        either this download or the stored blob."""
        self._drop(download)
        # Verified on its way in: trusted as stored, with no check on its next serve.
        self._stored.trust_committed(download.digest, download.path)
        download.complete()
        if self._on_commit is not None:
            self._on_commit(download)
        log.info(
            "download %s %s",
            download.digest,
            how,
            extra=download_event("download_finish", download),
        )

    def _pass_through(self, download: Download, how: str) -> None:
        """The blob is verified but not kept here: out of the registry and its held-back
        bytes released in one step, like ``_finish``, with nothing stored or trusted.  Its
        subscribers read on from their descriptors after the partial is removed."""
        self._drop(download)
        download.complete()
        log.info(
            "download %s %s",
            download.digest,
            how,
            extra=download_event("download_finish", download, kept=False),
        )

    # -- this process owns the download ----------------------------------------------------

    def _own(
        self, digest: Digest, claim: Claim, fetching: _Fetching, origin: Hashable, group: str
    ) -> Subscriber:
        """Start the download we just claimed; on any error, let go of the claim at once
        (a leaked claim would block this digest in every worker)."""
        try:
            # The caller found nothing stored, but another process may have committed
            # since; its claim is gone then, and we must not fetch the blob again.
            stored = self.open_stored(digest, just_committed=True)
            if stored is not None:
                claim.abandon()
                return stored
            fd = os.open(claim.partial, os.O_WRONLY | os.O_CLOEXEC)
        except BaseException:
            claim.abandon()
            raise
        try:
            download = Download(digest, claim.partial, origin, group, fetching.bound)
            download.on_size = partial(_publish_size, claim, digest)
            fetch = Fetch(
                download,
                fd,
                claim.source(fetching.source, download, forwardable=fetching.forwardable),
                fetching.stall_timeout,
                fetching.retry,
                self._chunk_size,
                self._stats(download),
                self._check_room,
            )
            self._nursery.start_soon(self._produce, fetch, claim)
        except BaseException:
            os.close(fd)
            claim.abandon()
            raise
        # Registered only once its producer exists: an entry without one would hang joiners.
        self._downloads[digest] = download
        self._stats(download).started += 1
        log.info("download %s started", digest, extra=download_event("download_start", download))
        return self._join(download)

    def _check_room(self, download: Download, size: int) -> None:
        """Refuse a blob the cache's disk cannot hold, counting what the other downloads
        this process writes still need (see ``_limits.check_room``)."""
        others = sum(
            d.size - d.available
            for d in self._downloads.values()
            if d is not download and not d.followed and d.size is not None
        )
        check_room(size, download.available, others, self._disk_free())

    async def _produce(self, fetch: Fetch, claim: Claim) -> None:
        """Supervise one download.  Never lets an exception escape into the app nursery."""
        download, fd = fetch.download, fetch.fd
        committed = False
        try:
            await fetch.run()
            # Verified: the clients may have their last bytes now, before the fsync (0.46 s
            # for 256 MiB here, issue 11); their responses end with the commit below.
            download.release()
            if not await claim.keeps(download):
                # Streamed through: marked for followers in other processes (they hold the
                # file open), released here, then removed by ``_let_go`` (not committed).
                mark_passed_through(fd)
                self._pass_through(download, "streamed through (not kept)")
                return
            await trio.to_thread.run_sync(os.fsync, fd)
            # The rename, the path switch and the registry removal happen in one step: a
            # request sees either this download or the stored blob.
            download.path = self._store.commit_blob(download.path, download.digest)
            committed = True
            self._stats(download).committed += 1
            self._finish(download, "committed")
        except RegistryError as error:
            log.warning(
                "download %s failed: %s",
                download.digest,
                error.message,
                extra=download_event("download_fail", download, reason=failure_reason(error)),
            )
            self._stats(download).failed(failure_reason(error))
            self.not_found.note((download.origin, download.digest), error)
            download.fail(error)
        except OSError as exc:
            log.error("download %s: disk error on %s: %s", download.digest, download.path, exc)
            reason, failure = write_failure(exc)
            self._stats(download).failed(reason)
            download.fail(failure)
        except trio.Cancelled:
            self._stats(download).failed("shutdown")
            download.fail(RegistryError(503, "UNAVAILABLE", "the proxy is shutting down"))
            raise
        except Exception as exc:
            log.exception("download %s: unexpected error", download.digest)
            self._stats(download).failed("internal")
            download.fail(RegistryError(500, "UNKNOWN", f"internal error: {type(exc).__name__}"))
        finally:
            os.close(fd)
            self._drop(download)
            _let_go(download, claim, committed)

    # -- an owner elsewhere has it ---------------------------------------------------------

    def _follow(
        self, digest: Digest, elsewhere: Elsewhere, origin: Hashable, group: str
    ) -> Subscriber:
        """Register a download that mirrors the owner elsewhere, and join it."""
        try:
            download = Download(digest, elsewhere.path, origin, group)
            download.followed = True
            download.reader = elsewhere.open_reader
            self._nursery.start_soon(self._mirror, download, elsewhere)
        except BaseException:
            elsewhere.close()
            raise
        self._downloads[digest] = download
        log.info(
            "download %s is owned by another process; following it",
            digest,
            extra=download_event("download_follow", download),
        )
        return self._join(download)

    async def _mirror(self, download: Download, elsewhere: Elsewhere) -> None:
        """Follow the owner elsewhere until it ends; never raises.  Its commit (or its
        verified end without a copy) releases the held-back bytes here in the same step (see
        ``Elsewhere.follow``)."""
        try:
            if await elsewhere.follow(download):
                self._store.note_committed(download.available)
                self._finish(download, "committed by its owner process")
            else:
                self._pass_through(download, "streamed through by its owner process")
        except RegistryError as error:
            log.warning(
                "download %s failed: %s",
                download.digest,
                error.message,
                extra=download_event("download_fail", download, reason="owner_failed"),
            )
            download.fail(error)
        except OSError as exc:
            log.error("download %s: cannot follow %s: %s", download.digest, download.path, exc)
            download.fail(RegistryError(500, "UNKNOWN", "cache read failed"))
        except trio.Cancelled:
            download.fail(RegistryError(503, "UNAVAILABLE", "the proxy is shutting down"))
            raise
        except Exception as exc:
            log.exception("download %s: unexpected error while following", download.digest)
            download.fail(RegistryError(500, "UNKNOWN", f"internal error: {type(exc).__name__}"))
        finally:
            download.reader = None
            self._drop(download)
            try:
                elsewhere.close()
            except OSError as exc:
                log.error("download %s: cannot let go of its owner: %s", download.digest, exc)


def _let_go(download: Download, claim: Claim, committed: bool) -> None:
    """A producer's last step: its partial goes (unless committed), then its claim.  Never
    raises: cleanup must not raise into the app nursery (that would end every download)."""
    try:
        if not committed:
            download.path.unlink(missing_ok=True)
    except OSError as exc:
        log.error("download %s: cannot remove %s: %s", download.digest, download.path, exc)
    try:
        # Last: the moment the claim goes, followers elsewhere look for the result.
        claim.release()
    except OSError as exc:
        log.error("download %s: cannot release its lease: %s", download.digest, exc)


def _publish_size(claim: Claim, digest: Digest, size: int) -> None:
    try:
        claim.publish_size(size)
    except OSError as exc:
        # Followers elsewhere then learn the size when the download ends.
        log.warning("download %s: cannot publish its size: %s", digest, exc)
