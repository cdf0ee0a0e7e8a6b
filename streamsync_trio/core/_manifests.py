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
* Concurrent requests share upstream fetches: one per digest, one per tag and ``Accept``
  class, and a client with a narrow ``Accept`` first waits for a broad fetch of the same tag
  in flight, whose answer it can often use.  Fetches run in the app nursery, so a
  disconnecting first client does not cancel them for the others.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
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

__all__ = [
    "DEFAULT_ACCEPT",
    "MANIFEST_MEDIA_TYPES",
    "Accept",
    "CachedManifest",
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


class _Pending:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: CachedManifest | None = None
        self.error: RegistryError | None = None


_PendingKey = tuple[str, str, str, str, str]  # (kind, upstream, repo, reference, record key)


class ManifestService:
    def __init__(self, store: Store, nursery: trio.Nursery) -> None:
        self._store = store
        self._nursery = nursery
        self._pending: dict[_PendingKey, _Pending] = {}
        self.upstream_fetches = 0  # manifest GETs sent upstream: what a pull limit counts
        self.upstream_heads = 0  # manifest HEADs sent upstream (free on Docker Hub)
        self.not_found: NegativeCache[tuple[str, str, str, str]] = NegativeCache()

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
        manifest = await self._get_by_digest(upstream, repo, digest, accept.widened())
        assert manifest.body is not None
        await trio.to_thread.run_sync(
            self._store.write_manifest, digest, manifest.body, manifest.media_type
        )
        await self._link(upstream, repo, digest, manifest.body)
        return manifest

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
            and self._is_fresh(upstream, record)
            and accept.admits(record.media_type)
        ):
            return await self._from_record(record)
        if accept.is_broad:
            return None
        record = await self._read_tag(upstream, repo, tag, accept.record_key)
        if record is not None and self._is_fresh(upstream, record):
            # Made for this very Accept: whatever the upstream answered then (even a type the
            # client did not list: registries send what they have) is the answer now.
            return await self._from_record(record)
        return None

    async def _fetch_tag(
        self, upstream: Upstream, repo: str, tag: str, accept: Accept, head: bool
    ) -> CachedManifest:
        record = await self._read_tag(upstream, repo, tag, accept.record_key)
        cached = await self._from_record(record) if record is not None else None
        try:
            resolved: ManifestHead | None = None
            if cached is not None or head:
                self.upstream_heads += 1
                resolved = await upstream.head_manifest(repo, tag, accept.header)
                if cached is not None and resolved.digest == cached.digest:
                    await self._write_tag(upstream, repo, tag, accept, cached)
                    return cached
            if head and resolved is not None:
                answer = _head_answer(resolved)
                if answer is not None:
                    await self._write_tag(upstream, repo, tag, accept, answer)
                    return answer
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
                return cached
            raise
        answer = await self._store_tag_answer(upstream, repo, manifest)
        await self._write_tag(upstream, repo, tag, accept, answer)
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
        await trio.to_thread.run_sync(self._store.write_manifest, digest, manifest.body, media_type)
        await self._link(upstream, repo, digest, manifest.body)
        return CachedManifest.of(manifest.body, media_type, str(digest))

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

    def _is_fresh(self, upstream: Upstream, record: TagRecord) -> bool:
        return time.time() - record.fetched_at < upstream.config.tag_ttl

    async def _read_tag(
        self, upstream: Upstream, repo: str, tag: str, record_key: str
    ) -> TagRecord | None:
        return await trio.to_thread.run_sync(
            self._store.read_tag, upstream.name, repo, _record_name(tag, record_key)
        )

    async def _write_tag(
        self, upstream: Upstream, repo: str, tag: str, accept: Accept, answer: CachedManifest
    ) -> None:
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
        digest = parse_digest(digest_text)
        stored = await trio.to_thread.run_sync(self._store.read_manifest, digest)
        return None if stored is None else CachedManifest.of(stored[0], stored[1], digest_text)

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
