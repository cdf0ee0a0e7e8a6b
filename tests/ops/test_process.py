"""Crash safety and graceful shutdown of a real proxy process.

The upstream is the fake served over real HTTP (``fake_server``), pacing a blob slowly enough
that the download is surely in flight when the process is killed or told to stop.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from ..labs.fake_server import serving
from ..labs.fakes import FakeRegistry
from ..labs.proclab import child_pids, free_port, start, stop, wait_ready, with_signal, write_config

MiB = 1024 * 1024


@dataclass
class ProxyProcess:
    process: subprocess.Popen[bytes]
    url: str
    cache: Path

    def blob_url(self, digest: str) -> str:
        return f"{self.url}/v2/library/app/blobs/{digest}"

    def partials(self) -> list[Path]:
        return list((self.cache / "partial").iterdir())

    def stored(self) -> list[Path]:
        return [p for p in (self.cache / "blobs").rglob("*") if p.is_file()]

    async def wait_stored(self, timeout: float = 10.0) -> list[Path]:
        """The stored blobs once there are any: a client has its last byte before the
        commit (the fsync is off its path), so its response may end before the rename."""
        with trio.fail_after(timeout):
            while not (stored := self.stored()):
                await trio.sleep(0.02)
        return stored


@asynccontextmanager
async def proxy_process(
    tmp_path: Path,
    upstream_url: str,
    extra_args: tuple[str, ...] = (),
    launcher: str = "hypercorn",
    zero_copy: bool = True,
) -> AsyncIterator[ProxyProcess]:
    cache = tmp_path / "cache"
    config = write_config(tmp_path / "cfg.toml", cache, upstream_url, read_timeout=30)
    with config.open("a") as more:
        more.write(f"[stream]\nzero_copy = {str(zero_copy).lower()}\n")
    port = free_port()
    process = start(tmp_path, port, config, extra_args, launcher=launcher)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(url, process)
        yield ProxyProcess(process, url, cache)
    finally:
        if process.poll() is None:
            stop(process)


async def read_some(chunks: AsyncIterator[bytes], at_least: int) -> int:
    """Read from one body iterator until ``at_least`` bytes or its end."""
    received = 0
    while received < at_least:
        chunk = await anext(chunks, None)
        if chunk is None:
            break
        received += len(chunk)
    return received


async def test_kill_9_mid_download_leaves_nothing_servable_and_restart_recovers(
    tmp_path: Path,
) -> None:
    fake = FakeRegistry(chunk_delay=0.01)  # 6.4 MB/s: 8 MiB takes over a second
    data = os.urandom(8 * MiB)
    digest = fake.add_blob(data)
    async with serving(fake) as upstream_url:
        async with proxy_process(tmp_path, upstream_url) as proxy:
            async with (
                httpx.AsyncClient() as client,
                client.stream("GET", proxy.blob_url(digest)) as response,
            ):
                assert response.status_code == 200
                await read_some(response.aiter_raw(), 1 * MiB)
                assert len(proxy.partials()) == 1
                # kill -9 the whole process tree, worker first: no cleanup code runs.
                for pid in child_pids(proxy.process.pid):
                    with_signal(pid, signal.SIGKILL)
                proxy.process.kill()
                proxy.process.wait()
            assert proxy.stored() == []  # the partial was never published
            leftover = proxy.partials()
            assert len(leftover) == 1

        async with proxy_process(tmp_path, upstream_url) as restarted:
            assert restarted.partials() == []  # removed at start
            async with httpx.AsyncClient() as client:
                response = await client.get(restarted.blob_url(digest), timeout=30)
            assert response.status_code == 200
            assert response.content == data
            [blob] = await restarted.wait_stored()
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name


@pytest.mark.parametrize("launcher", ["hypercorn", "serve"])
async def test_sigterm_ends_downloads_within_the_graceful_timeout_and_exits_0(
    tmp_path: Path, launcher: str
) -> None:
    fake = FakeRegistry(chunk_delay=0.02)  # 64 MiB at 3.2 MB/s: 20 s, far past the bound
    data = os.urandom(64 * MiB)
    digest = fake.add_blob(data)
    graceful = 2
    async with (
        serving(fake) as upstream_url,
        proxy_process(
            tmp_path, upstream_url, ("--graceful-timeout", str(graceful)), launcher
        ) as proxy,
        httpx.AsyncClient() as client,
        client.stream("GET", proxy.blob_url(digest)) as response,
    ):
        assert response.status_code == 200
        chunks = response.aiter_raw()
        await read_some(chunks, 256 * 1024)
        assert len(proxy.partials()) == 1
        started = trio.current_time()
        proxy.process.send_signal(signal.SIGTERM)
        # The client sees an aborted body, never a complete one.
        aborted = False
        try:
            await read_some(chunks, len(data))
        except httpx.RemoteProtocolError:
            aborted = True
        assert aborted
        with trio.fail_after(graceful + 8):
            returncode = await trio.to_thread.run_sync(proxy.process.wait)
        elapsed = trio.current_time() - started
        assert returncode == 0
        print(f"SIGTERM to exit: {elapsed:.2f}s")
        assert elapsed < graceful + 3
        assert proxy.partials() == []
        assert proxy.stored() == []
        # New connections were refused once it stopped.
        try:
            await client.get(f"{proxy.url}/v2/", timeout=2)
            refused = False
        except httpx.TransportError:
            refused = True
        assert refused


@pytest.mark.parametrize(
    ("launcher", "zero_copy"), [("hypercorn", True), ("serve", False)], ids=["sendfile", "read"]
)
async def test_sigterm_ends_a_response_whose_client_stopped_reading(
    tmp_path: Path, launcher: str, zero_copy: bool
) -> None:
    """A client that keeps its connection open but reads nothing must not hold the shutdown:
    hypercorn's own sends cannot be cancelled, and this process used to run on forever."""
    fake = FakeRegistry(chunk_delay=0.0)
    data = os.urandom(64 * MiB)  # far more than the socket buffers between us hold
    digest = fake.add_blob(data)
    graceful = 2
    async with (
        serving(fake) as upstream_url,
        proxy_process(
            tmp_path, upstream_url, ("--graceful-timeout", str(graceful)), launcher, zero_copy
        ) as proxy,
    ):
        async with httpx.AsyncClient() as client:
            cached = await client.get(proxy.blob_url(digest), timeout=60)
        assert cached.content == data
        port = int(proxy.url.rsplit(":", 1)[1])
        stalled = await trio.open_tcp_stream("127.0.0.1", port)
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        path = proxy.blob_url(digest).split(str(port), 1)[1]
        await stalled.send_all(f"GET {path} HTTP/1.1\r\nHost: proxy\r\n\r\n".encode())
        assert (await stalled.receive_some(64 * 1024)).startswith(b"HTTP/1.1 200")
        await trio.sleep(0.5)  # the server fills the socket buffers and waits
        started = trio.current_time()
        proxy.process.send_signal(signal.SIGTERM)
        with trio.fail_after(graceful + 8):
            returncode = await trio.to_thread.run_sync(proxy.process.wait, abandon_on_cancel=True)
        elapsed = trio.current_time() - started
        assert returncode == 0
        assert elapsed < graceful + 3
        # The stalled client, reading at last, finds the body cut short.
        received = 0
        with trio.fail_after(10):
            while chunk := await stalled.receive_some(1024 * 1024):
                received += len(chunk)
        assert received < len(data)
        await stalled.aclose()
