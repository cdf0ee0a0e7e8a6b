"""The first serve of a stored blob in this process is checked: hashed while it is served.

A stored blob is checked once per process: the first time this process serves it (or when
the file at its path is another file than the one checked), a checker hashes it while its
subscribers read it, and they hold back the last byte until the digest matches, like joiners
of a download.  A damaged blob is quarantined, its bodies end short, and the next request
downloads it afresh.  Blobs already checked, or committed by a download, are served with no
check at all (:class:`TrustedBlobs`).

Why at all: a blob on disk may have been damaged since it was verified (a crash, a disk, an
operator), and a pull-through cache must never serve a complete wrong body.  ``cache
verify`` (``_scrub``) checks every blob offline; this catches the ones served first.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from .._errors import RegistryError
from .._reference import Digest
from ._downloads import Download, Subscriber, read_stored, verified_download
from ._scrub import hash_step

if TYPE_CHECKING:
    from ._store import Store

log = logging.getLogger("streamsync_trio.streaming")

# Checking a stored blob on its first serve: bytes hashed per worker-thread hop (about 13 ms
# of sha256 here, so a shutdown is not held up, and the hop costs under 1 %), and how many
# hops run at once (hashing is CPU work: more threads than cores only share the cores).
CHECK_STEP = 16 * 1024 * 1024
CHECK_THREADS = 2
# How many checked blobs a process remembers (about 400 bytes each: ~6 MiB at most).  A blob
# forgotten is checked again on its next serve, which costs time, never correctness.
TRUSTED_MAX = 16384

Identity = tuple[int, int, int]  # (device, inode, size) of the file checked


class TrustedBlobs:
    """The stored blobs this process has checked (or committed), by the identity of the file
    checked: (device, inode, size).  Bounded; the least recently served are forgotten first.

    Not the modification time, although a change in it would be the usual sign: here it is
    the LRU clock, which every serve (of any worker process) moves.  Nothing in the proxy
    writes a stored file in place; a blob that comes again is a new file (a new inode), and
    that is what the identity catches.  A bit that rots in a file already checked is what
    ``cache verify`` is for.
    """

    def __init__(self, limit: int = TRUSTED_MAX) -> None:
        self._limit = limit
        self._entries: OrderedDict[Digest, Identity] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def trusts(self, digest: Digest, identity: Identity) -> bool:
        if self._entries.get(digest) != identity:
            return False
        self._entries.move_to_end(digest)
        return True

    def add(self, digest: Digest, identity: Identity) -> None:
        self._entries[digest] = identity
        self._entries.move_to_end(digest)
        while len(self._entries) > self._limit:
            self._entries.popitem(last=False)


def file_identity(stat: os.stat_result) -> Identity:
    return (stat.st_dev, stat.st_ino, stat.st_size)


class StoredBlobs:
    """Opens stored blobs for reading, checking the ones this process does not trust yet.

    ``enabled`` False serves every stored blob unchecked (the core's own tests).  The
    checkers run in ``nursery`` (the app's), so a check outlives the request that began it.
    """

    def __init__(self, store: Store, nursery: trio.Nursery, *, enabled: bool = True) -> None:
        self._store = store
        self._nursery = nursery
        self._enabled = enabled
        self.trusted = TrustedBlobs()
        self._checks: dict[Digest, tuple[Identity, Download]] = {}  # the checks running
        self._limiter = trio.CapacityLimiter(CHECK_THREADS)
        self.counts = {"verified": 0, "damaged": 0}

    def trust_committed(self, digest: Digest, path: Path) -> None:
        """A blob verified on its way in: trusted as stored, with no check on its next serve."""
        try:
            self.trusted.add(digest, file_identity(os.stat(path)))
        except OSError:
            pass  # evicted already; the next serve checks whatever is there then

    def open(self, digest: Digest, *, just_committed: bool = False) -> Subscriber | None:
        """A subscriber over the stored blob (marked as being read until it closes), or None
        when it is not stored.  Raises ``OSError`` when it is stored but cannot be opened.

        A blob this process has not checked yet is served while a checker hashes it, with
        its last byte held back until the digest matches (see :meth:`_check_stored`).
        ``just_committed``: the caller found no blob a moment ago (no checkpoint since) and
        then no download either, so the file was renamed into place in between by the
        process that verified it: trusted as if committed here."""
        fd = self._store.open_blob(digest)
        if fd is None:
            return None
        on_close = partial(self._store.release, digest)
        path = self._store.blob_path(digest)
        try:
            identity = file_identity(os.fstat(fd))
            if just_committed:
                self.trusted.add(digest, identity)
            if not self._enabled or self.trusted.trusts(digest, identity):
                return read_stored(digest, fd, path, on_close)
            download = self._checked(digest, fd, path, identity)
        except BaseException:
            os.close(fd)
            on_close()
            raise
        if download is None:
            os.close(fd)
            on_close()
            return None  # it was damaged: quarantined, and the caller downloads it
        return Subscriber(download, fd, on_close)

    def _checked(self, digest: Digest, fd: int, path: Path, identity: Identity) -> Download | None:
        """The check of this stored file: the one running, or a new one; None when the blob
        is found damaged at once (an empty file: nothing to hold back, so it is judged
        before any header goes out)."""
        running = self._checks.get(digest)
        if running is not None and running[0] == identity:
            return running[1]
        size = identity[2]
        if size == 0:
            if hashlib.new(digest.algorithm).hexdigest() == digest.hex:
                self.trusted.add(digest, identity)
                return verified_download(digest, path, 0)
            self._damaged(digest, path, identity, "is empty")
            return None
        download = Download(digest, path)
        download.set_size(size)
        download.advance(size)
        checker_fd = os.dup(fd)
        try:
            self._nursery.start_soon(self._check_stored, download, checker_fd, identity)
        except BaseException:
            os.close(checker_fd)
            raise
        self._store.hold(digest)  # until the check ends, whoever leaves meanwhile
        self._checks[digest] = (identity, download)
        return download

    async def _check_stored(self, download: Download, fd: int, identity: Identity) -> None:
        """Hash a stored blob while it is being served; never raises.

        Its subscribers read the file as it is (every byte is there) but hold back the last
        one, so a damaged blob is never served complete.  The checker reads the same pages
        they do, so the disk is read once; what it adds is the hashing, in a worker thread.
        """
        digest = download.digest
        problem = "does not match its digest"
        try:
            hasher = hashlib.new(digest.algorithm)
            offset, size = 0, identity[2]
            while offset < size:
                got = await trio.to_thread.run_sync(
                    hash_step, fd, hasher, offset, CHECK_STEP, limiter=self._limiter
                )
                if not got:
                    break
                offset += got
            if offset == size and hasher.hexdigest() == digest.hex:
                self.trusted.add(digest, identity)
                self.counts["verified"] += 1
                download.complete()
                return
        except OSError as exc:
            problem = f"cannot be read ({exc.strerror})"
        except trio.Cancelled:
            download.fail(RegistryError(503, "UNAVAILABLE", "the proxy is shutting down"))
            raise
        except Exception as exc:
            log.exception("checking stored blob %s: unexpected error", digest)
            download.fail(RegistryError(500, "UNKNOWN", f"internal error: {type(exc).__name__}"))
            return
        finally:
            os.close(fd)
            if self._checks.get(digest, (None, None))[1] is download:
                del self._checks[digest]
            self._store.release(digest)
        # One step, no checkpoint: the file leaves the store before the bodies end, so a
        # client retrying at once already misses it and downloads the blob afresh.
        self._damaged(digest, download.path, identity, problem)
        download.fail(RegistryError(500, "UNKNOWN", "the cached blob is damaged; retry"))

    def _damaged(self, digest: Digest, path: Path, identity: Identity, problem: str) -> None:
        self.counts["damaged"] += 1
        try:
            moved = self._store.quarantine("blobs", path, identity[:2])
        except OSError as exc:
            log.error("stored blob %s %s, and cannot be quarantined: %s", path, problem, exc)
            return
        log.error(
            "stored blob %s %s; moved to %s, the next request downloads it afresh",
            path,
            problem,
            moved,
        )
