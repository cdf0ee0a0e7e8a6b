"""How connections end and what a client may hold, on both launchers, with raw sockets.

HTTP clients that read to EOF (HTTP/1.0, ``Connection: close``) must get it; a connection
the client closed must not stay open on our side; a client that sends its headers slowly, or
opens connections without end, is bounded.  Raw sockets, because an HTTP library would hide
exactly these details (it closes for us, it reuses connections, it never dribbles).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from ..labs.proclab import REPO_ROOT, child_pids, free_port, start, stop, wait_ready, write_config

LAUNCHERS = ["hypercorn", "serve"]


@dataclass
class Proxy:
    process: subprocess.Popen[bytes]
    port: int

    def worker_pid(self) -> int:
        """The process that serves: hypercorn's one worker, or ``serve`` itself."""
        children = child_pids(self.process.pid)
        workers = [pid for pid in children if _serves(pid)]
        return workers[0] if workers else self.process.pid

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.worker_pid()}/fd"))


def _serves(pid: int) -> bool:
    """hypercorn's worker is a multiprocessing child (its resource tracker is another)."""
    try:
        return "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return False


@asynccontextmanager
async def proxy(tmp_path: Path, launcher: str, **server: object) -> AsyncIterator[Proxy]:
    """The proxy as the README starts it, with ``server`` settings added to hypercorn.toml."""
    config = write_config(tmp_path / "cfg.toml", tmp_path / "cache", "http://127.0.0.1:9")
    toml = tmp_path / "hypercorn.toml"
    # The README's file, with the keys given here in place of its own (TOML refuses a key
    # given twice).
    kept = [
        line
        for line in (REPO_ROOT / "hypercorn.toml").read_text().splitlines(keepends=True)
        if line.split("=", 1)[0].strip() not in server
    ]
    toml.write_text(
        "".join(kept) + "".join(f"{key} = {value!r}\n" for key, value in server.items())
    )
    flag = "--hypercorn-config" if launcher == "serve" else "--config"
    port = free_port()
    # Output to a file: a pipe nobody reads would fill with access lines and stop the proxy.
    log = tmp_path / "proxy.log"
    process = start(tmp_path, port, config, (flag, str(toml)), launcher=launcher, output=log)
    try:
        await wait_ready(f"http://127.0.0.1:{port}", process)
        yield Proxy(process, port)
    finally:
        stop(process)


