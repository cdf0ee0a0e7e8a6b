"""A cluster on this machine: one Redis, one real Distribution upstream, N proxy processes.

* The upstream is Debian's ``docker-registry`` behind a :class:`FaultRelay` that counts the
  response bytes of every request path (upstream bytes per blob) and paces each connection
  (a WAN stand-in slow enough that "mid-flight" is real).
* Redis is :class:`~.redislab.RedisServer` (our own process, stopped by PID).
* Node ``i`` listens on its own loopback address ``127.0.0.<2+i>`` with its own cache directory
  and config, the peer secret in an environment variable, started as the README starts the
  proxy (hypercorn + hypercorn.toml).  With ``peer_relays`` its ``node_url`` points through a
  :class:`FaultRelay` of its own, so a test can cut the node off from its peers (blackhole,
  reset) while its clients and its Redis heartbeat still work.

Every process is one we started, stopped (or killed, paused) through the PIDs we hold.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from streamsync_trio.cluster import RedisLeases, connect, heartbeat_key

from .e2elab import REQUEST_LINE, Registry, registry, unavailable
from .proclab import HYPERCORN, REPO_ROOT, child_pids, wait_ready, with_signal
from .redislab import RedisServer, require_redis

MiB = 1024 * 1024
SECRET_ENV = "STREAMSYNC_CLUSTER_SECRET"
REPO = "team/app"
CHUNK = 65536


def loopback_host(index: int) -> str:
    """Node ``index``'s own address: 127.0.0.2, .3, ... (all of 127/8 is loopback on Linux)."""
    return f"127.0.0.{2 + index}"


def free_port_on(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def require_loopback_addresses(count: int) -> None:
    """Fail early, with a clear message, where 127.0.0.2.. cannot be bound (not Linux)."""
    for index in range(count):
        try:
            free_port_on(loopback_host(index))
        except OSError as exc:
            raise RuntimeError(f"cannot bind {loopback_host(index)}: {exc}") from None


@dataclass
class _Connection:
    """One relayed connection: the request it carries now, and its cancel scope."""

    scope: trio.CancelScope
    sockets: tuple[trio.SocketStream, trio.SocketStream]
    path: str = ""


@dataclass
class FaultRelay:
    """A TCP relay that counts, paces, and on command blackholes or resets.

    Response bytes are attributed to the last request line seen on the same connection
    (HTTP/1.1 without pipelining, as every client here speaks), so :meth:`bytes_for` gives
    the bytes the target sent for a blob, headers included (a few hundred bytes).

    ``blackhole``: nothing crosses in either direction, on open connections and on new ones
    (they are accepted and then hear nothing), like a partition; bytes held back are sent
    after :meth:`heal`, as TCP would retransmit them.  ``reset``: open connections are
    closed with RST, new ones are reset at once.
    """

    target_host: str
    target_port: int
    host: str = "127.0.0.1"
    bytes_per_second: float | None = None
    port: int = 0
    requests: list[tuple[str, str]] = field(default_factory=list)
    response_bytes: dict[str, int] = field(default_factory=dict)
    mode: str = "pass"
    _healed: trio.Event = field(default_factory=trio.Event)
    _connections: set[int] = field(default_factory=set)
    _open: dict[int, _Connection] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"http://{self.host}:{self.port}"

    def count(self, method: str, fragment: str) -> int:
        return sum(1 for m, path in self.requests if m == method and fragment in path)

    def bytes_for(self, fragment: str) -> int:
        return sum(n for path, n in self.response_bytes.items() if fragment in path)

    def blackhole(self) -> None:
        self.mode = "blackhole"
        self._healed = trio.Event()

    def reset(self) -> None:
        self.mode = "reset"
        for connection in list(self._open.values()):
            _abort(connection)

    def heal(self) -> None:
        self.mode = "pass"
        self._healed.set()

    async def _pipe(
        self,
        connection: _Connection,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        *,
        requests: bool,
    ) -> None:
        pending = b""
        try:
            while data := await source.receive_some(CHUNK):
                while self.mode == "blackhole":
                    await self._healed.wait()
                if requests:
                    # GET/HEAD carry no body, so request lines can be found in the byte stream.
                    pending += data
                    for match in REQUEST_LINE.finditer(pending):
                        self.requests.append((match[1].decode(), match[2].decode()))
                        connection.path = match[2].decode()
                    pending = pending[-256:] if not pending.endswith(b"\r\n\r\n") else b""
                else:
                    self.response_bytes[connection.path] = self.response_bytes.get(
                        connection.path, 0
                    ) + len(data)
                    if self.bytes_per_second:
                        await trio.sleep(len(data) / self.bytes_per_second)
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            try:
                await sink.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _handle(self, client: trio.SocketStream) -> None:
        if self.mode == "reset":
            _linger_zero(client)
            await client.aclose()
            return
        while self.mode == "blackhole":
            await self._healed.wait()
        try:
            upstream = await trio.open_tcp_stream(self.target_host, self.target_port)
        except OSError:
            _linger_zero(client)
            await client.aclose()
            return
        key = id(client)
        with trio.CancelScope() as scope:
            connection = _Connection(scope, (client, upstream))
            self._open[key] = connection
            try:
                async with client, upstream, trio.open_nursery() as nursery:
                    nursery.start_soon(
                        partial(self._pipe, connection, client, upstream, requests=True)
                    )
                    nursery.start_soon(
                        partial(self._pipe, connection, upstream, client, requests=False)
                    )
            finally:
                del self._open[key]

    @asynccontextmanager
    async def running(self) -> AsyncIterator[FaultRelay]:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                partial(trio.serve_tcp, self._handle, self.port, host=self.host)
            )
            self.port = listeners[0].socket.getsockname()[1]
            try:
                yield self
            finally:
                self.heal()
                nursery.cancel_scope.cancel()


