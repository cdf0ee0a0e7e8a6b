"""What the other worker processes on this cache publish for a scrape to merge.

Several workers share one port, so a ``/metrics`` scrape reaches one of them at random.  Each
worker therefore writes its own metrics to ``<root>/workers/<pid>.prom`` every
``PUBLISH_INTERVAL`` seconds (by rename: read whole or not at all), and the worker that
answers a scrape adds what the others published.  A file is ignored once its writer is gone
or has not written for a while (a dead or hung worker), and removed when its writer is gone.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import trio

log = logging.getLogger("streamsync_trio.peers")

PUBLISH_INTERVAL = 2.0
_STALE_AFTER = 5 * PUBLISH_INTERVAL
_SUFFIX = ".prom"


def publish(directory: Path, text: str) -> None:
    staging = directory / f".{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        staging.write_text(text)
        os.rename(staging, directory / f"{os.getpid()}{_SUFFIX}")
    except BaseException:
        # A full disk creates the file, then refuses its bytes: never leave it behind.
        try:
            staging.unlink(missing_ok=True)
        except OSError:
            pass  # read-only: nothing was created
        raise


def withdraw(directory: Path) -> None:
    try:
        (directory / f"{os.getpid()}{_SUFFIX}").unlink(missing_ok=True)
    except OSError as exc:  # a read-only cache: readers skip a dead worker's file anyway
        log.warning("cannot withdraw this worker's metrics from %s: %s", directory, exc)


def read_others(directory: Path) -> list[tuple[int, str]]:
    """(pid, text) of every other live worker's latest publication."""
    found = []
    now = time.time()
    for path in directory.glob(f"*{_SUFFIX}"):
        try:
            pid = int(path.name.removesuffix(_SUFFIX))
        except ValueError:
            continue
        if pid == os.getpid():
            continue
        if not _alive(pid):
            path.unlink(missing_ok=True)
            continue
        try:
            if now - path.stat().st_mtime > _STALE_AFTER:
                continue
            found.append((pid, path.read_text()))
        except FileNotFoundError:
            continue  # its worker just stopped
    return sorted(found)


async def publish_periodically(directory: Path, render: Callable[[], str]) -> None:
    """Runs in the app nursery for the life of the worker.

    The cache disk can fill up or turn read-only under a running proxy.  Metrics of other
    workers are a convenience, the proxy's serving is not: a failed write is logged (once,
    and once more when writes work again) and tried again at the next interval.  Before, its
    ``OSError`` escaped into the app nursery and ended every download with it."""
    failing = False
    while True:
        text = render()
        try:
            await trio.to_thread.run_sync(publish, directory, text)
        except OSError as exc:
            if not failing:
                log.error("cannot publish this worker's metrics in %s: %s", directory, exc)
            failing = True
        else:
            if failing:
                log.info("publishing this worker's metrics in %s again", directory)
            failing = False
        await trio.sleep(PUBLISH_INTERVAL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process now has that pid; its file is stale
    return True
