"""Reading a blob body ahead of its consumer, so receiving overlaps hashing and writing.

The producer in the core alternates: take a piece, then hash and write a batch in a worker
thread, then take the next piece.  While the worker thread runs, the trio thread is free but
nobody asks the socket for bytes, so the upstream connection idles for as long as every write
takes (issue 11 measured the stages running one after another).  Here a task keeps receiving
into a small bounded channel while the consumer is busy: at most ``depth`` pieces (each at
most the reader's 1 MiB) wait, so memory stays bounded, and a slow consumer still slows the
upstream down through TCP.

Failures keep their order: the pieces that arrived before a dropped connection are handed
over first, then the error is raised from the consumer's ``anext``, as from the body itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

READ_AHEAD = 4  # pieces; with the wire reader's 1 MiB pieces, at most 4 MiB per download


class _Ahead:
    """The consumer's side: pieces, then the body's error (if any), then the end."""

    def __init__(self, receive: trio.MemoryReceiveChannel[bytes | Exception]) -> None:
        self._receive = receive

    def __aiter__(self) -> _Ahead:
        return self

    async def __anext__(self) -> bytes:
        try:
            item = await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None
        if isinstance(item, Exception):
            self._receive.close()
            raise item
        return item


@asynccontextmanager
async def read_ahead(
    chunks: AsyncIterator[bytes], depth: int = READ_AHEAD
) -> AsyncIterator[AsyncIterator[bytes]]:
    """``chunks``, received by a task of its own up to ``depth`` pieces ahead."""
    send, receive = trio.open_memory_channel[bytes | Exception](depth)

    async def pump() -> None:
        async with send:
            try:
                async for chunk in chunks:
                    await send.send(chunk)
            except Exception as exc:  # the body's own failure, for the consumer to raise
                await send.send(exc)

    # An exception from the caller's block must leave as itself, not wrapped in the
    # nursery's ExceptionGroup: it is kept, the pump cancelled, and raised after.
    failure: BaseException | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump)
        try:
            yield _Ahead(receive)
        except BaseException as exc:
            failure = exc
        nursery.cancel_scope.cancel()
    receive.close()
    if failure is not None:
        raise failure
