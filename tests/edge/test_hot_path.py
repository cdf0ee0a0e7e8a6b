"""The fast path (``edge/_hot_path``) answers exactly as the slow path (Quart) does.

Two proxies, built alike over two fake upstreams with the same content, one with the fast
path off and one with it on, get the same requests in the same order.  Every answer must be
the same on the wire (status, headers in order but the ``date``, body), move the metrics by
the same amounts, and write the same access-log line; and the requests the fast path is for
must really not reach Quart in the second proxy (else the comparison proves nothing).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import bcrypt
import httpx
import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from prometheus_client.parser import text_string_to_metric_families
from quart import Request
from quart_trio import QuartTrio

from streamsync_trio import create_app
from streamsync_trio._reference import parse_digest
from streamsync_trio.edge._metrics import render
from streamsync_trio.edge._state import ProxyState

from ..labs.fakes import FakeRegistry, make_config

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
# Timing, not behaviour: differs between any two runs.
UNCOMPARED_METRICS = ("streamsync_upstream_latency_seconds",)


@dataclass
class Twin:
    """One of the two proxies: its URL, state, upstream, and the requests Quart handled."""

    url: str
    app: QuartTrio
    fake: FakeRegistry
    quart_requests: list[str] = field(default_factory=list)

    @property
    def state(self) -> ProxyState:
        state = self.app.extensions["streamsync"]
        assert isinstance(state, ProxyState)
        return state


class AccessLines(logging.Handler):
    """The access-log records, as the fields a line has (all but its duration)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = ("event", "method", "path", "status", "bytes", "source")
        self.lines.append(
            {"message": record.getMessage()} | {f: getattr(record, f) for f in fields}
        )


@pytest.fixture
def access_lines() -> AsyncIterator[AccessLines] | Any:
    logger = logging.getLogger("streamsync_trio.access")
    handler = AccessLines()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def upstream_content(fake: FakeRegistry) -> dict[str, str]:
    """The same image in both fakes: a small config, a layer, a manifest, an index; plus a
    blob private to another repository.  Their digests by role."""
    config_bytes = b'{"architecture":"amd64","os":"linux"}' + b" " * 1300
    layer_bytes = b"layer bytes " * 100
    config, layer = fake.add_blob(config_bytes), fake.add_blob(layer_bytes)
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config, "size": len(config_bytes)},
        "layers": [{"mediaType": OCI_LAYER, "digest": layer, "size": len(layer_bytes)}],
    }
    manifest = fake.add_manifest("library/app", "v1", json.dumps(document).encode())
    child = {"mediaType": OCI_MANIFEST, "digest": manifest, "size": 1}
    index_body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [child]})
    index = fake.add_manifest("library/app", "multi", index_body.encode(), OCI_INDEX)
    secret = fake.add_blob(b"private " * 50)
    fake.private[secret] = {"secret/app"}
    return {
        "config": config,
        "layer": layer,
        "manifest": manifest,
        "index": index,
        "secret": secret,
    }


def content(pair: tuple[Twin, Twin]) -> dict[str, str]:
    digests = [upstream_content(twin.fake) for twin in pair]
    assert digests[0] == digests[1]
    return digests[0]


@asynccontextmanager
async def twins(
    tmp_path: Path, settings: dict[str, Any] | None = None
) -> AsyncIterator[tuple[Twin, Twin]]:
    """Two proxies alike: the first with the fast path off, the second with it on."""
    async with trio.open_nursery() as nursery:
        shutdown = trio.Event()
        found = []
        try:
            for name, hot in (("slow", False), ("fast", True)):
                fake = FakeRegistry()
                config = replace(make_config(tmp_path / name), **(settings or {}))
                app = create_app(config, transport=fake, hot_path=hot)
                binds = await nursery.start(
                    partial(serve, app, _hypercorn(), shutdown_trigger=shutdown.wait)
                )
                found.append(Twin(binds[0], app, fake))
                _count_quart_requests(found[-1])
            yield found[0], found[1]
        finally:
            shutdown.set()


def _hypercorn() -> HypercornConfig:
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.alpn_protocols = ["http/1.1"]
    config.accesslog = None
    return config


def _count_quart_requests(twin: Twin) -> None:
    """Record every request Quart itself handles (the hooks, refusals included)."""
    handle = twin.app.handle_request

    async def counting(request: Request) -> Any:
        twin.quart_requests.append(f"{request.method} {request.path}")
        return await handle(request)

    twin.app.handle_request = counting  # type: ignore[method-assign]


def metric_values(state: ProxyState) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    values = {}
    for family in text_string_to_metric_families(render(state).decode()):
        if family.name in UNCOMPARED_METRICS:
            continue
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def moved(
    before: dict[tuple[str, tuple[tuple[str, str], ...]], float],
    after: dict[tuple[str, tuple[tuple[str, str], ...]], float],
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """What changed, and by how much (new samples count from zero)."""
    return {
        key: value - before.get(key, 0.0)
        for key, value in after.items()
        if value != before.get(key, 0.0)
    }


@dataclass
class Seen:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float]
    line: dict[str, Any]
    quart: bool  # whether Quart handled it