async def exchange(port: int, request: bytes, timeout: float = 10.0) -> tuple[bytes, float | None]:
    """Send ``request`` and read until EOF: (everything read, seconds until EOF, or None if
    no EOF came within ``timeout``)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    received = b""
    async with stream:
        await stream.send_all(request)
        started = trio.current_time()
        with trio.move_on_after(timeout):
            while data := await stream.receive_some(65536):
                received += data
            return received, trio.current_time() - started
    return received, None


@pytest.mark.parametrize("launcher", LAUNCHERS)
async def test_connection_close_and_http_1_0_end_with_eof_and_status_lines_have_reasons(
    tmp_path: Path, launcher: str
) -> None:
    async with proxy(tmp_path, launcher) as running:
        port = running.port
        closing, took = await exchange(
            port, b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert closing.startswith(b"HTTP/1.1 200 OK\r\n")
        assert closing.endswith(b"\r\n\r\n{}")
        assert took is not None and took < 3.0, "no EOF after a Connection: close response"

        old, took = await exchange(port, b"GET /v2/ HTTP/1.0\r\n\r\n")
        assert old.startswith(b"HTTP/1.1 200 OK\r\n")
        assert took is not None and took < 3.0, "no EOF after an HTTP/1.0 response"

        missing, _ = await exchange(
            port, b"GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert missing.startswith(b"HTTP/1.1 404 Not Found\r\n")
        # hypercorn's own error answer (a malformed request) passes the same way.
        bad, _ = await exchange(port, b"GET /v2/ HTTP/1.1\r\nno colon here\r\n\r\n")
        assert bad.startswith(b"HTTP/1.1 400 Bad Request\r\n")


# hypercorn takes several ms per connection on a busy 2-core machine, so the other launcher
# (same classes, same code path) gets a shorter storm.
@pytest.mark.parametrize(("launcher", "cycles"), [("serve", 5000), ("hypercorn", 2000)])
async def test_connections_the_client_closed_do_not_linger(
    tmp_path: Path, launcher: str, cycles: int
) -> None:
    async with proxy(tmp_path, launcher) as running:
        await exchange(running.port, b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        baseline = running.open_fds()

        def storm() -> None:
            for _ in range(cycles):
                socket.create_connection(("127.0.0.1", running.port)).close()
            # And idle keep-alive connections closed after a request, the common case.
            for _ in range(200):
                with socket.create_connection(("127.0.0.1", running.port)) as sock:
                    sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
                    sock.recv(65536)

        await trio.to_thread.run_sync(storm)
        with trio.move_on_after(5):
            while running.open_fds() > baseline + 2:
                await trio.sleep(0.05)
        assert running.open_fds() <= baseline + 2, (baseline, running.open_fds())


@pytest.mark.parametrize("launcher", LAUNCHERS)
async def test_slowloris_connections_are_closed_within_the_header_timeout(
    tmp_path: Path, launcher: str
) -> None:
    header_timeout = 2.0
    async with proxy(tmp_path, launcher, header_timeout=header_timeout) as running:
        closed_after: list[float] = []

        async def slowloris() -> None:
            stream = await trio.open_tcp_stream("127.0.0.1", running.port)
            async with stream:
                started = trio.current_time()
                await stream.send_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")
                try:
                    for line in range(100):
                        with trio.move_on_after(0.5):
                            if await stream.receive_some(1024) == b"":
                                break
                        await stream.send_all(b"X-Drip-%d: 1\r\n" % line)
                except trio.BrokenResourceError:
                    pass  # reset by the server: closed as well
                closed_after.append(trio.current_time() - started)

        async def silent() -> None:
            stream = await trio.open_tcp_stream("127.0.0.1", running.port)
            async with stream:
                started = trio.current_time()
                with contextlib.suppress(trio.BrokenResourceError):
                    assert await stream.receive_some(1024) == b""
                closed_after.append(trio.current_time() - started)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for _ in range(40):
                    nursery.start_soon(slowloris)
                for _ in range(10):  # connect, then never send a byte
                    nursery.start_soon(silent)
        assert len(closed_after) == 50
        # The deadline, one dribble interval to notice it, and a margin for a busy machine.
        assert max(closed_after) < header_timeout + 0.5 + 2.0, sorted(closed_after)
        # A well-behaved client is still served.
        answer, _ = await exchange(
            running.port, b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n")


@pytest.mark.parametrize("launcher", LAUNCHERS)
async def test_one_client_address_holds_at_most_the_configured_connections(
    tmp_path: Path, launcher: str
) -> None:
    cap = 20
    async with proxy(tmp_path, launcher, max_connections_per_client=cap) as running:
        streams = [await trio.open_tcp_stream("127.0.0.1", running.port) for _ in range(cap + 10)]
        refused = 0

        async def refused_at_once(stream: trio.SocketStream) -> None:
            nonlocal refused
            with trio.move_on_after(1.0):
                try:
                    if await stream.receive_some(1024) == b"":
                        refused += 1
                except trio.BrokenResourceError:
                    refused += 1

        async with trio.open_nursery() as nursery:
            for stream in streams:
                nursery.start_soon(refused_at_once, stream)
        assert refused == 10
        for stream in streams:
            await stream.aclose()
        # Once they are closed, the address is admitted again.
        with trio.fail_after(5):
            while True:
                # Until the server has seen those closes, a new connection is still over the
                # cap: closed unanswered, or reset if our request was in flight by then.
                try:
                    answer, _ = await exchange(
                        running.port,
                        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                    )
                except trio.BrokenResourceError:
                    answer = b""
                if answer:
                    break
                await trio.sleep(0.05)
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
