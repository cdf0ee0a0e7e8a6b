"""Cluster mode on one machine (issue 13): N = 1, 2, 4 nodes over one Redis and one upstream.

The lab is the cluster tests' own (tests/labs/clusterlab.py): a real Distribution behind a
relay that paces each connection (the WAN) and counts the bytes of every request path, one
redis-server, and N proxy processes on 127.0.0.2.. with their own caches.  Per N:

* cold: one client on every node asks for one cold blob at once.  Upstream bytes per blob
  (counted by the relay), bytes between nodes (the nodes' peer-sent counters), first byte on
  the owner vs the slowest non-owner, how long after the owner's client the last non-owner's
  client finishes, Redis commands per blob (INFO commandstats before/after, minus the
  heartbeats an idle window of the same length costs);
* kill: a second cold blob, one client per node, the owner killed (-9) at half way: the
  longest stall of a surviving client (recovery) and the extra upstream bytes;
* peak RSS (whole process tree, sampled every 50 ms) of the largest node.

Prints a markdown table and draws docs/cluster.png.

    .venv/bin/python bench/cluster.py [--size-mib 64] [--rate-mib 16] [--nodes 1 2 4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import _lab
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.labs.clusterlab import (  # the repository root is on the path now
    Blob,
    Cluster,
    Fetch,
    MiB,
    cluster,
    fetch,
    metric,
)

HEARTBEAT_TTL = 3.0  # the default: what an operator gets
LEASE_TTL = 15.0


@dataclass
class Row:
    nodes: int
    ratio: float = 0.0
    between: float = 0.0  # bytes between nodes / blob size
    owner_ttfb: float = 0.0
    other_ttfb: float | None = None
    behind: float | None = None  # last non-owner done minus owner done
    redis_per_blob: float = 0.0
    redis_detail: str = ""
    recovery: float | None = None
    kill_extra: float | None = None  # extra upstream bytes after the kill / blob size
    peak_rss: int = 0
    correct: bool = True
    notes: list[str] = field(default_factory=list)


async def sample_rss(lab: Cluster, row: Row) -> None:
    while True:
        for node in lab.nodes:
            pids = node.pids()
            if pids:
                rss, _ = await trio.to_thread.run_sync(_lab.tree_memory_bytes, pids[0])
                row.peak_rss = max(row.peak_rss, rss)
        await trio.sleep(0.05)


async def one_client_per_node(lab: Cluster, blob: Blob) -> list[Fetch]:
    results = [Fetch(node.index) for node in lab.nodes]
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        for node, result in zip(lab.nodes, results, strict=True):
            nursery.start_soon(fetch, node, blob, t0, result)
    return results


async def peer_bytes_sent(lab: Cluster) -> float:
    total = 0.0
    for node in lab.nodes:
        if node.pids():
            values = await node.metrics()
            total += metric(values, "streamsync_cluster_peer_bytes_total", direction="sent")
    return total


OBSERVER = ("hello", "info")  # the benchmark's own connections and INFO calls, not the nodes'


async def redis_calls(lab: Cluster) -> dict[str, int]:
    calls = await lab.redis_commands()
    return {k: v for k, v in calls.items() if k not in OBSERVER}


def difference(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


async def fetched_from_upstream(lab: Cluster) -> list[float]:
    """Each node's own count of bytes read from the upstream registry (not from peers)."""
    return [
        metric(await n.metrics(), "streamsync_upstream_bytes_total") if n.pids() else 0.0
        for n in lab.nodes
    ]


async def cold(lab: Cluster, size: int, rate: int, row: Row) -> None:
    blob = await lab.upstream.push_blob(size)
    # Idle baseline: the heartbeats cost this many commands a second, blob or not.
    idle_before, idle_start = await redis_calls(lab), trio.current_time()
    await trio.sleep(size / rate + 1.0)
    idle = difference(await redis_calls(lab), idle_before)
    idle_rate = sum(idle.values()) / (trio.current_time() - idle_start)
    # Scrapes outside the counted window: a /metrics answer may ask Redis too.
    sent_before, fetched_before = await peer_bytes_sent(lab), await fetched_from_upstream(lab)
    before, started = await redis_calls(lab), trio.current_time()
    results = await one_client_per_node(lab, blob)
    took = trio.current_time() - started
    used = difference(await redis_calls(lab), before)
    row.redis_per_blob = sum(used.values()) - idle_rate * took
    row.redis_detail = ", ".join(f"{k} {v}" for k, v in sorted(used.items()))
    row.redis_detail += f" (heartbeats: {idle_rate:.1f}/s)"
    row.ratio = lab.upstream.bytes_for(blob) / size
    row.between = (await peer_bytes_sent(lab) - sent_before) / size
    row.correct &= all(r.correct(blob) for r in results)
    # The owner is the node that read the blob from the upstream (polling the lease in
    # Redis meanwhile would add the benchmark's own GETs to the count).
    grew = [a - b for a, b in zip(await fetched_from_upstream(lab), fetched_before, strict=True)]
    mine = results[grew.index(max(grew))]
    others = [r for r in results if r is not mine]
    assert mine.first_byte is not None
    assert mine.done is not None
    row.owner_ttfb = mine.first_byte - mine.started
    if others:
        row.other_ttfb = max((r.first_byte or 0) - r.started for r in others)
        row.behind = max(r.done or 0 for r in others) - mine.done


