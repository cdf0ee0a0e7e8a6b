"""Soak: does the proxy's memory level off under a long mixed load, or does it leak?

The lab of the other benchmarks (Distribution behind nginx, the proxy started with
``streamsync-trio serve``), with a small cache cap (``[storage] max_size``) so that eviction
runs all the time.  The upstream holds ``--images`` images of a few small layers; every
fourth image also has one of ``--big-layers`` layers of 32-64 MiB, more than the cap holds.
``--clients`` clients pull in a loop (manifest by tag, then config and layers), mostly the hot
images, sometimes a cold one, and ``--abort-share`` of the blob GETs hang up mid-body.

Every ``--sample-every`` seconds the proxy's RSS (and its anonymous part), open fds,
downloads in flight and their subscribers (from ``/metrics``), and the requests done are
sampled; then the clients stop, and the proxy idles ``--idle-minutes`` under the same
sampling.  The table ends with the least-squares slope of RSS over the second half of the
load (MiB/hour): near zero when memory has levelled off.

    .venv/bin/python bench/soak.py --minutes 30 --idle-minutes 2 --clients 20
    .venv/bin/python bench/soak.py --minutes 30 --probe            # + Python objects, malloc heap
    .venv/bin/python bench/soak.py --minutes 30 --glibc-defaults   # without the proxy's mallopt

``/metrics`` has no Python object counts, and the product carries no debugging endpoint:
``--probe`` starts the same ``main`` through a launcher of this script's own (``PROBE``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import _lab
import httpx
import trio

MiB = 1024 * 1024
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
# Every request is bounded in time; a pull that hits this counts as an error, not a hang.
REQUEST_TIMEOUT = 120.0

# ``--probe`` starts the proxy through this launcher instead of ``-m streamsync_trio``: the
# same ``main`` with the same arguments, plus two signal handlers of the benchmark's own, so
# the product carries no debugging endpoint.  SIGUSR2 writes what the Python heap and glibc's
# malloc hold to $SOAK_PROBE (JSON); SIGUSR1 hands glibc's free memory back (``malloc_trim``),
# which shows how much of the RSS was free heap kept for reuse.  ``--glibc-defaults`` skips
# the proxy's own ``mallopt`` tuning (``_process.tune_malloc``), for comparison.
PROBE = """
import ctypes, gc, json, os, signal, sys, collections
libc = ctypes.CDLL("libc.so.6")
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split())]
libc.mallinfo2.restype = MallInfo2
def probe(signum, frame):
    info = libc.mallinfo2()
    objects = gc.get_objects()
    types = collections.Counter(type(o).__name__ for o in objects).most_common(12)
    del objects
    out = {"mallinfo": {n: getattr(info, n) for n, _ in MallInfo2._fields_},
           "objects": len(gc.get_objects()), "blocks": sys.getallocatedblocks(),
           "types": types}
    path = os.environ["SOAK_PROBE"]
    with open(path + ".tmp", "w") as f:
        json.dump(out, f)
    os.replace(path + ".tmp", path)
def trim(signum, frame):
    gc.collect()
    libc.malloc_trim(0)
signal.signal(signal.SIGUSR2, probe)
signal.signal(signal.SIGUSR1, trim)
if os.environ.get("SOAK_GLIBC_DEFAULTS"):
    import streamsync_trio.ops._process
    streamsync_trio.ops._process.tune_malloc = lambda arenas=2: None
