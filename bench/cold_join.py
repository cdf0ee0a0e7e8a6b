"""Cold blob, late joiners: N clients join one uncached blob D seconds apart.

Measures what streaming sync promises: the upstream sends the blob once (upstream bytes /
blob size = 1.00), every client gets its first byte at once, and late joiners finish with the
first client instead of a whole transfer later.  Also the proxy's peak RSS (whole process
tree, sampled every 50 ms).

    .venv/bin/python bench/cold_join.py --size-mib 256 --clients 8 --join-every 0.5 --rate 40m
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import _lab
import trio


@dataclass
class ClientResult:
    joined: float
    first_byte: float
    done: float
    size: int
    digest_ok: bool


async def client(
    url: str, digest: str, size: int, join_at: float, t0: float, verify: bool
) -> ClientResult:
    """One client is a curl, C like the proxy's peer, so the proxy is measured and not a
    Python client competing with it for the two cores.  Verifying clients pipe into
    ``sha256sum``; the others write to /dev/null, so the client side costs as little as it
    can and does not cap throughput, and only curl's byte count is checked."""
    await trio.sleep_until(t0 + join_at)
    curl = "curl -sS --fail -w '%{stderr}%{time_starttransfer} %{size_download}'"
    command = (
        f"set -o pipefail; {curl} '{url}' | sha256sum" if verify else f"{curl} -o /dev/null '{url}'"
    )
    result = await trio.run_process(
        ["bash", "-c", command], capture_stdout=True, capture_stderr=True
    )
    done = trio.current_time() - t0
    first_byte, received = result.stderr.decode().split()
    if verify:
        ok = "sha256:" + result.stdout.decode().split()[0] == digest
    else:
        ok = int(received) == size
    return ClientResult(join_at, float(first_byte), done, int(received), ok)


@dataclass
class Sampler:
    """Samples the memory of a process tree every 50 ms; keeps the peaks.

    ``peak`` sums each member's resident set (RSS): pages a forked worker shares with its
    parent are counted once per process.  ``peak_pss`` sums proportional set sizes, which
    split shared pages between their sharers: what the tree costs the machine.  For one
    process the two differ only by the pages it shares with other programs (libc, say).
    """

    pid: int
    peak: int = 0
    peak_pss: int = 0

    async def run(self) -> None:
        while True:
            rss, pss = await trio.to_thread.run_sync(_lab.tree_memory_bytes, self.pid)
            self.peak = max(self.peak, rss)
            self.peak_pss = max(self.peak_pss, pss)
            await trio.sleep(0.05)


async def clients_on(
    url: str, digest: str, size: int, count: int, every: float, verify: bool, sampler: Sampler
) -> list[ClientResult]:
    """``count`` clients joining ``every`` seconds apart, while ``sampler`` watches memory."""
    results: list[ClientResult] = []
    t0 = trio.current_time()

    async def one(i: int) -> None:
        results.append(await client(url, digest, size, i * every, t0, verify))

    async with trio.open_nursery() as outer:
        outer.start_soon(sampler.run)
        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(one, i)
        outer.cancel_scope.cancel()
    return sorted(results, key=lambda r: r.joined)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--join-every", type=float, default=0.5)
    parser.add_argument("--rate", default="40m", help="nginx limit_rate per connection")
    parser.add_argument(
        "--no-verify", action="store_true", help="clients write to /dev/null instead of hashing"
    )
    args = parser.parse_args()
    _lab.require("docker-registry", "nginx")
    size = args.size_mib * 1024 * 1024
    with tempfile.TemporaryDirectory(prefix="streamsync-bench-") as tmp:
        workdir = Path(tmp)
        with _lab.upstream(workdir, args.rate) as up:
            digest = _lab.push_blob(up.registry_url, "bench/blob", size)
            with _lab.proxy(workdir, up.wan_url) as proxy:
                url = f"{proxy.url}/v2/bench/blob/blobs/{digest}"
                started = time.monotonic()
                sampler = Sampler(proxy.pid)
                results = trio.run(
                    clients_on,
                    url,
                    digest,
                    size,
                    args.clients,
                    args.join_every,
                    not args.no_verify,
                    sampler,
                )
                peak_rss = sampler.peak
                wall = time.monotonic() - started
            upstream_bytes = up.upstream_bytes()
    print(
        f"cold join: {args.size_mib} MiB blob, {args.clients} clients {args.join_every}s apart, "
        f"upstream limited to {args.rate}B/s per connection"
    )
    print(f"{'client':>6} {'joined s':>9} {'TTFB s':>8} {'done at s':>10} {'bytes ok':>9}")
    for i, r in enumerate(results):
        ok = "yes" if r.digest_ok and r.size == size else "NO"
        print(f"{i:>6} {r.joined:>9.2f} {r.first_byte:>8.3f} {r.done:>10.2f} {ok:>9}")
    first, last = results[0], results[-1]
    print(f"upstream bytes / blob size: {upstream_bytes / size:.3f}")
    print(f"slowest TTFB: {max(r.first_byte for r in results):.3f} s")
    print(
        f"first client done at {first.done:.2f} s, last at {last.done:.2f} s "
        f"(last/first = {last.done / first.done:.3f})"
    )
    print(f"peak RSS of the proxy process tree: {peak_rss / 2**20:.1f} MiB; wall {wall:.1f} s")


if __name__ == "__main__":
    main()
