"""Cluster mode with real parts: one Redis, a Distribution upstream, several proxy processes.

Each node is its own process on its own loopback address with its own cache; the upstream is
paced (a WAN stand-in) so that "mid-flight" is real, and counted, so upstream bytes per blob
are measured where they cross, not taken from the proxy's word.  See tests/labs/clusterlab.py.

Every test prints one ``cluster:`` line of figures (``pytest -s`` shows them).
"""

from __future__ import annotations

import hashlib
import os
import signal
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import pytest
import trio

from streamsync_trio.cluster import home, ranked

from ..labs.clusterlab import (
    Blob,
    Cluster,
    Fetch,
    MiB,
    Node,
    cluster,
    fetch,
    metric,
)

pytestmark = pytest.mark.e2e

RATE = 8 * MiB  # bytes/s per upstream connection
SIZE = 16 * MiB  # 2 s at RATE: long enough to act mid-flight, short enough for 2 cores
HEARTBEAT_TTL = 2.0
LEASE_TTL = 4.0
# After an owner dies a follower re-decides within one heartbeat TTL plus its retry backoff
# (0.5 s, 1 s, 2 s with full jitter); the rest is a loaded 2-core machine's slack.
RECOVERY = HEARTBEAT_TTL + 4.0
CLIENT_TIMEOUT = 90.0  # a client not done by then is stuck
HEADERS = 2048  # response headers counted with the body by the relay, per request


get = partial(fetch, timeout=CLIENT_TIMEOUT)


def ratio(lab: Cluster, blob: Blob) -> float:
    return lab.upstream.bytes_for(blob) / blob.size


def by_preference(lab: Cluster, blob: Blob, among: Sequence[Node] | None = None) -> list[Node]:
    """The nodes in the order rendezvous hashing prefers them for ``blob``: home first."""
    nodes = lab.nodes if among is None else among
    urls = ranked(blob.digest, [n.node_url for n in nodes])
    return [lab.node_for(url) for url in urls]


async def clients(
    lab: Cluster, blob: Blob, on: Sequence[int], t0: float, results: list[Fetch]
) -> None:
    """One client per entry of ``on`` (a node index), all at once; results appended."""
    async with trio.open_nursery() as nursery:
        for index in on:
            result = Fetch(index)
            results.append(result)
            nursery.start_soon(get, lab.nodes[index], blob, t0, result)


def assert_no_wrong_body(lab: Cluster, blob: Blob, results: Sequence[Fetch]) -> None:
    wrong = [r for r in results if r.complete_but_wrong(blob)]
    assert not wrong, f"complete but wrong bodies: {wrong}\n{lab.logs()}"


def assert_correct(lab: Cluster, blob: Blob, results: Sequence[Fetch]) -> None:
    bad = [r for r in results if not r.correct(blob)]
    assert not bad, f"clients that did not get the blob: {bad}\n{lab.logs()}"


async def upstream_bytes_by_node(lab: Cluster) -> list[float]:
    """Each node's own count of bytes it read from the upstream registry (not from peers)."""
    return [
        metric(await node.metrics(), "streamsync_upstream_bytes_total") if node.pids() else 0.0
        for node in lab.nodes
    ]


async def test_cold_fan_out_fetches_the_blob_once_for_every_node(tmp_path: Path) -> None:
    """K clients over N nodes, one cold blob: the upstream sends it once, every body right,
    and the lease holder is the blob's rendezvous home."""
    async with cluster(tmp_path, 3, bytes_per_second=RATE) as lab:
        blob = await lab.upstream.push_blob(SIZE)
        results: list[Fetch] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(clients, lab, blob, [0, 1, 2, 0, 1, 2], trio.current_time(), results)
            owner = await lab.wait_holder(blob)
        assert_correct(lab, blob, results)
        assert 1.0 <= ratio(lab, blob) < 1.0 + HEADERS * 4 / blob.size, lab.upstream.relay.requests
        assert owner is by_preference(lab, blob)[0]
        fetched = await upstream_bytes_by_node(lab)
        assert fetched[owner.index] == blob.size
        assert sum(fetched) == blob.size
        received = [
            metric(await n.metrics(), "streamsync_cluster_peer_bytes_total", direction="received")
            for n in lab.nodes
        ]
        assert received[owner.index] == 0
        assert all(received[n.index] == blob.size for n in lab.nodes if n is not owner)
        print(
            f"cluster: fan-out 6 clients/3 nodes ratio {ratio(lab, blob):.4f}, done "
            f"{', '.join(f'n{r.node}:{r.done:.2f}s' for r in results)}"
        )