async def ask(
    twin: Twin, lines: AccessLines, method: str, path: str, headers: dict[str, str] | None = None
) -> Seen:
    before = metric_values(twin.state)
    logged, handled = len(lines.lines), len(twin.quart_requests)
    async with httpx.AsyncClient(base_url=twin.url) as client:
        response = await client.request(method, path, headers=headers)
    with trio.fail_after(5):  # the line is written just after the last byte is sent
        while len(lines.lines) == logged:
            await trio.sleep(0.001)
    await _settle(twin)
    return Seen(
        response.status_code,
        [(k, v) for k, v in response.headers.raw if k.lower() != b"date"],
        response.content,
        moved(before, metric_values(twin.state)),
        lines.lines[-1],
        len(twin.quart_requests) > handled,
    )


async def _settle(twin: Twin) -> None:
    """Until no download or first-serve check is in flight: both twins then count alike."""
    with trio.fail_after(10):
        while len(twin.state.downloads) or any(twin.state.store.partial_dir.iterdir()):
            await trio.sleep(0.005)
    await trio.sleep(0.02)  # a check of a stored blob ends in the app nursery


async def same(
    pair: tuple[Twin, Twin],
    lines: AccessLines,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    *,
    fast: bool,
) -> Seen:
    """Ask both; assert the answers, metrics and log lines are the same, and whether the
    fast path answered in the second proxy (``fast``).  Returns what was seen."""
    slow_seen = await ask(pair[0], lines, method, path, headers)
    fast_seen = await ask(pair[1], lines, method, path, headers)
    where = f"{method} {path}"
    assert slow_seen.quart, where
    assert fast_seen.quart is not fast, where
    assert (fast_seen.status, fast_seen.headers) == (slow_seen.status, slow_seen.headers), where
    assert fast_seen.body == slow_seen.body, where
    assert fast_seen.metrics == slow_seen.metrics, where
    assert fast_seen.line == slow_seen.line, where
    return fast_seen


ACCEPT_ALL = {"Accept": f"{OCI_MANIFEST}, {OCI_INDEX}"}


async def test_manifests_by_digest_answer_alike(tmp_path: Path, access_lines: AccessLines) -> None:
    async with twins(tmp_path) as pair:
        digests = content(pair)
        manifest = f"/v2/library/app/manifests/{digests['manifest']}"
        index = f"/v2/library/app/manifests/{digests['index']}"
        await same(
            pair, access_lines, "GET", "/v2/library/app/manifests/v1", ACCEPT_ALL, fast=False
        )
        # Fetched by its tag just now: in memory already.
        first = await same(pair, access_lines, "GET", manifest, ACCEPT_ALL, fast=True)
        assert first.status == 200
        hit = await same(pair, access_lines, "GET", manifest, ACCEPT_ALL, fast=True)
        assert hit.body == pair[0].fake.manifests[("library/app", digests["manifest"])][0]
        await same(pair, access_lines, "HEAD", manifest, ACCEPT_ALL, fast=True)
        await same(pair, access_lines, "GET", manifest, None, fast=True)  # no Accept: default
        await same(pair, access_lines, "GET", manifest, {"Range": "bytes=0-3"}, fast=False)
        # A client that does not accept the stored type: the upstream is asked (slow path).
        await same(pair, access_lines, "GET", index, ACCEPT_ALL, fast=False)
        await same(pair, access_lines, "GET", index, {"Accept": OCI_MANIFEST}, fast=False)
        await same(pair, access_lines, "GET", index, ACCEPT_ALL, fast=True)
        # Another repository, and a query string: never from memory.
        await same(pair, access_lines, "GET", manifest.replace("library", "other"), fast=False)
        await same(pair, access_lines, "GET", manifest + "?ns=x", ACCEPT_ALL, fast=False)


async def test_a_manifest_gone_from_the_store_is_not_answered_from_memory(
    tmp_path: Path, access_lines: AccessLines
) -> None:
    async with twins(tmp_path) as pair:
        digest = content(pair)["manifest"]
        path = f"/v2/library/app/manifests/{digest}"
        await same(pair, access_lines, "GET", path, ACCEPT_ALL, fast=False)
        await same(pair, access_lines, "GET", path, ACCEPT_ALL, fast=True)
        for twin in pair:  # as `cache gc` does; then a damaged copy, rewritten in place
            twin.state.store.expire_manifests_and_tags(time.time() + 60)
        refetched = await same(pair, access_lines, "GET", path, ACCEPT_ALL, fast=False)
        assert refetched.metrics[("streamsync_manifest_upstream_fetches_total", ())] == 1
        await same(pair, access_lines, "GET", path, ACCEPT_ALL, fast=True)
        for twin in pair:
            stored = twin.state.store.manifest_path(parse_digest(digest))
            damaged = bytearray(stored.read_bytes())
            damaged[0] ^= 1
            stored.write_bytes(damaged)  # in place: same inode, same size
        await same(pair, access_lines, "GET", path, ACCEPT_ALL, fast=False)
        await same(pair, access_lines, "GET", path, ACCEPT_ALL, fast=True)


