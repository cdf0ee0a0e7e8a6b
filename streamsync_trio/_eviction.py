"""Keeping the cache under ``[storage] max_size``: least recently used blobs go first.

The decision is a pure function (:func:`plan_eviction`) shared by the running proxy and the
``streamsync-trio cache gc`` command.  In the proxy, listing and sorting the blobs runs in a
worker thread, but each deletion happens in the event loop right after checking that the blob
is neither being downloaded nor being read: those checks and the request path's open/subscribe
never interleave, so a blob a client is reading is never evicted under it.

Eviction goes down to a low-water mark below the cap, so one commit over the cap does not turn
into an eviction pass per commit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import trio

from ._reference import Digest
from ._store import Store

log = logging.getLogger("streamsync_trio.eviction")

LOW_WATER = 0.9  # evict down to 90 % of the cap
# How often the running totals are corrected from a listing of the blobs.
RESYNC_INTERVAL = 60.0


@dataclass(frozen=True, slots=True)
class Eviction:
    removed: int
    freed: int
    remaining_bytes: int


def plan_eviction(
    blobs_by_age: Iterable[tuple[float, int, Digest]],
    total_bytes: int,
    target_bytes: int,
    is_busy: Callable[[Digest], bool],
) -> list[Digest]:
    """Which blobs to delete, oldest use first, to get ``total_bytes`` down to the target."""
    chosen = []
    for _, size, digest in blobs_by_age:
        if total_bytes <= target_bytes:
            break
        if is_busy(digest):
            continue
        chosen.append(digest)
        total_bytes -= size
    return chosen


async def enforce_cap(
    store: Store,
    max_bytes: int,
    is_busy: Callable[[Digest], bool],
    listing: list[tuple[float, int, Digest]] | None = None,
) -> Eviction:
    """Evict down to the low-water mark if over the cap.  ``listing`` is a fresh
    :meth:`Store.blobs_by_age` the caller already made (it is not made again)."""
    if store.usage().bytes <= max_bytes:
        return Eviction(0, 0, store.usage().bytes)
    if listing is None:
        listing = await trio.to_thread.run_sync(store.blobs_by_age)
    store.set_usage(len(listing), sum(size for _, size, _ in listing))
    plan = plan_eviction(listing, store.usage().bytes, int(max_bytes * LOW_WATER), is_busy)
    removed = freed = 0
    for digest in plan:
        if is_busy(digest):  # may have become busy while we listed
            continue
        freed += store.remove_blob(digest)
        removed += 1
    log.info(
        "evicted %d blob(s), %d bytes; cache now %d bytes (cap %d)",
        removed,
        freed,
        store.usage().bytes,
        max_bytes,
    )
    return Eviction(removed, freed, store.usage().bytes)


class CacheKeeper:
    """Wakes the eviction task after commits; at most one pass runs at a time."""

    def __init__(self, store: Store, max_bytes: int, is_busy: Callable[[Digest], bool]) -> None:
        self._store = store
        self._max_bytes = max_bytes
        self._is_busy = is_busy
        self._pending = trio.Event()

    def blob_committed(self) -> None:
        if self._store.usage().bytes > self._max_bytes:
            self._pending.set()

    async def run(self) -> None:
        while True:
            # Woken by a commit in this process, or by the clock: other worker processes
            # (and ``cache gc``) change the cache behind this process's running totals.
            with trio.move_on_after(RESYNC_INTERVAL) as timer:
                await self._pending.wait()
            self._pending = trio.Event()
            try:
                listing = None
                if timer.cancelled_caught:
                    listing = await trio.to_thread.run_sync(self._store.blobs_by_age)
                    self._store.set_usage(len(listing), sum(size for _, size, _ in listing))
                await enforce_cap(self._store, self._max_bytes, self._is_busy, listing)
            except OSError as exc:
                log.error("eviction failed in %s: %s", self._store.root, exc)
            except Exception:
                # Never let this task's failure take the app nursery (and every download
                # in it) down: log it and keep serving; the next commit tries again.
                log.exception("eviction failed")


def collect_garbage(
    store: Store, max_bytes: int | None, manifest_max_age_days: float, *, dry_run: bool = False
) -> dict[str, int]:
    """The ``cache gc`` command: blobs down to the cap, then stale manifests and tags.

    Safe while a proxy runs on the same cache: a blob deleted under a reader keeps streaming
    from its open file, and the proxy re-fetches it when next asked.
    """
    listing = store.blobs_by_age()
    total = sum(size for _, size, _ in listing)
    plan = (
        plan_eviction(listing, total, max_bytes, lambda _: False) if max_bytes is not None else []
    )
    sizes = {digest: size for _, size, digest in listing}
    result = {"blobs_removed": len(plan), "bytes_freed": sum(sizes[d] for d in plan)}
    if not dry_run:
        store.set_usage(len(listing), total)
        for digest in plan:
            store.remove_blob(digest)
        cutoff = time.time() - manifest_max_age_days * 86400
        result["manifests_removed"], result["tags_removed"] = store.expire_manifests_and_tags(
            cutoff
        )
    return result
