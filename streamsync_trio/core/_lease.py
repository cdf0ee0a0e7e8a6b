"""Who downloads a digest when several processes share one cache: a lease per digest.

This is the :class:`~._owners.Owners` implementation for one machine (:class:`LeaseFiles`,
the registry's default).  Inside one process the :class:`~._registry.DownloadRegistry` dict
answers "is this digest in flight, and how do I join it".  Several hypercorn workers on one
machine share the cache directory but not that dict, so the question goes to the file system
(design.md §8: the in-flight registry seam):

* ``leases/<alg>-<hex>`` is the lease.  Its owner holds an exclusive ``flock`` on it for as
  long as the download runs, and its content names the partial the owner writes
  (``partial/<alg>-<hex>.<nonce>``).  A lease is published with ``link(2)`` from a file that
  is already locked and already names the partial, so nobody ever sees a lease that is
  unlocked-but-live or empty.
* ``leases/<alg>-<hex>.<nonce>.size`` holds the blob's size once the upstream announced it
  (written by rename, so it is read whole or not at all): followers need it for their
  ``Content-Length`` before the bytes are there.
* A follower (:class:`LeaseFollower`) keeps the lease open and tails the partial.  The kernel
  drops the owner's lock when the owner lets go, normally or by dying (even ``kill -9``), so
  "can I lock it now" is an exact "has the owner ended" test.  The owner ended well only if
  the blob is in the store as the very inode the follower was reading, or if it verified the
  blob and did not keep it (cluster ``placement = "shard"``): then it marked the partial
  (:func:`mark_passed_through`) before removing it, a mark on the inode itself that the
  follower reads through its held descriptor after the name is gone.

``flock`` locks belong to open file descriptions, so two opens in one process conflict just
like two processes do: the tests exercise this with two registries in one process.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import trio

from .._errors import RegistryError
from .._reference import Digest

if TYPE_CHECKING:
    from ._downloads import BlobSource, Download


class CacheDirs(Protocol):
    """Where a cache keeps leases, partials and blobs (a :class:`~._store.Store` is one).  A
    protocol rather than the store itself: the store imports this module (to remove
    abandoned partials at start), and an import must go one way."""

    @property
    def lease_dir(self) -> Path: ...

    @property
    def partial_dir(self) -> Path: ...

    def blob_path(self, digest: Digest) -> Path: ...


# A stale lease (its owner died) is taken over; should an unlucky sequence of owners keep
# finishing exactly between our steps, we give up rather than spin.
_CLAIM_ATTEMPTS = 20

# How often a follower looks at another process's download (lock, size, bytes written).
FOLLOW_INTERVAL = 0.02


@dataclass
class Owned:
    """This process owns the digest's download and writes ``partial``."""

    fd: int  # the lease, locked exclusively
    lease: Path
    partial: Path

    def source(self, upstream: BlobSource, download: Download, *, forwardable: bool) -> BlobSource:
        """One machine has one way to the blob: the upstream."""
        return upstream

    async def keeps(self, download: Download) -> bool:
        """One machine keeps every blob it fetched."""
        return True

    def publish_size(self, size: int) -> None:
        path = _size_path(self.lease, self.partial)
        staging = path.with_name(path.name + ".tmp")
        staging.write_text(str(size))
        os.rename(staging, path)

    def abandon(self) -> None:
        """Give up before any download started: the (empty) partial goes, then the lease."""
        try:
            self.partial.unlink(missing_ok=True)
        finally:
            self.release()

    def release(self) -> None:
        """Let go, after the partial was committed or removed.  The lease path goes first:
        once the lock drops, a newcomer must not find this generation's lease."""
        try:
            _size_path(self.lease, self.partial).unlink(missing_ok=True)
            if is_same_file(self.fd, self.lease):
                self.lease.unlink()
        finally:
            os.close(self.fd)  # whatever failed above, the lock must drop


