"""The app's long-running background tasks, kept running and watched by the health probes.

An exception that escapes a task in quart-trio's app nursery ends that nursery and every task
in it (downloads, manifest fetches); the server goes on accepting requests and answers them
with 500s, while nothing tells the operator or the orchestrator (design.md §7).  So:

* each background task runs under :meth:`BackgroundTasks.start`, which catches what escapes
  it, logs it, and starts it again after a growing pause: the nursery never sees the error;
* while a task is down, readiness (``/readyz``) says so, naming it: a load balancer sends
  the traffic elsewhere;
* a task that keeps dying soon after each restart cannot recover in this process, and
  neither can a process whose app nursery has ended anyway (a task outside this supervision
  let an error escape): liveness (``/healthz``) then fails, and the orchestrator replaces
  the process instead of keeping one that looks healthy and serves 500s.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

log = logging.getLogger("streamsync_trio.tasks")

# A task that ran this long before it died was not failing at once: its restarts start over.
STABLE_AFTER = 60.0
# Restart pauses: 1 s, 2, 4, ... up to this.
MAX_PAUSE = 30.0
# After this many quick deaths in a row the task is given up, and the process is not alive.
MAX_QUICK_DEATHS = 5


class BackgroundTasks:
    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self.down: dict[str, str] = {}  # name -> why it is not running now
        self.given_up: dict[str, str] = {}  # name -> why it will not run again
        self.nursery_open = True
        nursery.start_soon(self._watch_nursery, name="watch the app nursery")

    def start(self, name: str, task: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run ``task(*args)`` for the life of the nursery, restarting it when it fails."""
        self._nursery.start_soon(self._keep, name, task, args, name=name)

    def readiness_problems(self) -> list[str]:
        problems = [
            f"background task {name!r} is not running: {why}"
            for name, why in self.down.items()
            if name not in self.given_up
        ]
        return problems + self.liveness_problems()

    def liveness_problems(self) -> list[str]:
        problems = [
            f"background task {name!r} keeps failing and was given up: {why}"
            for name, why in self.given_up.items()
        ]
        if not self.nursery_open:
            problems.append("the app's task nursery has ended; this process cannot download")
        return problems

    async def _keep(self, name: str, task: Callable[..., Awaitable[None]], args: Any) -> None:
        quick_deaths = 0
        while True:
            started = trio.current_time()
            try:
                await task(*args)
            except Exception as exc:  # Cancelled is a BaseException: shutdown passes through
                why = f"{type(exc).__name__}: {exc}"
                log.exception("background task %r failed", name)
            else:
                why = "it returned"
                log.error("background task %r returned; it should run for good", name)
            quick = trio.current_time() - started < STABLE_AFTER
            quick_deaths = quick_deaths + 1 if quick else 1
            self.down[name] = why
            if quick_deaths >= MAX_QUICK_DEATHS:
                self.given_up[name] = why
                log.critical(
                    "background task %r failed %d times in a row; giving up", name, quick_deaths
                )
                return
            await trio.sleep(min(MAX_PAUSE, 2.0 ** (quick_deaths - 1)))
            del self.down[name]
            log.info("restarting background task %r", name)

    async def _watch_nursery(self) -> None:
        """Sleeps for the life of the nursery.  Cancelled only when the nursery ends: at
        shutdown, or because some task's error ended it."""
        try:
            await trio.sleep_forever()
        finally:
            self.nursery_open = False
