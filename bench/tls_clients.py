"""Peak memory with clients over TLS: 8 curl clients on one cold blob, then on it warm.

With TLS to the clients the proxy cannot hand cached bytes to ``sendfile``: every byte is
read into memory and encrypted, so this is where a response's buffers show (issue 11 saw
143 MiB with 8 TLS clients).  The upstream is Distribution on loopback over HTTPS, with no
throttle (the fast upstream of ``compare.py --fast-upstream``); the proxy serves HTTPS with a
test CA's certificate.  Prints the peak RSS and PSS of the proxy's process tree (sampled
every 50 ms) and the aggregate MB/s of each phase.

    .venv/bin/python bench/tls_clients.py [--size-mib 256] [--clients 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import _lab
import trio
from cold_join import Sampler


async def curl(url: str, ca: Path, size: int) -> None:
    command = ["curl", "-sS", "--fail", "--cacert", str(ca), "-o", "/dev/null"]
    result = await trio.run_process([*command, "-w", "%{size_download}", url], capture_stdout=True)
    if int(result.stdout) != size:
        raise SystemExit(f"bench: {url} gave {result.stdout.decode()} of {size} bytes")


async def phase(url: str, ca: Path, size: int, clients: int, sampler: Sampler) -> float:
    """``clients`` curls at once while ``sampler`` watches; aggregate MB/s."""
    started = trio.current_time()
    async with trio.open_nursery() as outer:
        outer.start_soon(sampler.run)
        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(curl, url, ca, size)
        outer.cancel_scope.cancel()
    return size * clients / (trio.current_time() - started) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    _lab.require("docker-registry", "curl", "openssl")
    size = args.size_mib * 1024 * 1024
    rows: list[tuple[int, int, float, int, int, float]] = []
    with tempfile.TemporaryDirectory(prefix="streamsync-tls-") as tmp:
        workdir = Path(tmp)
        ca = _lab.make_test_ca(workdir)
        env = {"SSL_CERT_FILE": str(ca.ca)}
        with _lab.fast_upstream(workdir) as plain, _lab.fast_upstream(workdir, ca) as tls:
            digests = [_lab.push_blob(plain, "bench/blob", size) for _ in range(args.rounds)]
            for digest in digests:
                with _lab.proxy(workdir, tls, env=env, client_tls=ca) as proxy:
                    url = f"{proxy.url}/v2/bench/blob/blobs/{digest}"
                    _lab.recycle_pages(workdir, size)  # see _lab.recycle_pages
                    cold = Sampler(proxy.pid)
                    cold_rate = trio.run(phase, url, ca.ca, size, args.clients, cold)
                    warm = Sampler(proxy.pid)
                    warm_rate = trio.run(phase, url, ca.ca, size, args.clients, warm)
                    rows.append(
                        (cold.peak, cold.peak_pss, cold_rate, warm.peak, warm.peak_pss, warm_rate)
                    )
    print(
        f"\n{args.clients} TLS clients, {args.size_mib} MiB blob, HTTPS upstream on loopback, "
        f"{args.rounds} rounds (a new proxy each); {time.strftime('%Y-%m-%d %H:%M')}\n"
    )
    print(
        "| round | cold: peak RSS / PSS, MiB | cold MB/s | warm: peak RSS / PSS, MiB | warm MB/s |"
    )
    print("| --- | --- | --- | --- | --- |")
    mib = 2**20
    for index, (c_rss, c_pss, c_rate, w_rss, w_pss, w_rate) in enumerate(rows, 1):
        print(
            f"| {index} | {c_rss / mib:.0f} / {c_pss / mib:.0f} | {c_rate:.0f} | "
            f"{w_rss / mib:.0f} / {w_pss / mib:.0f} | {w_rate:.0f} |"
        )
    worst = max(max(r[0], r[3]) for r in rows) / mib
    print(
        f"\nhighest peak RSS: {worst:.0f} MiB; median warm MB/s "
        f"{statistics.median(r[5] for r in rows):.0f}"
    )


if __name__ == "__main__":
    main()
