"""Stored manifests: every file named by a digest hashes to that name, the media type lives in
the ``.type`` file beside it, and a cache written in the old single-file format (a media-type
line, then the body) is rewritten once, at start."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import httpx
import pytest

from streamsync_trio._reference import Digest, parse_digest
from streamsync_trio.core._store import Store
from streamsync_trio.ops._cli import main

from ..labs.fakes import UPSTREAM
from ..labs.httplab import real_time_fake, running_proxy
from ..labs.storelab import MANIFEST_TYPE, digest_of, put_manifest, quarantined

INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
REPO = "library/app"


def manifest_files(store: Store) -> list[Path]:
    """Every file under ``manifests/`` that is named like content (not a type, not a temp)."""
    root = store.root / "manifests"
    return sorted(
        p for p in root.rglob("*") if p.is_file() and "." not in p.name and p.parent != root
    )


def write_old_format(store: Store, body: bytes, media_type: str) -> Digest:
    """A manifest as versions before this one stored it: a media-type line, then the body."""
    digest = digest_of(body)
    path = store.manifest_path(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(media_type.encode() + b"\n" + body)
    return digest


def index_body(*children: Digest) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": INDEX_TYPE,
            "manifests": [
                {"mediaType": MANIFEST_TYPE, "digest": str(c), "size": 2} for c in children
            ],
        }
    ).encode()


async def test_every_stored_manifest_file_hashes_to_its_name(tmp_path: Path) -> None:
    fake = real_time_fake()
    image = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "layers": []}).encode()
    image_digest = fake.add_manifest(REPO, "image", image)
    index = index_body(parse_digest(image_digest))
    fake.add_manifest(REPO, "v1", index, INDEX_TYPE)
    async with running_proxy(tmp_path, fake) as proxy, httpx.AsyncClient() as client:
        for reference in ("v1", image_digest):
            response = await client.get(f"{proxy.url}/v2/{REPO}/manifests/{reference}")
            assert response.status_code == 200
        store = proxy.state.store
    files = manifest_files(store)
    assert len(files) == 2
    for path in files:
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name  # what sha256sum says
    types = {path.name: path.with_name(path.name + ".type").read_text() for path in files}
    assert types == {
        digest_of(index).hex: INDEX_TYPE + "\n",
        parse_digest(image_digest).hex: MANIFEST_TYPE + "\n",
    }


async def test_an_old_format_cache_is_migrated_at_start_and_served_with_its_type(
    tmp_path: Path,
) -> None:
    fake = real_time_fake()  # knows nothing: every answer must come from the cache
    store = Store(tmp_path / "cache")
    child = write_old_format(store, b'{"schemaVersion":2,"config":{}}', MANIFEST_TYPE)
    index = index_body(child)
    digest = write_old_format(store, index, INDEX_TYPE)
    store.link(UPSTREAM, REPO, [digest, child])
    last_use = time.time() - 86400
    os.utime(store.manifest_path(digest), (last_use, last_use))

    async with running_proxy(tmp_path, fake) as proxy, httpx.AsyncClient() as client:
        # Migrated before the first request: the body alone, its last use kept for `cache gc`.
        assert store.manifest_path(digest).read_bytes() == index
        assert store.manifest_path(digest).stat().st_mtime == pytest.approx(last_use)
        assert store.read_manifest_type(digest) == INDEX_TYPE
        response = await client.get(f"{proxy.url}/v2/{REPO}/manifests/{digest}")
        assert response.status_code == 200
        assert response.headers["Content-Type"] == INDEX_TYPE
        assert response.content == index
        child_response = await client.get(f"{proxy.url}/v2/{REPO}/manifests/{child}")
        assert child_response.headers["Content-Type"] == MANIFEST_TYPE
        assert fake.manifest_requests("GET") == fake.manifest_requests("HEAD") == []
    for path in manifest_files(store):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name


def test_migration_is_idempotent_quarantines_damage_and_leaves_other_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store(tmp_path / "cache")
    good = write_old_format(store, b'{"schemaVersion":2}', MANIFEST_TYPE)
    damaged = write_old_format(store, b'{"schemaVersion":2,"x":1}', MANIFEST_TYPE)
    raw = bytearray(store.manifest_path(damaged).read_bytes())
    raw[-3] ^= 0x10
    store.manifest_path(damaged).write_bytes(bytes(raw))
    unknown_type = write_old_format(store, b'{"schemaVersion":2,"x":2}', "text/html")
    current, _ = put_manifest(store, {})
    bare = digest_of(b'{"bare":1}')  # a body whose type is gone: a miss, not damage
    store.manifest_path(bare).write_bytes(b'{"bare":1}')
    junk = store.manifest_path(bare).with_name("not-a-digest")
    junk.write_bytes(b"x")

    with caplog.at_level("WARNING", "streamsync_trio.store"):
        assert store.migrate_manifests() == 1
    assert "rewrote 1 manifest(s)" in caplog.text
    assert store.read_manifest(good) == (b'{"schemaVersion":2}', MANIFEST_TYPE)
    assert quarantined(store) == sorted(
        [f"manifests/sha256/{damaged.hex}", f"manifests/sha256/{unknown_type.hex}"]
    )
    assert store.read_manifest(current) is not None
    assert store.manifest_path(bare).exists() and junk.exists()  # not migration's business
    before = {p: p.stat().st_mtime_ns for p in (store.root / "manifests").rglob("*")}
    assert store.migrate_manifests() == 0
    assert {p: p.stat().st_mtime_ns for p in (store.root / "manifests").rglob("*")} == before


def test_a_body_without_its_type_is_a_miss_never_a_guess(cache: Store) -> None:
    digest, body = put_manifest(cache, {})
    cache.manifest_type_path(digest).unlink()
    assert cache.read_manifest(digest) is None
    assert cache.manifest_path(digest).exists() and quarantined(cache) == []
    cache.write_manifest(digest, body, MANIFEST_TYPE)  # fetched afresh
    assert cache.read_manifest(digest) == (body, MANIFEST_TYPE)


def test_a_type_that_is_not_a_manifest_type_is_a_miss(cache: Store) -> None:
    digest, _ = put_manifest(cache, {})
    cache.manifest_type_path(digest).write_text("text/html\n")
    assert cache.read_manifest(digest) is None
    assert quarantined(cache) == [
        f"manifests/sha256/{digest.hex}",
        f"manifests/sha256/{digest.hex}.type",
    ]


def test_gc_expires_a_manifest_with_its_type_by_the_manifest_s_last_use(
    cache: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    stale, _ = put_manifest(cache, {})
    used, _ = put_manifest(cache, {stale: 1})
    orphan_type = cache.manifest_type_path(digest_of(b"crashed between the two renames"))
    orphan_type.write_text(MANIFEST_TYPE + "\n")
    long_ago = time.time() - 40 * 86400
    for path in (
        cache.manifest_path(stale),
        cache.manifest_type_path(stale),
        cache.manifest_type_path(used),  # its type is old, but the manifest was just read
        orphan_type,
    ):
        os.utime(path, (long_ago, long_ago))

    assert main(["cache", "gc"]) == 0
    assert "removed 1 manifest(s)" in capsys.readouterr().out
    assert not cache.manifest_path(stale).exists()
    assert not cache.manifest_type_path(stale).exists() and not orphan_type.exists()
    assert cache.read_manifest(used) is not None
    assert cache.counts()["manifests"] == 1
