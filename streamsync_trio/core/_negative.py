"""Remembering, briefly, what an upstream said does not exist.

Without it, every request for a missing digest or tag is an upstream request: a fleet of
clients retrying a typo'd image (or a CI job polling for a tag not pushed yet) made 16,000
upstream requests for 16,000 client requests, each costing a slot, maybe a token and, on
Docker Hub, rate-limit budget.  A 404 is remembered per key (the caller's: upstream,
repository and reference, plus whatever else changes the answer, such as ``Accept``) for
:data:`TTL` seconds and answered from here as the very same OCI error.

Only 404s: a 401, 403 or 5xx says something about credentials or the upstream's health, not
about the content, and has its own handling (cool-downs, retries, stale tags).

The module is pure apart from the clock it is given; the HTTP layer and the manifest service
each hold one cache and call :func:`remembering` around their upstream calls.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable

import trio

from .._errors import RegistryError

# Long enough to absorb a retry storm (clients retry within a second or two, so a storm costs
# one upstream request per key per TTL), short enough that an image pushed right after a
# failed pull (CI: push, then pull through the proxy) is visible a few seconds later.  Not a
# setting: no value is better for one site than another, and a wrong one only costs upstream
# requests (too short) or a few seconds of stale 404s (too long).
TTL = 5.0

# One entry is a key and an error of a few hundred bytes; 4096 of them stay under ~2 MiB and
# cover about 800 distinct misses a second at TTL.  Beyond that the oldest entries (the first
# to expire anyway) go: a miss not remembered only costs an upstream request.
MAX_ENTRIES = 4096


class NegativeCache[K: Hashable]:
    """Upstream 404s by key, for ``ttl`` seconds, at most ``max_entries`` of them."""

    def __init__(
        self,
        *,
        ttl: float = TTL,
        max_entries: int = MAX_ENTRIES,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self._ttl = ttl
        self._max_entries = max_entries
        self._clock = clock
        # key -> (expiry, error); insertion order is expiry order, since the TTL is fixed.
        self._entries: OrderedDict[K, tuple[float, RegistryError]] = OrderedDict()
        self.hits = 0  # answers given from here instead of the upstream

    def __len__(self) -> int:
        return len(self._entries)

    def check(self, key: K) -> None:
        """Raise the remembered 404 for ``key``, if one is still fresh."""
        self._expire()
        entry = self._entries.get(key)
        if entry is None:
            return
        self.hits += 1
        raise _copy(entry[1])

    def note(self, key: K, error: RegistryError) -> None:
        """Remember ``error`` for ``key`` if it is a 404; anything else is not remembered."""
        if error.status != 404:
            return
        self._expire()
        self._entries.pop(key, None)  # re-inserted at the end: it now expires last
        self._entries[key] = (self._clock() + self._ttl, _copy(error))
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def forget(self, key: K) -> None:
        """Drop what is remembered for ``key`` (the content turned out to exist after all)."""
        self._entries.pop(key, None)

    def _expire(self) -> None:
        now = self._clock()
        while self._entries:
            key, (expiry, _) = next(iter(self._entries.items()))
            if expiry > now:
                return
            del self._entries[key]


def _copy(error: RegistryError) -> RegistryError:
    """A fresh exception with the same wire form: one instance raised in many tasks would
    collect their tracebacks."""
    return RegistryError(
        error.status, error.code, error.message, detail=error.detail, headers=error.headers
    )


async def remembering[K: Hashable, T](
    cache: NegativeCache[K], key: K, call: Callable[[], Awaitable[T]]
) -> T:
    """``await call()``, unless a 404 for ``key`` is remembered; remember the 404 it raises."""
    cache.check(key)
    try:
        return await call()
    except RegistryError as error:
        cache.note(key, error)
        raise