async def test_a_non_owners_client_joining_mid_flight_keeps_pace_with_the_owners(
    tmp_path: Path,
) -> None:
    """A client on the owner starts a cold download; at 30 % a client joins on the owner and
    one on a non-owner: the non-owner's first byte and completion are close to the owner's."""
    async with cluster(tmp_path, 2, bytes_per_second=RATE) as lab:
        blob = await lab.upstream.push_blob(SIZE)
        owner, other = by_preference(lab, blob)[:2]
        first, on_owner, on_other = Fetch(owner.index), Fetch(owner.index), Fetch(other.index)
        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(get, owner, blob, t0, first)
            await lab.upstream.wait_bytes(blob, int(0.3 * blob.size))
            nursery.start_soon(get, owner, blob, t0, on_owner)
            nursery.start_soon(get, other, blob, t0, on_other)
        assert_correct(lab, blob, [first, on_owner, on_other])
        with trio.fail_after(5):  # released after the commit (a moment after the last byte)
            while await lab.holder(blob) is not None:
                await trio.sleep(0.05)
        assert ratio(lab, blob) < 1.0 + HEADERS * 4 / blob.size
        assert on_owner.first_byte is not None and on_other.first_byte is not None
        assert first.done is not None and on_other.done is not None
        owner_ttfb = on_owner.first_byte - on_owner.started
        other_ttfb = on_other.first_byte - on_other.started
        behind = on_other.done - first.done
        print(
            f"cluster: join at 30 %: first byte owner {owner_ttfb * 1000:.0f} ms, "
            f"non-owner {other_ttfb * 1000:.0f} ms; non-owner done {behind:.2f} s after owner"
        )
        # The issue measured 156-270 ms and 0.27 s; the margins are for a loaded 2-core machine.
        assert other_ttfb < owner_ttfb + 1.0, (other_ttfb, owner_ttfb)
        assert behind < 2.0, behind


@pytest.mark.parametrize("fraction", [0.3, 0.7])
async def test_kill_9_of_the_owner_costs_only_its_own_clients(
    tmp_path: Path, fraction: float
) -> None:
    """The owner is killed (-9) at 30 % / 70 %: no body anywhere completes wrong, clients on
    the surviving nodes complete, within a heartbeat TTL plus backoff, and the upstream sends
    about one blob plus what the dead node had fetched and not yet passed on."""
    async with cluster(
        tmp_path, 3, bytes_per_second=RATE, heartbeat_ttl=HEARTBEAT_TTL, lease_ttl=LEASE_TTL
    ) as lab:
        blob = await lab.upstream.push_blob(SIZE)
        results: list[Fetch] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(clients, lab, blob, [0, 1, 2], trio.current_time(), results)
            owner = await lab.wait_holder(blob)
            await lab.upstream.wait_bytes(blob, int(fraction * blob.size))
            at_kill = lab.upstream.bytes_for(blob)
            survivors = [r for r in results if r.node != owner.index]
            passed_on = min(r.received for r in survivors)
            owner.kill()
        assert_no_wrong_body(lab, blob, results)
        assert_correct(lab, blob, survivors)
        recovery = max(r.max_gap for r in survivors)
        extra = lab.upstream.bytes_for(blob) - blob.size
        print(
            f"cluster: kill -9 at {fraction:.0%} (upstream {at_kill / blob.size:.2f}, survivors "
            f"had {passed_on / blob.size:.2f}): ratio {ratio(lab, blob):.3f}, "
            f"longest stall {recovery:.2f} s"
        )
        assert recovery < RECOVERY, [r.gaps for r in survivors]
        assert extra <= (at_kill - passed_on) + 0.1 * blob.size, lab.upstream.relay.requests


