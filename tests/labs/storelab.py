"""A cache on disk built by hand: stored blobs and manifests, and bits flipped in them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from streamsync_trio._reference import Digest
from streamsync_trio.core._store import Store

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


def digest_of(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


def put_blob(store: Store, data: bytes) -> Digest:
    digest = digest_of(data)
    store.blob_path(digest).parent.mkdir(parents=True, exist_ok=True)
    store.blob_path(digest).write_bytes(data)
    return digest


def put_manifest(store: Store, layers: dict[Digest, int]) -> tuple[Digest, bytes]:
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "layers": [
                {"mediaType": "application/octet-stream", "digest": str(d), "size": size}
                for d, size in layers.items()
            ],
        }
    ).encode()
    digest = digest_of(body)
    store.write_manifest(digest, body, MANIFEST_TYPE)
    return digest, body


def flip_bit(path: Path, offset: int) -> None:
    """In place, as a disk would: same file, same size, one bit different."""
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)[0]
        file.seek(offset)
        file.write(bytes([byte ^ 0x10]))


def quarantined(store: Store) -> list[str]:
    """``kind/alg/hex`` of every quarantined file, without the nonce (a manifest's type file:
    ``kind/alg/hex.type``)."""
    found = []
    for path in store.quarantine_dir.rglob("*"):
        if path.is_file():
            name, _, rest = path.name.partition(".")
            suffix = ".type" if rest.endswith(".type") else ""
            found.append(f"{path.parent.relative_to(store.quarantine_dir)}/{name}{suffix}")
    return sorted(found)