async def kill(lab: Cluster, size: int, row: Row) -> None:
    blob = await lab.upstream.push_blob(size)
    results = [Fetch(node.index) for node in lab.nodes]
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        for node, result in zip(lab.nodes, results, strict=True):
            nursery.start_soon(fetch, node, blob, t0, result)
        owner = await lab.wait_holder(blob)
        await lab.upstream.wait_bytes(blob, size // 2)
        owner.kill()
    survivors = [r for r in results if r.node != owner.index]
    row.correct &= all(r.correct(blob) for r in survivors)
    row.correct &= not any(r.complete_but_wrong(blob) for r in results)
    row.recovery = max(r.max_gap for r in survivors)
    row.kill_extra = lab.upstream.bytes_for(blob) / size - 1.0


async def measure(workdir: Path, nodes: int, size: int, rate: int) -> Row:
    row = Row(nodes)
    async with (
        cluster(
            workdir, nodes, bytes_per_second=rate, heartbeat_ttl=HEARTBEAT_TTL, lease_ttl=LEASE_TTL
        ) as lab,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(sample_rss, lab, row)
        await cold(lab, size, rate, row)
        if nodes > 1:
            await kill(lab, size, row)
        nursery.cancel_scope.cancel()
    return row


def table(rows: list[Row], size_mib: int, rate_mib: int) -> str:
    def opt(value: float | None, form: str, unit: str = "") -> str:
        return "n/a" if value is None else format(value, form) + unit

    lines = [
        f"{size_mib} MiB blob, upstream paced at {rate_mib} MiB/s per connection, one client "
        f"per node, heartbeat_ttl {HEARTBEAT_TTL:g} s, lease_ttl {LEASE_TTL:g} s",
        "",
        "| nodes | upstream bytes / blob | bytes between nodes / blob | first byte owner | "
        "first byte non-owner | non-owner done after owner | Redis cmds / blob | "
        "recovery after kill -9 | extra upstream after kill | peak RSS / node | bodies ok |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.nodes} | {r.ratio:.3f} | {r.between:.2f} | {r.owner_ttfb * 1000:.0f} ms | "
            f"{opt(None if r.other_ttfb is None else r.other_ttfb * 1000, '.0f', ' ms')} | "
            f"{opt(r.behind, '.2f', ' s')} | "
            f"{r.redis_per_blob:.0f} | {opt(r.recovery, '.2f', ' s')} | "
            f"{opt(r.kill_extra, '.3f')} | {r.peak_rss / MiB:.0f} MiB | "
            f"{'yes' if r.correct else 'NO'} |"
        )
    lines.append("")
    lines += [f"Redis commands in the cold run, N={r.nodes}: {r.redis_detail}" for r in rows]
    return "\n".join(lines)


def chart(rows: list[Row], path: Path) -> None:
    """Bars per N (Pillow only, like compare.py's chart): what a cluster costs and saves."""
    from PIL import Image, ImageDraw

    panels: list[tuple[str, str, list[float]]] = [
        ("upstream bytes / blob", "1.00 = one fetch for the fleet", [r.ratio for r in rows]),
        ("bytes between nodes / blob", "one copy per other node", [r.between for r in rows]),
        (
            "first byte, owner / non-owner (ms)",
            "cold, one client per node",
            [v for r in rows for v in (r.owner_ttfb * 1000, (r.other_ttfb or 0.0) * 1000)],
        ),
        (
            "recovery after kill -9 (s)",
            "longest stall of a survivor",
            [r.recovery or 0.0 for r in rows],
        ),
    ]
    width, height, pad = 1100, 360, 30
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    panel_width = (width - pad) // len(panels)
    for index, (title, hint, values) in enumerate(panels):
        left = pad + index * panel_width
        draw.text((left, 10), title, fill="black")
        draw.text((left, 26), hint, fill=(110, 110, 110))
        per_row = len(values) // len(rows)
        bar_width = (panel_width - 30) // len(values) - 6
        top = max(values) or 1.0
        for bar, value in enumerate(values):
            row = rows[bar // per_row]
            colour = (30, 136, 229) if bar % per_row == 0 else (144, 202, 249)
            bar_height = int((height - 110) * value / top)
            x0 = left + 10 + bar * (bar_width + 6)
            draw.rectangle((x0, height - 50 - bar_height, x0 + bar_width, height - 50), fill=colour)
            draw.text((x0, height - 64 - bar_height), f"{value:.2f}", fill="black")
            if bar % per_row == 0:
                draw.text((x0, height - 40), f"N={row.nodes}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--rate-mib", type=int, default=16, help="upstream pace per connection")
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument(
        "--chart", type=Path, default=Path(__file__).resolve().parent.parent / "docs/cluster.png"
    )
    args = parser.parse_args()
    _lab.require("docker-registry", "redis-server")
    rows = []
    for nodes in args.nodes:
        with tempfile.TemporaryDirectory(prefix="streamsync-cluster-") as tmp:
            rows.append(
                trio.run(measure, Path(tmp), nodes, args.size_mib * MiB, args.rate_mib * MiB)
            )
    print(table(rows, args.size_mib, args.rate_mib))
    chart(rows, args.chart)
    print(f"chart: {args.chart}")


if __name__ == "__main__":
    main()