async def test_sigstop_of_the_owner_past_its_lease_then_sigcont(tmp_path: Path) -> None:
    """The owner is paused well past its heartbeat and lease TTLs (a GC pause, a frozen VM)
    while a follower streams from it, a client on a third node asks meanwhile, then the owner
    resumes.  The follower does not wait for the owner's return (it leaves it within about
    a heartbeat TTL); two owners at once cost duplicate upstream bytes only: no client is
    stuck or gets a wrong body, and every node ends with the verified blob in its cache."""
    pause = LEASE_TTL + 3.0  # longer than RECOVERY: a follower that waits it out fails
    async with cluster(
        tmp_path, 3, bytes_per_second=RATE, heartbeat_ttl=HEARTBEAT_TTL, lease_ttl=LEASE_TTL
    ) as lab:
        blob = await lab.upstream.push_blob(SIZE)
        owner, follower, late = by_preference(lab, blob)
        results: list[Fetch] = []
        async with trio.open_nursery() as nursery:
            t0 = trio.current_time()
            nursery.start_soon(clients, lab, blob, [owner.index, follower.index], t0, results)
            assert await lab.wait_holder(blob) is owner
            await lab.upstream.wait_bytes(blob, int(0.3 * blob.size))
            owner.signal_all(signal.SIGSTOP)
            try:
                await trio.sleep(LEASE_TTL + 1.0)
                nursery.start_soon(clients, lab, blob, [late.index], t0, results)
                await trio.sleep(pause - LEASE_TTL - 1.0)
            finally:
                owner.signal_all(signal.SIGCONT)
        assert_correct(lab, blob, results)
        before = lab.upstream.blob_gets(blob)
        again: list[Fetch] = []
        await clients(lab, blob, [0, 1, 2], trio.current_time(), again)
        assert_correct(lab, blob, again)
        assert lab.upstream.blob_gets(blob) == before  # served from every node's cache
        leases = await owner.metrics()
        stall = next(r.max_gap for r in results if r.node == follower.index)
        print(
            f"cluster: SIGSTOP {pause:.0f} s at 30 %: ratio {ratio(lab, blob):.3f}, follower's "
            f"longest stall {stall:.2f} s, done "
            f"{', '.join(f'n{r.node}:{r.done:.2f}s' for r in results)}, old owner's leases lost "
            f"{metric(leases, 'streamsync_cluster_leases_total', event='lost'):.0f}"
        )
        assert stall < RECOVERY, stall
        assert ratio(lab, blob) <= len(lab.nodes) * (1.0 + HEADERS * 4 / blob.size)


async def test_redis_stopped_and_restarted_during_traffic(tmp_path: Path) -> None:
    """Redis goes away mid-download and comes back: the download in flight completes, hits
    are served, misses degrade to the upstream (counted), and after Redis returns the fleet
    fetches once per blob again."""
    size = 8 * MiB
    async with cluster(tmp_path, 3, bytes_per_second=RATE, heartbeat_ttl=HEARTBEAT_TTL) as lab:
        warm, in_flight, cold, later = [await lab.upstream.push_blob(size) for _ in range(4)]
        await clients(lab, warm, [0, 1, 2], trio.current_time(), [])
        warm_bytes = lab.upstream.bytes_for(warm)
        flying: list[Fetch] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(clients, lab, in_flight, [0, 1, 2], trio.current_time(), flying)
            await lab.upstream.wait_bytes(in_flight, int(0.3 * size))
            lab.redis.stop()
        assert_correct(lab, in_flight, flying)
        hits: list[Fetch] = []
        misses: list[Fetch] = []
        await clients(lab, warm, [0, 1, 2], trio.current_time(), hits)
        await clients(lab, cold, [0, 1, 2], trio.current_time(), misses)
        assert_correct(lab, warm, hits)
        assert_correct(lab, cold, misses)
        assert lab.upstream.bytes_for(warm) == warm_bytes
        assert lab.upstream.bytes_for(cold) <= 3 * (size + HEADERS)  # once per machine at most
        degraded = [
            metric(await n.metrics(), "streamsync_cluster_degraded_misses_total") for n in lab.nodes
        ]
        assert sum(degraded) >= 1, degraded
        lab.redis.start()
        await lab.wait_live({n.node_url for n in lab.nodes}, timeout=4 * HEARTBEAT_TTL + 10)
        results: list[Fetch] = []
        await clients(lab, later, [0, 1, 2], trio.current_time(), results)
        assert_correct(lab, later, results)
        print(
            f"cluster: Redis down: in-flight ratio {ratio(lab, in_flight):.2f}, cold ratio "
            f"{ratio(lab, cold):.2f}, degraded misses {degraded}; after restart "
            f"ratio {ratio(lab, later):.3f}"
        )
        assert ratio(lab, later) < 1.0 + HEADERS * 3 / size


