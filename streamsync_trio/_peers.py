"""What the other worker processes on this cache publish for a scrape to merge.

Several workers share one port, so a ``/metrics`` scrape reaches one of them at random.  Each
worker therefore writes its own metrics to ``<root>/workers/<pid>.prom`` every
``PUBLISH_INTERVAL`` seconds (by rename: read whole or not at all), and the worker that
answers a scrape adds what the others published.  A file is ignored once its writer is gone
or has not written for a while (a dead or hung worker), and removed when its writer is gone.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import trio

PUBLISH_INTERVAL = 2.0
_STALE_AFTER = 5 * PUBLISH_INTERVAL
_SUFFIX = ".prom"


def publish(directory: Path, text: str) -> None:
    staging = directory / f".{os.getpid()}-{secrets.token_hex(4)}.tmp"
    staging.write_text(text)
    os.rename(staging, directory / f"{os.getpid()}{_SUFFIX}")


def withdraw(directory: Path) -> None:
    (directory / f"{os.getpid()}{_SUFFIX}").unlink(missing_ok=True)


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
    """Runs in the app nursery for the life of the worker."""
    while True:
        text = render()
        await trio.to_thread.run_sync(publish, directory, text)
        await trio.sleep(PUBLISH_INTERVAL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process now has that pid; its file is stale
    return True
