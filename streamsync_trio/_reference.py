"""Pure parsing of what a client asks for: repository names, tags, digests, API paths.

Everything that arrives in a URL is checked here, before any other layer sees it, against the
grammar of the OCI distribution spec.  The store builds file paths from digests only, and only
from digests this module accepted (fixed alphabet, fixed length), which is what keeps a hostile
name or reference from ever reaching the file system.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from ._errors import RegistryError, digest_invalid, name_invalid, unsupported

# OCI distribution spec, "Pulling manifests": repository name components and tags.
_NAME_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME_RE = re.compile(rf"{_NAME_COMPONENT}(?:/{_NAME_COMPONENT})*")
_TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
_MAX_NAME_LENGTH = 255

# Only algorithms we can verify are accepted: a digest we cannot check is a digest we would
# have to trust, and the proxy never serves bytes it has not verified.
_DIGEST_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_DIGEST_SHAPE_RE = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")


@dataclass(frozen=True, slots=True)
class Digest:
    """A verified-shape content digest, e.g. ``sha256:<64 hex>``."""

    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


def parse_digest(text: str) -> Digest:
    """Parse ``algorithm:hex``; raise 400 ``DIGEST_INVALID`` for anything else."""
    if len(text) > 200 or not _DIGEST_SHAPE_RE.fullmatch(text):
        raise digest_invalid(text[:200], "not of the form algorithm:encoded")
    algorithm, _, encoded = text.partition(":")
    expected_length = _DIGEST_HEX_LENGTH.get(algorithm)
    if expected_length is None:
        raise digest_invalid(text, f"unsupported algorithm {algorithm!r}")
    if len(encoded) != expected_length or not re.fullmatch(r"[0-9a-f]+", encoded):
        raise digest_invalid(text, f"{algorithm} needs {expected_length} lowercase hex digits")
    return Digest(algorithm, encoded)


def is_digest_like(reference: str) -> bool:
    """Tags cannot contain ``:``, so a reference with one is meant as a digest."""
    return ":" in reference


def validate_name(name: str) -> str:
    if len(name) > _MAX_NAME_LENGTH:
        raise name_invalid(name[:_MAX_NAME_LENGTH], f"longer than {_MAX_NAME_LENGTH} characters")
    if not _NAME_RE.fullmatch(name):
        raise name_invalid(name, "does not match the OCI name grammar")
    return name


def is_tag(text: str) -> bool:
    """Does ``text`` match the spec's tag grammar ``[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}``?"""
    return _TAG_RE.fullmatch(text) is not None


def validate_tag(tag: str) -> str:
    """A reference that is no tag (and no digest) cannot name a manifest: 404, not 400.

    The spec's answer to a manifest that is not found is ``404 MANIFEST_UNKNOWN``;
    ``MANIFEST_INVALID`` is what a *push* of a bad manifest gets.  The OCI conformance suite
    asks for ``.INVALID_MANIFEST_NAME`` and expects exactly that 404.
    """
    if not is_tag(tag):
        raise RegistryError(
            404,
            "MANIFEST_UNKNOWN",
            "manifest unknown: not a tag ([a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}) nor a digest",
            detail={"tag": tag[:200]},
        )
    return tag


def is_host_like(component: str) -> bool:
    """Docker's rule for "is the first path component a registry host"."""
    return "." in component or ":" in component or component == "localhost"


_HOST_RE = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?\.)*[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
    r"(?::[0-9]{1,5})?"
)


def is_registry_host(name: str) -> bool:
    """A real ``host[:port]``: host-like by Docker's rule *and* a valid DNS name or address.

    ``..`` is host-like (it has a dot) but no host; such a name must never become an upstream
    or a path component under the cache root.
    """
    return is_host_like(name) and _HOST_RE.fullmatch(name) is not None


EndpointKind = Literal["manifest", "blob", "tags", "referrers"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A parsed ``/v2/...`` request path (before the repository is routed to an upstream)."""

    kind: EndpointKind
    name: str
    reference: str = ""


def parse_v2_path(path: str, method: str) -> Endpoint:
    """Split the part of a path after ``/v2/`` into repository name and endpoint.

    Names contain slashes, so the endpoint is recognised from the right-hand end, the way
    Distribution's router does it.  Write endpoints are recognised too, so that a push gets a
    405 ``UNSUPPORTED`` rather than a confusing 404.
    """
    parts = path.split("/")
    if len(parts) >= 3 and parts[-2] == "uploads" and parts[-3] == "blobs":
        raise unsupported("this registry is a read-only pull-through cache")
    if len(parts) >= 4 and parts[-3] == "uploads" and parts[-4] == "blobs":
        raise unsupported("this registry is a read-only pull-through cache")
    if len(parts) >= 3 and parts[-2] == "tags" and parts[-1] == "list":
        kind: EndpointKind = "tags"
        name_parts, reference = parts[:-2], ""
    elif len(parts) >= 3 and parts[-2] in ("manifests", "blobs", "referrers"):
        kind = {"manifests": "manifest", "blobs": "blob", "referrers": "referrers"}[parts[-2]]  # type: ignore[assignment]
        name_parts, reference = parts[:-2], parts[-1]
    else:
        raise RegistryError(404, "NOT_FOUND", "no such API endpoint", detail={"path": path[:300]})
    if method not in ("GET", "HEAD"):
        raise unsupported("this registry is a read-only pull-through cache")
    name = "/".join(name_parts)
    # Upstream prefixes (``ghcr.io/...``) are host-like and not valid name components, so the
    # name is checked component by component after routing; here only the shape that no
    # route can make valid is rejected.
    if not name or (not reference and kind != "tags"):
        raise RegistryError(404, "NOT_FOUND", "no such API endpoint", detail={"path": path[:300]})
    return Endpoint(kind, name, reference)
