"""Manifest content negotiation, as registries do it: pure functions, no I/O.

A tag can name several documents at once: a multi-platform index to a client that accepts
indexes, one platform's manifest to a client that does not.  Registries choose by the client's
``Accept``, and clients send it in every shape HTTP allows: containers/image (podman, buildah,
skopeo, CRI-O) and Docker send one ``Accept:`` line per media type, Docker in a different order
on every request; containerd joins them with commas and adds ``*/*``.  So the proxy reads
*every* line, splits the comma lists, honours ``q=0``, and forwards all of it.

What the proxy caches for a tag is the answer to a client that accepts every manifest type (the
tag's own document).  Any client whose ``Accept`` admits that document's type gets exactly what
the upstream would have sent it, because a registry only substitutes a document when the
client refuses the tag's own type.  A client that refuses it gets an answer of its own from the
upstream, which is cached for that ``Accept`` alone (:attr:`Accept.record_key`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass

from .._errors import RegistryError, manifest_unknown

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_V2 = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_V1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_V1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

MANIFEST_MEDIA_TYPES = (OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_V2)
SCHEMA1_MEDIA_TYPES = (DOCKER_V1_SIGNED, DOCKER_V1)
DEFAULT_ACCEPT = ", ".join(MANIFEST_MEDIA_TYPES)
_ALL_TYPES = frozenset(MANIFEST_MEDIA_TYPES)
_WILDCARDS = frozenset({"*/*", "application/*"})
# Content types that say nothing about which manifest a body is: the body's own mediaType
# (or, for OCI documents, which may omit it, their shape) decides.
_GENERIC_CONTENT_TYPES = frozenset(
    {"", "application/json", "application/octet-stream", "text/plain"}
)

# A client's Accept is bounded by the server's header limits already; these bounds keep what
# we forward and what we key records by small even so.
_MAX_ACCEPT_ITEMS = 64
_MAX_ACCEPT_HEADER = 4096


@dataclass(frozen=True, slots=True)
class Accept:
    """What one request's ``Accept`` lines admit, and the header to forward upstream."""

    types: frozenset[str] | None  # None: anything (a wildcard, or no Accept at all)
    header: str  # every value the client sent, in its order, comma-joined

    @classmethod
    def parse(cls, values: Iterable[str]) -> Accept:
        items: list[str] = []
        types: set[str] = set()
        anything = False
        for value in values:
            for item in value.split(","):
                item = item.strip()
                if not item or len(items) >= _MAX_ACCEPT_ITEMS:
                    continue
                media_type, _, parameters = item.partition(";")
                media_type = media_type.strip().lower()
                items.append(item)
                if _refused(parameters):
                    continue  # "q=0": explicitly not acceptable
                if media_type in _WILDCARDS:
                    anything = True
                else:
                    types.add(media_type)
        if not items:
            # No Accept (curl, scripts) means "whatever you have": ask for every type we serve.
            return cls(None, DEFAULT_ACCEPT)
        while len(", ".join(items)) > _MAX_ACCEPT_HEADER:
            items.pop()
        if anything:
            # A wildcard admits every type, but registries do not all read it so
            # (Distribution ignores it and answers 404 to "*/*" alone for an index), and
            # what comes back is cached as the tag's answer for every client: so every type
            # is named explicitly, and the answer is the tag's own document.
            named = [t for t in MANIFEST_MEDIA_TYPES if t not in types]
            return cls(None, ", ".join([*named, *items]))
        return cls(frozenset(types), ", ".join(items))

    def admits(self, media_type: str) -> bool:
        return self.types is None or media_type in self.types

    @property
    def is_broad(self) -> bool:
        """Admits every manifest type the proxy serves, so the upstream answers it with the
        tag's own document: what it gets may be cached as the tag's answer for everyone."""
        return self.types is None or self.types >= _ALL_TYPES

    @property
    def record_key(self) -> str:
        """Names the cached answer to this Accept: '' for the broad answer, else a hash of
        the admitted types (so clients sending the same set in another order share it)."""
        if self.is_broad:
            return ""
        assert self.types is not None
        return hashlib.sha256(",".join(sorted(self.types)).encode()).hexdigest()[:16]

    def widened(self) -> str:
        """The header for a fetch by digest: the document is fixed, so ask for it in any type
        we serve and decide afterwards whether this client may have it."""
        if self.types is None:
            return self.header
        missing = [t for t in MANIFEST_MEDIA_TYPES if t not in self.types]
        return ", ".join([self.header, *missing]) if missing else self.header


def _refused(parameters: str) -> bool:
    for parameter in parameters.split(";"):
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "q":
            try:
                return float(value.strip()) == 0.0
            except ValueError:
                return False
    return False


def schema1_unsupported() -> RegistryError:
    """Docker's schema 1 is deprecated and its digests need the JWS payload rebuilt; rather
    than serve bytes we have not verified, we say so.  404 lets Docker and containerd fall
    back from the mirror to the upstream itself, which is what a user of such an image needs.
    """
    error = manifest_unknown("")
    error.message = (
        "the upstream answered with a Docker schema 1 manifest, which this proxy does not "
        "serve (deprecated format); pull this image from the upstream directly"
    )
    error.detail = {"mediaType": DOCKER_V1_SIGNED}
    return error


def manifest_media_type(body: bytes, content_type: str, upstream: str) -> str:
    """The media type of a document the upstream sent as a manifest, after checking it is one.

    A manifest must be a JSON object of a known type whose ``mediaType`` agrees with the
    ``Content-Type``: a truncated body, a ``{}`` from a redirect target, or an HTML error page
    must never be cached and served as a manifest.
    """
    content_type = content_type.split(";")[0].strip().lower()
    if content_type in SCHEMA1_MEDIA_TYPES:
        raise schema1_unsupported()
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise _not_a_manifest(upstream, "it is not JSON") from None
    if not isinstance(document, dict):
        raise _not_a_manifest(upstream, "it is not a JSON object")
    if document.get("schemaVersion") == 1:
        raise schema1_unsupported()
    declared = document.get("mediaType")
    if declared is not None and not isinstance(declared, str):
        raise _not_a_manifest(upstream, "its mediaType is not a string")
    if content_type in _ALL_TYPES:
        media_type = content_type
        if declared is not None and declared != content_type:
            raise _not_a_manifest(
                upstream, f"its mediaType {declared[:100]!r} disagrees with {content_type}"
            )
    elif content_type in _GENERIC_CONTENT_TYPES and declared in _ALL_TYPES:
        media_type = declared
    elif content_type in _GENERIC_CONTENT_TYPES and declared is None:
        # OCI documents may omit mediaType; their shape says which one they are.
        media_type = (
            OCI_INDEX if "manifests" in document else OCI_MANIFEST if "config" in document else ""
        )
        if not media_type:
            raise _not_a_manifest(upstream, "it is neither an image manifest nor an index")
    else:
        raise _not_a_manifest(upstream, f"its type {content_type[:100]!r} is not a manifest's")
    if document.get("schemaVersion") != 2:
        raise _not_a_manifest(upstream, "its schemaVersion is not 2")
    return media_type


def _not_a_manifest(upstream: str, why: str) -> RegistryError:
    return RegistryError(502, "MANIFEST_INVALID", f"upstream {upstream} sent a bad manifest: {why}")
