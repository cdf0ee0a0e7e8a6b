"""Prometheus metrics, read at scrape time from the plain counters the other modules keep.

The core, the upstream client and the manifest cache count in ordinary dataclasses and know
nothing of Prometheus; this collector turns their numbers into metric families when scraped.
So a scrape costs nothing on the hot path, and every metric is consistent with the state the
status page shows.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from ..upstream import LATENCY_BUCKETS
from ._cluster import cluster_metrics, shared_tag_metrics

if TYPE_CHECKING:
    from ._state import ProxyState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ProxyCollector(Collector):
    """This worker's metrics, one group of families per part of the proxy it reads."""

    def __init__(self, state: ProxyState) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        state = self._state
        yield from _traffic(state)
        yield from _downloads(state)
        yield _dedupe_ratio(state)
        yield from _upstreams(state)
        yield from cluster_metrics(state.cluster)  # nothing without [cluster]
        if state.cluster is not None:
            yield CounterMetricFamily(
                "streamsync_cluster_streamed_through",
                "Verified blobs streamed through to clients and not kept (shard placement: "
                "this node is not their home)",
                value=state.cluster.stats.streamed_through,
            )
        yield from shared_tag_metrics(state.manifests.shared_tags)  # nor this
        usage = state.store.usage()
        yield GaugeMetricFamily("streamsync_cache_blobs", "Blobs in the cache", value=usage.blobs)
        yield GaugeMetricFamily(
            "streamsync_cache_bytes", "Bytes of blobs in the cache", value=usage.bytes
        )


def _labelled(
    family: CounterMetricFamily, counts: Iterable[tuple[str, int]]
) -> CounterMetricFamily:
    """``family`` with one sample per (label value, count) of ``counts``."""
    for label, count in counts:
        family.add_metric([label], count)
    return family


def _traffic(state: ProxyState) -> Iterator[Metric]:
    """What clients asked and got: bytes by source, blob and manifest requests."""
    traffic = state.traffic
    yield _labelled(
        CounterMetricFamily(
            "streamsync_served_bytes",
            "Blob bytes sent to clients, by source (cache: stored blob; stream: in flight)",
            labels=["source"],
        ),
        traffic.served_bytes.items(),
    )
    yield _labelled(
        CounterMetricFamily(
            "streamsync_blob_requests",
            "Blob GETs: hit (from the cache), join (joined a download), miss (started one)",
            labels=["result"],
        ),
        state.blobs.requests.items(),
    )
    yield CounterMetricFamily(
        "streamsync_manifest_requests", "Manifest requests", value=traffic.manifest_requests
    )
    yield CounterMetricFamily(
        "streamsync_manifest_upstream_fetches",
        "Manifests fetched from an upstream (the rest were cache hits)",
        value=state.manifests.upstream_fetches,
    )


def _dedupe_ratio(state: ProxyState) -> Metric:
    """How many bytes clients got per byte the upstreams sent: what the cache saves."""
    upstream_bytes = sum(stats.upstream_bytes for stats in state.downloads.stats.values())
    client_bytes = sum(state.traffic.served_bytes.values())
    return GaugeMetricFamily(
        "streamsync_dedupe_ratio",
        "Blob bytes served to clients per blob byte fetched from upstreams",
        value=client_bytes / upstream_bytes if upstream_bytes else 0.0,
    )


