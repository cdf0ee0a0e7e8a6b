"""The content-addressed cache on local disk.

Layout under the root::

    blobs/<alg>/<hex>                 verified blob bytes, immutable
    manifests/<alg>/<hex>             "<media type>\\n" + the exact manifest bytes
    tags/<upstream>/<repo>/_tags/<tag> JSON tag record (digest, media type, fetched at)
    tags/<upstream>/<repo>/_links/<alg>-<hex>  "this repository contains this digest"
    partial/<alg>-<hex>.<nonce>       in-flight downloads; never served as complete
    leases/<alg>-<hex>                who owns an in-flight download (see ``_lease``)

Everything visible under ``blobs/`` and ``manifests/`` got there by an atomic rename after the
content was verified, so a crash at any moment leaves either the old state or the new, never a
torn file under a content address.  Partials nobody owns (a crashed process left them) are
unverifiable leftovers and are removed at start; those of other live workers are kept.

This is one of the two seams design.md §8 asks to keep clean (put partial, commit, open): the
methods are synchronous and do no hashing or networking, so a shared-filesystem or object-store
implementation can replace this class without touching the streaming core.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from ._lease import remove_abandoned
from ._reference import Digest


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

    def scan(self) -> Usage:
        count = size = 0
        for algorithm in self._blobs.iterdir():
            for entry in os.scandir(algorithm):
                if entry.is_file(follow_symlinks=False):
                    count += 1
                    size += entry.stat(follow_symlinks=False).st_size
        self._blob_count, self._blob_bytes = count, size
        return self.usage()

    def usage(self) -> Usage:
        return Usage(self._blob_count, self._blob_bytes)

    def check_writable(self) -> list[str]:
        """Problems that would stop the cache from taking new blobs (empty: none)."""
        probe = self.partial_dir / f".probe-{secrets.token_hex(4)}"
        try:
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            return [f"cache {self.partial_dir} is not writable: {exc.strerror}"]
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
        self._readers[digest] = self._readers.get(digest, 0) + 1
        try:
            os.utime(fd)
        except OSError:
            pass  # a read-only cache still serves; it just cannot keep its LRU order
        return fd

    def release(self, digest: Digest) -> None:
        left = self._readers.get(digest, 0) - 1
        if left > 0:
            self._readers[digest] = left
        else:
            self._readers.pop(digest, None)

    def is_being_read(self, digest: Digest) -> bool:
        return digest in self._readers

    def blobs_by_age(self) -> list[tuple[float, int, Digest]]:
        """(last use, size, digest) of every stored blob, least recently used first."""
        found = []
        for algorithm in self._blobs.iterdir():
            for entry in os.scandir(algorithm):
                if entry.is_file(follow_symlinks=False):
                    stat = entry.stat(follow_symlinks=False)
                    found.append((stat.st_mtime, stat.st_size, Digest(algorithm.name, entry.name)))
        found.sort()
        return found

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
        """Remove manifests and tag records not used since ``older_than`` (wall clock)."""
        manifests = tags = 0
        for path in self._manifests.rglob("*"):
            if path.is_file() and path.stat().st_mtime < older_than:
                path.unlink(missing_ok=True)
                manifests += 1
        for path in self._tags.rglob("_tags/*"):
            if path.is_file() and path.stat().st_mtime < older_than:
                path.unlink(missing_ok=True)
                tags += 1
        return manifests, tags

    def counts(self) -> dict[str, int]:
        """What the cache holds, by kind (for ``streamsync-trio cache stats``)."""
        return {
            "manifests": sum(1 for p in self._manifests.rglob("*") if p.is_file()),
            "tags": sum(1 for p in self._tags.rglob("_tags/*") if p.is_file()),
            "partials": sum(1 for p in self.partial_dir.iterdir() if not p.name.startswith(".")),
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
        os.rename(partial, final)
        if not replaced:
            self._blob_count += 1
            self._blob_bytes += final.stat().st_size
        return final

    # -- manifests ---------------------------------------------------------------------------

    def _manifest_path(self, digest: Digest) -> Path:
        return self._manifests / digest.algorithm / digest.hex

    def read_manifest(self, digest: Digest) -> tuple[bytes, str] | None:
        path = self._manifest_path(digest)
        try:
            raw = path.read_bytes()
            os.utime(path)  # last use, for `cache gc`
        except FileNotFoundError:
            return None
        media_type, _, body = raw.partition(b"\n")
        return body, media_type.decode()

    def write_manifest(self, digest: Digest, body: bytes, media_type: str) -> None:
        _atomic_write(self._manifest_path(digest), media_type.encode() + b"\n" + body)

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


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
