"""Manifests: fetched whole, verified, cached by digest; tags cached for a TTL.

Manifests are small, so unlike blobs they are not streamed: the proxy fetches the whole
document, checks that it is a manifest and matches its digest, stores it under that digest and
only then answers.  Policies:

* A digest reference is immutable: once stored it is served from disk forever, to every
  client whose ``Accept`` admits its type (``_negotiation`` explains the rest).
* A tag maps to a digest for ``tag_ttl`` seconds.  After that the proxy revalidates with a
  ``HEAD`` (free on Docker Hub's rate limit), and downloads again only if the digest moved.
* A ``HEAD`` by tag that finds nothing cached is answered by a ``HEAD`` upstream, not a
  ``GET``: Docker and containerd resolve a tag with a HEAD and then GET the digest, and each
  GET counts against Docker Hub's pull limit.  The body is fetched when a client needs it.
* If the upstream cannot be reached (or is overloaded) and a tag was cached before, the stale
  answer is served with a warning in the log: a mirror that fails whenever its upstream blips
  is worse than no mirror.
* Hot manifests are kept in memory (:class:`HotManifests`, bounded by bytes), so the HTTP
  edge can answer a cached GET or HEAD by digest without a worker thread reading the file
  (:meth:`ManifestService.hot`); the file on disk stays the authority (see the class).
* Concurrent requests share upstream fetches: one per digest, one per tag and ``Accept``
  class, and a client with a narrow ``Accept`` first waits for a broad fetch of the same tag
  in flight, whose answer it can often use.  Fetches run in the app nursery, so a
  disconnecting first client does not cancel them for the others.
* In a fleet (``shared_tags``, see ``_tag_sharing``), a tag is resolved with the fleet before
  the upstream, and the upstream's answer is shared: N nodes ask the upstream once per tag
  and ``Accept`` class per ``tag_ttl``.  A shared manifest is checked like an upstream one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

import trio

from .._errors import RegistryError
from .._reference import Digest, is_digest_like, parse_digest, validate_tag
from ..upstream import MAX_MANIFEST_BYTES, Manifest, ManifestHead, Upstream
from ._descriptors import declared_sizes
from ._negative import NegativeCache, remembering
from ._negotiation import (
    DEFAULT_ACCEPT,
    MANIFEST_MEDIA_TYPES,
    SCHEMA1_MEDIA_TYPES,
    Accept,
    manifest_media_type,
    schema1_unsupported,
)
from ._store import Store, TagRecord
from ._tag_sharing import SharedTag, SharedTags, TagKey

__all__ = [
    "DEFAULT_ACCEPT",
    "MANIFEST_MEDIA_TYPES",
    "Accept",
    "CachedManifest",
    "HotManifests",
    "ManifestService",
    "referenced_digests",
]

log = logging.getLogger("streamsync_trio.manifests")


@dataclass(frozen=True, slots=True)
class CachedManifest:
    body: bytes | None  # None: only its headers are known (a HEAD answered by a HEAD upstream)
    media_type: str
    digest: str
    size: int

    @classmethod
    def of(cls, body: bytes, media_type: str, digest: str) -> CachedManifest:
        return cls(body, media_type, digest, len(body))


def referenced_digests(body: bytes) -> list[Digest]:
    """The digests a manifest or index points at: config, layers, child manifests, subject.

    Anything unparsable is skipped: the manifest itself was verified by digest, and a field we
    do not understand only means fewer links, never a wrong one.
    """
    try:
        document = json.loads(body)
    except ValueError:
        return []
    if not isinstance(document, dict):
        return []
    descriptors: list[object] = [document.get("config"), document.get("subject")]
    for key in ("layers", "manifests", "blobs"):
        entries = document.get(key)
        if isinstance(entries, list):
            descriptors.extend(entries)
    found = []
    for descriptor in descriptors:
        if isinstance(descriptor, dict) and isinstance(descriptor.get("digest"), str):
            try:
                found.append(parse_digest(descriptor["digest"]))
            except RegistryError:
                continue
    return found


# (device, inode, size, ctime) of the body file, (device, inode, ctime) of its type file.
_Identity = tuple[int, int, int, int, int, int, int]


def _identity(body_path: str, type_path: str) -> _Identity | None:
    """What the two files of a stored manifest are now; None when either is gone.

    The change time is in it because every change to a file moves it: a rewrite in place (a
    damaged disk, an operator), a rename of a new file over it (a new inode anyway), and the
    last-use mark another worker's read sets (harmless: it only sends the next request here
    to the file once more)."""
    try:
        body = os.stat(body_path)
        kind = os.stat(type_path)
    except OSError:
        return None
    return (
        body.st_dev,
        body.st_ino,
        body.st_size,
        body.st_ctime_ns,
        kind.st_dev,
        kind.st_ino,
        kind.st_ctime_ns,
    )


def _read_with_identity(
    store: Store, digest: Digest
) -> tuple[tuple[bytes, str], _Identity | None] | None:
    """``Store.read_manifest`` (verified, last use marked), then what its files are after it.
    In a worker thread: the read touches the disk."""
    stored = store.read_manifest(digest)
    if stored is None:
        return None
    paths = str(store.manifest_path(digest)), str(store.manifest_type_path(digest))
    return stored, _identity(*paths)


def _write_with_identity(
    store: Store, digest: Digest, body: bytes, media_type: str
) -> _Identity | None:
    """``Store.write_manifest``, then what its files are after it (in a worker thread)."""
    store.write_manifest(digest, body, media_type)
    return _identity(str(store.manifest_path(digest)), str(store.manifest_type_path(digest)))


@dataclass(slots=True)
class _HotEntry:
    manifest: CachedManifest
    paths: tuple[str, str]
    identity: _Identity
    until: float  # monotonic: after this, the next request reads the file again


class HotManifests:
    """Manifests read from the store lately, kept in memory, bounded by ``max_bytes``.

    Why: a fleet pulling one image asks for the same few manifests thousands of times, and
    each slow-path read is a worker-thread hop that opens, reads and hashes two files.  The
    store stays the authority, so an entry is used only while, checked on every use with two
    ``stat`` calls and no thread:

    * both files are still the very files read (same inode, size and change time): a
      manifest expired by ``cache gc`` or the eviction pass, quarantined by ``cache verify``,
      rewritten or damaged in place is not answered from here;
    * the entry is younger than ``fresh_for`` seconds: then the next request reads the file
      again through the store, which verifies its digest again and marks its last use (the
      clock ``cache gc`` expires manifests by; without reads it would stop while in use).

    The bytes served are the ones verified when read, so an entry can never serve content
    that does not match its digest.  Least recently used entries go first.
    """

    def __init__(
        self,
        *,
        max_bytes: int = 16 * 1024 * 1024,
        max_entry: int = 1024 * 1024,
        fresh_for: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_bytes = max_bytes
        self._max_entry = max_entry
        self._fresh_for = fresh_for
        self._clock = clock
        self._entries: OrderedDict[str, _HotEntry] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: str) -> CachedManifest | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if self._clock() >= entry.until or _identity(*entry.paths) != entry.identity:
            self.drop(digest)
            return None
        self._entries.move_to_end(digest)
        return entry.manifest

    def put(self, manifest: CachedManifest, paths: tuple[str, str], identity: _Identity) -> None:
        if manifest.body is None or manifest.size > self._max_entry:
            return
        self.drop(manifest.digest)
        until = self._clock() + self._fresh_for
        self._entries[manifest.digest] = _HotEntry(manifest, paths, identity, until)
        self.bytes += manifest.size
        while self.bytes > self._max_bytes:
            self.drop(next(iter(self._entries)))

    def drop(self, digest: str) -> None:
        entry = self._entries.pop(digest, None)
        if entry is not None:
            self.bytes -= entry.manifest.size


class _Pending:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: CachedManifest | None = None
        self.error: RegistryError | None = None


_PendingKey = tuple[str, str, str, str, str]  # (kind, upstream, repo, reference, record key)


# (upstream, repo, tag record name) -> (digest, wall-clock end) of answers adopted from the fleet
_FleetExpiry = dict[tuple[str, str, str], tuple[str, float]]
_MAX_FLEET_EXPIRY = 10_000


class ManifestService:
    def __init__(
        self, store: Store, nursery: trio.Nursery, shared_tags: SharedTags | None = None
    ) -> None:
        self._store = store
        self._nursery = nursery
        # None: this node alone resolves its tags (no cluster); else the fleet is asked first.
        self.shared_tags = shared_tags
        self._fleet_expiry: _FleetExpiry = {}
        self._pending: dict[_PendingKey, _Pending] = {}
        self.upstream_fetches = 0  # manifest GETs sent upstream: what a pull limit counts
        self.upstream_heads = 0  # manifest HEADs sent upstream (free on Docker Hub)
        self.not_found: NegativeCache[tuple[str, str, str, str]] = NegativeCache()
        self.hot_manifests = HotManifests()

    def hot(
        self, upstream: Upstream, repo: str, reference: str, accept: Accept
    ) -> CachedManifest | None:
        """The answer :meth:`get` would give, when it is certain without waiting: a manifest
        by digest, linked to ``repo``, in memory (:class:`HotManifests`), of a type the client
        accepts.  None means "ask :meth:`get`"; nothing is counted either way.

        Synchronous (two or three ``stat`` calls), for the edge's fast path.  While any 404
        is remembered it always says None: :meth:`get` may have to answer that 404 from
        memory (and count it), and only it expires the memory."""
        if len(self.not_found) or not is_digest_like(reference):
            return None
        try:
            digest = parse_digest(reference)
        except RegistryError:
            return None
        if not self._store.is_linked(upstream.name, repo, digest):
            return None
        manifest = self.hot_manifests.get(str(digest))
        if manifest is None or not accept.admits(manifest.media_type):
            return None
        return manifest

    async def get(
        self,
        upstream: Upstream,
        repo: str,
        reference: str,
        accept: Accept,
        *,
        head: bool = False,
    ) -> CachedManifest:
        """The manifest a client with this ``Accept`` gets; with ``head``, maybe headers only.

        An upstream 404 is remembered for a few seconds (``_negative``): a fleet asking for a
        tag that does not exist must not cost the upstream one request per client.  The key
        holds the Accept class, since a registry's 404 can depend on what the client accepts.
        """
        key = (upstream.name, repo, reference, accept.record_key)
        if is_digest_like(reference):
            digest = parse_digest(reference)
            return await remembering(
                self.not_found, key, partial(self._by_digest, upstream, repo, digest, accept, head)
            )
        validate_tag(reference)
        return await remembering(
            self.not_found, key, partial(self._by_tag, upstream, repo, reference, accept, head)
        )

    # -- by digest -----------------------------------------------------------------------------

    async def _by_digest(
        self, upstream: Upstream, repo: str, digest: Digest, accept: Accept, head: bool
    ) -> CachedManifest:
        answer = await self._document(upstream, repo, digest, accept)
        if accept.admits(answer.media_type):
            return answer
        # We hold this document in a type the client did not list.  Registries differ on
        # what they do then (Distribution refuses OCI types, serves Docker ones), so the
        # upstream is asked, with the client's own Accept, and its answer passed on.
        return await self._as_upstream_answers(upstream, repo, digest, accept, head)

    async def _document(
        self, upstream: Upstream, repo: str, digest: Digest, accept: Accept
    ) -> CachedManifest:
        """The document itself, from the cache when this repository is known to hold it."""
        if self._store.is_linked(upstream.name, repo, digest):
            stored = await self._stored(str(digest))
            if stored is not None:
                return stored
        return await self._shared(
            ("digest", upstream.name, repo, str(digest), ""),
            partial(self._fetch_by_digest, upstream, repo, digest, accept),
        )

    async def _fetch_by_digest(
        self, upstream: Upstream, repo: str, digest: Digest, accept: Accept
    ) -> CachedManifest:
        stored = await self._stored(str(digest))
        if stored is not None:
            # Cached, but not known to be in this repository: the upstream must confirm it
            # (as this repository, with its credentials) before we serve it here.
            self.upstream_heads += 1
            await upstream.head_manifest(repo, str(digest), accept.widened())
            assert stored.body is not None
            await self._link(upstream, repo, digest, stored.body)
            return stored
        shared = await self._fleet_manifest(upstream, repo, digest, accept)
        if shared is not None:
            return shared
        manifest = await self._get_by_digest(upstream, repo, digest, accept.widened())
        await self._write(digest, manifest)
        assert manifest.body is not None
        await self._link(upstream, repo, digest, manifest.body)
        if self.shared_tags is not None:
            ttl = upstream.config.tag_ttl
            await self.shared_tags.share_manifest(str(digest), manifest.body, ttl)
        return manifest

    async def _fleet_manifest(
        self, upstream: Upstream, repo: str, digest: Digest, accept: Accept
    ) -> CachedManifest | None:
        """A manifest another node fetched and shared: a HEAD upstream instead of a GET
        (Docker Hub counts GETs against its pull limit, not HEADs).  The HEAD also confirms
        that this repository holds the digest (knowing a digest is not access) and names its
        media type; the body must hash to the digest.  None: GET it from the upstream."""
        if self.shared_tags is None:
            return None
        body = await self.shared_tags.manifest(str(digest))
        if body is None:
            return None
        self.upstream_heads += 1
        head = await upstream.head_manifest(repo, str(digest), accept.widened())
        return await self._store_shared(
            upstream, repo, str(digest), body, head.media_type, str(digest)
        )

    async def _store_shared(
        self,
        upstream: Upstream,
        repo: str,
        digest: str,
        body: bytes,
        media_type: str,
        shared_as: TagKey | str,
    ) -> CachedManifest | None:
        """A manifest the fleet shared, checked exactly like an upstream answer, then stored
        and linked to ``repo``; None (counted) when it fails a check: then the upstream is
        asked.  The checks are what make a wrong or tampered entry harmless: the body must
        be a manifest within the size bound and hash to the digest it is shared under.
        ``shared_as``: the tag, or the digest, the fleet shared it under (for the count)."""
        assert self.shared_tags is not None
        try:
            parsed = parse_digest(digest)
            if len(body) > MAX_MANIFEST_BYTES:
                raise _bad_upstream(upstream, "shared by the fleet is over the size bound")
            _check_digest(body, parsed)
            media_type = manifest_media_type(body, media_type, upstream.name)
        except RegistryError as error:
            log.warning("ignoring the fleet's manifest %s: %s", digest, error.message)
            self.shared_tags.rejected(shared_as, error.message)
            return None
        answer = CachedManifest.of(body, media_type, digest)
        await self._write(parsed, answer)
        await self._link(upstream, repo, parsed, body)
        return answer

    async def _as_upstream_answers(
        self, upstream: Upstream, repo: str, digest: Digest, accept: Accept, head: bool
    ) -> CachedManifest:
        if head:
            self.upstream_heads += 1
            answer = await upstream.head_manifest(repo, str(digest), accept.header)
            if answer.digest not in (None, str(digest)) or answer.size is None:
                raise _bad_upstream(upstream, "its HEAD answer names another digest")
            return CachedManifest(None, answer.media_type, str(digest), answer.size)
        return await self._get_by_digest(upstream, repo, digest, accept.header)

    async def _get_by_digest(
        self, upstream: Upstream, repo: str, digest: Digest, accept_header: str
    ) -> CachedManifest:
        """GET a manifest by digest: a manifest, and the very bytes the digest names."""
        self.upstream_fetches += 1
        manifest = await upstream.get_manifest(repo, str(digest), accept_header)
        media_type = manifest_media_type(manifest.body, manifest.media_type, upstream.name)
        _check_digest(manifest.body, digest)
        return CachedManifest.of(manifest.body, media_type, str(digest))

    # -- by tag --------------------------------------------------------------------------------

    async def _by_tag(
        self, upstream: Upstream, repo: str, tag: str, accept: Accept, head: bool
    ) -> CachedManifest:
        answer = await self._fresh_tag(upstream, repo, tag, accept)
        broad_fetch = self._pending.get(("tag", upstream.name, repo, tag, ""))
        if answer is None and broad_fetch is not None and not accept.is_broad:
            # A broad fetch of this tag is under way; its answer serves this client too
            # whenever the tag's document is of a type the client accepts.
            await broad_fetch.done.wait()
            answer = await self._fresh_tag(upstream, repo, tag, accept)
        if answer is None:
            answer = await self._shared(
                ("tag", upstream.name, repo, tag, accept.record_key),
                partial(self._fetch_tag, upstream, repo, tag, accept, head),
            )
        if answer.body is None and not head:
            # Resolved by a HEAD; the client now needs the document itself.
            answer = await self._document(upstream, repo, parse_digest(answer.digest), accept)
        return answer

    async def _fresh_tag(
        self, upstream: Upstream, repo: str, tag: str, accept: Accept
    ) -> CachedManifest | None:
        """The cached answer to this client, if one is within ``tag_ttl``."""
        record = await self._read_tag(upstream, repo, tag, "")
        if (
            record is not None
            and self._is_fresh(upstream, repo, tag, record)
            and accept.admits(record.media_type)
        ):
            return await self._from_record(record)
        if accept.is_broad:
            return None
        record = await self._read_tag(upstream, repo, tag, accept.record_key)
        if record is not None and self._is_fresh(
            upstream, repo, _record_name(tag, accept.record_key), record
        ):
            # Made for this very Accept: whatever the upstream answered then (even a type the
            # client did not list: registries send what they have) is the answer now.
            return await self._from_record(record)
        return None

    async def _fetch_tag(
        self, upstream: Upstream, repo: str, tag: str, accept: Accept, head: bool
    ) -> CachedManifest:
        record = await self._read_tag(upstream, repo, tag, accept.record_key)
        cached = await self._from_record(record) if record is not None else None
        sharing = self.shared_tags if upstream.config.tag_ttl > 0 else None
        if sharing is None:
            return (await self._ask_upstream(upstream, repo, tag, accept, head, cached))[0]
        key = TagKey(upstream.name, repo, tag, accept.record_key)
        # A HEAD with nothing cached is answered by a HEAD upstream, which is free: it takes
        # a fleet's answer if there is one, but does not wait for another node's GET.
        shared = await sharing.lookup(key, wait=not head or cached is not None)
        if shared is not None:
            adopted = await self._adopt(upstream, repo, tag, accept, key, shared)
            if adopted is not None:
                await sharing.abandon(key)  # no-op unless the wait ran out and then we won
                return adopted
        try:
            answer, confirmed = await self._ask_upstream(upstream, repo, tag, accept, head, cached)
        except (RegistryError, OSError):
            await sharing.abandon(key)
            raise
        if confirmed and answer.body is not None:
            fresh = SharedTag(answer.digest, answer.media_type, answer.body)
            await sharing.publish(key, fresh, upstream.config.tag_ttl)
        else:  # stale, or headers only: nothing the fleet may take for the tag's answer
            await sharing.abandon(key)
        return answer

    async def _ask_upstream(
        self,
        upstream: Upstream,
        repo: str,
        tag: str,
        accept: Accept,
        head: bool,
        cached: CachedManifest | None,
    ) -> tuple[CachedManifest, bool]:
        """The upstream's answer for this tag now (revalidating ``cached`` with a HEAD), and
        whether the upstream confirmed it (False: ``cached`` served stale while it fails)."""
        try:
            resolved: ManifestHead | None = None
            if cached is not None or head:
                self.upstream_heads += 1
                resolved = await upstream.head_manifest(repo, tag, accept.header)
                if cached is not None and resolved.digest == cached.digest:
                    await self._write_tag(upstream, repo, tag, accept, cached)
                    return cached, True
            if head and resolved is not None:
                answer = _head_answer(resolved)
                if answer is not None:
                    await self._write_tag(upstream, repo, tag, accept, answer)
                    return answer, True
            self.upstream_fetches += 1
            manifest = await upstream.get_manifest(repo, tag, accept.header)
        except RegistryError as error:
            if cached is not None and error.status in (429, 502, 503, 504):
                log.warning(
                    "upstream %s unreachable for %s:%s (%s); serving the cached tag (stale)",
                    upstream.name,
                    repo,
                    tag,
                    error.message,
                )
                return cached, False
            raise
        answer = await self._store_tag_answer(upstream, repo, manifest)
        await self._write_tag(upstream, repo, tag, accept, answer)
        return answer, True

    async def _adopt(
        self,
        upstream: Upstream,
        repo: str,
        tag: str,
        accept: Accept,
        key: TagKey,
        shared: SharedTag,
    ) -> CachedManifest | None:
        """The fleet's answer for a tag, checked and stored (:meth:`_store_shared`) and
        recorded as this node's; None (counted) when it fails a check."""
        answer = await self._store_shared(
            upstream, repo, shared.digest, shared.body, shared.media_type, key
        )
        if answer is None:
            return None
        await self._write_tag(upstream, repo, tag, accept, answer)
        # Fresh here only as long as at the node that fetched it: tag_ttl bounds staleness.
        name = _record_name(tag, accept.record_key)
        if len(self._fleet_expiry) >= _MAX_FLEET_EXPIRY:
            now = time.time()
            self._fleet_expiry = {k: v for k, v in self._fleet_expiry.items() if v[1] > now}
            if len(self._fleet_expiry) >= _MAX_FLEET_EXPIRY:
                self._fleet_expiry.clear()  # only loosens the bound to tag_ttl after adoption
        until = time.time() + max(0.0, shared.fresh_for)
        self._fleet_expiry[(upstream.name, repo, name)] = (answer.digest, until)
        return answer

    async def _store_tag_answer(
        self, upstream: Upstream, repo: str, manifest: Manifest
    ) -> CachedManifest:
        media_type = manifest_media_type(manifest.body, manifest.media_type, upstream.name)
        claimed = manifest.upstream_digest
        if claimed is not None and claimed.startswith("sha512:"):
            digest = Digest("sha512", hashlib.sha512(manifest.body).hexdigest())
        else:
            digest = Digest("sha256", hashlib.sha256(manifest.body).hexdigest())
        if claimed is not None and claimed != str(digest):
            raise _bad_upstream(upstream, "it does not match its Docker-Content-Digest")
        answer = CachedManifest.of(manifest.body, media_type, str(digest))
        await self._write(digest, answer)
        await self._link(upstream, repo, digest, manifest.body)
        return answer

    # -- plumbing ------------------------------------------------------------------------------

    async def _shared(
        self, key: _PendingKey, fetch: Callable[[], Awaitable[CachedManifest]]
    ) -> CachedManifest:
        """Run ``fetch`` once for everyone asking under ``key`` at the same time."""
        pending = self._pending.get(key)
        if pending is None:
            pending = _Pending()
            self._pending[key] = pending
            self._nursery.start_soon(self._run, key, pending, fetch)
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    async def _run(
        self,
        key: _PendingKey,
        pending: _Pending,
        fetch: Callable[[], Awaitable[CachedManifest]],
    ) -> None:
        """Supervised: every outcome lands in ``pending``; nothing escapes into the nursery."""
        try:
            pending.result = await fetch()
        except RegistryError as error:
            pending.error = error
        except OSError as exc:
            log.error("manifest cache write failed: %s", exc)
            pending.error = RegistryError(500, "UNKNOWN", "manifest cache write failed")
        except trio.Cancelled:
            pending.error = RegistryError(503, "UNAVAILABLE", "the proxy is shutting down")
            raise
        except Exception as exc:
            log.exception("manifest fetch %s failed", key)
            pending.error = RegistryError(500, "UNKNOWN", f"internal error: {type(exc).__name__}")
        finally:
            del self._pending[key]
            pending.done.set()

    def _is_fresh(self, upstream: Upstream, repo: str, name: str, record: TagRecord) -> bool:
        now = time.time()
        adopted = self._fleet_expiry.get((upstream.name, repo, name))
        if adopted is not None and adopted[0] == record.digest and now >= adopted[1]:
            return False  # taken from the fleet: as old as where it was fetched
        return now - record.fetched_at < upstream.config.tag_ttl

    async def _read_tag(
        self, upstream: Upstream, repo: str, tag: str, record_key: str
    ) -> TagRecord | None:
        return await trio.to_thread.run_sync(
            self._store.read_tag, upstream.name, repo, _record_name(tag, record_key)
        )

    async def _write_tag(
        self, upstream: Upstream, repo: str, tag: str, accept: Accept, answer: CachedManifest
    ) -> None:
        # Written now, so fresh for tag_ttl from now (``_adopt`` narrows it again after).
        self._fleet_expiry.pop((upstream.name, repo, _record_name(tag, accept.record_key)), None)
        await trio.to_thread.run_sync(
            self._store.write_tag,
            upstream.name,
            repo,
            _record_name(tag, accept.record_key),
            answer.digest,
            answer.media_type,
            answer.size,
        )

    async def _from_record(self, record: TagRecord) -> CachedManifest | None:
        stored = await self._stored(record.digest)
        if stored is not None:
            return stored
        if record.size is not None and record.media_type in MANIFEST_MEDIA_TYPES:
            return CachedManifest(None, record.media_type, record.digest, record.size)
        return None

    async def _stored(self, digest_text: str) -> CachedManifest | None:
        """The stored manifest, read (and verified) through the store; kept in memory too."""
        digest = parse_digest(digest_text)
        read = await trio.to_thread.run_sync(_read_with_identity, self._store, digest)
        if read is None:
            self.hot_manifests.drop(digest_text)
            return None
        (body, media_type), identity = read
        manifest = CachedManifest.of(body, media_type, digest_text)
        self._keep(digest, manifest, identity)
        return manifest

    async def _write(self, digest: Digest, manifest: CachedManifest) -> None:
        """Store a verified manifest; kept in memory too, as the files just written."""
        assert manifest.body is not None
        identity = await trio.to_thread.run_sync(
            _write_with_identity, self._store, digest, manifest.body, manifest.media_type
        )
        self._keep(digest, manifest, identity)

    def _keep(self, digest: Digest, manifest: CachedManifest, identity: _Identity | None) -> None:
        if identity is not None:
            paths = self._store.manifest_path(digest), self._store.manifest_type_path(digest)
            self.hot_manifests.put(manifest, (str(paths[0]), str(paths[1])), identity)

    async def _link(self, upstream: Upstream, repo: str, digest: Digest, body: bytes) -> None:
        """Record that ``repo`` contains this manifest and everything it references."""
        await trio.to_thread.run_sync(
            self._store.link, upstream.name, repo, [digest, *referenced_digests(body)]
        )
        # What the manifest declares of a blob's size bounds its download (``_limits.SizeBound``).
        await trio.to_thread.run_sync(
            self._store.note_declared_sizes, upstream.name, repo, declared_sizes(body)
        )