@pytest.mark.parametrize("fault", ["blackhole", "reset"])
async def test_an_owner_cut_off_from_its_peers_mid_flight(tmp_path: Path, fault: str) -> None:
    """The relay in front of the owner blackholes or resets every peer connection at 30 %:
    the owner's own client completes, and the other nodes' clients complete from the
    upstream at their own offsets, each node fetching at most once."""
    async with cluster(
        tmp_path,
        3,
        bytes_per_second=RATE,
        peer_relays=True,
        heartbeat_ttl=HEARTBEAT_TTL,
        upstream_extra="read_timeout = 3\n",
    ) as lab:
        blob = await lab.upstream.push_blob(SIZE)
        results: list[Fetch] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(clients, lab, blob, [0, 1, 2], trio.current_time(), results)
            owner = await lab.wait_holder(blob)
            await lab.upstream.wait_bytes(blob, int(0.3 * blob.size))
            assert owner.relay is not None
            if fault == "blackhole":
                owner.relay.blackhole()
            else:
                owner.relay.reset()
        assert_correct(lab, blob, results)
        stall = max(r.max_gap for r in results if r.node != owner.index)
        print(
            f"cluster: owner's peers {fault} at 30 %: ratio {ratio(lab, blob):.2f}, "
            f"longest stall elsewhere {stall:.2f} s"
        )
        assert ratio(lab, blob) <= len(lab.nodes) * (1.0 + HEADERS * 4 / blob.size)
        assert stall < 3.0 + RECOVERY


async def test_member_lists_that_disagree_cost_at_most_a_duplicate(tmp_path: Path) -> None:
    """Node 2 does not know node 0 (a rolling config change half done): every body is still
    right and no client is stuck; a digest costs at most one extra upstream fetch."""
    size = 6 * MiB
    async with cluster(
        tmp_path, 3, bytes_per_second=RATE, members=[[0, 1, 2], [0, 1, 2], [1, 2]]
    ) as lab:
        blobs = [await lab.upstream.push_blob(size) for _ in range(4)]
        results: dict[str, list[Fetch]] = {b.digest: [] for b in blobs}
        async with trio.open_nursery() as nursery:
            t0 = trio.current_time()
            for blob in blobs:
                nursery.start_soon(clients, lab, blob, [0, 1, 2], t0, results[blob.digest])
        for blob in blobs:
            assert_correct(lab, blob, results[blob.digest])
        ratios = [ratio(lab, b) for b in blobs]
        taken = [
            metric(await n.metrics(), "streamsync_cluster_leases_total", event="taken_over")
            for n in lab.nodes
        ]
        print(
            f"cluster: disagreeing member lists: ratios {[round(r, 2) for r in ratios]}, "
            f"leases taken over by node {taken}"
        )
        assert all(r <= 2.0 + HEADERS * 4 / size for r in ratios), ratios


async def test_a_node_added_and_removed_moves_only_its_digests(tmp_path: Path) -> None:
    """Nodes 0 and 1 run, node 2 joins, then leaves: each cold blob, asked of node 0, is
    fetched from the upstream by its rendezvous home among the live nodes at the time, so
    a change moves only the digests the added or removed node wins (the 1/N share itself is
    checked over many digests in tests/cluster/test_rendezvous.py)."""
    async with cluster(tmp_path, 3, bytes_per_second=4 * RATE, started=[0, 1]) as lab:
        everyone = [n.node_url for n in lab.nodes]
        late = lab.nodes[2]

        async def check(phase: str, live: list[Node], count: int) -> list[str]:
            blobs = [await push_homed_at(lab, everyone, late.node_url) for _ in range(count)]
            fetchers = []
            for blob in blobs:
                before = await upstream_bytes_by_node(lab)
                await clients(lab, blob, [0], trio.current_time(), [])
                after = await upstream_bytes_by_node(lab)
                fetched = [i for i in range(3) if after[i] - before[i] == blob.size]
                fetchers.append(fetched)
                want = home(blob.digest, [n.node_url for n in live])
                assert fetched == [lab.node_for(str(want)).index], (phase, fetched, want)
            return [str(f) for f in fetchers]

        alone = await check("before", lab.nodes[:2], 2)
        await lab.start_nodes([late])
        await lab.wait_live(set(everyone))
        joined = await check("joined", lab.nodes, 2)
        late.stop()  # clean shutdown: its heartbeat key goes at once
        await lab.wait_live(set(everyone[:2]))
        left = await check("left", lab.nodes[:2], 2)
        print(f"cluster: fetchers before {alone}, with node 2 {joined}, after {left}")


async def push_homed_at(lab: Cluster, members: list[str], node_url: str) -> Blob:
    """Push a random 1 MiB blob whose rendezvous home among ``members`` is ``node_url``, so
    every phase of the add/remove test involves the node that comes and goes."""
    while True:
        data = os.urandom(MiB)
        if home("sha256:" + hashlib.sha256(data).hexdigest(), members) == node_url:
            return await lab.upstream.push_bytes(data)