def _linger_zero(stream: trio.SocketStream) -> None:
    """Make the next close send RST instead of FIN."""
    try:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


def _abort(connection: _Connection) -> None:
    for stream in connection.sockets:
        _linger_zero(stream)
    connection.scope.cancel()


@dataclass
class Blob:
    digest: str
    size: int

    @property
    def path(self) -> str:
        return f"/v2/{REPO}/blobs/{self.digest}"


@dataclass
class Upstream:
    registry: Registry
    relay: FaultRelay

    @property
    def url(self) -> str:
        """What the nodes are configured with: the counting, pacing relay."""
        return self.relay.address

    def bytes_for(self, blob: Blob) -> int:
        return self.relay.bytes_for(f"/blobs/{blob.digest}")

    def blob_gets(self, blob: Blob) -> int:
        return self.relay.count("GET", f"/blobs/{blob.digest}")

    async def push_blob(self, size: int) -> Blob:
        """Upload ``size`` random bytes straight to the registry."""
        return await self.push_bytes(os.urandom(size))

    async def push_bytes(self, data: bytes) -> Blob:
        """Upload ``data`` as a blob (monolithic upload)."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        async with httpx.AsyncClient(base_url=self.registry.url, timeout=120) as client:
            started = await client.post(f"/v2/{REPO}/blobs/uploads/")
            started.raise_for_status()
            location = started.headers["Location"]
            separator = "&" if "?" in location else "?"
            put = await client.put(f"{location}{separator}digest={digest}", content=data)
            put.raise_for_status()
        return Blob(digest, len(data))

    async def wait_bytes(self, blob: Blob, at_least: int, timeout: float = 60.0) -> None:
        with trio.fail_after(timeout):
            while self.bytes_for(blob) < at_least:
                await trio.sleep(0.01)


@dataclass
class Node:
    index: int
    host: str
    port: int
    node_url: str  # what the peers use: this node, or its relay
    members: tuple[str, ...]
    workdir: Path
    upstream_url: str
    redis_url: str
    secret: str
    heartbeat_ttl: float
    lease_ttl: float
    relay: FaultRelay | None = None
    process: subprocess.Popen[bytes] | None = None
    extra: str = ""  # more TOML for the [cluster] table
    upstream_extra: str = ""  # more TOML for the [[upstream]] table

    @property
    def url(self) -> str:
        """Where this node's clients connect: always directly."""
        return f"http://{self.host}:{self.port}"

    @property
    def cache(self) -> Path:
        return self.workdir / "cache"

    @property
    def log(self) -> Path:
        return self.workdir / "node.log"

    def config_text(self) -> str:
        members = ", ".join(f'"{m}"' for m in self.members)
        name = self.upstream_url.split("://", 1)[1]
        return (
            f'[storage]\nroot = "{self.cache}"\n'
            f'[[upstream]]\nname = "{name}"\nurl = "{self.upstream_url}"\ndefault = true\n'
            f"{self.upstream_extra}"
            f'[cluster]\nnode_url = "{self.node_url}"\nmembers = [{members}]\n'
            f'redis_url = "{self.redis_url}"\nsecret_env = "{SECRET_ENV}"\n'
            f"heartbeat_ttl = {self.heartbeat_ttl}\nlease_ttl = {self.lease_ttl}\n{self.extra}"
        )

    def start(self) -> None:
        """Start (or restart, on the same address and cache) the node's process."""
        assert self.process is None or self.process.poll() is not None, "already running"
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "streamsync.toml"
        config.write_text(self.config_text())
        env = {k: v for k, v in os.environ.items() if k != "STREAMSYNC_CONFIG"}
        env |= {"STREAMSYNC_CONFIG": str(config), SECRET_ENV: self.secret}
        command = [HYPERCORN, "--config", str(REPO_ROOT / "hypercorn.toml")]
        command += ["--bind", f"{self.host}:{self.port}", "streamsync_trio.app:app"]
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(
                command, cwd=self.workdir, env=env, stdout=sink, stderr=subprocess.STDOUT
            )

    def pids(self) -> list[int]:
        """The hypercorn process and its workers."""
        if self.process is None or self.process.poll() is not None:
            return []
        return [self.process.pid, *child_pids(self.process.pid)]

    def signal_all(self, signum: int) -> None:
        for pid in self.pids():
            with_signal(pid, signum)

    def kill(self) -> None:
        """kill -9 of the node: every process of it, no clean shutdown, no heartbeat DEL."""
        pids = self.pids()
        for pid in pids:
            with_signal(pid, signal.SIGKILL)
        if self.process is not None:
            self.process.wait()
            self.process = None

    def stop(self) -> None:
        """SIGTERM (clean shutdown: the node leaves), SIGKILL if it does not go."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        children = child_pids(process.pid)
        with_signal(process.pid, signal.SIGCONT)  # a paused node cannot shut down
        for pid in children:
            with_signal(pid, signal.SIGCONT)
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            for pid in [process.pid, *children]:
                with_signal(pid, signal.SIGKILL)
            process.wait()
        for pid in children:
            with_signal(pid, signal.SIGKILL)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def wait_ready(self, timeout: float = 60.0) -> None:
        await wait_ready(self.url, None, timeout)

    async def metrics(self) -> dict[str, float]:
        """``/metrics`` as {"name{label=value,...}": value}."""
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(f"{self.url}/metrics")
        response.raise_for_status()
        return parse_metrics(response.text)

    async def status(self) -> dict[str, object]:
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(f"{self.url}/_status.json")
        response.raise_for_status()
        answer: dict[str, object] = response.json()
        return answer


def parse_metrics(text: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def metric(values: dict[str, float], name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels``."""
    total = 0.0
    for key, value in values.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        have = dict(item.split("=", 1) for item in rest.rstrip("}").split(",") if item)
        if all(have.get(k) == v for k, v in labels.items()):
            total += value
    return total