def _downloads(state: ProxyState) -> Iterator[Metric]:
    """The blob downloads: per upstream, by outcome; the 404s answered from memory; the
    stored blobs checked on first serve; the downloads in flight and their clients."""
    fetched = CounterMetricFamily(
        "streamsync_upstream_bytes", "Blob bytes fetched from each upstream", labels=["upstream"]
    )
    resumes = CounterMetricFamily(
        "streamsync_download_resumes",
        "Blob downloads resumed after a drop or stall",
        labels=["upstream"],
    )
    downloads = CounterMetricFamily(
        "streamsync_downloads", "Blob downloads by outcome", labels=["upstream", "outcome"]
    )
    failures = CounterMetricFamily(
        "streamsync_download_failures",
        "Failed blob downloads by reason",
        labels=["upstream", "reason"],
    )
    for group, stats in state.downloads.stats.items():
        fetched.add_metric([group], stats.upstream_bytes)
        resumes.add_metric([group], stats.resumes)
        downloads.add_metric([group, "started"], stats.started)
        downloads.add_metric([group, "committed"], stats.committed)
        for reason, count in stats.failures.items():
            failures.add_metric([group, reason], count)
    yield from (fetched, resumes, downloads, failures)
    negative = CounterMetricFamily(
        "streamsync_negative_cache_hits",
        "Requests answered 404 from the brief memory of an upstream 404 (see _negative)",
        labels=["kind"],
    )
    negative.add_metric(["blob"], state.downloads.not_found.hits)
    negative.add_metric(["manifest"], state.manifests.not_found.hits)
    yield negative
    yield _labelled(
        CounterMetricFamily(
            "streamsync_stored_blob_checks",
            "Stored blobs hashed on this process's first serve of them, by result",
            labels=["result"],
        ),
        state.downloads.stored_checks.items(),
    )
    in_flight = state.downloads.in_flight()
    yield GaugeMetricFamily(
        "streamsync_downloads_in_flight", "Blob downloads in flight", value=len(in_flight)
    )
    subscribers = GaugeMetricFamily(
        "streamsync_download_subscribers",
        "Clients following each in-flight download",
        labels=["digest"],
    )
    for download in in_flight:
        subscribers.add_metric([str(download.digest)], download.subscriber_count)
    yield subscribers


def _upstreams(state: ProxyState) -> Iterator[Metric]:
    """The requests to each upstream: by outcome, to its token server, redirects followed,
    and the latency to response headers."""
    requests = CounterMetricFamily(
        "streamsync_upstream_requests",
        "Requests to each upstream by outcome (HTTP status, or the failure before one)",
        labels=["upstream", "outcome"],
    )
    latency = HistogramMetricFamily(
        "streamsync_upstream_latency_seconds",
        "Time from sending a request to an upstream to having its response headers",
        labels=["upstream"],
    )
    tokens = CounterMetricFamily(
        "streamsync_upstream_token_requests",
        "Requests to each upstream's token server by outcome (HTTP status or failure)",
        labels=["upstream", "outcome"],
    )
    redirects = CounterMetricFamily(
        "streamsync_upstream_redirects",
        "Redirect hops followed from each upstream (to its CDN or object storage)",
        labels=["upstream"],
    )
    for name, upstream in state.upstreams.items():
        calls = upstream.stats
        for outcome, count in calls.requests.items():
            requests.add_metric([name, outcome], count)
        for outcome, count in calls.token_requests.items():
            tokens.add_metric([name, outcome], count)
        redirects.add_metric([name], calls.redirects)
        buckets = [
            (str(bound), float(count))
            for bound, count in zip(LATENCY_BUCKETS, calls.latency_buckets, strict=True)
        ]
        buckets.append(("+Inf", float(calls.latency_count)))
        latency.add_metric([name], buckets, calls.latency_sum)
    yield from (requests, tokens, redirects, latency)


def render(state: ProxyState, others: list[tuple[int, str]] | None = None) -> bytes:
    """This worker's metrics, plus those ``others`` published (pid, exposition text).

    With one worker process the output is exactly its own metrics.  With several, a scrape
    reaches whichever worker accepts it, so that worker answers for all of them: every
    sample gets a ``worker`` label (its pid), and ``sum without (worker)`` gives the totals.
    Another worker's numbers are at most ``PUBLISH_INTERVAL`` seconds old.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(state))
    if not others:
        return generate_latest(registry)
    merged: dict[str, Metric] = {}
    sources: list[tuple[int, Iterable[Metric]]] = [(os.getpid(), registry.collect())]
    sources += [(pid, text_string_to_metric_families(text)) for pid, text in others]
    for pid, families in sources:
        for family in families:
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(family.name, family.documentation, family.type)
            into.samples += [
                sample._replace(labels={**sample.labels, "worker": str(pid)})
                for sample in family.samples
            ]
    combined = CollectorRegistry(auto_describe=False)
    combined.register(_Fixed(list(merged.values())))
    return generate_latest(combined)


def render_own(state: ProxyState) -> str:
    """This worker's metrics alone, as published for the other workers to merge."""
    return render(state).decode()


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)
