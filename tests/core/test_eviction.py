"""The size-capped cache: LRU eviction in the running proxy, and the cache commands."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import trio

from streamsync_trio import parse_config
from streamsync_trio._reference import Digest, parse_digest
from streamsync_trio.core._eviction import RESYNC_INTERVAL, CacheKeeper, enforce_cap, plan_eviction
from streamsync_trio.core._store import Store
from streamsync_trio.ops._cli import main

from ..labs.httplab import MiB, Running, fetch, real_time_fake, running_proxy
from ..labs.proclab import write_config


def d(n: int) -> Digest:
    return Digest("sha256", f"{n:064x}")


def test_plan_takes_least_recently_used_first_and_skips_busy_blobs() -> None:
    listing = [(1.0, 100, d(1)), (2.0, 100, d(2)), (3.0, 100, d(3)), (4.0, 100, d(4))]
    assert plan_eviction(listing, 400, 250, lambda _: False) == [d(1), d(2)]
    assert plan_eviction(listing, 400, 250, lambda x: x == d(1)) == [d(2), d(3)]
    assert plan_eviction(listing, 400, 400, lambda _: False) == []
    assert plan_eviction(listing, 400, 0, lambda _: True) == []


def stored(proxy: Running, digest: str) -> bool:
    return proxy.state.store.blob_size(parse_digest(digest)) is not None


async def settle() -> None:
    # File times have a coarse clock tick: space out uses so LRU order is unambiguous.
    await trio.sleep(0.05)


async def test_proxy_evicts_least_recently_used_blobs_over_the_cap(tmp_path: Path) -> None:
    fake = real_time_fake()
    a, b, c, e = (fake.add_blob(os.urandom(1 * MiB)) for _ in range(4))
    async with (
        running_proxy(tmp_path, fake, settings={"max_size": int(2.5 * MiB)}) as proxy,
        httpx.AsyncClient() as client,
    ):
        for digest in (a, b):
            await fetch(client, proxy.blob_url(digest))
            await proxy.wait_stored(digest)
            await settle()
        await fetch(client, proxy.blob_url(a))  # a is now more recent than b
        await settle()
        await fetch(client, proxy.blob_url(c))  # 3 MiB > 2.5 MiB: evict down to 2.25
        await proxy.wait_stored(c)
        with trio.fail_after(5):
            while stored(proxy, b):
                await trio.sleep(0.01)
        assert stored(proxy, a)
        assert stored(proxy, c)
        assert proxy.state.store.usage().bytes == 2 * MiB
        await settle()
        # Evicted blobs come back on demand.
        response, _ = await fetch(client, proxy.blob_url(b))
        assert response.status_code == 200
        assert len(fake.blob_gets(b)) == 2
        await proxy.wait_stored(b)
        with trio.fail_after(5):
            while stored(proxy, a):  # now a is the least recently used
                await trio.sleep(0.01)
        assert not stored(proxy, e)


async def test_a_blob_being_read_is_never_evicted(tmp_path: Path) -> None:
    # The blob being read is far larger than loopback socket buffers, so the proxy cannot
    # finish sending it (and release it) while the client is not reading.
    fake = real_time_fake()
    oldest = os.urandom(32 * MiB)
    oldest_digest = fake.add_blob(oldest)
    newer = [fake.add_blob(os.urandom(4 * MiB)) for _ in range(2)]
    cap = 36 * MiB
    async with (
        running_proxy(tmp_path, fake, settings={"max_size": cap}) as proxy,
        httpx.AsyncClient() as client,
    ):
        await fetch(client, proxy.blob_url(oldest_digest))
        await proxy.wait_stored(oldest_digest)
        await settle()
        async with client.stream("GET", proxy.blob_url(oldest_digest)) as slow:
            chunks = slow.aiter_raw()
            received = len(await anext(chunks))  # a slow reader holds the oldest blob
            for digest in newer:
                response, _ = await fetch(client, proxy.blob_url(digest))
                assert response.status_code == 200
                await proxy.wait_idle()
                await settle()
            # Over the cap, and the least recently used, but being read: it stays, and the
            # pass takes the next one in LRU order instead.
            assert proxy.state.store.is_being_read(parse_digest(oldest_digest))
            assert stored(proxy, oldest_digest)
            assert proxy.state.store.usage().bytes <= cap
            async for chunk in chunks:
                received += len(chunk)
        assert received == len(oldest)
        # Once released, the next commit's pass may take it.
        extra = fake.add_blob(os.urandom(8 * MiB))
        await fetch(client, proxy.blob_url(extra))
        with trio.fail_after(5):
            while stored(proxy, oldest_digest):
                await trio.sleep(0.01)


def test_cache_stats_and_gc_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    store = Store(cache)
    sizes = [300, 200, 100]
    for age, size in enumerate(sizes):
        digest = d(age + 1)
        path = store.blob_path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)
        os.utime(path, (1000 + age, 1000 + age))
    store.write_manifest(d(9), b"{}", "application/json")
    config = write_config(tmp_path / "cfg.toml", cache, "http://127.0.0.1:9")
    monkeypatch.setenv("STREAMSYNC_CONFIG", str(config))

    assert main(["cache", "stats"]) == 0
    out = capsys.readouterr().out
    assert "blobs      3 (600 B; cap none)" in out
    assert "manifests  1" in out

    assert main(["cache", "gc", "--max-size", "250", "--dry-run"]) == 0
    assert "would remove 2 blob(s), 500 B" in capsys.readouterr().out
    assert len(store.blobs_by_age()) == 3

    assert main(["cache", "gc", "--max-size", "350"]) == 0
    assert "removed 1 blob(s), 300 B" in capsys.readouterr().out
    assert [digest for _, _, digest in store.blobs_by_age()] == [d(2), d(3)]

    assert main(["cache", "gc", "--max-size", "lots"]) == 2


def test_max_size_config_is_parsed() -> None:
    config = parse_config({"storage": {"max_size": "1.5GiB"}})
    assert config.max_size == int(1.5 * 1024**3)
    assert replace(config, max_size=None).max_size is None


async def test_the_cap_holds_for_blobs_other_worker_processes_added(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Each worker keeps running totals of what it committed or followed; blobs another
    worker fetched alone reach its totals through the periodic listing."""
    mine, theirs = Store(tmp_path / "cache"), Store(tmp_path / "cache")
    keeper = CacheKeeper(mine, 2 * MiB, lambda _: False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keeper.run)
        for n in range(4):
            partial = theirs.new_partial(d(n))
            partial.write_bytes(os.urandom(MiB))
            theirs.commit_blob(partial, d(n))
        assert mine.usage().bytes == 0  # nothing told this worker
        await trio.sleep(RESYNC_INTERVAL + 1)
        on_disk = sum(size for _, size, _ in mine.blobs_by_age())
        assert on_disk <= 2 * MiB
        assert mine.usage().bytes == on_disk
        nursery.cancel_scope.cancel()


