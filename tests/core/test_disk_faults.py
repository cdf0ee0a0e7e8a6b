"""A cache disk that fills up or fails under a running proxy: it must heal without a restart,
and while it cannot serve, its probes must say so (issue 14, defect 1)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from streamsync_trio.core._store import Store
from streamsync_trio.core._tasks import MAX_QUICK_DEATHS, BackgroundTasks
from streamsync_trio.edge import _peers

from ..labs.fake_server import serving
from ..labs.fakes import FakeRegistry, digest_of
from ..labs.httplab import fetch, running_proxy
from ..labs.proclab import free_port, start, stop, wait_ready, write_config

MiB = 1024 * 1024


def full_disk(path: Path, *args: Any, **kwargs: Any) -> None:
    """What a full disk does to a small write: the file is created, its bytes refused."""
    path.touch()
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_the_writability_probe_leaves_no_file_on_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path / "cache")
    monkeypatch.setattr(Path, "write_bytes", full_disk)
    [problem] = store.check_writable()
    assert "not writable" in problem
    assert "No space left" in problem
    assert list(store.partial_dir.iterdir()) == []


async def test_the_metrics_publisher_survives_write_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    real_write_text = Path.write_text
    failing = True

    def write_text(path: Path, *args: Any, **kwargs: Any) -> int:
        if failing:
            full_disk(path)
        return real_write_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_peers.publish_periodically, tmp_path, lambda: "metric 1\n")
        await trio.sleep(5 * _peers.PUBLISH_INTERVAL)
        assert os.listdir(tmp_path) == []  # no staging file left by the failures
        failing = False  # space freed
        await trio.sleep(2 * _peers.PUBLISH_INTERVAL)
        assert os.listdir(tmp_path) == [f"{os.getpid()}.prom"]
        nursery.cancel_scope.cancel()


async def test_a_failing_background_task_takes_readiness_then_liveness_down(
    autojump_clock: trio.testing.MockClock,
) -> None:
    runs = 0

    async def broken() -> None:
        nonlocal runs
        runs += 1
        await trio.sleep(1)
        raise OSError(errno.EROFS, "Read-only file system")

    async with trio.open_nursery() as nursery:
        tasks = BackgroundTasks(nursery)
        tasks.start("broken", broken)
        await trio.sleep(1.5)
        [problem] = tasks.readiness_problems()
        assert "'broken' is not running" in problem
        assert "Read-only file system" in problem
        assert tasks.liveness_problems() == []  # it may still recover
        await trio.sleep(3600)
        assert runs == MAX_QUICK_DEATHS
        [problem] = tasks.liveness_problems()
        assert "'broken' keeps failing" in problem
        assert tasks.readiness_problems() == [problem]
        nursery.cancel_scope.cancel()
    assert not tasks.nursery_open


async def test_a_dead_background_task_shows_in_readyz_and_the_proxy_goes_on_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_publish(directory: Path, text: str) -> None:
        raise RuntimeError("boom")  # not an error of the disk: a bug

    monkeypatch.setattr(_peers, "publish", broken_publish)
    fake = FakeRegistry()
    digest = fake.add_blob(os.urandom(MiB))
    async with running_proxy(tmp_path, fake) as proxy, httpx.AsyncClient() as client:
        with trio.fail_after(10):
            while (ready := await client.get(f"{proxy.url}/readyz")).status_code == 200:
                await trio.sleep(0.05)
        assert ready.status_code == 503
        assert any("'metrics publisher'" in p for p in ready.json()["problems"])
        assert (await client.get(f"{proxy.url}/healthz")).status_code == 200
        # The app nursery survived it: downloads still start and finish.
        response, body = await fetch(client, proxy.blob_url(digest))
        assert response.status_code == 200
        assert digest_of(body) == digest


# -- a real full disk ---------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs under ``tmp_path``: a disk the test can fill and free.  (Not smaller:
    the proxy starts a download only with 32 MiB to spare.)"""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    why = None
    if os.geteuid() != 0:
        why = "mounting a tmpfs needs root"
    else:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount_point)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            why = f"cannot mount a tmpfs: {result.stderr.strip()}"
    if why is not None:
        if os.environ.get("STREAMSYNC_REQUIRE_E2E") == "1":
            pytest.fail(f"STREAMSYNC_REQUIRE_E2E=1 but {why}")
        pytest.skip(why)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(disk: Path) -> Path:
    """Write a file until the disk refuses more."""
    filler = disk / "filler"
    with filler.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * MiB)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