async def test_small_blobs_answer_alike(tmp_path: Path, access_lines: AccessLines) -> None:
    async with twins(tmp_path) as pair:
        digests = content(pair)
        config = f"/v2/library/app/blobs/{digests['config']}"
        miss = await same(pair, access_lines, "GET", config, fast=False)
        assert miss.status == 200
        hit = await same(pair, access_lines, "GET", config, fast=True)
        assert hit.body == pair[0].fake.blobs[digests["config"]]
        assert hit.line["source"] == "cache"
        await same(pair, access_lines, "HEAD", config, fast=True)
        await same(pair, access_lines, "GET", config, {"Range": "bytes=10-19"}, fast=False)
        await same(pair, access_lines, "HEAD", config, {"Range": "bytes=10-"}, fast=False)
        await same(pair, access_lines, "GET", config, {"Range": "bytes=99999-"}, fast=False)
        # Knowing a digest is not access: a private blob under another repository.
        secret = f"/v2/secret/app/blobs/{digests['secret']}"
        await same(pair, access_lines, "GET", secret, fast=False)
        stolen = await same(
            pair, access_lines, "GET", secret.replace("secret", "public"), fast=False
        )
        assert stolen.status == 404
        await same(pair, access_lines, "HEAD", secret.replace("secret", "public"), fast=False)
        await same(pair, access_lines, "GET", secret, fast=True)
        # Evicted: the next request downloads it again, in both.
        for twin in pair:
            twin.state.store.remove_blob(parse_digest(digests["config"]))
        again = await same(pair, access_lines, "GET", config, fast=False)
        assert again.metrics[("streamsync_blob_requests_total", (("result", "miss"),))] == 1
        await same(pair, access_lines, "GET", config, fast=True)


async def test_a_stored_blob_not_checked_yet_takes_the_slow_path(
    tmp_path: Path, access_lines: AccessLines
) -> None:
    async with twins(tmp_path) as pair:
        digest = content(pair)["layer"]
        path = f"/v2/library/app/blobs/{digest}"
        await same(pair, access_lines, "GET", path, fast=False)
        for twin in pair:  # as after a restart: stored, but not checked by this process
            twin.state.downloads.trusted._entries.clear()
        await same(pair, access_lines, "GET", path, fast=False)  # checked while served
        await same(pair, access_lines, "GET", path, fast=True)


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def test_client_auth_is_kept(tmp_path: Path, access_lines: AccessLines) -> None:
    htpasswd = tmp_path / "htpasswd"
    hashed = bcrypt.hashpw(b"hunter2", bcrypt.gensalt(rounds=4)).decode()
    htpasswd.write_text(f"ci:{hashed}\n")
    async with twins(tmp_path, {"htpasswd": htpasswd}) as pair:
        digests = content(pair)
        good, bad = _basic("ci", "hunter2"), _basic("ci", "wrong")
        manifest = f"/v2/library/app/manifests/{digests['manifest']}"
        config = f"/v2/library/app/blobs/{digests['config']}"
        for path in (manifest, config):
            await same(pair, access_lines, "GET", path, good, fast=False)
            await same(pair, access_lines, "GET", path, good, fast=True)
            refused = await same(pair, access_lines, "GET", path, None, fast=False)
            assert refused.status == 401
            await same(pair, access_lines, "GET", path, bad, fast=False)
            await same(pair, access_lines, "HEAD", path, bad, fast=False)
            await same(pair, access_lines, "HEAD", path, good, fast=True)


def test_blob_bytes_and_identity_bound_the_memory(tmp_path: Path) -> None:
    from streamsync_trio.core._blobs import SmallBlobs

    now = [0.0]
    small = SmallBlobs(max_bytes=100, fresh_for=5.0, clock=lambda: now[0])
    a, b = parse_digest("sha256:" + "a" * 64), parse_digest("sha256:" + "b" * 64)
    small.put(a, os.urandom(60), (1, 1, 60))
    small.put(b, os.urandom(60), (1, 2, 60))
    assert small.get(a, (1, 1, 60)) is None  # pushed out: 120 bytes > 100
    assert small.get(b, (1, 3, 60)) is None  # another file now: dropped
    small.put(b, b"x" * 60, (1, 2, 60))
    assert small.get(b, (1, 2, 60)) == b"x" * 60
    now[0] = 5.0
    assert small.get(b, (1, 2, 60)) is None  # read through the store again
    assert small.bytes == 0
