"""The content-addressed cache on local disk.

Layout under the root::

    blobs/<alg>/<hex>                 verified blob bytes, immutable
    manifests/<alg>/<hex>             the exact manifest bytes (they hash to the name)
    manifests/<alg>/<hex>.type        its media type, one line (no digest covers it)
    tags/<upstream>/<repo>/_tags/<tag> JSON tag record (digest, media type, fetched at)
    tags/<upstream>/<repo>/_links/<alg>-<hex>  "this repository contains this digest"
    partial/<alg>-<hex>.<nonce>       in-flight downloads; never served as complete
    leases/<alg>-<hex>                who owns an in-flight download (see ``_lease``)
    quarantine/<kind>/<alg>/<hex>.<nonce>  content that failed its digest check (``_scrub``);
                                      never looked at again, kept for the operator

Everything visible under ``blobs/`` and ``manifests/`` got there by an atomic rename after the
content was verified, so a crash at any moment leaves either the old state or the new, never a
torn file under a content address.  Every file named by a digest holds exactly the bytes of
that digest, so ``sha256sum`` (or ``cache verify``) checks the cache with nothing to strip; a
manifest's media type, which the client needs and no digest covers, lives in the ``.type``
file beside it (older versions wrote it as a first line of the manifest file;
:meth:`Store.migrate_manifests` rewrites such a cache once, at start).  Partials nobody owns
(a crashed process left them) are unverifiable leftovers and are removed at start; those of
other live workers are kept.

This is one of the two seams design.md §8 asks to keep clean (put partial, commit, open): the
methods are synchronous and do no networking, and no hashing beyond the small manifests they
read back, so a shared-filesystem or object-store implementation can replace this class
without touching the streaming core.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .._errors import RegistryError
from .._reference import Digest, parse_digest
from ._lease import remove_abandoned
from ._negotiation import MANIFEST_MEDIA_TYPES

log = logging.getLogger("streamsync_trio.store")

# The media type of ``manifests/<alg>/<hex>`` is in ``<hex>`` + this: a name that is not a
# digest, so nothing that walks content addresses mistakes it for content.
TYPE_SUFFIX = ".type"

# A stored manifest is at most 4 MiB (``upstream.MAX_MANIFEST_BYTES``); a file far larger
# under manifests/ is not one, and is not read whole to find that out.
MAX_MANIFEST_FILE = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Usage:
    blobs: int
    bytes: int


@dataclass(frozen=True, slots=True)
class TagRecord:
    digest: str
    media_type: str
    fetched_at: float  # wall-clock seconds: tag records outlive the process
    size: int | None = None  # the manifest's length (older records did not keep it)


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._blobs = self.root / "blobs"
        self._manifests = self.root / "manifests"
        self._tags = self.root / "tags"
        self.partial_dir = self.root / "partial"
        self.lease_dir = self.root / "leases"
        self.quarantine_dir = self.root / "quarantine"  # made when first needed
        for directory in (
            self._blobs,
            self._manifests,
            self._tags,
            self.partial_dir,
            self.lease_dir,
        ):
            directory.mkdir(parents=True, exist_ok=True)
        # Kept up to date by commit and eviction, so a status page or a size cap never walks
        # the tree; ``scan`` (at start, in a worker thread) sets the initial numbers.
        self._blob_count = 0
        self._blob_bytes = 0
        self._readers: dict[Digest, int] = {}
        # Called when the last reader of a blob lets go: a pass that had to pass it by can
        # now bring the cache under its cap (the eviction task sets it).
        self.on_released: Callable[[], None] | None = None

    def scan(self) -> Usage:
        listing = self.blobs_by_age()
        self._blob_count, self._blob_bytes = len(listing), sum(size for _, size, _ in listing)
        return self.usage()

    def usage(self) -> Usage:
        return Usage(self._blob_count, self._blob_bytes)

    def check_writable(self) -> list[str]:
        """Problems that would stop the cache from taking new blobs (empty: none)."""
        probe = self.partial_dir / f".probe-{secrets.token_hex(4)}"
        try:
            probe.write_bytes(b"ok")
        except OSError as exc:
            return [f"cache {self.partial_dir} is not writable: {exc.strerror}"]
        finally:
            # A full disk creates the file and then refuses the byte: remove it either way,
            # or every probe of a full cache leaves an empty file behind.
            try:
                probe.unlink(missing_ok=True)
            except OSError:
                pass  # a read-only cache has no probe to remove
        return []

    def remove_leftover_partials(self) -> int:
        """Delete partials no live process owns; returns how many there were."""
        return remove_abandoned(self.lease_dir, self.partial_dir)

    # -- blobs -------------------------------------------------------------------------------

    def blob_path(self, digest: Digest) -> Path:
        return self._blobs / digest.algorithm / digest.hex

    def blob_size(self, digest: Digest) -> int | None:
        try:
            return self.blob_path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def open_blob(self, digest: Digest) -> int | None:
        """A read-only fd on the stored blob, or None.  Open, then fstat: no stat/open race.

        Marks the blob as just used (its mtime is the LRU clock) and as being read until
        :meth:`release`, so eviction passes it by.
        """
        path = self.blob_path(digest)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        self.hold(digest)
        try:
            os.utime(fd)
        except OSError:
            pass  # a read-only cache still serves; it just cannot keep its LRU order
        return fd

    def hold(self, digest: Digest) -> None:
        """Count one more reader of ``digest`` until :meth:`release`: eviction passes it by.

        Not only readers of the stored file: a client that joined a download reads the same
        inode after the commit renames it into place, and deleting it under them would throw
        the cached copy away exactly while it is in demand (issue 14, defect 12)."""
        self._readers[digest] = self._readers.get(digest, 0) + 1

    def release(self, digest: Digest) -> None:
        left = self._readers.get(digest, 0) - 1
        if left > 0:
            self._readers[digest] = left
        else:
            self._readers.pop(digest, None)
            if self.on_released is not None:
                self.on_released()

    def is_being_read(self, digest: Digest) -> bool:
        return digest in self._readers

    def blobs_by_age(self) -> list[tuple[float, int, Digest]]:
        """(last use, size, digest) of every stored blob, least recently used first.

        Ties (file times are coarse: two blobs committed in one tick share one) are broken
        by the digest's text; :class:`Digest` itself has no order, and sorting the tuples
        as they are compared two Digests and failed every eviction pass (issue 14)."""
        found = []
        for algorithm in self._blobs.iterdir():
            for entry in os.scandir(algorithm):
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    stat = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # evicted meanwhile, by another worker or ``cache gc``
                found.append((stat.st_mtime, stat.st_size, Digest(algorithm.name, entry.name)))
        found.sort(key=lambda item: (item[0], item[1], str(item[2])))
        return found

    def partial_bytes(self) -> int:
        """Bytes the in-flight downloads of every process on this cache hold on disk.

        They count against the cap too: a cap that sees only committed blobs lets the disk
        fill with downloads it then cannot commit."""
        total = 0
        for entry in os.scandir(self.partial_dir):
            if entry.name.startswith("."):
                continue  # probes and other transient files
            try:
                total += entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                continue  # committed or removed meanwhile
        return total

    def set_usage(self, blobs: int, size: int) -> None:
        """Correct the running totals from a fresh listing (another process may have evicted)."""
        self._blob_count, self._blob_bytes = blobs, size

    def remove_blob(self, digest: Digest) -> int:
        """Delete a stored blob; returns the bytes freed (0 if it was already gone)."""
        path = self.blob_path(digest)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        self._blob_count -= 1
        self._blob_bytes -= size
        return size

    def expire_manifests_and_tags(self, older_than: float) -> tuple[int, int]:
        """Remove manifests and tag records not used since ``older_than`` (wall clock).

        A manifest and its ``.type`` file are one entry, judged by the manifest's time (its
        reads touch it): the body goes first, then the type, so no moment shows a body
        without its type that was not already a miss.  A type file without a body (a write
        that crashed between the two renames) and stale temporary files go by their own age."""
        manifests = tags = 0
        for directory in self._manifest_dirs():
            for entry in sorted(os.scandir(directory), key=lambda e: e.name):
                path = Path(entry.path)
                try:
                    if path.stat().st_mtime >= older_than:
                        continue
                except FileNotFoundError:
                    continue  # removed with its body earlier in this loop
                if entry.name.startswith(".") or entry.name.endswith(TYPE_SUFFIX):
                    body = path.with_name(entry.name.removesuffix(TYPE_SUFFIX))
                    if entry.name.startswith(".") or not body.exists():
                        path.unlink(missing_ok=True)  # goes with its body, when it has one
                    continue
                path.unlink(missing_ok=True)
                _type_path(path).unlink(missing_ok=True)
                manifests += 1
        for path in self._tags.rglob("_tags/*"):
            if path.is_file() and path.stat().st_mtime < older_than:
                path.unlink(missing_ok=True)
                tags += 1
        return manifests, tags

    def counts(self) -> dict[str, int]:
        """What the cache holds, by kind (for ``streamsync-trio cache stats``)."""
        return {
            "manifests": sum(1 for kind, _ in self.content_files() if kind == "manifests"),
            "tags": sum(1 for p in self._tags.rglob("_tags/*") if p.is_file()),
            "partials": sum(1 for p in self.partial_dir.iterdir() if not p.name.startswith(".")),
            # Entries: a quarantined manifest's type file went with it and is not one more.
            "quarantined": sum(
                1
                for p in self.quarantine_dir.rglob("*")
                if p.is_file() and not p.name.endswith(TYPE_SUFFIX)
            ),
        }

    def new_partial(self, digest: Digest) -> Path:
        """A fresh, unique partial path: two generations of one digest never share a file."""
        return self.partial_dir / f"{digest.algorithm}-{digest.hex}.{secrets.token_hex(6)}"

    def note_committed(self, size: int) -> None:
        """Count a blob another process committed (we followed its download)."""
        self._blob_count += 1
        self._blob_bytes += size

    def commit_blob(self, partial: Path, digest: Digest) -> Path:
        """Atomically publish a verified partial (already fsynced by the caller)."""
        final = self.blob_path(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        replaced = final.exists()
        try:
            # The LRU clock starts at the commit: the blob its clients are still reading is
            # the most recently used, never the first victim of the next eviction pass.
            os.utime(partial)
        except OSError:
            pass  # the order is a preference; the commit is what matters
        os.rename(partial, final)
        if not replaced:
            self._blob_count += 1
            self._blob_bytes += final.stat().st_size
        return final

    # -- manifests ---------------------------------------------------------------------------

    def _manifest_path(self, digest: Digest) -> Path:
        return self._manifests / digest.algorithm / digest.hex

    def manifest_path(self, digest: Digest) -> Path:
        return self._manifest_path(digest)

    def manifest_type_path(self, digest: Digest) -> Path:
        return _type_path(self._manifest_path(digest))

    def read_manifest(self, digest: Digest) -> tuple[bytes, str] | None:
        """The stored body and media type, or None: not stored, or stored damaged.

        The body is hashed on every read: a manifest is a few KiB read whole (hashing one
        costs microseconds), and a flipped bit on disk must become a cache miss, fetched
        afresh, not a manifest whose content no longer matches the digest it is served as.
        The damaged file is quarantined, so the next read does not meet it again.

        Body first, then type: the type is written first, so a body that is there has its
        type.  A body without one (removed by hand, or half of an interrupted ``cache gc``) is
        a miss: a guessed type could make a client parse an index as an image."""
        path = self._manifest_path(digest)
        try:
            with open(path, "rb") as file:
                raw = file.read()
                stat = os.fstat(file.fileno())
            os.utime(path)  # last use, for `cache gc`
        except FileNotFoundError:
            return None
        media_type = self.read_manifest_type(digest)
        if media_type is None:
            log.warning("stored manifest %s has no media type beside it; fetching it again", path)
            return None
        if not manifest_record_ok(digest, raw, media_type):
            log.error("stored manifest %s does not match its digest; quarantined", path)
            self.quarantine("manifests", path, (stat.st_dev, stat.st_ino))
            return None
        return raw, media_type

    def read_manifest_type(self, digest: Digest) -> str | None:
        """What the ``.type`` file beside the manifest says (not checked), or None."""
        try:
            with open(self.manifest_type_path(digest), "rb") as file:
                raw = file.read(256)  # the longest manifest media type has 54 characters
        except FileNotFoundError:
            return None
        return raw.decode("utf-8", "replace").removesuffix("\n")

    def write_manifest(self, digest: Digest, body: bytes, media_type: str) -> None:
        """Store a verified manifest: its type first, then the body by an atomic rename."""
        path = self._manifest_path(digest)
        _atomic_write(_type_path(path), media_type.encode() + b"\n")
        _atomic_write(path, body)

    def migrate_manifests(self) -> int:
        """Rewrite manifests stored in the old single-file format; returns how many.

        Older versions wrote ``<media type>\\n<body>`` under the digest.  Only files without a
        ``.type`` beside them are read (so a migrated cache costs one listing per start), and
        each is either rewritten as body + type (its last-use time kept, for ``cache gc``),
        quarantined when it is neither format intact, or left alone when it already is a bare
        body (a miss until fetched again) or is not named by a digest (``cache verify``'s
        business).  Safe beside other workers doing the same: every write is a rename of the
        same content, and a quarantine moves only the very file that was read."""
        migrated = 0
        for directory in self._manifest_dirs():
            names = set(os.listdir(directory))
            for name in sorted(names):
                if (
                    name.startswith(".")
                    or name.endswith(TYPE_SUFFIX)
                    or name + TYPE_SUFFIX in names
                ):
                    continue
                migrated += self._migrate_manifest(directory / name)
        if migrated:
            log.warning("rewrote %d manifest(s) stored in the old format: body + .type", migrated)
        return migrated

    def _migrate_manifest(self, path: Path) -> bool:
        try:
            digest = parse_digest(f"{path.parent.name}:{path.name}")
        except RegistryError:
            return False
        try:
            with open(path, "rb") as file:
                stat = os.fstat(file.fileno())
                if not (0 < stat.st_size <= MAX_MANIFEST_FILE):
                    return False
                raw = file.read()
        except FileNotFoundError:
            return False  # expired, or migrated by another worker, meanwhile
        if hashlib.new(digest.algorithm, raw).hexdigest() == digest.hex:
            return False  # already a bare body
        body, media_type = split_manifest_record(raw)
        if not manifest_record_ok(digest, body, media_type):
            log.error("stored manifest %s is damaged (old format); quarantined", path)
            self.quarantine("manifests", path, (stat.st_dev, stat.st_ino))
            return False
        _atomic_write(_type_path(path), media_type.encode() + b"\n")
        _atomic_write(path, body, times_ns=(stat.st_atime_ns, stat.st_mtime_ns))
        return True

    def _manifest_dirs(self) -> list[Path]:
        """``manifests/<alg>`` directories (temporary files start with a dot)."""
        return [
            d
            for d in sorted(self._manifests.iterdir())
            if d.is_dir() and not d.name.startswith(".")
        ]

    # -- integrity (``_scrub``) --------------------------------------------------------------

    def content_files(self) -> Iterator[tuple[str, Path]]:
        """``("blobs" | "manifests", path)`` of every file stored under a content address.

        A manifest's ``.type`` file is not listed: it belongs to the manifest beside it.  Nor
        is anything else that is not content yet: partials (never complete), leases and the
        temporary files of atomic writes (their names start with a dot)."""
        for kind, top in (("blobs", self._blobs), ("manifests", self._manifests)):
            for algorithm in sorted(top.iterdir()):
                if not algorithm.is_dir() or algorithm.name.startswith("."):
                    continue
                for entry in sorted(os.scandir(algorithm), key=lambda e: e.name):
                    if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                        continue
                    if kind == "manifests" and entry.name.endswith(TYPE_SUFFIX):
                        continue  # part of its manifest's entry, checked with it
                    yield kind, Path(entry.path)

    def quarantine(self, kind: str, path: Path, identity: tuple[int, int]) -> Path | None:
        """Move the file at ``path`` (a ``kind`` of :meth:`content_files`) found damaged to
        ``quarantine/``, where nothing looks for content; returns where it went.

        ``identity`` is the (device, inode) that was checked.  A running proxy may have
        replaced the file meanwhile (a fresh, verified download renamed over the path): that
        one is good and stays, and None says nothing was moved."""
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            return None  # evicted or quarantined by someone else meanwhile
        if (stat.st_dev, stat.st_ino) != identity:
            return None
        target = (
            self.quarantine_dir / kind / path.parent.name / f"{path.name}.{secrets.token_hex(4)}"
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(path, target)
        moved = os.stat(target)
        if (moved.st_dev, moved.st_ino) != identity:
            # Replaced between the stat and the rename (a window of microseconds): put the
            # good file back.  Content-addressed, so anything now at the path is the same.
            os.rename(target, path)
            return None
        if kind == "blobs":
            self._blob_count -= 1
            self._blob_bytes -= moved.st_size
        elif kind == "manifests":
            # The type goes with its manifest: one entry, and the operator sees both.  (A
            # fetch in another process that wrote a fresh type this very moment loses it,
            # and its body is then a miss once: fetched again, not served wrong.)
            try:
                os.rename(_type_path(path), _type_path(target))
            except FileNotFoundError:
                pass
        return target

    def links(self) -> Iterator[tuple[str, str, Digest, Path]]:
        """``(upstream, repository, digest, path)`` of every repository link marker."""
        for links_dir in sorted(self._tags.glob("*/**/_links")):
            parts = links_dir.relative_to(self._tags).parts
            if len(parts) < 3 or not links_dir.is_dir():
                continue
            upstream, repo = parts[0], "/".join(parts[1:-1])
            for entry in sorted(os.scandir(links_dir), key=lambda e: e.name):
                algorithm, dash, hex_ = entry.name.partition("-")
                if entry.name.startswith(".") or not dash:
                    continue  # a temporary file of note_declared_sizes
                yield upstream, repo, Digest(algorithm, hex_), Path(entry.path)

    def has_partial(self, digest: Digest) -> bool:
        """Whether a download of ``digest`` is in flight in some process on this cache."""
        prefix = f"{digest.algorithm}-{digest.hex}."
        return any(entry.name.startswith(prefix) for entry in os.scandir(self.partial_dir))

    # -- tags --------------------------------------------------------------------------------

    def _tag_path(self, upstream: str, repo: str, tag: str) -> Path:
        # ``_tags`` cannot be a name component (components start with [a-z0-9]), so a
        # repository ``a/b`` and a tag ``b`` of repository ``a`` can never collide.
        return self._tags / upstream / repo / "_tags" / tag

    def read_tag(self, upstream: str, repo: str, tag: str) -> TagRecord | None:
        try:
            data = json.loads(self._tag_path(upstream, repo, tag).read_bytes())
            size = data.get("size")
            return TagRecord(
                str(data["digest"]),
                str(data["media_type"]),
                float(data["fetched_at"]),
                size if isinstance(size, int) and size >= 0 else None,
            )
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            return None  # a damaged record is just a cache miss

    def write_tag(
        self, upstream: str, repo: str, tag: str, digest: str, media_type: str, size: int
    ) -> None:
        record = {
            "digest": digest,
            "media_type": media_type,
            "size": size,
            "fetched_at": time.time(),
        }
        _atomic_write(self._tag_path(upstream, repo, tag), json.dumps(record).encode())

    # -- repository membership ---------------------------------------------------------------
    # Content is stored once per digest, but a digest is only served under a repository known
    # to contain it, so a client cannot read a private repository's layers through another
    # repository's name by knowing the digest.  Like Distribution's ``_layers`` links.

    def _link_path(self, upstream: str, repo: str, digest: Digest) -> Path:
        return self._tags / upstream / repo / "_links" / f"{digest.algorithm}-{digest.hex}"

    def is_linked(self, upstream: str, repo: str, digest: Digest) -> bool:
        return self._link_path(upstream, repo, digest).exists()

    def link(self, upstream: str, repo: str, digests: list[Digest]) -> None:
        for digest in digests:
            path = self._link_path(upstream, repo, digest)
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()

    # The size a stored manifest of the repository declares for a digest (``_descriptors``)
    # is kept in the link file itself: the link says "this repository contains the digest",
    # and the size is what the repository's manifests say about it.  Per repository, not per
    # digest: a manifest anyone can push elsewhere must not set the bound of our pulls here.

    def note_declared_sizes(self, upstream: str, repo: str, sizes: dict[Digest, int]) -> None:
        """Record the sizes a manifest of ``repo`` declares (and link the digests)."""
        for digest, size in sizes.items():
            path = self._link_path(upstream, repo, digest)
            content = str(size).encode()
            try:
                if path.read_bytes() == content:
                    continue
            except FileNotFoundError:
                path.parent.mkdir(parents=True, exist_ok=True)
            # Renamed into place, so a reader never sees half a number; not fsynced (one per
            # layer would cost more than it saves): after a crash a link may be empty, which
            # only means "no declared size".
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
            try:
                tmp.write_bytes(content)
                os.rename(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise

    def declared_size(self, upstream: str, repo: str, digest: Digest) -> int | None:
        """The size ``repo``'s stored manifests declare for ``digest``; None if none does."""
        try:
            content = self._link_path(upstream, repo, digest).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        text = content.decode("ascii", "replace")
        return int(text) if text.isdigit() and len(text) <= 16 else None


def split_manifest_record(raw: bytes) -> tuple[bytes, str]:
    """(body, media type) of a manifest file in the old format: a media-type line, then the
    body (:meth:`Store.migrate_manifests`)."""
    media_type, _, body = raw.partition(b"\n")
    return body, media_type.decode("utf-8", "replace")


def manifest_record_ok(digest: Digest, body: bytes, media_type: str) -> bool:
    """Whether a stored manifest is intact: the body hashes to its digest, and the media type
    (which no digest covers) is one of the manifest types the proxy stores."""
    if media_type not in MANIFEST_MEDIA_TYPES:
        return False
    return hashlib.new(digest.algorithm, body).hexdigest() == digest.hex


def _type_path(manifest: Path) -> Path:
    return manifest.with_name(manifest.name + TYPE_SUFFIX)


def _atomic_write(path: Path, data: bytes, times_ns: tuple[int, int] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if times_ns is not None:
            os.utime(tmp, ns=times_ns)
        os.rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