from streamsync_trio.ops._cli import main
sys.argv[0] = "streamsync-trio"
sys.exit(main())
"""


@dataclass
class Image:
    repo: str
    blobs: list[str]  # config first, then the layers


@dataclass
class Counts:
    requests: int = 0
    aborted: int = 0
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    blob_bytes: int = 0


@dataclass
class Probe:
    """What ``PROBE`` reports: Python objects tracked by the GC, pymalloc blocks, and glibc's
    heap split into bytes in use and bytes free (kept by malloc, still resident if touched)."""

    objects: int = -1
    blocks: int = -1
    heap_used: int = -1
    heap_free: int = -1
    types: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class Sample:
    minute: float
    rss: int
    rss_anon: int
    fds: int
    in_flight: int
    subscribers: int
    cache_bytes: int
    requests: int
    phase: str
    probe: Probe = field(default_factory=Probe)


def put_manifest(
    registry_url: str, repo: str, config: tuple[str, int], layers: list[tuple[str, int]]
) -> None:
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config[0],
            "size": config[1],
        },
        "layers": [{"mediaType": LAYER, "digest": d, "size": s} for d, s in layers],
    }
    body = json.dumps(manifest).encode()
    response = httpx.put(
        f"{registry_url}/v2/{repo}/manifests/v1",
        content=body,
        headers={"Content-Type": MANIFEST},
        timeout=60,
    )
    response.raise_for_status()


def push_images(registry_url: str, count: int, big_layers: int, rng: random.Random) -> list[Image]:
    """``count`` images of 2-4 small layers (16-512 KiB); every fourth also has a big layer.

    Blobs are random bytes, not tars: the proxy never looks inside a layer.  A blob is pushed
    to each repository that names it, as a registry's cross-mount would link it.
    """
    bigs: list[bytes] = [os.urandom(rng.randint(32, 64) * MiB) for _ in range(big_layers)]
    images = []
    for index in range(count):
        repo = f"soak/img{index:02d}"
        config = json.dumps({"architecture": "amd64", "os": "linux", "soak": index}).encode()
        layers = [os.urandom(rng.randint(16, 512) * 1024) for _ in range(rng.randint(2, 4))]
        if big_layers and index % 4 == 0:
            layers.append(bigs[(index // 4) % big_layers])
        pushed_config = (_lab.push_bytes(registry_url, repo, config), len(config))
        pushed_layers = [
            (_lab.push_bytes(registry_url, repo, layer), len(layer)) for layer in layers
        ]
        put_manifest(registry_url, repo, pushed_config, pushed_layers)
        images.append(Image(repo, [pushed_config[0]] + [d for d, _ in pushed_layers]))
    return images


@contextlib.contextmanager
def proxy(workdir: Path, upstream_url: str, args: argparse.Namespace) -> Iterator[_lab.Proxy]:
    """The proxy as the README starts it, with a cache cap and a short tag TTL (through the
    ``PROBE`` launcher with ``--probe`` or ``--glibc-defaults``)."""
    port = _lab.free_port()
    name = upstream_url.removeprefix("http://")
    cache = workdir / "proxy-cache"
    config = workdir / "streamsync.toml"
    config.write_text(
        f'[storage]\nroot = "{cache}"\nmax_size = "{args.max_size}"\n[log]\nlevel = "warning"\n'
        f'[[upstream]]\nname = "{name}"\nurl = "{upstream_url}"\ndefault = true\n'
        "tag_ttl = 30\n"
    )
    env = {**os.environ, "STREAMSYNC_CONFIG": str(config)}
    command = [sys.executable, "-m", "streamsync_trio"]
    if args.probe or args.glibc_defaults:
        command = [sys.executable, "-c", PROBE]
        env["SOAK_PROBE"] = str(workdir / "probe.json")
        if args.glibc_defaults:
            env["SOAK_GLIBC_DEFAULTS"] = "1"
    command += ["serve", "--bind", f"127.0.0.1:{port}", "--workers", "1"]
    with _lab.process(command, workdir / "proxy.log", env) as pid:
        url = f"http://127.0.0.1:{port}"
        _lab.wait_http(url + "/v2/")
        yield _lab.Proxy(url, pid, cache)


async def get(
    client: httpx.AsyncClient, path: str, counts: Counts, abort: bool, headers: dict[str, str]
) -> None:
    """One GET, read whole or (``abort``) hung up on after the first chunk."""
    counts.requests += 1
    with trio.move_on_after(REQUEST_TIMEOUT) as scope:
        try:
            async with client.stream("GET", path, headers=headers) as response:
                counts.statuses[response.status_code] = (
                    counts.statuses.get(response.status_code, 0) + 1
                )
                async for chunk in response.aiter_raw(256 * 1024):
                    counts.blob_bytes += len(chunk)
                    if abort:
                        counts.aborted += 1
                        break
        except httpx.HTTPError:
            counts.errors += 1
    if scope.cancelled_caught:
        counts.errors += 1


async def puller(
    url: str, images: list[Image], hot: int, args: argparse.Namespace, seed: int, counts: Counts
) -> None:
    """Pulls images until cancelled or ``--max-requests`` have been made by all the clients:
    ``--hot-share`` of them among the first ``hot``.

    Aborted bodies close the connection (httpx drops it), so the proxy sees clients vanish
    mid-body; the next request opens a new one.
    """
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    timeout = httpx.Timeout(REQUEST_TIMEOUT)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        while counts.requests < args.max_requests:
            if rng.random() < args.hot_share:
                image = images[rng.randrange(hot)]
            else:
                image = images[rng.randrange(hot, len(images))]
            await get(client, f"/v2/{image.repo}/manifests/v1", counts, False, {"Accept": MANIFEST})
            for digest in image.blobs:
                abort = rng.random() < args.abort_share
                await get(client, f"/v2/{image.repo}/blobs/{digest}", counts, abort, {})
            await trio.sleep(rng.uniform(0, 2 * args.pause))


def metrics_values(text: str) -> tuple[int, int, int]:
    """(downloads in flight, subscribers summed, cache bytes) from the exposition text."""
    in_flight = subscribers = cache_bytes = 0
    for line in text.splitlines():
        if line.startswith("streamsync_downloads_in_flight "):
            in_flight = int(float(line.split()[-1]))
        elif line.startswith("streamsync_download_subscribers{"):
            subscribers += int(float(line.split()[-1]))
        elif line.startswith("streamsync_cache_bytes "):
            cache_bytes = int(float(line.split()[-1]))
    return in_flight, subscribers, cache_bytes


def process_memory(pid: int) -> tuple[int, int, int]:
    """(RSS, anonymous RSS, open fds) of one process, from /proc."""
    rss = anon = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("RssAnon:"):
            anon = int(line.split()[1]) * 1024
    return rss, anon, len(os.listdir(f"/proc/{pid}/fd"))


def read_probe(pid: int, path: Path) -> Probe:
    """Asks the ``PROBE`` launcher for its figures (SIGUSR2) and waits for the new file."""
    path.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + 10
    while not path.exists():
        if time.monotonic() > deadline:
            return Probe()
        time.sleep(0.05)
    data = json.loads(path.read_text())
    info = data["mallinfo"]
    return Probe(
        data["objects"],
        data["blocks"],
        info["uordblks"] + info["hblkhd"],
        info["fordblks"],
        [(name, count) for name, count in data["types"]],
    )


async def sample(
    proxy: _lab.Proxy, t0: float, counts: Counts, phase: str, probe: Path | None
) -> Sample:
    figures = await trio.to_thread.run_sync(read_probe, proxy.pid, probe) if probe else Probe()
    rss, anon, fds = process_memory(proxy.pid)
    in_flight = subscribers = cache_bytes = -1
    with trio.move_on_after(10):
        async with httpx.AsyncClient(timeout=10) as client:
            try:
                response = await client.get(proxy.url + "/metrics")
                in_flight, subscribers, cache_bytes = metrics_values(response.text)
            except httpx.HTTPError:
                pass
    minute = (trio.current_time() - t0) / 60
    return Sample(
        minute, rss, anon, fds, in_flight, subscribers, cache_bytes, counts.requests, phase, figures
    )


async def soak(
    proxy: _lab.Proxy, images: list[Image], args: argparse.Namespace
) -> tuple[list[Sample], Counts]:
    counts = Counts()
    samples: list[Sample] = []
    t0 = trio.current_time()
    probe = proxy.cache.parent / "probe.json" if args.probe else None

    async def sampler(phase: str, until: float) -> None:
        # Samples on a fixed grid from t0 (a slow sample does not shift the later ones).
        while True:
            await trio.sleep_until(t0 + len(samples) * args.sample_every)
            samples.append(await sample(proxy, t0, counts, phase, probe))
            print_row(samples[-1], flush=True)
            if t0 + len(samples) * args.sample_every > until + 1.0:
                return

    load_end = t0 + args.minutes * 60
    async with trio.open_nursery() as nursery:
        for index in range(args.clients):
            nursery.start_soon(puller, proxy.url, images, args.hot, args, args.seed + index, counts)
        await sampler("load", load_end)
        nursery.cancel_scope.cancel()
    # The clients are gone: the proxy idles, sampled on the same grid.
    await sampler("idle", load_end + args.idle_minutes * 60)
    if probe:
        # What is left once glibc hands its free memory back: the live part of the RSS.
        os.kill(proxy.pid, signal.SIGUSR1)
        await trio.sleep(2)
        samples.append(await sample(proxy, t0, counts, "trim", probe))
        print_row(samples[-1], flush=True)
        print("most common Python objects after the idle time:", samples[-1].probe.types)
    return samples, counts


HEADER = (
    f"{'minute':>7} {'phase':>5} {'RSS MiB':>8} {'anon MiB':>9} {'fds':>5} "
    f"{'in flight':>9} {'subs':>5} {'cache MiB':>9} {'requests':>9}"
)
PROBE_HEADER = f" {'objects':>8} {'blocks':>8} {'heap used':>9} {'heap free':>9}"


def print_row(s: Sample, flush: bool = False) -> None:
    row = (
        f"{s.minute:>7.2f} {s.phase:>5} {s.rss / MiB:>8.1f} {s.rss_anon / MiB:>9.1f} {s.fds:>5} "
        f"{s.in_flight:>9} {s.subscribers:>5} {s.cache_bytes / MiB:>9.0f} {s.requests:>9}"
    )
    p = s.probe
    if p.objects >= 0:
        row += f" {p.objects:>8} {p.blocks:>8} {p.heap_used / MiB:>9.1f} {p.heap_free / MiB:>9.1f}"
    print(row, flush=flush)


def slope_mib_per_hour(samples: list[Sample]) -> float:
    """Least-squares slope of RSS against time, MiB per hour."""
    xs = [s.minute / 60 for s in samples]
    ys = [s.rss / MiB for s in samples]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    if var == 0:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--idle-minutes", type=float, default=2)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--images", type=int, default=30)
    parser.add_argument("--hot", type=int, default=6, help="images pulled --hot-share of the time")
    parser.add_argument("--hot-share", type=float, default=0.7)
    parser.add_argument("--big-layers", type=int, default=8, help="layers of 32-64 MiB")
    parser.add_argument("--abort-share", type=float, default=0.1, help="blob GETs cut mid-body")
    parser.add_argument("--pause", type=float, default=0.5, help="mean pause between pulls (s)")
    parser.add_argument("--max-size", default="300MiB", help="the proxy's [storage] max_size")
    parser.add_argument("--rate", default="100m", help="nginx limit_rate per upstream connection")
    parser.add_argument("--sample-every", type=float, default=15.0)
    parser.add_argument(
        "--max-requests", type=int, default=2_000_000, help="no new pull after this many requests"
    )
    parser.add_argument(
        "--probe",
        action="store_true",
        help="also sample Python objects and glibc's heap (used/free); malloc_trim at the end",
    )
    parser.add_argument(
        "--glibc-defaults", action="store_true", help="skip the proxy's mallopt tuning"
    )
    parser.add_argument("--seed", type=int, default=20261130)
    args = parser.parse_args()
    # A shell starts a background job (``nohup ... &``) with SIGINT ignored, and SIGTERM would
    # end this script without stopping what it started: both become a SIGINT (which trio turns
    # into KeyboardInterrupt at a safe point), so the ``with`` blocks stop the proxy, the
    # registry and nginx by their PIDs.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda _signum, _frame: signal.raise_signal(signal.SIGINT))
    _lab.require("docker-registry", "nginx")
    with tempfile.TemporaryDirectory(prefix="streamsync-soak-") as tmp:
        workdir = Path(tmp)
        with _lab.upstream(workdir, args.rate) as up:
            started = time.monotonic()
            images = push_images(
                up.registry_url, args.images, args.big_layers, random.Random(args.seed)
            )
            print(f"pushed {len(images)} images in {time.monotonic() - started:.0f} s", flush=True)
            with proxy(workdir, up.wan_url, args) as running:
                print(
                    f"soak: {args.clients} clients, {args.minutes} min load + "
                    f"{args.idle_minutes} min idle, cap {args.max_size}, proxy pid {running.pid}"
                    + (", glibc malloc defaults" if args.glibc_defaults else "")
                )
                print(HEADER + (PROBE_HEADER if args.probe else ""), flush=True)
                samples, counts = trio.run(soak, running, images, args)
    report(samples, counts)


def report(samples: list[Sample], counts: Counts) -> None:
    load = [s for s in samples if s.phase == "load"]
    idle = [s for s in samples if s.phase == "idle"]
    trimmed = [s for s in samples if s.phase == "trim"]
    second_half = [s for s in load if s.minute >= load[-1].minute / 2]
    statuses = ", ".join(f"{code}: {n}" for code, n in sorted(counts.statuses.items()))
    print(
        f"requests {counts.requests} ({statuses}); aborted mid-body {counts.aborted}; "
        f"errors {counts.errors}; body bytes read {counts.blob_bytes / MiB:.0f} MiB"
    )
    rss = [s.rss / MiB for s in load]
    print(
        f"RSS under load: first {rss[0]:.1f}, min {min(rss):.1f}, max {max(rss):.1f}, "
        f"last {rss[-1]:.1f} MiB"
    )
    if idle:
        print(f"RSS idle: last {idle[-1].rss / MiB:.1f} MiB; fds {idle[-1].fds}")
    if trimmed:
        print(f"RSS after gc.collect() + malloc_trim(0): {trimmed[-1].rss / MiB:.1f} MiB")
    if len(second_half) >= 3:
        print(
            "RSS slope over the second half of the load: "
            f"{slope_mib_per_hour(second_half):+.1f} MiB/hour"
        )
        anon = [Sample(s.minute, s.rss_anon, 0, 0, 0, 0, 0, 0, "") for s in second_half]
        print(f"anonymous RSS slope, second half: {slope_mib_per_hour(anon):+.1f} MiB/hour")


if __name__ == "__main__":
    main()
