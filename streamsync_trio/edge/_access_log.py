"""The access log: one line per HTTP request, written at the wire.

A small ASGI wrapper around the app writes it, because only at the wire can one see the
status and byte count a streamed body really ended with (an aborted blob is logged with the
bytes actually sent).  Handlers say where a response's bytes came from with
:func:`mark_source`; the line never holds request headers, so no credential reaches it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

access_log = logging.getLogger("streamsync_trio.access")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
# The wrapped app's own signature is Quart's TypedDict-based one; this wrapper only needs
# "an ASGI callable", so it accepts any.
ASGIApp = Callable[..., Awaitable[None]]
SOURCE_KEY = "streamsync.source"  # set in the ASGI scope by handlers: cache, stream, upstream


def mark_source(scope: Any, source: str) -> None:
    """Record in the ASGI scope where a response's bytes came from, for its access line."""
    scope[SOURCE_KEY] = source


def with_access_log(app: ASGIApp) -> ASGIApp:
    """Wrap an ASGI app so every HTTP request ends in one access-log line."""

    async def logged(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        started = time.monotonic()
        status = 0
        sent = 0

        async def counting_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        outcome = "complete"
        try:
            await app(scope, receive, counting_send)
        except BaseException:
            outcome = "aborted"
            raise
        finally:
            access_log.info(
                "%s %s %s",
                scope["method"],
                scope["path"],
                status,
                extra={
                    "event": "request" if outcome == "complete" else "request_aborted",
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "bytes": sent,
                    "duration_ms": round((time.monotonic() - started) * 1000, 1),
                    "source": scope.get(SOURCE_KEY, "-"),
                },
            )

    return logged
