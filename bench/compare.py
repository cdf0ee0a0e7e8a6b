"""streamsync-trio against CNCF Distribution's proxy mode, side by side in one lab.

The mirrors (ours with one worker process, ours with --workers, and Distribution) sit in
front of the same upstream (Distribution behind nginx limiting each connection to --rate,
whose access log counts upstream bytes), all running at once, and get the same workloads:

1. cold: N clients join one uncached blob D seconds apart (upstream bytes / blob size, time to
   first byte, completion of the first and the last client);
2. warm: the same N clients at once on the now cached blob, --warm-rounds times per mirror,
   mirrors taking turns (aggregate MB/s, median; clients write to /dev/null, so the client
   side does not cap it);
3. skopeo pull of a 16 x 4 MiB image, cold then warm;
4. a 1 GiB blob with 16 clients (peak memory must stay flat);
and for each mirror the peak memory of its whole process tree (RSS summed, and PSS, which
counts pages shared between forked workers once) and CPU seconds per GB served.

    .venv/bin/python bench/compare.py            # prints the table, writes docs/benchmark.png
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import _lab
import trio
from cold_join import ClientResult, Sampler, clients_on

DOCS = _lab.REPO_ROOT / "docs"
GB = 1e9


@dataclass
class Measured:
    name: str
    proxy: _lab.Proxy
    rows: dict[str, float] = field(default_factory=dict)
    served_bytes: int = 0
    cpu_before: float = 0.0
    sampler: Sampler = field(init=False)
    warm_rounds: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sampler = Sampler(self.proxy.pid)
        self.cpu_before = _lab.tree_cpu_seconds(self.proxy.pid)

    def blob_url(self, digest: str) -> str:
        return f"{self.proxy.url}/v2/bench/blob/blobs/{digest}"


async def checked_clients(
    url: str, digest: str, size: int, count: int, every: float, verify: bool, sampler: Sampler
) -> list[ClientResult]:
    results = await clients_on(url, digest, size, count, every, verify, sampler)
    if not all(r.digest_ok for r in results):
        sys.exit(f"bench: a client received wrong or incomplete bytes from {url}")
    return results


def timed_skopeo(proxy_url: str, reference: str, destination: Path) -> float:
    host = proxy_url.removeprefix("http://")
    started = time.monotonic()
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--src-tls-verify=false",
            f"docker://{host}/{reference}",
            f"dir:{destination}",
        ],
        check=True,
        capture_output=True,
    )
    elapsed = time.monotonic() - started
    shutil.rmtree(destination)
    return elapsed


def cold(m: Measured, up: _lab.Upstream, blob: tuple[str, int], args: argparse.Namespace) -> None:
    digest, size = blob
    before = up.upstream_bytes(digest)
    results = trio.run(
        checked_clients,
        m.blob_url(digest),
        digest,
        size,
        args.clients,
        args.join_every,
        True,
        m.sampler,
    )
    m.rows["upstream bytes / blob size"] = (up.upstream_bytes(digest) - before) / size
    m.rows["cold: first byte, first client (s)"] = results[0].first_byte
    m.rows["cold: first byte, slowest client (s)"] = max(r.first_byte for r in results)
    m.rows["cold: first client done (s)"] = results[0].done
    m.rows["cold: last client done (s)"] = results[-1].done
    m.rows["cold: last / first"] = results[-1].done / results[0].done
    m.served_bytes += size * len(results)


def warm_round(m: Measured, blob: tuple[str, int], args: argparse.Namespace) -> None:
    digest, size = blob
    started = time.monotonic()
    trio.run(checked_clients, m.blob_url(digest), digest, size, args.clients, 0.0, False, m.sampler)
    m.warm_rounds.append(size * args.clients / (time.monotonic() - started) / 1e6)
    m.served_bytes += size * args.clients


def skopeo_pulls(m: Measured, workdir: Path) -> None:
    slug = m.name.replace(" ", "-").replace(",", "")
    for kind in ("cold", "warm"):
        m.rows[f"skopeo 16 x 4 MiB {kind} (s)"] = timed_skopeo(
            m.proxy.url, "bench/image:v1", workdir / f"{slug}-{kind}"
        )
        m.served_bytes += 16 * 4 * 1024 * 1024


def big_blob(m: Measured, blob: tuple[str, int]) -> None:
    digest, size = blob
    sampler = Sampler(m.proxy.pid)
    trio.run(checked_clients, m.blob_url(digest), digest, size, 16, 0.25, False, sampler)
    m.served_bytes += size * 16
    m.rows["peak RSS, 1 GiB x 16 clients (MiB)"] = sampler.peak / 2**20
    m.rows["peak PSS, 1 GiB x 16 clients (MiB)"] = sampler.peak_pss / 2**20


def finish(m: Measured) -> None:
    m.rows["warm: aggregate MB/s (median)"] = statistics.median(m.warm_rounds)
    m.rows["warm: slowest / fastest round (MB/s)"] = min(m.warm_rounds) / max(m.warm_rounds)
    m.rows["peak RSS, 256 MiB runs (MiB)"] = m.sampler.peak / 2**20
    m.rows["peak PSS, 256 MiB runs (MiB)"] = m.sampler.peak_pss / 2**20
    cpu = _lab.tree_cpu_seconds(m.proxy.pid) - m.cpu_before
    m.rows["CPU seconds per GB served"] = cpu / (m.served_bytes / GB)


def measure_all(
    mirrors: dict[str, Callable[[], contextlib.AbstractContextManager[_lab.Proxy]]],
    up: _lab.Upstream,
    blobs: dict[str, tuple[str, int]],
    args: argparse.Namespace,
    workdir: Path,
) -> list[Measured]:
    """Every mirror runs for the whole measurement, each phase takes them in turn, and the
    warm rounds alternate between mirrors: a slow spell of the machine (it is shared) then
    hits all of them instead of whichever happened to run at that moment."""
    with contextlib.ExitStack() as stack:
        results = [Measured(name, stack.enter_context(start())) for name, start in mirrors.items()]
        for m in results:
            cold(m, up, blobs["cold"], args)
        for _ in range(args.warm_rounds):
            for m in results:
                warm_round(m, blobs["cold"], args)
        for m in results:
            skopeo_pulls(m, workdir)
        if not args.skip_big:
            for m in results:
                big_blob(m, blobs["big"])
        for m in results:
            finish(m)
    return results


def chart(results: list[Measured], path: Path) -> None:
    """A small grouped bar chart (Pillow only), one panel per headline measure."""
    from PIL import Image, ImageDraw

    panels = [
        ("upstream bytes / blob size", "lower is better"),
        ("cold: last client done (s)", "lower is better"),
        ("warm: aggregate MB/s (median)", "higher is better"),
        ("CPU seconds per GB served", "lower is better"),
    ]
    colours = [(30, 136, 229), (144, 202, 249), (120, 120, 120)]
    width, height, pad = 1100, 360, 30
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    panel_width = (width - pad) // len(panels)
    for index, (key, hint) in enumerate(panels):
        left = pad + index * panel_width
        values = [r.rows.get(key, 0.0) for r in results]
        top = max(values) or 1.0
        draw.text((left, 10), key, fill="black")
        draw.text((left, 26), hint, fill=(110, 110, 110))
        for bar, (value, result) in enumerate(zip(values, results, strict=True)):
            bar_height = int((height - 110) * value / top)
            x0 = left + 10 + bar * 85
            draw.rectangle(
                (x0, height - 50 - bar_height, x0 + 60, height - 50),
                fill=colours[bar % len(colours)],
            )
            draw.text((x0, height - 64 - bar_height), f"{value:.2f}", fill="black")
            for line, text in enumerate(result.name.split(", ")):
                draw.text((x0, height - 40 + 12 * line), text, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


@contextlib.contextmanager
def lab(
    args: argparse.Namespace,
) -> Iterator[tuple[Path, _lab.Upstream, dict[str, tuple[str, int]]]]:
    with tempfile.TemporaryDirectory(prefix="streamsync-compare-") as tmp:
        workdir = Path(tmp)
        with _lab.upstream(workdir, args.rate) as up:
            size = args.size_mib * 1024 * 1024
            blobs = {"cold": (_lab.push_blob(up.registry_url, "bench/blob", size), size)}
            if not args.skip_big:
                blobs["big"] = (_lab.push_blob(up.registry_url, "bench/blob", 2**30), 2**30)
            _lab.push_image(workdir, up.registry_url, "bench/image", 16, 4 * 1024 * 1024)
            yield workdir, up, blobs


ROWS = [
    "upstream bytes / blob size",
    "cold: first byte, first client (s)",
    "cold: first byte, slowest client (s)",
    "cold: first client done (s)",
    "cold: last client done (s)",
    "cold: last / first",
    "warm: aggregate MB/s (median)",
    "warm: slowest / fastest round (MB/s)",
    "skopeo 16 x 4 MiB cold (s)",
    "skopeo 16 x 4 MiB warm (s)",
    "peak RSS, 256 MiB runs (MiB)",
    "peak PSS, 256 MiB runs (MiB)",
    "peak RSS, 1 GiB x 16 clients (MiB)",
    "peak PSS, 1 GiB x 16 clients (MiB)",
    "CPU seconds per GB served",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--join-every", type=float, default=0.5)
    parser.add_argument("--rate", default="40m", help="nginx limit_rate per connection")
    parser.add_argument("--workers", type=int, default=2, help="our worker processes")
    parser.add_argument("--warm-rounds", type=int, default=5, help="warm rounds per mirror")
    parser.add_argument("--skip-big", action="store_true", help="skip the 1 GiB x 16 run")
    parser.add_argument("--chart", type=Path, default=DOCS / "benchmark.png")
    args = parser.parse_args()
    _lab.require("docker-registry", "nginx", "skopeo", "curl")
    with lab(args) as (workdir, up, blobs):
        # The default first (one worker), then the --workers choice, then the peer.
        mirrors: dict[str, Callable[[], contextlib.AbstractContextManager[_lab.Proxy]]] = {}
        mirrors["ours, 1 worker"] = lambda: _lab.proxy(workdir, up.wan_url, workers=1)
        if args.workers != 1:
            mirrors[f"ours, {args.workers} workers"] = lambda: _lab.proxy(
                workdir, up.wan_url, workers=args.workers
            )
        mirrors["Distribution"] = lambda: _lab.distribution_proxy(workdir, up.wan_url)
        results = measure_all(mirrors, up, blobs, args, workdir)
    *ours, theirs = results
    print(
        f"\n{args.size_mib} MiB blob, {args.clients} clients {args.join_every}s apart, "
        f"upstream limited to {args.rate}B/s per connection, "
        f"{args.warm_rounds} warm rounds; {time.strftime('%Y-%m-%d')}\n"
    )
    names = [m.name for m in results]
    ratios = [f"{m.name} / Distribution" for m in ours]
    print("| measure | " + " | ".join(names + ratios) + " |")
    print("|" + " --- |" * (1 + len(names) + len(ratios)))
    for key in ROWS:
        if key not in theirs.rows:
            continue
        values = [f"{m.rows[key]:.3f}" for m in results]
        b = theirs.rows[key]
        shares = [f"{m.rows[key] / b:.2f}" if b else "-" for m in ours]
        print(f"| {key} | " + " | ".join(values + shares) + " |")
    print(
        "\nwarm rounds (MB/s): "
        + "; ".join(f"{m.name}: " + ", ".join(f"{r:.0f}" for r in m.warm_rounds) for m in results)
    )
    chart(results, args.chart)
    print(f"\nchart: {args.chart}")


if __name__ == "__main__":
    main()
