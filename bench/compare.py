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

With ``--fast-upstream`` it measures the cold path at wire speed instead (issue 11): the
upstream is Distribution on loopback with nothing in between, over plain HTTP and over HTTPS
(a test CA made with openssl, trusted through ``SSL_CERT_FILE``); one client on a cold blob,
four clients on one cold blob, four clients on four cold blobs; for ours, Distribution's
proxy, and curl straight from the upstream.  Every round starts each mirror with an empty
cache; the table has the median of ``--rounds`` rounds.

    .venv/bin/python bench/compare.py            # prints the table, writes docs/benchmark.png
    .venv/bin/python bench/compare.py --fast-upstream --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def record(path: Path, key: str, figures: dict[str, object]) -> dict[str, dict[str, object]]:
    """Keep this run's figures beside the chart (``<chart>.json``, one entry per kind of
    run), so the chart shows the latest run of each kind: the slow-upstream lab and the
    fast-upstream cold path are separate runs of this script."""
    store = path.with_suffix(".json")
    saved: dict[str, dict[str, object]] = json.loads(store.read_text()) if store.exists() else {}
    saved[key] = {"date": time.strftime("%Y-%m-%d"), **figures}
    store.parent.mkdir(parents=True, exist_ok=True)
    store.write_text(json.dumps(saved, indent=1, sort_keys=True) + "\n")
    return saved


LAB_PANELS = [
    ("upstream bytes / blob size", "lower is better"),
    ("cold: last client done (s)", "lower is better"),
    ("warm: aggregate MB/s (median)", "higher is better"),
    ("CPU seconds per GB served", "lower is better"),
]
COLOURS = [(30, 136, 229), (144, 202, 249), (120, 120, 120), (200, 200, 200)]


