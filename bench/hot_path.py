"""The per-request cost of small cached objects (issue 11): wrk against ours and Distribution.

A fleet pulling one image makes thousands of small requests at once (index, manifest, config
blob), all answered from the cache.  This measures them alone: the upstream is Distribution on
loopback (no nginx, no rate limit: nothing here waits on it), both mirrors are warmed, and
then ``wrk`` (Debian's) sends one request again and again over ``--connections`` keep-alive
connections, against ours (one worker process, started as the README says) and against
Distribution's proxy mode, in turns, in the same run:

* a cached manifest GET by digest (with the client's ``Accept``, as containerd sends it);
* a cached blob GET of ``--blob-bytes`` (1.3 KB: a typical image config).

It prints requests per second, the 99th percentile latency (``wrk --latency``) and the CPU
milliseconds each request cost the mirror's process tree, the median of ``--rounds`` rounds,
and the load average before and after: the machine is shared, so a rate means little without
it, and the CPU per request is the steadier figure.  ``hot_path_rows`` (with ``push_target``
and ``table``) is what ``compare.py`` can call with mirrors it has started itself.

    .venv/bin/python bench/hot_path.py [--duration 10] [--connections 100] [--rounds 3]
    .venv/bin/python bench/hot_path.py --quart-only   # also ours with the fast path off
    .venv/bin/python bench/hot_path.py --profile      # py-spy profiles of ours under wrk
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import _lab
import httpx

REPO = "bench/hot"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
# What containerd sends to GET a manifest (one field, comma-separated).
ACCEPT = (
    "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, "
    "application/vnd.docker.distribution.manifest.v2+json, "
    "application/vnd.docker.distribution.manifest.list.v2+json, */*"
)


@dataclass(frozen=True)
class Target:
    """What the benchmark asks for: a manifest by digest and a small blob, in ``REPO``."""

    manifest_digest: str
    blob_digest: str
    blob_size: int

    def paths(self) -> dict[str, str]:
        return {
            "manifest by digest": f"/v2/{REPO}/manifests/{self.manifest_digest}",
            f"blob {self.blob_size} B": f"/v2/{REPO}/blobs/{self.blob_digest}",
        }


@dataclass(frozen=True)
class WrkResult:
    requests_per_second: float
    p99_ms: float
    non_2xx: int
    errors: int
    requests: int = 0
    cpu_seconds: float = 0.0  # of the mirror's process tree during the run

    @property
    def cpu_ms_per_request(self) -> float:
        """What one request costs the mirror: robust where req/s is not, on a shared machine
        (other people's work takes CPU from the mirror, not CPU per request)."""
        return 1000 * self.cpu_seconds / self.requests if self.requests else math.nan


def push_target(registry_url: str, blob_bytes: int) -> Target:
    """A small config blob, one layer, and the manifest naming them, pushed to ``REPO``."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "pad": ""}).encode()
    config = config.replace(b'""', b'"' + b"x" * max(0, blob_bytes - len(config)) + b'"')
    config_digest = _lab.push_bytes(registry_url, REPO, config)
    layer = os.urandom(4096)
    layer_digest = _lab.push_bytes(registry_url, REPO, layer)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
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
    ).encode()
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    response = httpx.put(
        f"{registry_url}/v2/{REPO}/manifests/{digest}",
        content=manifest,
        headers={"Content-Type": MANIFEST_TYPE},
    )
    response.raise_for_status()
    return Target(digest, config_digest, len(config))


# Starts the proxy as ``streamsync-trio serve`` does, with the fast path turned off: the
# same server with every request through Quart, to measure what the fast path changes.
_QUART_ONLY = """
import sys
from functools import partial
import streamsync_trio.edge as edge
edge.create_app = partial(edge.create_app, hot_path=False)
from streamsync_trio.ops._cli import main
sys.exit(main(sys.argv[1:]))
"""


@contextlib.contextmanager
def quart_only_proxy(workdir: Path, upstream_url: str) -> Iterator[_lab.Proxy]:
    """Ours as ``_lab.proxy`` starts it (one worker), but without the fast path."""
    port = _lab.free_port()
    cache = workdir / f"proxy-cache-{port}"
    config = workdir / f"streamsync-{port}.toml"
    name = upstream_url.split("://", 1)[-1]
    config.write_text(
        f'[storage]\nroot = "{cache}"\n[stream]\nchunk_size = 1048576\n[log]\nlevel = "warning"\n'
        f'[[upstream]]\nname = "{name}"\nurl = "{upstream_url}"\ndefault = true\n'
    )
    env = {**os.environ, "STREAMSYNC_CONFIG": str(config)}
    args = [sys.executable, "-c", _QUART_ONLY, "serve", "--bind", f"127.0.0.1:{port}"]
    with _lab.process([*args, "--workers", "1"], workdir / "proxy-quart-only.log", env) as pid:
        url = f"http://127.0.0.1:{port}"
        _lab.wait_http(url + "/v2/")
        yield _lab.Proxy(url, pid, cache)


def warm(url: str, target: Target) -> None:
    """Fetch both objects through a mirror until it serves them from its cache."""
    with httpx.Client(base_url=url, timeout=30, headers={"Accept": ACCEPT}) as client:
        for path in target.paths().values():
            for _ in range(20):
                response = client.get(path)
                response.raise_for_status()


def run_wrk(
    url: str, *, duration: float, connections: int, threads: int = 1, pid: int | None = None
) -> WrkResult:
    """One wrk run: its requests per second and 99th percentile latency; with the mirror's
    ``pid``, also the CPU its process tree used meanwhile."""
    cpu_before = _lab.tree_cpu_seconds(pid) if pid is not None else 0.0
    args = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--latency"]
    args += ["-H", f"Accept: {ACCEPT}", url]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    cpu = _lab.tree_cpu_seconds(pid) - cpu_before if pid is not None else 0.0
    count = re.search(r"(\d+) requests in", out)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
    if rate is None or p99 is None:
        sys.exit(f"bench: cannot read wrk's output:\n{out}")
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return WrkResult(
        float(rate.group(1)),
        float(p99.group(1)) * scale,
        int(non_2xx.group(1)) if non_2xx else 0,
        sum(int(n) for n in errors.groups()) if errors else 0,
        int(count.group(1)) if count else 0,
        cpu,
    )


def hot_path_rows(
    mirrors: dict[str, _lab.Proxy],
    target: Target,
    *,
    duration: float = 10.0,
    connections: int = 100,
    rounds: int = 3,
) -> dict[str, dict[str, list[WrkResult]]]:
    """``{request: {mirror: [result per round]}}``; the mirrors (by name) are warmed first
    and take turns within each round, so a slow minute of the machine hits all."""
    for mirror in mirrors.values():
        warm(mirror.url, target)
    results: dict[str, dict[str, list[WrkResult]]] = {}
    for request, path in target.paths().items():
        per_mirror = results.setdefault(request, {name: [] for name in mirrors})
        for _ in range(rounds):
            for name, mirror in mirrors.items():
                per_mirror[name].append(
                    run_wrk(
                        mirror.url + path,
                        duration=duration,
                        connections=connections,
                        pid=mirror.pid,
                    )
                )
    return results


def table(results: dict[str, dict[str, list[WrkResult]]], ours: str, theirs: str) -> str:
    """Medians of the rounds, ``ours`` against ``theirs``; CPU ms per request of each mirror's
    process tree; wrk's count of non-2xx answers and socket errors (timeouts) in all rounds."""
    lines = [
        f"| request | {ours} req/s | {theirs} req/s | ratio | {ours} p99 ms | "
        f"{theirs} p99 ms | p99 ratio | CPU ms/req, {ours} / {theirs} | "
        "non-2xx, socket errors (wrk's timeouts: 2 s) | "
        "rounds (req/s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for request, per_mirror in results.items():
        a, b = per_mirror[ours], per_mirror[theirs]
        rate_a = statistics.median(r.requests_per_second for r in a)
        rate_b = statistics.median(r.requests_per_second for r in b)
        p99_a = statistics.median(r.p99_ms for r in a)
        p99_b = statistics.median(r.p99_ms for r in b)
        cpu_a = statistics.median(r.cpu_ms_per_request for r in a)
        cpu_b = statistics.median(r.cpu_ms_per_request for r in b)
        errors = " / ".join(
            f"{sum(r.non_2xx for r in rs)}, {sum(r.errors for r in rs)}" for rs in (a, b)
        )
        rounds = " ".join(
            f"{x.requests_per_second:.0f}/{y.requests_per_second:.0f}"
            for x, y in zip(a, b, strict=True)
        )
        lines.append(
            f"| {request} | {rate_a:.0f} | {rate_b:.0f} | {rate_a / rate_b:.2f} | {p99_a:.1f} | "
            f"{p99_b:.1f} | {p99_a / p99_b:.2f} | {cpu_a:.2f} / {cpu_b:.2f} | {errors} | "
            f"{rounds} |"
        )
    return "\n".join(lines)


def profile(pid: int, url: str, out: Path, *, duration: float, connections: int) -> str:
    """``py-spy record`` of the proxy (pid) while wrk runs against ``url``: the top entries by
    samples in which a function is on the stack (inclusive) and at the top (own), in %."""
    spy = Path(sys.executable).parent / "py-spy"
    args = [str(spy), "record", "--pid", str(pid), "--format", "raw", "--output", str(out)]
    args += ["--duration", f"{duration:g}", "--threads", "--nonblocking", "--rate", "200"]
    with subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as spying:
        run_wrk(url, duration=duration, connections=connections)
        spying.wait()
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        total += count
        frames = [
            f.split(" (")[0] + " " + f.rsplit("/", 1)[-1].rstrip(")") for f in stack.split(";")
        ]
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
        own[frames[-1]] = own.get(frames[-1], 0) + count
    top = sorted(inclusive.items(), key=lambda item: -item[1])[:60]
    top_own = sorted(own.items(), key=lambda item: -item[1])[:15]
    lines = [f"{total} samples; inclusive:"]
    lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in top]
    lines.append("own:")
    lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in top_own]
    return "\n".join(lines)


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--blob-bytes", type=int, default=1300)
    parser.add_argument("--keep", action="store_true", help="keep the lab directory")
    parser.add_argument(
        "--quart-only",
        action="store_true",
        help="also ours with the fast path off (every request through Quart)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="instead: py-spy profiles of ours under wrk"
    )
    args = parser.parse_args()
    _lab.require("docker-registry", "wrk")
    workdir = Path(tempfile.mkdtemp(prefix="hot-path-"))
    try:
        run(args, workdir)
    finally:
        if args.keep:
            print(f"lab kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def run(args: argparse.Namespace, workdir: Path) -> None:
    with _lab.fast_upstream(workdir) as upstream_url:
        target = push_target(upstream_url, args.blob_bytes)
        with (
            _lab.proxy(workdir, upstream_url) as ours,
            _lab.distribution_proxy(workdir, upstream_url) as theirs,
            contextlib.ExitStack() as stack,
        ):
            mirrors = {"ours": ours, "Distribution": theirs}
            if args.quart_only:
                mirrors["ours, Quart only"] = stack.enter_context(
                    quart_only_proxy(workdir, upstream_url)
                )
            print(f"load average before: {load_average()}  (ours: pid {ours.pid})", flush=True)
            if args.profile:
                warm(ours.url, target)
                for request, path in target.paths().items():
                    report = profile(
                        ours.pid,
                        ours.url + path,
                        workdir / "profile.txt",
                        duration=args.duration,
                        connections=args.connections,
                    )
                    print(f"## {request}\n{report}", flush=True)
                return
            results = hot_path_rows(
                mirrors,
                target,
                duration=args.duration,
                connections=args.connections,
                rounds=args.rounds,
            )
            print(f"load average after: {load_average()}")
    print(table(results, "ours", "Distribution"))
    if args.quart_only:
        print(table(results, "ours", "ours, Quart only"))


if __name__ == "__main__":
    main()