def store_with_blobs(root: Path, sizes: list[int], mtime_ns: int) -> Store:
    """A store holding blobs of ``sizes``, all last used at the same instant (a clock tick)."""
    store = Store(root)
    for n, size in enumerate(sizes):
        partial = store.new_partial(d(n))
        partial.write_bytes(b"x" * size)
        store.commit_blob(partial, d(n))
        os.utime(store.blob_path(d(n)), ns=(mtime_ns, mtime_ns))
    return store


async def test_blobs_tied_in_time_and_size_are_listed_and_evicted(tmp_path: Path) -> None:
    # File times are coarse: blobs committed in one tick, of one size, tie on both.
    store = store_with_blobs(tmp_path / "cache", [100] * 6, 1_700_000_000_000_000_000)
    listing = store.blobs_by_age()
    assert len(listing) == 6
    assert [digest for _, _, digest in listing] == sorted((d(n) for n in range(6)), key=str)
    evicted = await enforce_cap(store, 300, lambda _: False)
    assert evicted.removed == 4  # 600 bytes down to the low-water mark, 270
    assert store.usage().bytes == 200
    assert len(store.blobs_by_age()) == 2


async def test_a_blob_that_cannot_be_removed_does_not_stop_the_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = store_with_blobs(tmp_path / "cache", [100] * 6, 1_700_000_000_000_000_000)
    first = store.blobs_by_age()[0][2]
    remove_blob = Store.remove_blob

    def failing_remove(self: Store, digest: Digest) -> int:
        if digest == first:
            raise PermissionError(13, "Permission denied", str(self.blob_path(digest)))
        return remove_blob(self, digest)

    monkeypatch.setattr(Store, "remove_blob", failing_remove)
    evicted = await enforce_cap(store, 300, lambda _: False)
    assert evicted.removed == 3  # the plan's other blobs still went
    assert store.blob_size(first) == 100


def test_a_blob_removed_while_the_cache_is_listed_is_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another worker (or ``cache gc``) evicts between reading the directory and the stat.
    store = store_with_blobs(tmp_path / "cache", [100] * 3, 1_700_000_000_000_000_000)
    gone = store.blob_path(d(1))
    scandir = os.scandir

    def racing_scandir(path: Path) -> Iterator[os.DirEntry[str]]:
        if Path(path) != gone.parent:
            return scandir(path)
        entries = list(scandir(path))
        gone.unlink(missing_ok=True)
        return iter(entries)

    monkeypatch.setattr(os, "scandir", racing_scandir)
    assert [digest for _, _, digest in store.blobs_by_age()] == [d(0), d(2)]
    assert store.scan().bytes == 200
