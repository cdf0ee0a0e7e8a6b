"""The HTTP test lab: the real app under a real hypercorn on a loopback port, fake upstream."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from streamsync_trio import create_app
from streamsync_trio._reference import parse_digest
from streamsync_trio.edge._state import ProxyState

from .fakes import FakeRegistry, make_config
from .wirelab import certificates

MiB = 1024 * 1024


@dataclass
class Running:
    url: str
    state: ProxyState
    fake: FakeRegistry

    def blob_url(self, digest: str, repo: str = "library/app") -> str:
        return f"{self.url}/v2/{repo}/blobs/{digest}"

    async def wait_stored(self, digest: str, timeout: float = 10.0) -> int:
        with trio.fail_after(timeout):
            while (size := self.state.store.blob_size(parse_digest(digest))) is None:
                await trio.sleep(0.01)
        return size

    async def wait_idle(self, timeout: float = 10.0) -> None:
        """Until no download is in flight and no partial file is left."""
        with trio.fail_after(timeout):
            while len(self.state.downloads) or any(self.state.store.partial_dir.iterdir()):
                await trio.sleep(0.01)


@asynccontextmanager
async def running_proxy(
    tmp_path: Path,
    fake: FakeRegistry,
    *,
    settings: dict[str, Any] | None = None,
    tls: bool = False,
    **upstream: object,
) -> AsyncIterator[Running]:
    """The app under hypercorn on a free port; ``settings`` change its Config, ``upstream``
    settings go to its one upstream.  With ``tls`` it serves HTTPS with the wire lab's test
    certificate (valid for 127.0.0.1; clients verify with ``wirelab.client_context()``)."""
    proxy_config = replace(make_config(tmp_path / "cache", **upstream), **(settings or {}))
    app = create_app(proxy_config, transport=fake)
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.alpn_protocols = ["http/1.1"]
    config.accesslog = None
    if tls:
        certs = certificates()
        config.certfile, config.keyfile = str(certs.cert), str(certs.key)
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, app, config, shutdown_trigger=shutdown.wait))
        try:
            yield Running(binds[0], app.extensions["streamsync"], fake)
        finally:
            shutdown.set()


def real_time_fake() -> FakeRegistry:
    return FakeRegistry(chunk_delay=0.002)  # 64 KiB per 2 ms: ~32 MB/s


async def fetch(client: httpx.AsyncClient, url: str) -> tuple[httpx.Response, bytes]:
    async with client.stream("GET", url) as response:
        body = b"".join([chunk async for chunk in response.aiter_raw()])
    return response, body


async def fetch_until_abort(client: httpx.AsyncClient, url: str) -> tuple[int, int, bytes]:
    """GET a body that must be cut short: (status, Content-Length, bytes received)."""
    received = bytearray()
    async with client.stream("GET", url) as response:
        with pytest.raises(httpx.RemoteProtocolError):
            async for chunk in response.aiter_raw():
                received += chunk
    return response.status_code, int(response.headers["Content-Length"]), bytes(received)


class SendfileMeter:
    """Counts the bytes os.sendfile hands to sockets."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent = 0
        real = os.sendfile

        def counting(out_fd: int, in_fd: int, offset: int, count: int) -> int:
            sent = real(out_fd, in_fd, offset, count)
            self.sent += sent
            return sent

        monkeypatch.setattr(os, "sendfile", counting)
