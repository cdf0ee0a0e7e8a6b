"""Running the proxy as a real process, exactly as the README starts it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import trio

REPO_ROOT = Path(__file__).resolve().parents[2]
HYPERCORN = str(Path(sys.executable).parent / "hypercorn")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(path: Path, cache: Path, upstream_url: str, **upstream: object) -> Path:
    """A config with one default upstream; its name is ``name=`` (``"docker.io"``, say),
    else the URL's host:port; other keywords are upstream settings."""
    name = str(upstream.pop("name", upstream_url.split("://", 1)[1]))
    lines = [
        f'[storage]\nroot = "{cache}"\n[[upstream]]\nname = "{name}"',
        f'url = "{upstream_url}"\ndefault = true',
    ]
    lines += [f"{key} = {value!r}" for key, value in upstream.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def start(
    cwd: Path,
    port: int,
    config: Path | None,
    extra_args: tuple[str, ...] = (),
    *,
    launcher: str = "hypercorn",
    output: Path | None = None,
    new_session: bool = False,
) -> subprocess.Popen[bytes]:
    """Start the proxy as the README does: ``hypercorn ... streamsync_trio.app:app``, or
    (``launcher="serve"``) ``streamsync-trio serve``, both with the repo's hypercorn.toml.

    Its output is piped (``stop`` returns it), or written to ``output`` for a test that
    must read the log while the proxy runs."""
    env = {k: v for k, v in os.environ.items() if k != "STREAMSYNC_CONFIG"}
    if config is not None:
        env["STREAMSYNC_CONFIG"] = str(config)
    hypercorn_toml = str(REPO_ROOT / "hypercorn.toml")
    if launcher == "serve":
        command = [sys.executable, "-m", "streamsync_trio", "serve"]
        command += ["--hypercorn-config", hypercorn_toml, "--bind", f"127.0.0.1:{port}"]
        command += list(extra_args)
    else:
        command = [HYPERCORN, "--config", hypercorn_toml, *extra_args]
        command += ["--bind", f"127.0.0.1:{port}", "streamsync_trio.app:app"]
    if output is None:
        return subprocess.Popen(
            command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
    with output.open("wb") as sink:
        return subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=new_session,
        )


def stop(process: subprocess.Popen[bytes]) -> str:
    """SIGTERM (then SIGKILL) the process we started, and its workers; return its output."""
    children = child_pids(process.pid)
    process.terminate()
    try:
        output, _ = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        # The workers too, before reading on: they hold the output pipe open.
        for pid in [process.pid, *children]:
            with_signal(pid, signal.SIGKILL)
        output, _ = process.communicate()
    for pid in children:
        with_signal(pid, signal.SIGKILL)
    return (output or b"").decode(errors="replace")


def child_pids(parent: int) -> list[int]:
    """Direct children of ``parent`` (hypercorn's worker processes), from /proc."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            children.append(int(entry))
    return children


def with_signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


async def wait_ready(
    url: str, process: subprocess.Popen[bytes] | None = None, timeout: float = 30.0
) -> None:
    """Until ``url`` answers; fails at once, with the output, if the process died instead."""
    async with httpx.AsyncClient() as client:
        with trio.fail_after(timeout):
            while True:
                try:
                    await client.get(f"{url}/v2/")
                    return
                except httpx.TransportError:
                    if process is not None and process.poll() is not None:
                        output = process.stdout.read().decode() if process.stdout else ""
                        raise RuntimeError(f"the proxy exited at start:\n{output}") from None
                    await trio.sleep(0.05)
