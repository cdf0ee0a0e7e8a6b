"""What a manifest says about the blobs it names: their sizes.

Every descriptor in an image manifest or index carries the ``size`` of the content it points
at, and the digest of a manifest we stored was verified, so its sizes are what the image's
author published.  The blob download uses them as its bound: an upstream that announces (or
sends) another length for a layer is wrong, and a blob of unannounced length may be no longer
than its manifest says (see ``_limits.SizeBound``).
"""

from __future__ import annotations

import json

from .._errors import RegistryError
from .._reference import Digest, parse_digest

# Larger than any real blob (the largest registry layer limits are tens of GiB); a "size" above
# it is nonsense and is ignored rather than trusted as a bound.
_MAX_DECLARED = 2**53


def declared_sizes(body: bytes) -> dict[Digest, int]:
    """``{digest: size}`` for each descriptor of a manifest or index (config, layers, child
    manifests, blobs, subject) whose digest and size are well-formed.

    Anything unparsable is skipped: a missing size only means the configured maximum is the
    bound instead.  A digest listed twice with two different sizes is dropped for the same
    reason: one of them is wrong and we cannot tell which.
    """
    try:
        document = json.loads(body)
    except ValueError:
        return {}
    if not isinstance(document, dict):
        return {}
    descriptors: list[object] = [document.get("config"), document.get("subject")]
    for key in ("layers", "manifests", "blobs"):
        entries = document.get(key)
        if isinstance(entries, list):
            descriptors.extend(entries)
    sizes: dict[Digest, int] = {}
    conflicting: set[Digest] = set()
    for descriptor in descriptors:
        if not isinstance(descriptor, dict):
            continue
        digest_text, size = descriptor.get("digest"), descriptor.get("size")
        if not isinstance(digest_text, str) or type(size) is not int:
            continue  # bool is an int, and ``"size": true`` is not a size
        if not 0 <= size <= _MAX_DECLARED:
            continue
        try:
            digest = parse_digest(digest_text)
        except RegistryError:
            continue
        if sizes.setdefault(digest, size) != size:
            conflicting.add(digest)
    for digest in conflicting:
        del sizes[digest]
    return sizes