@asynccontextmanager
async def proxy_on(tmp_path: Path, cache: Path, upstream: str, launcher: str) -> AsyncIterator[str]:
    config = write_config(tmp_path / "cfg.toml", cache, upstream, read_timeout=10)
    port = free_port()
    process = start(tmp_path, port, config, launcher=launcher, output=tmp_path / "proxy.log")
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(url, process)
        yield url
    finally:
        stop(process)


def image(fake: FakeRegistry, tag: str) -> tuple[str, str]:
    """A blob and an OCI manifest (tagged ``tag``) naming it: (blob digest, manifest digest)."""
    layer = os.urandom(2 * MiB)
    layer_digest = fake.add_blob(layer)
    config = json.dumps({"tag": tag}).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": fake.add_blob(config),
            "size": len(config),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": layer_digest,
                "size": len(layer),
            }
        ],
    }
    return layer_digest, fake.add_manifest("library/app", tag, json.dumps(manifest).encode())


@pytest.mark.parametrize("launcher", ["serve", "hypercorn"])
async def test_a_full_cache_disk_heals_without_a_restart(
    tmp_path: Path, small_disk: Path, launcher: str
) -> None:
    fake = FakeRegistry()
    blob_while_full, _ = image(fake, "full")
    blob_after, _ = image(fake, "after")
    cache = small_disk / "cache"
    async with (
        serving(fake) as upstream,
        proxy_on(tmp_path, cache, upstream, launcher) as url,
        httpx.AsyncClient(base_url=url, timeout=20) as client,
    ):
        assert (await client.get("/readyz")).status_code == 200
        filler = fill(small_disk)
        # Every background task meets the full disk (the publisher writes every 2 s).
        await trio.sleep(2.5 * _peers.PUBLISH_INTERVAL)
        with trio.fail_after(20):  # an answer, not a hang
            refused = await client.get(f"/v2/library/app/blobs/{blob_while_full}")
        assert refused.status_code >= 500
        assert refused.headers["Content-Type"] == "application/json"
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert any("not writable" in problem for problem in ready.json()["problems"])
        assert (await client.get("/healthz")).status_code == 200  # it can recover
        assert [name for name in os.listdir(cache / "partial") if name.startswith(".")] == []

        filler.unlink()  # space freed: the proxy serves again, uncached content included
        assert (await client.get("/readyz")).status_code == 200
        with trio.fail_after(20):
            blob = await client.get(f"/v2/library/app/blobs/{blob_after}")
            manifest = await client.get(
                "/v2/library/app/manifests/after",
                headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
            )
            retried = await client.get(f"/v2/library/app/blobs/{blob_while_full}")
        assert blob.status_code == 200
        assert digest_of(blob.content) == blob_after
        assert manifest.status_code == 200
        assert retried.status_code == 200
        assert digest_of(retried.content) == blob_while_full
        assert (await client.get("/healthz")).status_code == 200
        assert [name for name in os.listdir(cache / "partial") if name.startswith(".")] == []


async def test_a_process_whose_app_nursery_ended_is_not_alive(tmp_path: Path) -> None:
    """An error that escapes some task outside the supervision ends quart-trio's app nursery,
    and with it every download to come: liveness must fail, so the process is replaced."""

    async def escaping() -> None:
        raise RuntimeError("an unsupervised task's bug")

    async with running_proxy(tmp_path, FakeRegistry()) as proxy, httpx.AsyncClient() as client:
        assert (await client.get(f"{proxy.url}/healthz")).status_code == 200
        proxy.state.downloads._nursery.start_soon(escaping)
        with trio.fail_after(5):
            while (health := await client.get(f"{proxy.url}/healthz")).status_code == 200:
                await trio.sleep(0.05)
        assert health.status_code == 503
        assert "nursery has ended" in health.json()["problems"][0]
        assert (await client.get(f"{proxy.url}/readyz")).status_code == 503
