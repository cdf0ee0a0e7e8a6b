"""Blocking work in a worker thread that a cancellation can stop.

``trio.to_thread.run_sync`` cannot stop a thread: cancelled, it either waits for the thread
(the cancellation then waits for a blocking ``recv`` that may last a whole read timeout) or
abandons it (and the thread goes on using a file descriptor that its owner closes, and the
number may already name another file).  A blocking loop that owns a socket can do better:
it can be *interrupted* (the socket shut down, a flag set), after which it returns within
one batch.  :func:`run_interruptible` does that on cancellation and then waits, shielded,
for the thread to be done, so that whatever the thread used is free again when it returns.
"""

from __future__ import annotations

from collections.abc import Callable

import outcome
import trio


async def run_interruptible[T](work: Callable[[], T], interrupt: Callable[[], None]) -> T:
    """``work()`` in a thread of its own; on cancellation ``interrupt()`` (from the trio
    thread), then wait for ``work`` to return or raise, then let the cancellation through.

    Not limited by ``trio.to_thread``'s default limiter: the callers hold a slot of their own
    (an upstream connection), which bounds how many of these run at once.
    """
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()
    result: list[outcome.Outcome[T]] = []

    def deliver(value: outcome.Outcome[T]) -> None:  # in the worker thread
        def record() -> None:
            result.append(value)
            done.set()

        try:
            token.run_sync_soon(record)
        except trio.RunFinishedError:
            pass  # the run is over: nobody is left to receive the outcome

    trio.lowlevel.start_thread_soon(work, deliver)
    try:
        await done.wait()
    except BaseException:
        try:
            interrupt()
        finally:  # even if interrupting failed: the thread may still hold what we free next
            with trio.CancelScope(shield=True):
                await done.wait()
        raise
    return result[0].unwrap()