@dataclass
class Followed:
    """Another process owns the download: ``partial`` is its file, ``fd`` its lease."""

    fd: int
    lease: Path
    partial: Path

    def size(self) -> int | None:
        try:
            return int(_size_path(self.lease, self.partial).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def owner_ended(self) -> bool:
        """Whether the owner let go (or died).  The probe lock is dropped at once: held, it
        would make a newcomer take a dead owner's lease for a live one."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        return True

    def close(self) -> None:
        os.close(self.fd)


def claim(leases: Path, partials: Path, digest: Digest) -> Owned | Followed:
    """Own the download of ``digest``, or learn who does.  Never blocks.

    Raises ``OSError`` for disk trouble (the caller answers 500), ``RuntimeError`` if
    ownership kept changing hands for every attempt.
    """
    name = f"{digest.algorithm}-{digest.hex}"
    lease = leases / name
    for _ in range(_CLAIM_ATTEMPTS):
        try:
            fd = os.open(lease, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            owned = _publish(lease, partials, name)
            if owned is not None:
                return owned
            continue  # somebody published first: look at theirs
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                partial_name = os.pread(fd, 256, 0).decode(errors="replace").strip()
            except BaseException:
                os.close(fd)
                raise
            return Followed(fd, lease, partials / partial_name)
        except BaseException:
            os.close(fd)
            raise
        # Unlocked: its owner is gone.  Either it is just removing the lease (then the path
        # no longer leads to this file), or it died and left lease and partial behind.
        try:
            if is_same_file(fd, lease):
                _remove_generation(lease, partials, fd)
        finally:
            os.close(fd)
    raise RuntimeError(f"could not claim {name}: ownership kept changing")


class LeaseFiles:
    """The :class:`~._owners.Owners` of one machine: the lease files in ``store``'s cache
    directory, shared by every process that uses it."""

    def __init__(self, store: CacheDirs) -> None:
        self._store = store

    def claim(self, digest: Digest) -> Owned | LeaseFollower | None:
        """Own the download (an :class:`Owned`), or follow the process that owns it; None
        when that owner ended between the two steps (it committed, or failed)."""
        store = self._store
        try:
            lease = claim(store.lease_dir, store.partial_dir, digest)
        except RuntimeError as exc:
            raise RegistryError(
                503, "UNAVAILABLE", str(exc), headers={"Retry-After": "1"}
            ) from None
        if isinstance(lease, Owned):
            return lease
        try:
            hold = os.open(lease.partial, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            lease.close()
            return None
        except BaseException:
            lease.close()
            raise
        return LeaseFollower(lease, hold, store.blob_path(digest))


class LeaseFollower:
    """Follows another process's download: holds its lease open and its partial at ``hold``
    (the :class:`~._owners.Elsewhere` of one machine)."""

    def __init__(self, lease: Followed, hold: int, stored: Path) -> None:
        self._lease = lease
        self._hold = hold
        self._stored = stored  # where the blob is once committed

    @property
    def path(self) -> Path:
        return self._lease.partial

    def open_reader(self) -> int:
        return os.dup(self._hold)

    async def follow(self, download: Download) -> bool:
        """Tail the owner's partial until the owner lets go; True when it committed the
        blob, False when it verified it and did not keep it.

        Polling, because neither a lock release nor a file growing in another process can be
        awaited in trio; every ``FOLLOW_INTERVAL`` costs three system calls.  The owner ended
        well only if the stored blob is the very file we have been reading, or if that file
        carries the owner's pass-through mark: then every byte we served was verified by the
        owner, and the held-back last bytes may go.
        """
        lease, hold = self._lease, self._hold
        while True:
            ended = lease.owner_ended()  # first: whatever it wrote before is seen below
            if download.size is None:
                size = lease.size()
                if size is not None:
                    download.set_size(size)
            written = os.fstat(hold).st_size
            if written > download.available:
                # Bytes in the partial: the owner's upstream answered, even if with no
                # length (then the size comes only at the end).
                download.mark_answered()
                download.advance(written)
            if ended:
                break
            await trio.sleep(FOLLOW_INTERVAL)
        kept = is_same_file(hold, self._stored)
        if not kept and not passed_through(hold):
            raise RegistryError(
                502,
                "UNAVAILABLE",
                "the upstream download failed in another worker process; retry",
            )
        size = os.fstat(hold).st_size
        if download.size is None:
            download.set_size(size)
        download.advance(size)
        if kept:
            download.path = self._stored
        return kept

    def close(self) -> None:
        try:
            os.close(self._hold)
        finally:
            self._lease.close()


# The owner's "verified, and not kept" mark on a partial: read-only, with the sticky bit
# (which Linux ignores on regular files).  The sticky bit is the mark itself: no umask can
# set it and a partial is created without it, so a partial still in flight, or left by a
# failed owner, never carries it.
_PASSED_THROUGH = stat.S_ISVTX
_WRITE_BITS = 0o222


def mark_passed_through(fd: int) -> None:
    """Mark the verified partial open at ``fd`` as streamed through, before it is removed
    instead of committed: followers in other processes then end well (see
    :meth:`LeaseFollower.follow`).  On the inode, not in a file beside it: a follower reads
    it through its held descriptor after the partial's name is gone, and nothing is left
    behind to clean up.  Raises ``OSError``."""
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    os.fchmod(fd, (mode & ~_WRITE_BITS) | _PASSED_THROUGH)


def passed_through(fd: int) -> bool:
    """Whether the partial open at ``fd`` carries :func:`mark_passed_through`'s mark."""
    return bool(os.fstat(fd).st_mode & _PASSED_THROUGH)


def remove_abandoned(leases: Path, partials: Path) -> int:
    """Remove partials nobody owns (left by a crash); returns how many.  Safe while other
    processes download: a partial named by a locked lease is left alone."""
    entries = [p for p in partials.iterdir() if not p.name.startswith(".")]
    live: set[str] = set()
    dead: set[str] = set()
    for path in list(leases.iterdir()):
        if path.name.endswith((".size", ".tmp")):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                live.add(os.pread(fd, 256, 0).decode(errors="replace").strip())
                continue
            if path.name.endswith(".claim"):
                path.unlink(missing_ok=True)  # a publication that died half way
            elif is_same_file(fd, path):
                dead.add(_remove_generation(path, partials, fd))
        finally:
            os.close(fd)
    removed = 0
    for entry in entries:
        if entry.name in live:
            continue
        try:
            entry.unlink()
        except FileNotFoundError:
            # Committed meanwhile, or removed above with its dead owner's lease.
            removed += entry.name in dead
            continue
        removed += 1
    for path in leases.iterdir():
        # Size files whose lease is gone (the lease's owner removes its own).
        if path.name.endswith((".size", ".tmp")) and not _lease_of(path).exists():
            path.unlink(missing_ok=True)
    return removed


def _publish(lease: Path, partials: Path, name: str) -> Owned | None:
    """Publish a new generation; None when somebody else's publication or a cleanup got in
    the way (the caller looks again).

    The partial exists before the lease does: a follower that finds the lease can always
    open the partial it names (until the owner ends), and a crash in between leaves only
    files that no lease names, which cleanup removes.
    """
    nonce = secrets.token_hex(6)
    partial = partials / f"{name}.{nonce}"
    staging = lease.with_name(f"{name}.{nonce}.claim")
    fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    published = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None  # a startup cleanup is looking at this half-made claim
        os.write(fd, partial.name.encode())
        os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
        try:
            os.link(staging, lease)
        except (FileExistsError, FileNotFoundError):
            # Somebody published first, or a cleanup removed our staging file.
            partial.unlink(missing_ok=True)
            return None
        published = True
        return Owned(fd, lease, partial)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        if not published:
            os.close(fd)
        staging.unlink(missing_ok=True)


def _remove_generation(lease: Path, partials: Path, fd: int) -> str:
    """Clean up after a dead owner: its partial, its size file, then its lease.  Returns the
    partial's name."""
    partial_name = os.pread(fd, 256, 0).decode(errors="replace").strip()
    if partial_name:
        (partials / partial_name).unlink(missing_ok=True)
        _size_path(lease, partials / partial_name).unlink(missing_ok=True)
    lease.unlink(missing_ok=True)
    return partial_name


def _size_path(lease: Path, partial: Path) -> Path:
    nonce = partial.name.rpartition(".")[2]
    return lease.with_name(f"{lease.name}.{nonce}.size")


def _lease_of(size_file: Path) -> Path:
    return size_file.with_name(size_file.name.split(".", 1)[0])


def is_same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)
