"""Metrics, status JSON and health endpoints, checked after a known workload."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from streamsync_trio._logging import JSONFormatter

from ..labs.fakes import FakeRegistry, Fault, image_manifest
from ..labs.httplab import MiB, fetch, fetch_until_abort, real_time_fake, running_proxy

UPSTREAM = "registry.fake.test"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_metrics_count_a_known_workload(tmp_path: Path) -> None:
    fake = FakeRegistry(chunk_delay=0.01)  # 1 MiB takes 0.16 s: the three clients overlap
    data = os.urandom(1 * MiB)
    digest = fake.add_blob(data)
    fake.add_manifest("library/app", "v1", image_manifest(digest, []))
    missing = "sha256:" + "0" * 64
    async with running_proxy(tmp_path, fake) as proxy, httpx.AsyncClient() as client:
        # Three clients together: one starts the download, two join it.
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(fetch, client, proxy.blob_url(digest))
        await proxy.wait_stored(digest)
        for _ in range(2):  # then two from the cache
            await fetch(client, proxy.blob_url(digest))
        for _ in range(2):  # one manifest, asked twice: one upstream fetch
            assert (await client.get(f"{proxy.url}/v2/library/app/manifests/v1")).is_success
        assert (await client.get(proxy.blob_url(missing))).status_code == 404

        response = await client.get(f"{proxy.url}/metrics")
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        metrics = samples(response.text)

    def value(name: str, **labels: str) -> float:
        return metrics[(name, tuple(sorted(labels.items())))]

    assert value("streamsync_served_bytes_total", source="stream") == 3 * len(data)
    assert value("streamsync_served_bytes_total", source="cache") == 2 * len(data)
    assert value("streamsync_blob_requests_total", result="miss") == 1
    assert value("streamsync_blob_requests_total", result="join") == 2
    assert value("streamsync_blob_requests_total", result="hit") == 2
    assert value("streamsync_upstream_bytes_total", upstream=UPSTREAM) == len(data)
    assert value("streamsync_downloads_total", upstream=UPSTREAM, outcome="committed") == 1
    assert value("streamsync_downloads_total", upstream=UPSTREAM, outcome="started") == 2
    assert (
        value("streamsync_download_failures_total", upstream=UPSTREAM, reason="upstream_404") == 1
    )
    assert value("streamsync_download_resumes_total", upstream=UPSTREAM) == 0
    assert value("streamsync_dedupe_ratio") == 5.0
    assert value("streamsync_downloads_in_flight") == 0
    assert value("streamsync_manifest_requests_total") == 2
    assert value("streamsync_manifest_upstream_fetches_total") == 1
    assert value("streamsync_upstream_requests_total", upstream=UPSTREAM, outcome="200") == 2
    assert value("streamsync_upstream_requests_total", upstream=UPSTREAM, outcome="404") == 1
    assert value("streamsync_upstream_latency_seconds_count", upstream=UPSTREAM) == 3
    assert value("streamsync_cache_blobs") == 1
    assert value("streamsync_cache_bytes") == len(data)


async def test_status_json_shows_a_download_in_flight(tmp_path: Path) -> None:
    fake = FakeRegistry(chunk_delay=0.01)  # 8 MiB at 6.4 MB/s: over a second
    data = os.urandom(8 * MiB)
    digest = fake.add_blob(data)
    async with running_proxy(tmp_path, fake) as proxy, httpx.AsyncClient() as client:
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(fetch, client, proxy.blob_url(digest))
            await trio.sleep(0.4)
            status = (await client.get(f"{proxy.url}/_status.json")).json()
            [download] = status["downloads"]
            assert download["digest"] == digest
            assert download["repository"] == "library/app"
            assert download["upstream"] == UPSTREAM
            assert download["size"] == len(data)
            assert 0 < download["received"] < len(data)
            assert 0 < download["progress"] < 1
            assert download["subscribers"] == 2
            assert download["rate_bytes_per_second"] > 1_000_000
        status = (await client.get(f"{proxy.url}/_status.json")).json()
        assert status["downloads"] == []
        assert status["cache"]["blobs"] == 1
        assert status["cache"]["bytes"] == len(data)
        assert status["traffic"]["upstream_bytes"] == len(data)


async def test_health_and_readiness(tmp_path: Path) -> None:
    async with running_proxy(tmp_path, real_time_fake()) as proxy, httpx.AsyncClient() as client:
        assert (await client.get(f"{proxy.url}/healthz")).json() == {"status": "ok"}
        ready = await client.get(f"{proxy.url}/readyz")
        assert ready.status_code == 200
        assert ready.json()["status"] == "ready"
        # Make the cache unwritable for real: its partial directory becomes a file.
        partial_dir = proxy.state.store.partial_dir
        shutil.rmtree(partial_dir)
        partial_dir.write_text("not a directory")
        not_ready = await client.get(f"{proxy.url}/readyz")
        assert not_ready.status_code == 503
        assert "not writable" in not_ready.json()["problems"][0]
        assert (await client.get(f"{proxy.url}/healthz")).status_code == 200
        partial_dir.unlink()
        partial_dir.mkdir()


async def test_one_structured_line_per_request_and_per_download(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    fake = real_time_fake()
    data = os.urandom(1 * MiB)
    digest = fake.add_blob(data)
    async with running_proxy(tmp_path, fake) as proxy, httpx.AsyncClient() as client:
        await fetch(client, proxy.blob_url(digest))
        await proxy.wait_stored(digest)
        await fetch(client, proxy.blob_url(digest))
        await client.get(f"{proxy.url}/v2/UPPER/manifests/v1")

    formatter = JSONFormatter()
    lines = [json.loads(formatter.format(r)) for r in caplog.records if hasattr(r, "event")]
    requests = [line for line in lines if line["event"] == "request"]
    blob_path = f"/v2/library/app/blobs/{digest}"
    assert [(r["path"], r["status"], r["bytes"], r["source"]) for r in requests] == [
        (blob_path, 200, len(data), "stream"),
        (blob_path, 200, len(data), "cache"),
        ("/v2/UPPER/manifests/v1", 400, requests[2]["bytes"], "-"),
    ]
    assert all(r["method"] == "GET" and r["duration_ms"] >= 0 for r in requests)
    [start] = [line for line in lines if line["event"] == "download_start"]
    [finish] = [line for line in lines if line["event"] == "download_finish"]
    assert start["digest"] == finish["digest"] == digest
    assert finish["repository"] == "library/app"
    assert finish["upstream"] == UPSTREAM
    assert finish["bytes"] == finish["size"] == len(data)
    assert finish["upstream_requests"] == 1
    assert finish["subscribers"] >= 0


async def test_an_aborted_body_is_logged_with_the_bytes_really_sent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    fake = real_time_fake()
    data = os.urandom(2 * MiB)
    digest = fake.add_blob(data)
    fake.faults[digest] = [Fault(drop_at=1 * MiB)]
    async with (
        running_proxy(tmp_path, fake, max_retries=0) as proxy,
        httpx.AsyncClient() as client,
    ):
        await fetch_until_abort(client, proxy.blob_url(digest))
        await proxy.wait_idle()
    [aborted] = [r for r in caplog.records if getattr(r, "event", "") == "request_aborted"]
    assert aborted.status == 200  # type: ignore[attr-defined]
    assert 0 < aborted.bytes < len(data)  # type: ignore[attr-defined]
    [failed] = [r for r in caplog.records if getattr(r, "event", "") == "download_fail"]
    assert failed.reason == "upstream_502"  # type: ignore[attr-defined]
