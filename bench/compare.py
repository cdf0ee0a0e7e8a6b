"""streamsync-trio against CNCF Distribution's proxy mode, side by side in one lab.

Both mirrors sit in front of the same upstream (Distribution behind nginx limiting each
connection to --rate, whose access log counts upstream bytes) and get the same workloads:

1. cold: N clients join one uncached blob D seconds apart (upstream bytes / blob size, time to
   first byte, completion of the first and the last client);
2. warm: the same N clients at once on the now cached blob (aggregate MB/s; clients write to
   /dev/null, so the client side does not cap it);
3. skopeo pull of a 16 x 4 MiB image, cold then warm;
4. a 1 GiB blob with 16 clients (peak RSS must stay flat);
and for each mirror the peak RSS of its whole process tree and CPU seconds per GB served.

    .venv/bin/python bench/compare.py            # prints the table, writes docs/benchmark.png
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
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
    rows: dict[str, float] = field(default_factory=dict)
    served_bytes: int = 0
    peak_rss: int = 0
    cpu_seconds: float = 0.0


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


def measure(
    name: str,
    mirror: Callable[[], contextlib.AbstractContextManager[_lab.Proxy]],
    up: _lab.Upstream,
    blobs: dict[str, tuple[str, int]],
    args: argparse.Namespace,
    workdir: Path,
) -> Measured:
    result = Measured(name)
    with mirror() as proxy:
        sampler = Sampler(proxy.pid)
        cpu_before = _lab.tree_cpu_seconds(proxy.pid)

        digest, size = blobs["cold"]
        url = f"{proxy.url}/v2/bench/blob/blobs/{digest}"
        before = up.upstream_bytes(digest)
        cold = trio.run(
            checked_clients, url, digest, size, args.clients, args.join_every, True, sampler
        )
        result.rows["upstream bytes / blob size"] = (up.upstream_bytes(digest) - before) / size
        result.rows["cold: first byte, slowest client (s)"] = max(r.first_byte for r in cold)
        result.rows["cold: first client done (s)"] = cold[0].done
        result.rows["cold: last client done (s)"] = cold[-1].done
        result.rows["cold: last / first"] = cold[-1].done / cold[0].done
        result.served_bytes += size * len(cold)

        started = time.monotonic()
        trio.run(checked_clients, url, digest, size, args.clients, 0.0, False, sampler)
        warm_seconds = time.monotonic() - started
        result.rows["warm: aggregate MB/s"] = size * args.clients / warm_seconds / 1e6
        result.served_bytes += size * args.clients

        result.rows["skopeo 16 x 4 MiB cold (s)"] = timed_skopeo(
            proxy.url, "bench/image:v1", workdir / f"{name}-cold"
        )
        result.rows["skopeo 16 x 4 MiB warm (s)"] = timed_skopeo(
            proxy.url, "bench/image:v1", workdir / f"{name}-warm"
        )
        result.served_bytes += 2 * 16 * 4 * 1024 * 1024
        result.rows["peak RSS, 256 MiB runs (MiB)"] = sampler.peak / 2**20

        if not args.skip_big:
            big_digest, big_size = blobs["big"]
            big_url = f"{proxy.url}/v2/bench/blob/blobs/{big_digest}"
            big_sampler = Sampler(proxy.pid)
            trio.run(checked_clients, big_url, big_digest, big_size, 16, 0.25, False, big_sampler)
            result.served_bytes += big_size * 16
            result.rows["peak RSS, 1 GiB x 16 clients (MiB)"] = big_sampler.peak / 2**20
            sampler.peak = max(sampler.peak, big_sampler.peak)

        result.cpu_seconds = _lab.tree_cpu_seconds(proxy.pid) - cpu_before
        result.peak_rss = sampler.peak
        result.rows["CPU seconds per GB served"] = result.cpu_seconds / (result.served_bytes / GB)
    return result


def chart(results: list[Measured], path: Path) -> None:
    """A small grouped bar chart (Pillow only), one panel per headline measure."""
    from PIL import Image, ImageDraw

    panels = [
        ("upstream bytes / blob size", "lower is better"),
        ("cold: last client done (s)", "lower is better"),
        ("warm: aggregate MB/s", "higher is better"),
        ("CPU seconds per GB served", "lower is better"),
    ]
    colours = [(30, 136, 229), (120, 120, 120)]
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
            x0 = left + 20 + bar * 90
            draw.rectangle(
                (x0, height - 50 - bar_height, x0 + 60, height - 50), fill=colours[bar % 2]
            )
            draw.text((x0, height - 64 - bar_height), f"{value:.2f}", fill="black")
            draw.text((x0, height - 40), result.name, fill="black")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--join-every", type=float, default=0.5)
    parser.add_argument("--rate", default="40m", help="nginx limit_rate per connection")
    parser.add_argument("--skip-big", action="store_true", help="skip the 1 GiB x 16 run")
    parser.add_argument("--chart", type=Path, default=DOCS / "benchmark.png")
    args = parser.parse_args()
    _lab.require("docker-registry", "nginx", "skopeo", "curl")
    with lab(args) as (workdir, up, blobs):
        mirrors = {
            "streamsync": lambda: _lab.proxy(workdir, up.wan_url),
            "distribution": lambda: _lab.distribution_proxy(workdir, up.wan_url),
        }
        results = [
            measure(name, mirror, up, blobs, args, workdir) for name, mirror in mirrors.items()
        ]
    ours, theirs = results
    print(
        f"\n{args.size_mib} MiB blob, {args.clients} clients {args.join_every}s apart, "
        f"upstream limited to {args.rate}B/s per connection; {time.strftime('%Y-%m-%d')}\n"
    )
    print("| measure | streamsync-trio | Distribution proxy | ours / theirs |")
    print("| --- | --- | --- | --- |")
    for key in ours.rows:
        a, b = ours.rows[key], theirs.rows.get(key, float("nan"))
        print(f"| {key} | {a:.3f} | {b:.3f} | {a / b if b else float('nan'):.2f} |")
    chart(results, args.chart)
    print(f"\nchart: {args.chart}")


if __name__ == "__main__":
    main()
