"""Several worker processes on one cache, as real processes: the workers = 2 proof.

Both launchers the README gives are covered: ``hypercorn --workers 2`` (hypercorn's own
multi-process runner) and ``streamsync-trio serve --workers 2`` (our pre-forking one).
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from ..labs.fake_server import serving
from ..labs.fakes import FakeRegistry
from ..labs.proclab import child_pids, free_port, start, stop, wait_ready, write_config

MiB = 1024 * 1024
FOLLOWING = "is owned by another process; following it"


async def get_all(url: str, clients: int, stagger: float = 0.0) -> list[bytes]:
    """``clients`` GETs, each on its own connection, started ``stagger`` seconds apart."""
    bodies: list[bytes] = []

    async def one() -> None:
        async with httpx.AsyncClient() as client:
            response = await client.get(url, timeout=60)
            assert response.status_code == 200, response.text
            bodies.append(response.content)

    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(one)
            await trio.sleep(stagger)
    return bodies


async def blob_requests_by_worker(url: str) -> dict[str, float]:
    """Blob GETs counted by each worker, from one scrape of /metrics."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{url}/metrics")).text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "streamsync_blob_requests":
            for sample in family.samples:
                worker = sample.labels.get("worker", "")
                counts[worker] = counts.get(worker, 0.0) + sample.value
    return counts


def started(
    tmp_path: Path, upstream_url: str, launcher: str
) -> tuple[subprocess.Popen[bytes], str]:
    config = write_config(tmp_path / "cfg.toml", tmp_path / "cache", upstream_url, read_timeout=30)
    port = free_port()
    process = start(
        tmp_path, port, config, ("--workers", "2"), launcher=launcher, output=tmp_path / "log"
    )
    return process, f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("launcher", ["hypercorn", "serve"])
async def test_two_worker_processes_fetch_each_blob_from_the_upstream_once(
    tmp_path: Path, launcher: str
) -> None:
    fake = FakeRegistry(chunk_delay=0.01)  # 6.4 MB/s: a 4 MiB blob is in flight ~0.65 s
    async with serving(fake) as upstream_url:
        process, url = started(tmp_path, upstream_url, launcher)
        try:
            await wait_ready(url, process)
            # Connections go to whichever worker accepts first, and a worker that wakes up
            # takes every connection already waiting: a burst of eight could all land on one
            # worker, round after round (seen in CI).  Started 50 ms apart, within the 0.65 s
            # the blob is in flight, each is a fresh chance for the other worker; new blobs
            # until the log shows one worker following the other.
            requests_made = 0
            for _ in range(8):
                data = os.urandom(4 * MiB)
                digest = fake.add_blob(data)
                bodies = await get_all(f"{url}/v2/library/app/blobs/{digest}", 8, stagger=0.05)
                requests_made += 8
                assert bodies == [data] * 8
                assert len(fake.blob_gets(digest)) == 1
                if FOLLOWING in (tmp_path / "log").read_text():
                    break
            assert FOLLOWING in (tmp_path / "log").read_text()
            assert list((tmp_path / "cache" / "partial").iterdir()) == []
            assert list((tmp_path / "cache" / "leases").iterdir()) == []
            # Whichever worker a scrape reaches answers for both.
            with trio.fail_after(15):
                while True:
                    counts = await blob_requests_by_worker(url)
                    if len(counts) == 2 and sum(counts.values()) == requests_made:
                        break
                    await trio.sleep(0.5)
        finally:
            stop(process)


async def test_serve_replaces_a_killed_worker_and_stops_them_all_on_sigterm(
    tmp_path: Path,
) -> None:
    fake = FakeRegistry()
    data = os.urandom(1 * MiB)
    digest = fake.add_blob(data)
    async with serving(fake) as upstream_url:
        process, url = started(tmp_path, upstream_url, "serve")
        try:
            await wait_ready(url, process)
            first = child_pids(process.pid)
            assert len(first) == 2
            os.kill(first[0], signal.SIGKILL)
            with trio.fail_after(10):
                while len(now := child_pids(process.pid)) != 2 or first[0] in now:
                    await trio.sleep(0.05)
            assert first[1] in now  # the other worker was left alone
            assert await get_all(f"{url}/v2/library/app/blobs/{digest}", 4) == [data] * 4
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(15):
                code = await trio.to_thread.run_sync(process.wait)
            assert code == 0
            assert all(not os.path.exists(f"/proc/{pid}") for pid in now)  # noqa: ASYNC240
            assert "starting another" in (tmp_path / "log").read_text()
        finally:
            if process.poll() is None:
                stop(process)


