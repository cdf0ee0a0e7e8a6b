"""Manifests: fetched whole, verified, cached by digest; tags cached for a TTL.

Manifests are small, so unlike blobs they are not streamed: the proxy fetches the whole
document, checks its digest, stores it under that digest and only then answers.  Policies:

* A digest reference is immutable: once stored it is served from disk forever.
* A tag maps to a digest for ``tag_ttl`` seconds.  After that the proxy revalidates with a
  ``HEAD`` (free on Docker Hub's rate limit), and downloads again only if the digest moved.
* If the upstream cannot be reached (or is overloaded) and a tag was cached before, the stale
  answer is served with a warning in the log: a mirror that fails whenever its upstream blips
  is worse than no mirror.
* Concurrent requests for the same manifest share one upstream fetch, which runs in the app
  nursery so that a disconnecting first client does not cancel it for the others.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass

import trio

from ._errors import RegistryError, manifest_unknown, upstream_unavailable
from ._reference import Digest, is_digest_like, parse_digest, validate_tag
from ._store import Store
from ._upstream import Upstream

log = logging.getLogger("streamsync_trio.manifests")

MANIFEST_MEDIA_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
DEFAULT_ACCEPT = ", ".join(MANIFEST_MEDIA_TYPES)
_ALL_TYPES = frozenset(MANIFEST_MEDIA_TYPES)


@dataclass(frozen=True, slots=True)
class CachedManifest:
    body: bytes
    media_type: str
    digest: str


def accepted_types(accept: str) -> frozenset[str] | None:
    """The media types an ``Accept`` header admits; ``None`` means anything goes."""
    types = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    types.discard("")
    if not types or "*/*" in types:
        return None
    return frozenset(types)


def _record_name(tag: str, accept: frozenset[str] | None) -> str:
    """Which tag record answers a client with this ``Accept``.

    The same tag can resolve to different manifests by ``Accept`` (a multi-platform index for
    clients that take one, a single-platform manifest for clients that do not), so a narrow
    ``Accept`` gets a record of its own and never overwrites what everyone else is served.
    ``~`` cannot appear in a tag, so the names never collide.
    """
    if accept is None or accept >= _ALL_TYPES:
        return tag
    key = hashlib.sha256(",".join(sorted(accept)).encode()).hexdigest()[:16]
    return f"{tag}~{key}"


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


class ManifestService:
    def __init__(self, store: Store, nursery: trio.Nursery) -> None:
        self._store = store
        self._nursery = nursery
        self._pending: dict[tuple[str, str, str, str], _Pending] = {}
        self.upstream_fetches = 0  # observable for tests and metrics

    async def get(
        self, upstream: Upstream, repo: str, reference: str, accept: str
    ) -> CachedManifest:
        accept = accept.strip() or DEFAULT_ACCEPT
        accept_set = accepted_types(accept)
        if is_digest_like(reference):
            digest = parse_digest(reference)
            if self._store.is_linked(upstream.name, repo, digest):
                stored = await trio.to_thread.run_sync(self._store.read_manifest, digest)
                if stored is not None:
                    return CachedManifest(stored[0], stored[1], str(digest))
        else:
            validate_tag(reference)
            fresh = await self._fresh_tag(upstream, repo, reference, accept_set)
            if fresh is not None:
                return fresh
        key = (upstream.name, repo, reference, ",".join(sorted(accept_set or ("*/*",))))
        pending = self._pending.get(key)
        if pending is None:
            pending = _Pending()
            self._pending[key] = pending
            self._nursery.start_soon(self._fetch, key, pending, upstream, repo, reference, accept)
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    async def _fresh_tag(
        self, upstream: Upstream, repo: str, tag: str, accept: frozenset[str] | None
    ) -> CachedManifest | None:
        record = await trio.to_thread.run_sync(
            self._store.read_tag, upstream.name, repo, _record_name(tag, accept)
        )
        if record is None or time.time() - record.fetched_at >= upstream.config.tag_ttl:
            return None
        return await self._stored(record.digest)

    async def _stored(self, digest_text: str) -> CachedManifest | None:
        digest = parse_digest(digest_text)
        stored = await trio.to_thread.run_sync(self._store.read_manifest, digest)
        return None if stored is None else CachedManifest(stored[0], stored[1], digest_text)

    async def _fetch(
        self,
        key: tuple[str, str, str, str],
        pending: _Pending,
        upstream: Upstream,
        repo: str,
        reference: str,
        accept: str,
    ) -> None:
        """Supervised: every outcome lands in ``pending``; nothing escapes into the nursery."""
        try:
            if is_digest_like(reference):
                pending.result = await self._fetch_by_digest(
                    upstream, repo, parse_digest(reference), accept
                )
            else:
                pending.result = await self._fetch_tag(upstream, repo, reference, accept)
        except RegistryError as error:
            pending.error = error
        except OSError as exc:
            log.error("manifest cache write failed: %s", exc)
            pending.error = RegistryError(500, "UNKNOWN", "manifest cache write failed")
        except trio.Cancelled:
            pending.error = RegistryError(503, "UNAVAILABLE", "the proxy is shutting down")
            raise
        except Exception as exc:
            log.exception("manifest fetch %s/%s:%s failed", upstream.name, repo, reference)
            pending.error = RegistryError(500, "UNKNOWN", f"internal error: {type(exc).__name__}")
        finally:
            del self._pending[key]
            pending.done.set()

    async def _fetch_by_digest(
        self, upstream: Upstream, repo: str, digest: Digest, accept: str
    ) -> CachedManifest:
        stored = await trio.to_thread.run_sync(self._store.read_manifest, digest)
        if stored is not None:
            # Cached, but not known to be in this repository: the upstream must confirm it
            # (as this repository, with its credentials) before we serve it here.
            await upstream.head_manifest(repo, str(digest), accept)
            await self._link(upstream, repo, digest, stored[0])
            return CachedManifest(stored[0], stored[1], str(digest))
        self.upstream_fetches += 1
        manifest = await upstream.get_manifest(repo, str(digest), accept)
        actual = hashlib.new(digest.algorithm, manifest.body).hexdigest()
        if actual != digest.hex:
            raise RegistryError(
                502,
                "DIGEST_INVALID",
                "upstream manifest does not match the requested digest",
                detail={"digest": str(digest)},
            )
        await trio.to_thread.run_sync(
            self._store.write_manifest, digest, manifest.body, manifest.media_type
        )
        await self._link(upstream, repo, digest, manifest.body)
        return CachedManifest(manifest.body, manifest.media_type, str(digest))

    async def _link(self, upstream: Upstream, repo: str, digest: Digest, body: bytes) -> None:
        """Record that ``repo`` contains this manifest and everything it references."""
        await trio.to_thread.run_sync(
            self._store.link, upstream.name, repo, [digest, *referenced_digests(body)]
        )

    async def _fetch_tag(
        self, upstream: Upstream, repo: str, tag: str, accept: str
    ) -> CachedManifest:
        record_name = _record_name(tag, accepted_types(accept))
        record = await trio.to_thread.run_sync(
            self._store.read_tag, upstream.name, repo, record_name
        )
        cached = None
        # The record was made for this Accept (see _record_name), so whatever the upstream
        # answered then is the answer now, even a type the client did not list.
        if record is not None:
            cached = await self._stored(record.digest)
        try:
            if cached is not None:
                # Revalidate cheaply: a HEAD costs no pull on Docker Hub's rate limit.
                head = await upstream.head_manifest(repo, tag, accept)
                if head.digest == cached.digest:
                    await trio.to_thread.run_sync(
                        self._store.write_tag,
                        upstream.name,
                        repo,
                        record_name,
                        cached.digest,
                        cached.media_type,
                    )
                    return cached
            self.upstream_fetches += 1
            manifest = await upstream.get_manifest(repo, tag, accept)
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
        digest = Digest("sha256", hashlib.sha256(manifest.body).hexdigest())
        claimed = manifest.upstream_digest
        if claimed is not None and claimed.startswith("sha256:") and claimed != str(digest):
            raise upstream_unavailable(
                upstream.name, "manifest does not match its Docker-Content-Digest"
            )
        if not manifest.body:
            raise manifest_unknown(tag)
        await trio.to_thread.run_sync(
            self._store.write_manifest, digest, manifest.body, manifest.media_type
        )
        await self._link(upstream, repo, digest, manifest.body)
        await trio.to_thread.run_sync(
            self._store.write_tag,
            upstream.name,
            repo,
            record_name,
            str(digest),
            manifest.media_type,
        )
        return CachedManifest(manifest.body, manifest.media_type, str(digest))
