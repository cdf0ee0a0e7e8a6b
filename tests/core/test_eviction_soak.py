"""Eviction under load: a blob being served is never evicted, and the cap holds (issue 14,
defects 11 and 12).

"Being served" means any open subscriber: a client reading the stored file, and a client
that joined (or started) a download and is still reading it after the commit.  Subscribers
are counted here by wrapping the streaming core's ``Subscriber`` itself, independently of the
store's own reader count that eviction consults.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections import Counter
from pathlib import Path

import httpx
import pytest
import trio

from streamsync_trio._reference import Digest, parse_digest
from streamsync_trio.core import _downloads
from streamsync_trio.core._store import Store

from ..labs.httplab import MiB, Running, fetch, real_time_fake, running_proxy

SEED = 20261130


class InUseEvictions:
    """Open subscribers per digest, and the removals of blobs that had one."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.open: Counter[Digest] = Counter()
        self.in_use_removed: list[Digest] = []
        self.removed: list[Digest] = []
        subscriber_init = _downloads.Subscriber.__init__
        subscriber_close = _downloads.Subscriber.close
        remove_blob = Store.remove_blob
        watcher = self

        def init(
            self: _downloads.Subscriber, download: _downloads.Download, *args: object, **kw: object
        ) -> None:
            subscriber_init(self, download, *args, **kw)  # type: ignore[arg-type]
            watcher.open[download.digest] += 1
            self._watched = True  # type: ignore[attr-defined]

        def close(self: _downloads.Subscriber) -> None:
            if getattr(self, "_watched", False):
                self._watched = False  # type: ignore[attr-defined]
                watcher.open[self.download.digest] -= 1
            subscriber_close(self)

        def remove(self: Store, digest: Digest) -> int:
            watcher.removed.append(digest)
            if watcher.open[digest] > 0:
                watcher.in_use_removed.append(digest)
            return remove_blob(self, digest)

        monkeypatch.setattr(_downloads.Subscriber, "__init__", init)
        monkeypatch.setattr(_downloads.Subscriber, "close", close)
        monkeypatch.setattr(Store, "remove_blob", remove)


@pytest.fixture
def watcher(monkeypatch: pytest.MonkeyPatch) -> InUseEvictions:
    return InUseEvictions(monkeypatch)


def stored(proxy: Running, digest: str) -> bool:
    return proxy.state.store.blob_size(parse_digest(digest)) is not None


async def test_a_blob_its_downloading_clients_still_read_after_the_commit_is_not_evicted(
    tmp_path: Path, watcher: InUseEvictions
) -> None:
    # Far larger than loopback socket buffers: the proxy cannot finish sending it while the
    # client does not read, so the client's subscriber stays open past the commit.
    fake = real_time_fake()
    big = fake.add_blob(os.urandom(32 * MiB))
    small = [fake.add_blob(os.urandom(4 * MiB)) for _ in range(2)]
    cap = 36 * MiB
    async with (
        running_proxy(tmp_path, fake, settings={"max_size": cap}) as proxy,
        httpx.AsyncClient() as client,
        client.stream("GET", proxy.blob_url(big)) as slow,
    ):
        chunks = slow.aiter_raw()
        received = len(await anext(chunks))  # then it pauses, mid-body
        await proxy.wait_stored(big)  # committed while its client still reads
        for digest in small:
            await trio.sleep(0.05)  # coarse file times: a clear LRU order
            response, _ = await fetch(client, proxy.blob_url(digest))
            assert response.status_code == 200
            await proxy.wait_idle()
        # 40 MiB > 36: the pass ran, and the least recently used blob was passed by.
        with trio.fail_after(5):
            while proxy.state.store.usage().bytes > cap:
                await trio.sleep(0.01)
        assert stored(proxy, big)
        assert watcher.in_use_removed == []
        async for chunk in chunks:
            received += len(chunk)
        assert received == 32 * MiB
    assert len(fake.blob_gets(big)) == 1


CAP = 24 * MiB
DURATION = 25.0  # seconds of load; the whole test stays well under a minute


@pytest.mark.soak
async def test_soak_hot_and_cold_images_under_a_small_cap(
    tmp_path: Path, watcher: InUseEvictions, caplog: pytest.LogCaptureFixture
) -> None:
    """12 clients for 25 s over a working set twice the cap: hot layers, cold layers, and one
    big layer that several clients download together and read at different speeds."""
    rng = random.Random(SEED)
    fake = real_time_fake()
    blobs: dict[str, bytes] = {}
    for size in [2 * MiB] * 3 + [rng.randint(MiB, 2 * MiB) for _ in range(10)] + [14 * MiB]:
        data = rng.randbytes(size)
        blobs[fake.add_blob(data)] = data
    digests = list(blobs)
    hot, cold, big = digests[:3], digests[3:-1], digests[-1]
    peak = 0
    served: Counter[str] = Counter()
    async with running_proxy(tmp_path, fake, settings={"max_size": CAP}) as proxy:
        store = proxy.state.store
        limits = httpx.Limits(max_connections=32)

        async def client(index: int, http: httpx.AsyncClient) -> None:
            mine = random.Random(SEED + index)
            slow = index % 3 == 0  # a third of the clients read slowly
            deadline = trio.current_time() + DURATION
            while trio.current_time() < deadline:
                roll = mine.random()
                if roll < 0.55:
                    digest = mine.choice(hot)
                else:
                    digest = big if roll < 0.65 else mine.choice(cold)
                body = bytearray()
                async with http.stream("GET", proxy.blob_url(digest)) as response:
                    assert response.status_code == 200, digest
                    async for chunk in response.aiter_raw():
                        body += chunk
                        if slow:
                            await trio.sleep(0.01)
                assert hashlib.sha256(body).hexdigest() == digest.split(":")[1]
                served[digest] += 1

        async def measure() -> None:
            nonlocal peak
            while True:
                on_disk = await trio.to_thread.run_sync(
                    lambda: sum(size for _, size, _ in store.blobs_by_age()) + store.partial_bytes()
                )
                peak = max(peak, on_disk)
                await trio.sleep(0.1)

        async with (
            httpx.AsyncClient(limits=limits, timeout=60) as http,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(measure)
            async with trio.open_nursery() as clients:
                for index in range(12):
                    clients.start_soon(client, index, http)
            nursery.cancel_scope.cancel()
        await proxy.wait_idle()
        # Once nothing is served, the blobs passed by go too: the cache is under the cap.
        with trio.fail_after(10):
            while sum(size for _, size, _ in store.blobs_by_age()) > CAP:
                await trio.sleep(0.1)
        evicted = len(watcher.removed)
        big_fetches = len(fake.blob_gets(big))
    logging.getLogger(__name__).warning(
        "soak: %d responses, %d evictions, %d of them in use; big blob fetched %d times for "
        "%d requests; peak on disk %.1f MiB (cap %.1f MiB)",
        sum(served.values()),
        evicted,
        len(watcher.in_use_removed),
        big_fetches,
        served[big],
        peak / MiB,
        CAP / MiB,
    )
    assert watcher.in_use_removed == []
    assert evicted > 0  # the cap was really in play
    assert served[big] > big_fetches  # joiners and cache hits, not a fetch per request
    assert not [r for r in caplog.records if "eviction pass failed" in r.getMessage()]
