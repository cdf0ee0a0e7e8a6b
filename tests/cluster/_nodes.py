"""Several cluster nodes in one process: the real app under hypercorn on loopback ports, one
real Redis, one fake upstream (which counts every blob request and paces its bytes).

Each node has its own cache directory and its own ``[cluster]`` table naming the others; the
nodes talk to each other over real HTTP on the peer endpoint.  :meth:`Node.kill` cancels a
node's server without its shutdown hooks (no lease release, no heartbeat ``leave``): to its
peers it looks like a process killed with SIGKILL.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from prometheus_client.parser import text_string_to_metric_families

from streamsync_trio import create_app
from streamsync_trio._config import ClusterConfig, Config
from streamsync_trio._reference import parse_digest
from streamsync_trio.edge._state import ProxyState

from ..labs.fakes import FakeRegistry, make_config
from ..labs.proclab import free_port

SECRET_ENV = "STREAMSYNC_TEST_PEER_SECRET"
REPO = "library/app"


class Counted(httpx.AsyncBaseTransport):
    """The fake upstream, counting the body bytes it really sent (a body cut off by a
    killed node counts only what left)."""

    def __init__(self, fake: FakeRegistry) -> None:
        self.fake = fake
        self.sent = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.fake.handle_async_request(request)
        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_CountedBody(response.stream, self),
            extensions=response.extensions,
        )


class _CountedBody(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, counter: Counted) -> None:
        self._inner = inner
        self._counter = counter

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            self._counter.sent += len(chunk)
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


@dataclass
class Node:
    url: str
    state: ProxyState
    scope: trio.CancelScope
    shutdown: trio.Event

    def blob_url(self, digest: str) -> str:
        return f"{self.url}/v2/{REPO}/blobs/{digest}"

    def kill(self) -> None:
        self.scope.cancel()

    async def metrics(self, client: httpx.AsyncClient) -> dict[str, float]:
        """Every sample of ``/metrics`` by ``name{label=value,...}``."""
        text = (await client.get(f"{self.url}/metrics")).text
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples


async def _run(
    app_config: Config,
    fake: httpx.AsyncBaseTransport,
    port: int,
    task_status: trio.TaskStatus[Node],
) -> None:
    app = create_app(app_config, transport=fake)
    config = HypercornConfig()
    config.bind = [f"127.0.0.1:{port}"]
    config.alpn_protocols = ["http/1.1"]
    config.accesslog = None
    shutdown = trio.Event()
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(partial(serve, app, config, shutdown_trigger=shutdown.wait))
            task_status.started(Node(binds[0], app.extensions["streamsync"], scope, shutdown))


@asynccontextmanager
async def cluster_of(
    tmp_path: Path,
    fake: httpx.AsyncBaseTransport,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    count: int = 2,
    lists: Sequence[Sequence[int]] | None = None,
    upstream: dict[str, object] | None = None,
    **cluster: object,
) -> AsyncIterator[list[Node]]:
    """``count`` nodes of one cluster, all serving; stopped cleanly at the end.  ``lists``:
    the members each node lists, by index (default: every node lists all); ``upstream``:
    settings of the upstream, the same on every node (``tag_ttl``, say)."""
    monkeypatch.setenv(SECRET_ENV, "a test secret shared by the nodes")
    ports = [free_port() for _ in range(count)]
    members = tuple(f"http://127.0.0.1:{port}" for port in ports)
    nodes: list[Node] = []
    async with trio.open_nursery() as nursery:
        for index, port in enumerate(ports):
            settings = ClusterConfig(
                node_url=members[index],
                redis_url=redis_url,
                secret_env=SECRET_ENV,
                members=members if lists is None else tuple(members[i] for i in lists[index]),
                **cluster,  # type: ignore[arg-type]
            )
            config = make_config(tmp_path / f"node{index}", **(upstream or {}))
            config = replace(config, cluster=settings)
            nodes.append(await nursery.start(_run, config, fake, port))
        try:
            yield nodes
        finally:
            for node in nodes:
                node.shutdown.set()


def stored(node: Node, digest: str) -> bytes | None:
    path = node.state.store.blob_path(parse_digest(digest))
    return path.read_bytes() if path.exists() else None


async def settled(node: Node, digest: str) -> bytes | None:
    """What ``node`` holds of ``digest`` once its download has ended.  A client has its last
    byte before the commit (the fsync is off its path), so a response the client finished may
    still be committing, or dropping its partial, on the node."""
    with trio.fail_after(10):
        while node.state.downloads.get(parse_digest(digest)) is not None:
            await trio.sleep(0.01)
    return stored(node, digest)