@dataclass
class Fetch:
    """One client's GET of a blob: its timings (seconds since ``t0``), bytes and verdict."""

    node: int
    started: float = 0.0
    first_byte: float | None = None
    done: float | None = None
    received: int = 0
    status: int | None = None
    sha256: str = ""
    error: str = ""
    max_gap: float = 0.0  # the longest wait for the next chunk after the first byte
    gaps: list[tuple[float, float]] = field(default_factory=list)  # (at, gap) over 0.5 s

    def correct(self, blob: Blob) -> bool:
        return (
            not self.error
            and self.status == 200
            and self.received == blob.size
            and f"sha256:{self.sha256}" == blob.digest
        )

    def complete_but_wrong(self, blob: Blob) -> bool:
        """The one outcome never allowed: a body that ended cleanly and is not the blob."""
        return not self.error and self.status == 200 and not self.correct(blob)


async def fetch(
    node: Node, blob: Blob, t0: float, result: Fetch, *, timeout: float = 120.0
) -> Fetch:
    """GET the blob from ``node`` (directly), hashing as it arrives; never raises for the
    proxy's sake: a cut body is recorded in ``result.error``."""
    result.started = trio.current_time() - t0
    hasher = hashlib.sha256()
    last = None
    try:
        with trio.fail_after(timeout):
            async with (
                httpx.AsyncClient(timeout=httpx.Timeout(timeout)) as client,
                client.stream("GET", f"{node.url}{blob.path}") as response,
            ):
                result.status = response.status_code
                async for chunk in response.aiter_raw(CHUNK):
                    now = trio.current_time()
                    if last is None:
                        result.first_byte = now - t0
                    else:
                        gap = now - last
                        result.max_gap = max(result.max_gap, gap)
                        if gap > 0.5:
                            result.gaps.append((now - t0, gap))
                    last = now
                    hasher.update(chunk)
                    result.received += len(chunk)
    except (httpx.HTTPError, trio.TooSlowError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.done = trio.current_time() - t0
    result.sha256 = hasher.hexdigest()
    return result


@dataclass
class Cluster:
    upstream: Upstream
    redis: RedisServer
    nodes: list[Node]
    workdir: Path

    def node_for(self, node_url: str) -> Node:
        return next(n for n in self.nodes if n.node_url == node_url)

    async def holder(self, blob: Blob) -> Node | None:
        """The node whose lease on the blob is in Redis now, if any."""
        async with connect(self.redis.url) as redis:
            lease = await RedisLeases(redis, "http://observer", 1.0).holder(blob.digest)
        return None if lease is None else self.node_for(lease.node_url)

    async def wait_holder(self, blob: Blob, timeout: float = 30.0) -> Node:
        with trio.fail_after(timeout):
            while (node := await self.holder(blob)) is None:
                await trio.sleep(0.02)
        return node

    async def live(self) -> set[str]:
        """node_urls whose heartbeat key exists in Redis now."""
        async with connect(self.redis.url) as redis:
            found = set()
            for node in self.nodes:
                if await redis.exists([heartbeat_key(node.node_url)]):
                    found.add(node.node_url)
        return found

    async def wait_live(self, expected: set[str], timeout: float = 30.0) -> None:
        with trio.fail_after(timeout):
            while await self.live() != expected:
                await trio.sleep(0.05)

    async def redis_commands(self) -> dict[str, int]:
        """INFO commandstats: calls per command, to count what a blob costs Redis."""
        async with connect(self.redis.url) as redis:
            info = await redis.info("commandstats")
        calls: dict[str, int] = {}
        for key, value in info.items():
            if key.startswith("cmdstat_") and isinstance(value, dict):
                calls[key.removeprefix("cmdstat_")] = int(str(value["calls"]))
        return calls

    async def start_nodes(self, nodes: Sequence[Node]) -> None:
        for node in nodes:
            node.start()
        try:
            async with trio.open_nursery() as nursery:
                for node in nodes:
                    nursery.start_soon(node.wait_ready)
        except BaseException:
            raise RuntimeError("\n\n".join(n.log_tail() for n in nodes)) from None

    async def stop_nodes(self, nodes: Sequence[Node]) -> None:
        """Stop nodes at once (each waits for its clean shutdown in a thread)."""
        async with trio.open_nursery() as nursery:
            for node in nodes:
                nursery.start_soon(trio.to_thread.run_sync, node.stop)

    def logs(self) -> str:
        return "\n\n".join(f"--- node {n.index} ({n.url})\n{n.log_tail()}" for n in self.nodes)


@asynccontextmanager
async def cluster(
    workdir: Path,
    count: int,
    *,
    bytes_per_second: float | None = None,
    peer_relays: bool = False,
    heartbeat_ttl: float = 2.0,
    lease_ttl: float = 4.0,
    members: Sequence[Sequence[int]] | None = None,
    started: Sequence[int] | None = None,
    extra: str = "",
    upstream_extra: str = "",
) -> AsyncIterator[Cluster]:
    """``count`` nodes over one Redis and one paced, counting upstream.

    ``members[i]`` lists the node indexes node i is configured with (default: all), so
    member lists can disagree; ``started`` the nodes to start now (default: all; a test
    starts the others later with :meth:`Cluster.start_nodes`)."""
    if shutil.which("docker-registry") is None:
        unavailable("docker-registry not installed (apt-get install docker-registry)")
    require_redis()
    require_loopback_addresses(count)
    redis = RedisServer(workdir / "redis")
    redis.start()
    try:
        with registry(workdir) as upstream_registry:
            port = int(upstream_registry.url.rsplit(":", 1)[1])
            relay = FaultRelay("127.0.0.1", port, bytes_per_second=bytes_per_second)
            async with relay.running(), _node_relays(count, peer_relays) as relays:
                nodes = _nodes(workdir, relay.address, redis.url, relays, members)
                for node in nodes:
                    node.heartbeat_ttl, node.lease_ttl = heartbeat_ttl, lease_ttl
                    node.extra, node.upstream_extra = extra, upstream_extra
                lab = Cluster(Upstream(upstream_registry, relay), redis, nodes, workdir)
                first = [nodes[i] for i in (range(count) if started is None else started)]
                try:
                    await lab.start_nodes(first)
                    await lab.wait_live({n.node_url for n in first})
                    yield lab
                finally:
                    for node_relay in [relay, *relays]:
                        if node_relay is not None:
                            node_relay.heal()  # a held connection would delay a clean stop
                    with trio.CancelScope(shield=True):
                        await lab.stop_nodes(nodes)
    finally:
        redis.stop()


@asynccontextmanager
async def _node_relays(count: int, wanted: bool) -> AsyncIterator[list[FaultRelay | None]]:
    """One relay per node in front of it (its port chosen now, its target filled in by
    :func:`_nodes`), or none."""
    if not wanted:
        yield [None] * count
        return
    relays = [
        FaultRelay(loopback_host(i), free_port_on(loopback_host(i)), host=loopback_host(i))
        for i in range(count)
    ]
    async with _all_running(relays):
        yield list(relays)


@asynccontextmanager
async def _all_running(relays: list[FaultRelay]) -> AsyncIterator[None]:
    if not relays:
        yield
        return
    async with relays[0].running(), _all_running(relays[1:]):
        yield


def _nodes(
    workdir: Path,
    upstream_url: str,
    redis_url: str,
    relays: list[FaultRelay | None],
    members: Sequence[Sequence[int]] | None,
) -> list[Node]:
    secret = secrets.token_hex(16)
    count = len(relays)
    hosts = [loopback_host(i) for i in range(count)]
    ports = [
        relay.target_port if relay is not None else free_port_on(host)
        for host, relay in zip(hosts, relays, strict=True)
    ]
    urls = [
        relay.address if relay is not None else f"http://{host}:{port}"
        for host, port, relay in zip(hosts, ports, relays, strict=True)
    ]
    nodes = []
    for i in range(count):
        listed = range(count) if members is None else members[i]
        nodes.append(
            Node(
                index=i,
                host=hosts[i],
                port=ports[i],
                node_url=urls[i],
                members=tuple(urls[j] for j in listed),
                workdir=workdir / f"node{i}",
                upstream_url=upstream_url,
                redis_url=redis_url,
                secret=secret,
                heartbeat_ttl=2.0,
                lease_ttl=4.0,
                relay=relays[i],
            )
        )
    return nodes
