"""Cached bytes leave by sendfile(2) under the real hypercorn: byte-exact, whole or in ranges,
only when the page cache holds them, and without leaking a descriptor when a client leaves."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from streamsync_trio.core import _downloads
from streamsync_trio.core._pagecache import FileRange, pages_cached

from ..labs.corelab import open_fds
from ..labs.httplab import MiB, Running, SendfileMeter, fetch, real_time_fake, running_proxy


@asynccontextmanager
async def cached_blob(tmp_path: Path, size: int) -> AsyncIterator[tuple[Running, str, bytes]]:
    """The proxy under hypercorn with one blob of ``size`` random bytes already stored:
    (proxy, the blob's URL, its bytes)."""
    fake = real_time_fake()
    data = os.urandom(size)
    digest = fake.add_blob(data)
    async with running_proxy(tmp_path, fake) as proxy:
        async with httpx.AsyncClient() as client:
            await fetch(client, proxy.blob_url(digest))
        await proxy.wait_stored(digest)
        yield proxy, proxy.blob_url(digest), data


async def test_a_cached_blob_leaves_by_sendfile_whole_and_in_ranges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Three file ranges, the last one odd-sized.
    async with (
        cached_blob(tmp_path, 9 * MiB + 123) as (proxy, url, data),
        httpx.AsyncClient() as client,
    ):
        meter = SendfileMeter(monkeypatch)

        # Several requests on one kept-alive connection: each ends exactly where h11 expects.
        _, body = await fetch(client, url)
        assert body == data
        assert meter.sent == len(data)
        size = len(data)
        for header, (start, end) in {
            "bytes=5-4194310": (5, 4194311),  # not page aligned, crosses a range boundary
            "bytes=4194300-": (4194300, size),
            "bytes=-1": (size - 1, size),
        }.items():
            meter.sent = 0
            response = await client.get(url, headers={"Range": header})
            assert response.status_code == 206
            assert response.content == data[start:end]
            assert meter.sent == end - start
        meter.sent = 0
        head = await client.head(url)
        assert head.headers["Content-Length"] == str(size)
        assert meter.sent == 0
        # The access log and the metrics count the bytes that left by sendfile.
        metrics = (await client.get(f"{proxy.url}/metrics")).text
        served = [
            line for line in metrics.splitlines() if 'served_bytes_total{source="cache"' in line
        ]
        assert served and float(served[0].split()[-1]) >= 2 * size


async def test_bytes_not_in_the_page_cache_are_read_not_sent_from_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sendfile(2) would wait for the disk inside the event loop; those bytes go the read way
    (a worker thread), and the body is the same."""
    async with cached_blob(tmp_path, 5 * MiB) as (_, url, data), httpx.AsyncClient() as client:
        meter = SendfileMeter(monkeypatch)
        monkeypatch.setattr(_downloads, "pages_cached", lambda fd, offset, count: False)
        _, body = await fetch(client, url)
        assert body == data
        assert meter.sent == 0


async def test_bytes_evicted_after_the_body_checked_them_are_read_in_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A range is checked when the body makes it and again before every sendfile call: a
    slow client may come back for the rest after the page cache let those pages go."""
    async with cached_blob(tmp_path, 9 * MiB) as (_, url, data), httpx.AsyncClient() as client:
        meter = SendfileMeter(monkeypatch)
        server_checks: list[int] = []

        def evicted_since(file_range: FileRange, offset: int, count: int) -> bool:
            server_checks.append(offset)
            return False  # the body's own look (the real one) found them cached

        monkeypatch.setattr(FileRange, "cached", evicted_since)
        _, body = await fetch(client, url)
        assert body == data
        assert meter.sent == 0
        assert len(server_checks) >= 9  # each 1 MiB piece, in each of the three ranges


async def test_clients_leaving_mid_sendfile_leave_no_descriptor_behind(
    tmp_path: Path,
) -> None:
    # More than loopback's socket buffers hold.
    async with cached_blob(tmp_path, 32 * MiB) as (_, url, data):
        baseline = open_fds()
        for _ in range(5):
            async with httpx.AsyncClient() as client, client.stream("GET", url) as response:
                async for _chunk in response.aiter_raw():
                    break  # one piece, then hang up with most of the body unsent
        with trio.fail_after(10):
            while open_fds() > baseline:
                await trio.sleep(0.01)
        # And the server still serves the whole blob.
        async with httpx.AsyncClient() as client:
            _, body = await fetch(client, url)
        assert body == data


def test_page_cache_check_agrees_with_the_kernel(tmp_path: Path) -> None:
    """pages_cached (cachestat) on a file whose pages the kernel was told to drop and then
    four of them read back, page by page against a witness: a read with RWF_NOWAIT, which the
    kernel refuses (EAGAIN) when it would have to wait for the disk.  The witness goes last,
    because a refused read still starts reading that page in, and it counts one way only: a
    refusal proves the page was not cached, a success may be the witness's own doing (a fast
    disk can finish that read before the kernel looks again)."""
    path = tmp_path / "blob"
    page = os.sysconf("SC_PAGE_SIZE")
    path.write_bytes(os.urandom(64 * page))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert pages_cached(fd, 0, 64 * page)  # just written: every page is in memory
        assert pages_cached(fd, 3, 5 * page)  # unaligned ranges count partial pages
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: exactly these
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # drop the clean pages
        os.pread(fd, 4 * page, 8 * page)
        seen = [pages_cached(fd, index * page, page) for index in range(64)]
        shown = "".join("C" if cached else "." for cached in seen)
        assert seen[8:12] == [True] * 4, shown
        assert pages_cached(fd, 8 * page, 4 * page)
        assert pages_cached(fd, 7 * page, 2 * page) == seen[7]
        witness = []
        for index in range(64):
            try:
                witness.append(os.preadv(fd, [bytearray(page)], index * page, os.RWF_NOWAIT) > 0)
            except BlockingIOError:
                witness.append(False)
            except OSError:
                # tmpfs: no RWF_NOWAIT, and its pages are never dropped.
                assert all(seen)
                return
        refused = [index for index, cached in enumerate(witness) if not cached]
        assert refused  # the file system did drop pages
        assert not any(seen[index] for index in refused), (shown, refused)
    finally:
        os.close(fd)
