"""Bits flipped on the cache's disk: ``cache verify`` finds and quarantines them, ``cache gc``
prunes dangling links, and the proxy never serves a damaged blob or manifest complete."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest
import trio

from streamsync_trio._reference import Digest, parse_digest
from streamsync_trio.core._scrub import content_listing, scrub
from streamsync_trio.core._store import Store
from streamsync_trio.core._trusted import TrustedBlobs
from streamsync_trio.ops._cli import main

from ..labs.fakes import UPSTREAM
from ..labs.httplab import MiB, SendfileMeter, fetch, real_time_fake, running_proxy
from ..labs.storelab import MANIFEST_TYPE, digest_of, flip_bit, put_blob, put_manifest, quarantined

# -- cache verify ------------------------------------------------------------------------


def test_verify_quarantines_exactly_the_damaged_blob_and_manifest(
    cache: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    blobs = [put_blob(cache, os.urandom(n)) for n in (5 * MiB + 7, 100, 1)]
    manifests = [put_manifest(cache, {b: 1})[0] for b in blobs[:2]]
    flip_bit(cache.blob_path(blobs[0]), 5 * MiB)  # in the second 4 MiB read
    flip_bit(cache.manifest_path(manifests[1]), 40)
    # Not content: a partial (never complete) and an atomic write's temporary file.
    partial = cache.new_partial(blobs[1])
    partial.write_bytes(b"half a blob")
    temporary = cache.manifest_path(manifests[0]).with_name(".x.tmp")
    temporary.write_bytes(b"being written")

    assert main(["cache", "verify"]) == 1
    out = capsys.readouterr().out
    assert f"DAMAGED {cache.blob_path(blobs[0])}" in out
    assert f"DAMAGED {cache.manifest_path(manifests[1])}" in out
    assert "verified 5 file(s)" in out and "2 damaged" in out
    assert quarantined(cache) == [
        f"blobs/sha256/{blobs[0].hex}",
        f"manifests/sha256/{manifests[1].hex}",
        f"manifests/sha256/{manifests[1].hex}.type",  # one entry: the type went with it
    ]
    # The store no longer finds them; everything else is where it was.
    assert cache.blob_size(blobs[0]) is None and cache.read_manifest(manifests[1]) is None
    assert all(cache.blob_size(b) is not None for b in blobs[1:])
    assert cache.read_manifest(manifests[0]) is not None
    assert partial.read_bytes() == b"half a blob" and temporary.exists()
    assert cache.counts()["quarantined"] == 2

    assert main(["cache", "verify", "--quiet"]) == 0
    assert capsys.readouterr().out == ""


def test_verify_a_clean_cache_exits_0_and_reports_throughput(
    cache: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    put_blob(cache, os.urandom(3 * MiB))
    put_manifest(cache, {})
    assert main(["cache", "verify"]) == 0
    out = capsys.readouterr().out
    assert "verified 2 file(s), 3.0 MiB" in out and "/s); 0 damaged" in out
    assert not cache.quarantine_dir.exists()


def test_verify_finds_a_damaged_or_missing_media_type_file_and_junk_names(
    cache: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    digest, body = put_manifest(cache, {})
    flip_bit(cache.manifest_type_path(digest), len("application"))  # "/" -> "?"
    typeless, _ = put_manifest(cache, {digest: len(body)})
    cache.manifest_type_path(typeless).unlink()
    intact, _ = put_manifest(cache, {typeless: 1})
    junk = cache.blob_path(Digest("sha256", "not-a-digest"))
    junk.parent.mkdir(parents=True, exist_ok=True)
    junk.write_bytes(b"x")
    assert main(["cache", "verify", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert f"DAMAGED {junk}: not named by a digest" in out
    assert f"DAMAGED {cache.manifest_path(digest)}: its media type file holds" in out
    assert "not a manifest media type" in out
    assert f"DAMAGED {cache.manifest_path(typeless)}: no media type file beside it" in out
    assert out.count("DAMAGED") == 3  # the .type files are not entries of their own
    assert quarantined(cache) == sorted(
        [
            "blobs/sha256/not-a-digest",
            f"manifests/sha256/{digest.hex}",
            f"manifests/sha256/{digest.hex}.type",
            f"manifests/sha256/{typeless.hex}",
        ]
    )
    assert cache.read_manifest(intact) is not None
    assert main(["cache", "verify", "--quiet"]) == 0


def test_verify_leaves_a_blob_replaced_while_it_was_hashed(cache: Store) -> None:
    """A running proxy may quarantine and download a blob again while the scrub hashes the
    old file: the new file came verified and must stay."""
    data = os.urandom(9 * MiB)
    digest = put_blob(cache, data)
    path = cache.blob_path(digest)
    flip_bit(path, 0)
    replaced: list[bool] = []

    def replace_once(_: int) -> None:
        if not replaced:
            fresh = cache.new_partial(digest)
            fresh.write_bytes(data)
            os.rename(fresh, path)  # as a commit does
            replaced.append(True)

    report = scrub(cache, content_listing(cache), on_bytes=replace_once)
    assert report.findings == [] and report.changed == 1
    assert path.read_bytes() == data
    assert quarantined(cache) == []


def test_a_damaged_stored_manifest_is_a_cache_miss(cache: Store) -> None:
    digest, body = put_manifest(cache, {})
    assert cache.read_manifest(digest) == (body, MANIFEST_TYPE)
    flip_bit(cache.manifest_path(digest), 5)
    assert cache.read_manifest(digest) is None
    assert quarantined(cache) == [
        f"manifests/sha256/{digest.hex}",
        f"manifests/sha256/{digest.hex}.type",
    ]
    cache.write_manifest(digest, body, MANIFEST_TYPE)  # fetched afresh
    assert cache.read_manifest(digest) == (body, MANIFEST_TYPE)


# -- cache gc: links ---------------------------------------------------------------------


def test_gc_prunes_links_to_content_that_is_gone(
    cache: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    stored = put_blob(cache, b"stored")
    gone, declared, recent, in_flight, elsewhere = (
        digest_of(name.encode()) for name in ("gone", "declared", "recent", "in flight", "else")
    )
    manifest, _ = put_manifest(cache, {declared: 8})
    cache.link(UPSTREAM, "lib/app", [stored, gone, recent, in_flight, manifest])
    cache.note_declared_sizes(UPSTREAM, "lib/app", {declared: 8, gone: 4})
    # Another repository's link to ``declared``: no stored manifest of *it* names the blob.
    cache.link(UPSTREAM, "other", [declared, elsewhere])
    cache.new_partial(in_flight).write_bytes(b"in")
    links = {(repo, digest): path for _, repo, digest, path in cache.links()}
    hour_ago = time.time() - 7200
    for (_, digest), path in links.items():
        if digest != recent:
            os.utime(path, (hour_ago, hour_ago))

    assert main(["cache", "gc", "--dry-run"]) == 0
    assert "would remove 3 repository link(s)" in capsys.readouterr().out
    assert {(r, d) for _, r, d, _ in cache.links()} == set(links)

    assert main(["cache", "gc"]) == 0
    assert "removed 3 repository link(s)" in capsys.readouterr().out
    assert {(r, d) for _, r, d, _ in cache.links()} == set(links) - {
        ("lib/app", gone),
        ("other", declared),
        ("other", elsewhere),
    }
    # The declared size a stored manifest gives survives, for the next download's bound.
    assert cache.declared_size(UPSTREAM, "lib/app", declared) == 8


# -- the proxy: a stored blob is checked on its first serve ------------------------------


@pytest.mark.parametrize("range_header", [None, "bytes=0-99"], ids=["whole", "range"])
async def test_a_flipped_bit_is_never_served_complete_after_a_restart(
    tmp_path: Path, range_header: str | None
) -> None:
    fake = real_time_fake()
    data = os.urandom(6 * MiB + 3)
    digest = fake.add_blob(data)
    async with running_proxy(tmp_path, fake) as proxy, httpx.AsyncClient() as client:
        await fetch(client, proxy.blob_url(digest))
        await proxy.wait_stored(digest)
        path = proxy.state.store.blob_path(parse_digest(digest))
    flip_bit(path, 3 * MiB)

    # A new process: it has checked nothing yet.
    async with running_proxy(tmp_path, fake) as proxy, httpx.AsyncClient() as client:
        headers = {} if range_header is None else {"Range": range_header}
        received = bytearray()
        async with client.stream("GET", proxy.blob_url(digest), headers=headers) as response:
            with pytest.raises(httpx.RemoteProtocolError):
                async for chunk in response.aiter_raw():
                    received += chunk
        expected = len(data) if range_header is None else 100
        assert response.status_code in (200, 206)
        assert int(response.headers["Content-Length"]) == expected
        assert len(received) < expected  # never complete
        assert proxy.state.downloads.stored_checks == {"verified": 0, "damaged": 1}
        metrics = (await client.get(f"{proxy.url}/metrics")).text
        assert 'streamsync_stored_blob_checks_total{result="damaged"} 1.0' in metrics
        assert quarantined(proxy.state.store) == [f"blobs/sha256/{digest.partition(':')[2]}"]
        # The next request downloads it afresh, and it is stored intact again.
        response, body = await fetch(client, proxy.blob_url(digest))
        assert response.status_code == 200 and body == data
        assert len(fake.blob_gets(digest)) == 2
        await proxy.wait_stored(digest)
        assert path.read_bytes() == data


async def test_a_checked_blob_leaves_by_sendfile_and_is_not_checked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = real_time_fake()
    data = os.urandom(9 * MiB + 123)
    digest = fake.add_blob(data)
    async with running_proxy(tmp_path, fake) as proxy, httpx.AsyncClient() as client:
        await fetch(client, proxy.blob_url(digest))
        await proxy.wait_stored(digest)
        # Committed by this process: trusted, no check.
        assert (await fetch(client, proxy.blob_url(digest)))[1] == data
        assert proxy.state.downloads.stored_checks == {"verified": 0, "damaged": 0}

    async with running_proxy(tmp_path, fake) as proxy, httpx.AsyncClient() as client:
        meter = SendfileMeter(monkeypatch)
        _, first = await fetch(client, proxy.blob_url(digest))  # checked while served
        assert first == data
        assert proxy.state.downloads.stored_checks == {"verified": 1, "damaged": 0}
        meter.sent = 0
        _, again = await fetch(client, proxy.blob_url(digest))
        assert again == data
        assert meter.sent == len(data)  # all of it by sendfile, as before the check existed
        assert proxy.state.downloads.stored_checks == {"verified": 1, "damaged": 0}
        assert len(fake.blob_gets(digest)) == 1


async def test_an_emptied_blob_is_downloaded_again_not_served_empty(tmp_path: Path) -> None:
    """A truncated file has no last byte to hold back: it is judged before the headers."""
    fake = real_time_fake()
    data = os.urandom(MiB)
    digest = fake.add_blob(data)
    async with running_proxy(tmp_path, fake) as proxy, httpx.AsyncClient() as client:
        await fetch(client, proxy.blob_url(digest))
        path = proxy.state.store.blob_path(parse_digest(digest))
        await proxy.wait_stored(digest)
    os.truncate(path, 0)
    async with running_proxy(tmp_path, fake) as proxy, httpx.AsyncClient() as client:
        response, body = await fetch(client, proxy.blob_url(digest))
        assert response.status_code == 200 and body == data
        assert len(fake.blob_gets(digest)) == 2
        assert proxy.state.downloads.stored_checks["damaged"] == 1


def test_trusted_blobs_are_bounded_and_forget_the_least_recently_served() -> None:
    trusted = TrustedBlobs(limit=2)
    a, b, c = (digest_of(x) for x in (b"a", b"b", b"c"))
    trusted.add(a, (1, 1, 1))
    trusted.add(b, (1, 2, 1))
    assert trusted.trusts(a, (1, 1, 1))  # a is now the most recent
    assert not trusted.trusts(a, (1, 9, 1))  # another file at the same path
    trusted.add(c, (1, 3, 1))
    assert len(trusted) == 2
    assert trusted.trusts(a, (1, 1, 1)) and trusted.trusts(c, (1, 3, 1))
    assert not trusted.trusts(b, (1, 2, 1))


async def test_clients_of_a_first_serve_share_one_check(tmp_path: Path) -> None:
    fake = real_time_fake()
    data = os.urandom(4 * MiB + 5)
    digest = fake.add_blob(data)
    async with running_proxy(tmp_path, fake) as proxy, httpx.AsyncClient() as client:
        await fetch(client, proxy.blob_url(digest))
        await proxy.wait_stored(digest)
    async with running_proxy(tmp_path, fake) as proxy, httpx.AsyncClient() as client:
        bodies: list[bytes] = []

        async def one() -> None:
            bodies.append((await fetch(client, proxy.blob_url(digest)))[1])

        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(one)
        assert bodies == [data] * 6
        assert proxy.state.downloads.stored_checks == {"verified": 1, "damaged": 0}
        assert len(fake.blob_gets(digest)) == 1
