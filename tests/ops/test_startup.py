"""Starting the server the documented way: hypercorn + hypercorn.toml + STREAMSYNC_CONFIG."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from ..labs.proclab import free_port, start, stop


@pytest.mark.parametrize(
    ("toml", "named_key"),
    [
        ('[[upstream]]\nname = "r.test"\nurl = "http://r.test"\nread_timout = 3\n', "read_timout"),
        ('[stream]\nchunk_size = "big"\n', "stream.chunk_size"),
        ('[[upstream]]\nname = "library"\nurl = "http://r.test"\n', "upstream[0].name"),
        ("[storage\n", "streamsync.toml"),
    ],
)
def test_invalid_config_stops_the_server_naming_the_key(
    tmp_path: Path, toml: str, named_key: str
) -> None:
    config = tmp_path / "streamsync.toml"
    config.write_text(toml)
    process = start(tmp_path, free_port(), config)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("the server kept running with an invalid configuration:\n" + stop(process))
    output = stop(process)
    # The worker stops with the message; hypercorn's parent then exits too (with status 0:
    # a hypercorn 0.18 bug, which is why scripts/serve runs check-config first).
    assert "invalid configuration" in output
    assert named_key in output
    check = subprocess.run(
        [sys.executable, "-m", "streamsync_trio", "check-config"],
        cwd=tmp_path,
        env={**os.environ, "STREAMSYNC_CONFIG": str(config)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 2
    assert named_key in check.stderr
    served = subprocess.run(
        [sys.executable, "-m", "streamsync_trio", "serve", "--bind", f"127.0.0.1:{free_port()}"],
        cwd=tmp_path,
        env={**os.environ, "STREAMSYNC_CONFIG": str(config)},
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert served.returncode == 2
    assert named_key in served.stderr


async def test_defaults_serve_from_dot_data_without_touching_the_upstream(tmp_path: Path) -> None:
    """No config at all: cache in ./data, Docker Hub as default, and /v2/ answers at once."""
    port = free_port()
    process = start(tmp_path, port, None)
    try:
        async with httpx.AsyncClient() as client:
            with trio.fail_after(30):
                while True:
                    try:
                        response = await client.get(f"http://127.0.0.1:{port}/v2/")
                        break
                    except httpx.TransportError:
                        await trio.sleep(0.1)
            assert response.status_code == 200
            assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
            bad = await client.get(f"http://127.0.0.1:{port}/v2/UPPER/blobs/sha256:00")
            assert bad.status_code == 400
        assert (tmp_path / "data" / "blobs").is_dir()
        assert (tmp_path / "data" / "partial").is_dir()
    finally:
        output = stop(process)
    assert "docker.io=https://registry-1.docker.io (default)" in output
