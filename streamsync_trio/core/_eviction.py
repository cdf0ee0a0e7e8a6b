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

from .._reference import Digest
from ._store import Store

log = logging.getLogger("streamsync_trio.eviction")

LOW_WATER = 0.9  # evict down to 90 % of the cap
# How often the running totals are corrected from a listing of the blobs.
RESYNC_INTERVAL = 60.0
# After a pass that left the cache over the cap (every candidate was in use), the next one
# comes this soon: a listing every 2 s at most, and only while over the cap.
BUSY_RETRY_INTERVAL = 2.0


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
    """Evict down to the low-water mark if blobs and partials together are over the cap.

    ``listing`` is a fresh :meth:`Store.blobs_by_age` the caller already made (it is not made
    again).  Partials count but are never evicted: when downloads alone exceed the cap, every
    idle blob goes and the cache stays over it until they end."""
    if listing is None:
        listing = await trio.to_thread.run_sync(store.blobs_by_age)
    in_flight = await trio.to_thread.run_sync(store.partial_bytes)
    store.set_usage(len(listing), sum(size for _, size, _ in listing))
    if store.usage().bytes + in_flight <= max_bytes:
        return Eviction(0, 0, store.usage().bytes)
    target = max(0, int(max_bytes * LOW_WATER) - in_flight)
    plan = plan_eviction(listing, store.usage().bytes, target, is_busy)
    removed = freed = 0
    for digest in plan:
        if is_busy(digest):  # may have become busy while we listed
            continue
        try:
            freed += store.remove_blob(digest)
        except OSError as exc:
            # One blob that cannot go (a read-only directory, an I/O error) must not keep
            # the others: log it and go on with the plan.
            log.error("cannot evict %s: %s", store.blob_path(digest), exc)
            continue
        removed += 1
    log.info(
        "evicted %d blob(s), %d bytes; cache now %d bytes and %d in downloads (cap %d)",
        removed,
        freed,
        store.usage().bytes,
        in_flight,
        max_bytes,
    )
    return Eviction(removed, freed, store.usage().bytes)


class CacheKeeper:
    """Wakes the eviction task after commits; at most one pass runs at a time.

    ``in_flight`` tells how many bytes this process's running downloads hold, so that a
    commit wakes the task when blobs and downloads together pass the cap (the pass itself
    lists every process's partials)."""

    def __init__(
        self,
        store: Store,
        max_bytes: int,
        is_busy: Callable[[Digest], bool],
        in_flight: Callable[[], int] = lambda: 0,
    ) -> None:
        self._store = store
        self._max_bytes = max_bytes
        self._is_busy = is_busy
        self._in_flight = in_flight
        self._pending = trio.Event()
        self.failed_passes = 0

    def blob_committed(self) -> None:
        if self._store.usage().bytes + self._in_flight() > self._max_bytes:
            self._pending.set()

    async def run(self) -> None:
        wait = RESYNC_INTERVAL
        while True:
            # Woken by a commit in this process, or by the clock: other worker processes
            # (and ``cache gc``) change the cache behind this process's running totals.
            with trio.move_on_after(wait):
                await self._pending.wait()
            self._pending = trio.Event()
            wait = RESYNC_INTERVAL
            try:
                await enforce_cap(self._store, self._max_bytes, self._is_busy)
                if self._store.usage().bytes + self._in_flight() > self._max_bytes:
                    # Still over: blobs in use were passed by.  Their readers' release
                    # wakes us, but a blob can stop being busy in other ways (its download
                    # leaves the registry after the commit), so look again soon.
                    wait = BUSY_RETRY_INTERVAL
            except Exception:
                # One failed pass must not end eviction (the cap would stop holding for
                # good) nor this task's nursery (and every download in it): log it, and
                # the next commit or the clock tries again.
                self.failed_passes += 1
                log.exception("eviction pass failed in %s", self._store.root)


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