@pytest.mark.parametrize("when", ["serving", "starting"])
async def test_workers_stop_when_their_supervisor_is_killed(tmp_path: Path, when: str) -> None:
    """kill -9 of the supervisor: the kernel tells the workers (parent-death signal), and
    they stop instead of serving on as orphans that hold the port.  Also when it dies while
    they are still starting, before they listen for the signal (this failed once in CI)."""
    async with serving(FakeRegistry()) as upstream_url:
        process, url = started(tmp_path, upstream_url, "serve")
        workers: list[int] = []
        try:
            if when == "serving":
                await wait_ready(url, process)
            with trio.fail_after(15):
                while len(workers := child_pids(process.pid)) != 2:
                    await trio.sleep(0.005)
            process.kill()
            process.wait()
            with trio.fail_after(15):
                while not all(ended(pid) for pid in workers):
                    await trio.sleep(0.05)
            with pytest.raises(httpx.TransportError):
                async with httpx.AsyncClient() as client:
                    await client.get(f"{url}/v2/", timeout=2)
        finally:
            for pid in workers:
                if not ended(pid):
                    os.kill(pid, signal.SIGKILL)
            if process.poll() is None:
                stop(process)


def ended(pid: int) -> bool:
    """Gone, or a zombie waiting for whoever adopted it to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


async def test_workers_that_keep_dying_are_replaced_ever_more_slowly(tmp_path: Path) -> None:
    """The first death is replaced at once; a second soon after waits 1 s, a third 2 s."""
    async with serving(FakeRegistry()) as upstream_url:
        process, url = started(tmp_path, upstream_url, "serve")
        try:
            await wait_ready(url, process)
            waits = []
            for _ in range(3):
                victim, survivor = child_pids(process.pid)
                os.kill(victim, signal.SIGKILL)
                killed_at = trio.current_time()
                with trio.fail_after(15):
                    while len(now := child_pids(process.pid)) != 2 or victim in now:
                        await trio.sleep(0.02)
                waits.append(trio.current_time() - killed_at)
                assert survivor in now
            assert waits[0] < 0.9
            assert 1.0 <= waits[1] < 3.0
            assert 2.0 <= waits[2] < 5.0
            log = (tmp_path / "log").read_text()
            assert "starting another in 0 s" in log
            assert "starting another in 1 s" in log
            assert "starting another in 2 s" in log
            await wait_ready(url, process)  # still serving
        finally:
            if process.poll() is None:
                stop(process)


async def test_serve_stops_when_its_workers_cannot_start(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "partial").write_text("not a directory")  # every worker's startup fails
    config = write_config(tmp_path / "cfg.toml", cache, "http://127.0.0.1:9")
    process = start(
        tmp_path, free_port(), config, ("--workers", "2"), launcher="serve", output=tmp_path / "log"
    )
    with trio.fail_after(20):
        code = await trio.to_thread.run_sync(process.wait)
    assert code != 0
    assert "failed at start" in (tmp_path / "log").read_text()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_serve_drains_when_the_whole_process_group_is_signalled(
    tmp_path: Path, signum: signal.Signals
) -> None:
    """Ctrl-C in a terminal, or systemd's control-group stop: every worker gets the signal
    and then the supervisor's forwarded SIGTERM too; the second must not kill the drain."""
    fake = FakeRegistry(chunk_delay=0.01)  # 8 MiB over 1.3 s: in flight when signalled
    data = os.urandom(8 * MiB)
    digest = fake.add_blob(data)
    async with serving(fake) as upstream_url:
        config = write_config(tmp_path / "cfg.toml", tmp_path / "cache", upstream_url)
        port = free_port()
        process = start(
            tmp_path,
            port,
            config,
            ("--workers", "2", "--graceful-timeout", "10"),
            launcher="serve",
            output=tmp_path / "log",
            new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            await wait_ready(url, process)
            async with (
                httpx.AsyncClient() as client,
                client.stream("GET", f"{url}/v2/library/app/blobs/{digest}") as response,
            ):
                assert response.status_code == 200
                chunks = response.aiter_raw()
                received = len(await anext(chunks))
                os.killpg(process.pid, signum)
                async for chunk in chunks:
                    received += len(chunk)
            assert received == len(data)  # the response in flight was allowed to finish
            with trio.fail_after(20):
                code = await trio.to_thread.run_sync(process.wait)
            assert code == 0
        finally:
            if process.poll() is None:
                stop(process)