def chart(saved: dict[str, dict[str, Any]], path: Path) -> None:
    """Grouped bar charts (Pillow only): a row for the slow-upstream lab (40 MiB/s per
    connection) and a row for the fast upstream (the cold path at wire speed)."""
    from PIL import Image, ImageDraw

    rows: list[tuple[str, list[tuple[str, str, list[tuple[str, float]]]]]] = []
    if "lab" in saved:
        mirrors = saved["lab"]["mirrors"]
        panels = [
            (key, hint, [(n, r.get(key, 0.0)) for n, r in mirrors.items()])
            for key, hint in LAB_PANELS
        ]
        rows.append(
            (f"upstream limited to 40 MiB/s per connection ({saved['lab']['date']})", panels)
        )
    if "fast" in saved:
        fast = saved["fast"]["medians"]
        panels = []
        for scenario in FAST_SCENARIOS:
            for scheme in ("http", "https"):
                key = f"{scheme} {scenario}"
                if key in fast:
                    bars = [(m, fast[key][m][0]) for m in FAST_MIRRORS]
                    panels.append((f"{scenario}, {scheme}: MB/s", "higher is better", bars))
        rows.append(
            (f"fast upstream on loopback, cold 256 MiB blobs ({saved['fast']['date']})", panels)
        )
    width, row_height, pad = 1400, 360, 30
    image = Image.new("RGB", (width, row_height * max(len(rows), 1)), "white")
    draw = ImageDraw.Draw(image)
    for row, (title, panels) in enumerate(rows):
        top_y = row * row_height
        draw.text((pad, top_y + 6), title, fill="black")
        panel_width = (width - pad) // max(len(panels), 1)
        for index, (key, hint, bars) in enumerate(panels):
            left = pad + index * panel_width
            top = max(v for _, v in bars) or 1.0
            draw.text((left, top_y + 26), key, fill="black")
            draw.text((left, top_y + 40), hint, fill=(110, 110, 110))
            bar_width = min(60, (panel_width - 20) // len(bars) - 10)
            for bar, (name, value) in enumerate(bars):
                bar_height = int((row_height - 130) * value / top)
                x0 = left + 10 + bar * (bar_width + 10)
                bottom = top_y + row_height - 50
                draw.rectangle(
                    (x0, bottom - bar_height, x0 + bar_width, bottom), fill=COLOURS[bar % 4]
                )
                draw.text(
                    (x0, bottom - 14 - bar_height),
                    f"{value:.2f}" if value < 10 else f"{value:.0f}",
                    fill="black",
                )
                for line, text in enumerate(name.split(", ")):
                    draw.text((x0, bottom + 10 + 12 * line), text, fill="black")
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


# -- the cold path at wire speed (--fast-upstream) ---------------------------------------------

FAST_SCENARIOS = {"1 client, 1 blob": (1, 1), "4 clients, 1 blob": (4, 1), "4 on 4 blobs": (4, 4)}
FAST_MIRRORS = ("ours", "Distribution", "curl direct")
# (scheme, scenario, mirror) -> one measurement per round: (MB/s, CPU s per GB or nan, TTFB)
FastRuns = dict[tuple[str, str, str], list[tuple[float, float, float]]]


async def fast_client(url: str, size: int, ca: Path | None) -> tuple[float, float]:
    """One curl to /dev/null: (time to first byte, done), both from its own start."""
    command = ["curl", "-sS", "--fail", "-o", "/dev/null"]
    command += ["-w", "%{time_starttransfer} %{size_download}", url]
    command += ["--cacert", str(ca)] if ca else []
    started = trio.current_time()
    result = await trio.run_process(command, capture_stdout=True)
    done = trio.current_time() - started
    first_byte, received = result.stdout.decode().split()
    if int(received) != size:
        sys.exit(f"bench: {url} gave {received} of {size} bytes")
    return float(first_byte), done


async def parallel_pulls(urls: list[str], size: int, ca: Path | None) -> tuple[float, float]:
    """All ``urls`` at once: (first time to first byte, time until the last is done)."""
    times: list[tuple[float, float]] = []

    async def one(url: str) -> None:
        times.append(await fast_client(url, size, ca))

    async with trio.open_nursery() as nursery:
        for url in urls:
            nursery.start_soon(one, url)
    return min(t for t, _ in times), max(d for _, d in times)


@contextlib.contextmanager
def fast_mirror(
    mirror: str, workdir: Path, upstream_url: str, ca: Path | None
) -> Iterator[tuple[str, int | None]]:
    """A mirror with an empty cache: (base URL, pid whose process tree does the work)."""
    env = {"SSL_CERT_FILE": str(ca)} if ca else {}
    if mirror == "curl direct":
        yield upstream_url, None
        return
    start = _lab.proxy if mirror == "ours" else _lab.distribution_proxy
    with start(workdir, upstream_url, env=env) as proxy:
        yield proxy.url, proxy.pid
    shutil.rmtree(proxy.cache, ignore_errors=True)


def fast_round(
    runs: FastRuns,
    scheme: str,
    workdir: Path,
    upstream: str,
    ca: Path | None,
    blobs: Blobs,
    scenarios: list[str],
) -> None:
    """One round: each mirror starts empty, and each scenario pulls blobs it has not seen."""
    digests, size = blobs
    for mirror in FAST_MIRRORS:
        with fast_mirror(mirror, workdir, upstream, ca) as (url, pid):
            unused = iter(digests)
            for scenario in scenarios:
                clients, count = FAST_SCENARIOS[scenario]
                chosen = [next(unused) for _ in range(count)]
                urls = [f"{url}/v2/bench/blob/blobs/{chosen[i % count]}" for i in range(clients)]
                if pid:  # a mirror caches what it serves: into recently freed pages, all alike
                    _lab.recycle_pages(workdir, size * count)
                cpu = _lab.tree_cpu_seconds(pid) if pid else 0.0
                first_byte, wall = trio.run(parallel_pulls, urls, size, ca)
                total = size * clients
                used = _lab.tree_cpu_seconds(pid) - cpu if pid else math.nan
                runs.setdefault((scheme, scenario, mirror), []).append(
                    (total / wall / 1e6, used / (total / GB), first_byte)
                )


Blobs = tuple[list[str], int]


def fast_upstream(args: argparse.Namespace) -> None:
    """The --fast-upstream benchmark: prints one table row per scheme and scenario."""
    _lab.require("docker-registry", "curl", "openssl")
    runs: FastRuns = {}
    size = args.size_mib * 1024 * 1024
    # --one-client: the scenario that shows the proxy's own ceiling, in a third of the time.
    scenarios = list(FAST_SCENARIOS)[:1] if args.one_client else list(FAST_SCENARIOS)
    needed = sum(FAST_SCENARIOS[scenario][1] for scenario in scenarios)
    with tempfile.TemporaryDirectory(prefix="streamsync-fast-") as tmp:
        workdir = Path(tmp)
        ca = _lab.make_test_ca(workdir)
        with _lab.fast_upstream(workdir) as plain, _lab.fast_upstream(workdir, ca) as tls:
            digests = [_lab.push_blob(plain, "bench/blob", size) for _ in range(needed)]
            loads = [os.getloadavg()[0]]
            for _ in range(args.rounds):
                for scheme, url in (("http", plain), ("https", tls)):
                    fast_round(runs, scheme, workdir, url, ca.ca, (digests, size), scenarios)
                loads.append(os.getloadavg()[0])
    print(
        f"\ncold path at wire speed: {args.size_mib} MiB blobs, Distribution on loopback as the "
        f"upstream, median of {args.rounds} rounds; {time.strftime('%Y-%m-%d %H:%M')}, "
        f"1-min load average {', '.join(f'{x:.2f}' for x in loads)}\n"
    )
    print(
        "| upstream | scenario | ours MB/s | Distribution MB/s | curl direct MB/s | ours / Dist. "
        "| ours / curl | CPU s/GB ours / Dist. | TTFB s ours / Dist. |"
    )
    print("|" + " --- |" * 9)
    for scheme in ("http", "https"):
        for scenario in scenarios:
            ours, dist, curl = (
                [statistics.median(r[k] for r in runs[(scheme, scenario, m)]) for k in range(3)]
                for m in FAST_MIRRORS
            )
            print(
                f"| {scheme} | {scenario} | {ours[0]:.0f} | {dist[0]:.0f} | {curl[0]:.0f} | "
                f"{ours[0] / dist[0]:.2f} | {ours[0] / curl[0]:.2f} | "
                f"{ours[1]:.2f} / {dist[1]:.2f} | {ours[2]:.3f} / {dist[2]:.3f} |"
            )
    print("\nevery round (MB/s):")
    for (scheme, scenario, mirror), values in runs.items():
        print(f"  {scheme} {scenario} {mirror}: " + ", ".join(f"{v[0]:.0f}" for v in values))
    medians = {
        f"{scheme} {scenario}": {
            mirror: [
                statistics.median(r[k] for r in runs[(scheme, scenario, mirror)]) for k in range(3)
            ]
            for mirror in FAST_MIRRORS
        }
        for scheme in ("http", "https")
        for scenario in scenarios
    }
    if args.one_client:
        return  # the chart shows whole runs only
    saved = record(args.chart, "fast", {"medians": medians, "rounds": args.rounds})
    chart(saved, args.chart)
    print(f"\nchart: {args.chart}")


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
    parser.add_argument(
        "--fast-upstream", action="store_true", help="the cold path at wire speed (issue 11)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="--fast-upstream rounds")
    parser.add_argument(
        "--one-client", action="store_true", help="--fast-upstream: the 1-client scenario only"
    )
    args = parser.parse_args()
    if args.fast_upstream:
        fast_upstream(args)
        return
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
    saved = record(args.chart, "lab", {"mirrors": {m.name: m.rows for m in results}})
    chart(saved, args.chart)
    print(f"\nchart: {args.chart}")


if __name__ == "__main__":
    main()
