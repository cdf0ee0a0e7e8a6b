"""The fake upstream served over real HTTP, for proxies running in another process.

A tiny ASGI app hands each request to :class:`FakeRegistry` (or any httpx transport) and
streams its answer back, so
the fault scripts (drops, stalls, statuses, pacing) reach a real proxy process through a real
socket.  A body that fails mid-way raises, and hypercorn closes the connection short, exactly
as a dropped upstream connection looks to the proxy.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import httpx
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from .fakes import FakeRegistry

Scope = dict[str, Any]
Message = dict[str, Any]


def asgi_app(
    fake: httpx.AsyncBaseTransport, *, by_host: bool = False
) -> Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]
]:
    async def app(
        scope: Scope,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        headers = [(k.decode(), v.decode()) for k, v in scope["headers"]]
        # by_host: the request's Host names the fake's origin (a registry and its CDN on one
        # server); else every request is the registry's.
        host = dict(headers).get("host", "") if by_host else ""
        host = host.split(":")[0] or "registry.fake.test"
        query = scope["query_string"].decode()
        url = f"https://{host}{scope['path']}" + (f"?{query}" if query else "")
        request = httpx.Request(scope["method"], url, headers=headers)
        response = await fake.handle_async_request(request)
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": [(k.encode(), v.encode()) for k, v in response.headers.items()],
            }
        )
        stream = response.stream
        assert isinstance(stream, httpx.AsyncByteStream)
        try:
            if scope["method"] != "HEAD":
                async for chunk in stream:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
        finally:
            await stream.aclose()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


@asynccontextmanager
async def serving(fake: FakeRegistry) -> AsyncIterator[str]:
    """Serve ``fake`` on a free loopback port; yields its base URL."""
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 0.5
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            partial(serve, asgi_app(fake), config, shutdown_trigger=shutdown.wait)  # type: ignore[arg-type]
        )
        try:
            yield binds[0]
        finally:
            shutdown.set()
