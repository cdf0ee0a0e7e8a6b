"""The core test lab: a DownloadRegistry with a store, an Upstream over the fake, a nursery.

Shared by the core tests (streaming, resilience); nothing here knows about HTTP.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import trio

from streamsync_trio import RegistryError, UpstreamConfig
from streamsync_trio._reference import parse_digest
from streamsync_trio.core._downloads import Subscriber
from streamsync_trio.core._pagecache import FileRange
from streamsync_trio.core._registry import DownloadRegistry
from streamsync_trio.core._retry import RetryPolicy
from streamsync_trio.core._store import Store
from streamsync_trio.upstream._client import Upstream

from .fakes import FakeRegistry

REPO = "library/app"
MiB = 1024 * 1024
CHUNK_DELAY = 0.01  # the fake sends 64 KiB per 10 ms: 6.4 MB/s
STALL_TIMEOUT = 5.0


@dataclass
class Lab:
    fake: FakeRegistry
    store: Store
    registry: DownloadRegistry
    upstream: Upstream
    nursery: trio.Nursery
    retry: RetryPolicy

    def subscribe(self, digest: str) -> Subscriber:
        return self.registry.subscribe(
            parse_digest(digest),
            partial(self.upstream.open_blob, REPO, digest),
            stall_timeout=STALL_TIMEOUT,
            retry=self.retry,
        )

    def partials(self) -> list[Path]:
        return list(self.store.partial_dir.iterdir())


@asynccontextmanager
async def open_lab(
    tmp_path: Path,
    *,
    max_retries: int = 0,
    fake: FakeRegistry | None = None,
    **upstream_settings: Any,
) -> AsyncIterator[Lab]:
    fake = fake or FakeRegistry(chunk_delay=CHUNK_DELAY)
    store = Store(tmp_path / "cache")
    upstream = Upstream(
        replace(
            UpstreamConfig(name="registry.fake.test", url="https://registry.fake.test"),
            **upstream_settings,
        ),
        transport=fake,
    )
    async with trio.open_nursery() as nursery:
        registry = DownloadRegistry(store, nursery, chunk_size=256 * 1024)
        retry = RetryPolicy(max_retries=max_retries, backoff_base=0.1)
        yield Lab(fake, store, registry, upstream, nursery, retry)
    await upstream.aclose()


@dataclass
class Outcome:
    data: bytes
    error: RegistryError | None
    first_byte_at: float | None
    ended_at: float
    ranges: int = 0  # pieces that came as file ranges


async def drain(subscriber: Subscriber, *, zero_copy: bool = False) -> Outcome:
    """Read a subscriber to its end (or failure), the way the HTTP body does; with
    ``zero_copy``, as a body for a server that sends file ranges (their bytes are read back
    from the range's own descriptor, as sendfile would)."""
    received = bytearray()
    first: float | None = None
    ranges = 0
    try:
        await subscriber.wait_size()
        while True:
            if zero_copy:
                piece = await subscriber.read_or_range(100_000, 300_000)
                if isinstance(piece, FileRange):
                    ranges += 1
                    with contextlib.closing(piece):
                        data = os.pread(piece.fd, piece.count, piece.offset)
                    assert len(data) == piece.count
                else:
                    data = piece
            else:
                data = await subscriber.read(100_000)
            if not data:
                break
            if first is None:
                first = trio.current_time()
            received += data
    except RegistryError as error:
        return Outcome(bytes(received), error, first, trio.current_time(), ranges)
    finally:
        subscriber.close()
    return Outcome(bytes(received), None, first, trio.current_time(), ranges)


async def join_later(
    lab: Lab, digest: str, delay: float, results: list[Outcome], zero_copy: bool = False
) -> None:
    await trio.sleep(delay)
    results.append(await drain(lab.subscribe(digest), zero_copy=zero_copy))


def blob(size: int) -> bytes:
    return os.urandom(size)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def assert_clean(lab: Lab) -> None:
    """Nothing of a finished download survives: no entry, no partial, no producer task."""
    assert len(lab.registry) == 0
    assert lab.partials() == []
    assert lab.nursery.child_tasks == frozenset()


@asynccontextmanager
async def second_worker(lab: Lab) -> AsyncIterator[Lab]:
    """Another 'process' on the same cache and upstream: own store object, own registry."""
    store = Store(lab.store.root)
    async with trio.open_nursery() as nursery:
        registry = DownloadRegistry(store, nursery, chunk_size=256 * 1024)
        yield replace(lab, store=store, registry=registry, nursery=nursery)
