"""``streamsync-trio serve``: hypercorn's trio server in this process, with our own signals.

``hypercorn -c hypercorn.toml streamsync_trio.app:app`` works and stays supported, but its
multi-process runner costs a parent process and a resource tracker next to the one worker
(about 40 MiB more), and it exits 0 even when its worker died of a bad configuration.  This
serves the same app (``streamsync_trio.app:app``) with the same ``hypercorn.toml`` through
``hypercorn.trio.serve``: one process, SIGTERM and SIGINT start hypercorn's graceful shutdown,
and a bad configuration exits 2.
"""

from __future__ import annotations

import importlib
import signal
from functools import partial
from pathlib import Path

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve


async def _until_signalled() -> None:
    """Returns on the first SIGTERM or SIGINT: hypercorn's cue for a graceful shutdown."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            return


def serve(
    hypercorn_toml: Path,
    binds: list[str] | None = None,
    graceful_timeout: float | None = None,
) -> int:
    server = HypercornConfig()
    if hypercorn_toml.is_file():
        server = HypercornConfig.from_toml(hypercorn_toml)
    if binds:
        server.bind = binds
    if graceful_timeout is not None:
        server.graceful_timeout = graceful_timeout
    # Importing the app module loads and checks the configuration (exit 2 when it is bad),
    # sets up logging and process tuning: exactly what the hypercorn command gets.
    app = importlib.import_module("streamsync_trio.app").app
    trio.run(partial(hypercorn_serve, app, server, shutdown_trigger=_until_signalled))
    return 0
