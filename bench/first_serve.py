"""What checking a stored blob on its first serve costs: 8 clients x one 256 MiB cached blob.

The proxy hashes a stored blob the first time a process serves it (``core._trusted``,
``open_stored``); its clients get every byte but the last at once, and the last when the
digest matched.  This measures the rounds after a restart: the first (checked while served)
against the later ones (trusted, the plain sendfile path), in wall time, throughput and the
proxy's CPU seconds.  The blob is put into the cache directly (and linked to the repository),
so no upstream is involved; the page cache is warm in every round (the file was just
written), so the difference is the hashing, not the disk.

    .venv/bin/python bench/first_serve.py --size-mib 256 --clients 8 --rounds 3 --restarts 2
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import _lab
import trio

from streamsync_trio._reference import Digest
from streamsync_trio.core._store import Store

REPO = "bench/blob"


def store_blob(cache: Path, size: int, upstream: str) -> str:
    data = os.urandom(size)
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    store = Store(cache)
    path = store.blob_path(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    store.link(upstream, REPO, [digest])
    return str(digest)


@contextlib.contextmanager
def proxy(workdir: Path, cache: Path, upstream: str) -> Iterator[tuple[str, int]]:
    """The proxy as the README starts it, on ``cache``; (its URL, its PID)."""
    port = _lab.free_port()
    config = workdir / "streamsync.toml"
    config.write_text(
        f'[storage]\nroot = "{cache}"\n[log]\nlevel = "warning"\n'
        f'[[upstream]]\nname = "{upstream}"\nurl = "http://{upstream}"\ndefault = true\n'
    )
    env = {**os.environ, "STREAMSYNC_CONFIG": str(config)}
    args = [sys.executable, "-m", "streamsync_trio", "serve", "--bind", f"127.0.0.1:{port}"]
    with _lab.process([*args, "--workers", "1"], workdir / "proxy.log", env) as pid:
        url = f"http://127.0.0.1:{port}"
        _lab.wait_http(url + "/v2/")
        yield url, pid


async def one_client(url: str, size: int) -> float:
    """curl, C like the proxy's peer, writing to /dev/null: the client side costs little."""
    started = trio.current_time()
    curl = "curl -sS --fail -o /dev/null -w '%{size_download}'"
    result = await trio.run_process(["bash", "-c", f"{curl} '{url}'"], capture_stdout=True)
    if int(result.stdout) != size:
        raise SystemExit(f"short body: {int(result.stdout)} of {size}")
    return trio.current_time() - started


async def one_round(url: str, size: int, clients: int) -> tuple[float, float]:
    """(wall seconds, slowest client's seconds) for ``clients`` concurrent GETs."""
    times: list[float] = []

    async def run() -> None:
        times.append(await one_client(url, size))

    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(run)
    return trio.current_time() - started, max(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--restarts", type=int, default=2)
    args = parser.parse_args()
    _lab.require("curl")
    size = args.size_mib * 1024 * 1024
    upstream = f"127.0.0.1:{_lab.free_port()}"  # nobody listens: the blob is cached
    with tempfile.TemporaryDirectory(prefix="bench-first-serve-") as tmp:
        workdir = Path(tmp)
        cache = workdir / "cache"
        digest = store_blob(cache, size, upstream)
        started = time.perf_counter()
        hashlib.sha256(Path(Store(cache).root, "blobs", "sha256", digest[7:]).read_bytes())
        print(f"sha256 of the blob alone (one core): {time.perf_counter() - started:.3f} s")
        results: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        for restart in range(args.restarts):
            with proxy(workdir, cache, upstream) as (url, pid):
                blob_url = f"{url}/v2/{REPO}/blobs/{digest}"
                for number in range(args.rounds):
                    cpu = _lab.tree_cpu_seconds(pid)
                    wall, slowest = trio.run(one_round, blob_url, size, args.clients)
                    cpu = _lab.tree_cpu_seconds(pid) - cpu
                    rate = args.clients * size / wall / 2**30
                    label = "first serve (checked)" if number == 0 else "later serve (trusted)"
                    results[number == 0].append((wall, cpu))
                    print(
                        f"process {restart + 1} round {number + 1} {label:<22} wall {wall:.3f} s"
                        f"  slowest client {slowest:.3f} s  {rate:.2f} GiB/s  proxy CPU {cpu:.2f} s"
                    )
        for first, label in ((True, "first serves"), (False, "later serves")):
            walls = [wall for wall, _ in results[first]]
            cpus = [cpu for _, cpu in results[first]]
            print(
                f"median of {len(walls)} {label}: wall {statistics.median(walls):.3f} s, "
                f"proxy CPU {statistics.median(cpus):.2f} s"
            )


if __name__ == "__main__":
    main()