def _record_name(tag: str, record_key: str) -> str:
    """The tag record of one ``Accept`` class (``Accept.record_key``); ``~`` cannot appear in
    a tag, so the names never collide with a tag's own record."""
    return f"{tag}~{record_key}" if record_key else tag


def _head_answer(head: ManifestHead) -> CachedManifest | None:
    """A HEAD's headers as an answer, when they say everything a HEAD client needs."""
    if head.media_type in SCHEMA1_MEDIA_TYPES:
        raise schema1_unsupported()
    if head.digest is None or head.size is None or head.media_type not in MANIFEST_MEDIA_TYPES:
        return None
    if head.size > MAX_MANIFEST_BYTES:
        return None  # the GET will refuse it with the reason
    try:
        parse_digest(head.digest)
    except RegistryError:
        return None
    return CachedManifest(None, head.media_type, head.digest, head.size)


def _check_digest(body: bytes, digest: Digest) -> None:
    if hashlib.new(digest.algorithm, body).hexdigest() != digest.hex:
        raise RegistryError(
            502,
            "DIGEST_INVALID",
            "upstream manifest does not match the requested digest",
            detail={"digest": str(digest)},
        )


def _bad_upstream(upstream: Upstream, why: str) -> RegistryError:
    return RegistryError(502, "UNAVAILABLE", f"upstream {upstream.name}: manifest {why}")
