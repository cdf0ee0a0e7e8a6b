"""Checking stored content against its name: ``cache verify``, and link pruning for ``cache gc``.

Every file under ``blobs/`` and ``manifests/`` is named by the digest of what it must hold,
so the cache checks itself: hash the file, compare with the name.  A manifest is checked
exactly like a blob, and so is the ``.type`` file beside it, the one thing no digest covers:
it must name a manifest media type.  Nothing in the proxy
writes such a file in place (content arrives by an atomic rename after its digest was
checked), so a mismatch means the disk, the file system or a person changed it, and the
only cure is to move it out of the way and fetch it afresh from the upstream.

Damaged files are *moved* to ``quarantine/`` (never deleted: the operator may want to look at
what the disk did) and the store never looks there, so a running proxy answers the next
request for that digest with a download.  This runs safely beside a running proxy on the same
cache: partials are never listed, and a file that was replaced while it was being hashed (a
fresh download renamed over it) is a new, verified file, which stays (see
:meth:`Store.quarantine`).

The running proxy hashes a stored blob itself the first time it serves it (``_trusted``);
this command is the complete check, including blobs a long-running proxy already trusts.
Hashing reads ``READ_SIZE`` bytes per call into one reused buffer: sha256 runs at about
1.2 GB/s on one core here, and at 4 MiB per read the system calls cost under 1 % of that.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .._errors import RegistryError
from .._reference import Digest, parse_digest
from ._descriptors import declared_sizes
from ._negotiation import MANIFEST_MEDIA_TYPES
from ._store import MAX_MANIFEST_FILE, Store

READ_SIZE = 4 * 1024 * 1024

# ``cache gc`` leaves a link younger than this alone even when its content is gone: a
# download links its repository while it is still in flight, and a listing of the partials
# made a moment earlier may not show it yet.
LINK_GRACE = 3600.0


def hash_step(
    fd: int, hasher: hashlib._Hash, offset: int, count: int, buffer: bytearray | None = None
) -> int:
    """Feed up to ``count`` bytes of ``fd`` from ``offset`` to ``hasher``; bytes read (0 at
    the end).  Positional reads, so several readers may share one file description.  Without
    a ``buffer``, one of ``READ_SIZE`` lives for this call only (cheap next to hashing it,
    and nothing stays allocated between the calls of many concurrent checks)."""
    view = memoryview(bytearray(min(count, READ_SIZE)) if buffer is None else buffer)
    done = 0
    while done < count:
        want = min(len(view), count - done)
        got = os.preadv(fd, [view[:want]], offset + done)
        if got == 0:
            break
        hasher.update(view[:got])  # releases the GIL: other threads keep going
        done += got
    return done


def hash_file(
    fd: int, algorithm: str, on_bytes: Callable[[int], None] | None = None
) -> tuple[str, int]:
    """(hex digest, size) of everything in ``fd``, read sequentially in ``READ_SIZE`` calls."""
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # a larger read-ahead
    except OSError:
        pass  # only advice
    hasher = hashlib.new(algorithm)
    buffer = bytearray(READ_SIZE)
    offset = 0
    while got := hash_step(fd, hasher, offset, READ_SIZE, buffer):
        offset += got
        if on_bytes is not None:
            on_bytes(got)
    return hasher.hexdigest(), offset


@dataclass(frozen=True, slots=True)
class Finding:
    """One stored file that failed its check."""

    kind: str  # "blobs" or "manifests"
    path: Path
    problem: str
    moved_to: Path | None  # None: it could not be moved (see ``problem``)


@dataclass
class ScrubReport:
    checked: int = 0
    bytes: int = 0
    seconds: float = 0.0
    # Evicted, or replaced by a fresh download, while being checked: nothing to judge.
    changed: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        """Bytes hashed per second."""
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


def content_listing(store: Store) -> list[tuple[str, Path, int]]:
    """(kind, path, size) of every stored blob and manifest: the work ``scrub`` will do."""
    listing = []
    for kind, path in store.content_files():
        try:
            listing.append((kind, path, path.stat().st_size))
        except FileNotFoundError:
            continue
    return listing


def scrub(
    store: Store,
    listing: list[tuple[str, Path, int]],
    on_bytes: Callable[[int], None] | None = None,
    on_finding: Callable[[Finding], None] | None = None,
) -> ScrubReport:
    """Hash every listed file; quarantine those that do not match their names."""
    report = ScrubReport()
    started = time.monotonic()
    for kind, path, _ in listing:
        finding = _check(store, kind, path, report, on_bytes)
        if finding is not None:
            report.findings.append(finding)
            if on_finding is not None:
                on_finding(finding)
    report.seconds = time.monotonic() - started
    return report


def _check(
    store: Store,
    kind: str,
    path: Path,
    report: ScrubReport,
    on_bytes: Callable[[int], None] | None,
) -> Finding | None:
    try:
        digest = parse_digest(f"{path.parent.name}:{path.name}")
    except RegistryError:
        digest = None  # no request can name it: junk, though it takes room
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        report.changed += 1  # evicted or expired since the listing
        return None
    except OSError as exc:
        return _quarantine(store, kind, path, None, f"unreadable: {exc.strerror}")
    try:
        stat = os.fstat(fd)
        identity = (stat.st_dev, stat.st_ino)
        if digest is None:
            return _quarantine(store, kind, path, identity, "not named by a digest")
        try:
            problem = _content_problem(store, fd, kind, digest, on_bytes)
        except OSError as exc:  # EIO: the disk cannot give the bytes back
            return _quarantine(store, kind, path, identity, f"unreadable: {exc.strerror}")
    finally:
        os.close(fd)
    report.checked += 1
    report.bytes += stat.st_size
    if problem is None:
        return None
    finding = _quarantine(store, kind, path, identity, problem)
    if finding is None:
        report.changed += 1  # what was checked is gone; what is there now came verified
    return finding


def _content_problem(
    store: Store, fd: int, kind: str, digest: Digest, on_bytes: Callable[[int], None] | None
) -> str | None:
    """What is wrong with the stored content (None: nothing)."""
    hex_digest, _ = hash_file(fd, digest.algorithm, on_bytes)
    if hex_digest != digest.hex:
        return "content does not match its digest"
    if kind == "manifests":
        # Read after the body, as the proxy reads them: a type is written before its body.
        media_type = store.read_manifest_type(digest)
        if media_type is None:
            return "no media type file beside it"
        if media_type not in MANIFEST_MEDIA_TYPES:
            return f"its media type file holds {media_type[:60]!r}, not a manifest media type"
    return None


def _quarantine(
    store: Store, kind: str, path: Path, identity: tuple[int, int] | None, problem: str
) -> Finding | None:
    if identity is None:
        try:
            stat = os.stat(path)
        except OSError:
            return Finding(kind, path, problem, None)
        identity = (stat.st_dev, stat.st_ino)
    try:
        moved_to = store.quarantine(kind, path, identity)
    except OSError as exc:
        return Finding(kind, path, f"{problem}; cannot move it: {exc.strerror}", None)
    if moved_to is None:
        return None  # replaced by a fresh (verified) file, or removed, meanwhile
    return Finding(kind, path, problem, moved_to)


# -- links (``cache gc``) ------------------------------------------------------------------


def prune_links(store: Store, *, dry_run: bool = False, grace: float = LINK_GRACE) -> int:
    """Remove the repository link markers whose content is gone; how many (would) go.

    A link whose blob or manifest is neither stored nor being downloaded stays when a manifest
    of the same repository that is still stored names the digest: its file carries the size
    that manifest declares (``Store.note_declared_sizes``), the bound of the blob's next
    download, and the manifest would not write it again while it is served from the cache.
    """
    # Listed first: a download that starts after this has a partial, but its link is then
    # younger than ``grace``; one that commits after this has a stored blob.
    in_flight = {entry.name.rpartition(".")[0] for entry in os.scandir(store.partial_dir)}
    cutoff = time.time() - grace
    by_repo: dict[tuple[str, str], list[tuple[Digest, Path]]] = {}
    for upstream, repo, digest, path in store.links():
        by_repo.setdefault((upstream, repo), []).append((digest, path))
    pruned = 0
    for links in by_repo.values():
        named: set[Digest] | None = None  # read only for a repository with a dangling link
        for digest, path in links:
            if f"{digest.algorithm}-{digest.hex}" in in_flight or _stored(store, digest):
                continue
            try:
                if path.stat().st_mtime > cutoff:
                    continue
            except FileNotFoundError:
                continue
            if named is None:
                named = _named_by_manifests(store, [digest for digest, _ in links])
            if digest in named:
                continue
            if not dry_run:
                path.unlink(missing_ok=True)
            pruned += 1
    return pruned


def _stored(store: Store, digest: Digest) -> bool:
    return store.blob_size(digest) is not None or store.manifest_path(digest).exists()


def _named_by_manifests(store: Store, linked: list[Digest]) -> set[Digest]:
    """Every digest that the stored manifests among ``linked`` declare a size for."""
    named: set[Digest] = set()
    for digest in linked:
        # Read directly, not by ``read_manifest``: that counts as a use of the manifest and
        # would keep it from ever expiring.  Bounded: only a manifest is read whole.
        path = store.manifest_path(digest)
        try:
            if path.stat().st_size > MAX_MANIFEST_FILE:
                continue
            body = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            continue
        named.update(declared_sizes(body))
    return named
