"""The response body of a blob: chunks read through a subscriber, or file ranges to send
without reading them (``_zerocopy``), sized by the shared :class:`ChunkBudget`."""

from __future__ import annotations

from collections.abc import AsyncIterator

from ..core import FileRange, Subscriber
from ._state import ChunkBudget, Traffic

# Bytes per zero-copy body chunk (a FileRange).  They cost no memory here, only one round
# through Quart, hypercorn and h11, so they are bigger than chunks of bytes.  Warm, 8 clients
# (MB/s, CPU s/GB): 1 MiB 2304, 0.38; 2 MiB 2569, 0.33; 4 MiB 2490, 0.29; 8 MiB 2642, 0.26;
# 16 MiB 2678, 0.26.  Beyond 4 MiB the gain is within the machine's noise, while each range is
# a longer stretch of one client's body before the next turn of its loop.
FILE_RANGE = 4 * 1024 * 1024


class BlobResponseBody:
    """The response body of a blob: reads through a subscriber, closes it when done.

    A class rather than an async generator so that Quart's ``aclose`` (or, if the response is
    dropped unsent, the finaliser) always releases the subscriber and its share of the chunk
    budget, even when iteration never started.
    """

    def __init__(
        self,
        subscriber: Subscriber,
        budget: ChunkBudget,
        traffic: Traffic,
        source: str,
        *,
        zero_copy: bool = False,
        encrypted: bool = False,
    ) -> None:
        self._subscriber = subscriber
        self._zero_copy = zero_copy
        self._encrypted = encrypted  # TLS to the client: see ChunkBudget.ENCRYPTED_LARGEST
        self._budget = budget
        self._traffic = traffic
        self._source = source
        budget.open_bodies += 1
        self._open = True

    def __aiter__(self) -> AsyncIterator[bytes | FileRange]:
        return self

    async def __anext__(self) -> bytes | FileRange:
        try:
            if self._zero_copy:
                data = await self._subscriber.read_or_range(self._budget.chunk(), FILE_RANGE)
            else:
                data = await self._subscriber.read(self._budget.chunk(encrypted=self._encrypted))
        except BaseException:
            self._close()
            raise
        if not data:
            self._close()
            raise StopAsyncIteration
        self._traffic.served(self._source, len(data))
        return data

    async def aclose(self) -> None:
        self._close()

    def _close(self) -> None:
        if self._open:
            self._open = False
            self._budget.open_bodies -= 1
        self._subscriber.close()

    def __del__(self) -> None:
        self._close()
