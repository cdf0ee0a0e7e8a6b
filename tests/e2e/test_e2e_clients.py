"""The client matrix: real podman, buildah, skopeo, containerd and docker through the proxy.

Each client is configured with the README's snippet (``docs/clients/``, ``mirror:5000`` replaced
by the proxy's address) plus only the private roots, sockets and state the test needs, and
pulls ``docker.io/library/<name>`` through the proxy, whose default upstream is named
``docker.io`` and is a real Distribution (behind a relay that counts what it is asked).

Every image shape (OCI index, Docker manifest list, Docker v2s2, OCI image, a 64 MiB layer) is
pulled cold by tag, warm by tag (removed from the client's store first; the upstream must see no
blob request), by digest, and for the index and the list with ``--platform linux/arm64``.  Every
pull is checked against the upstream's own digests: what the reference resolved to, the image
manifest used, and the config (image ID), which proves the platform.  Each cell's result and
time goes to a table (``<pytest basetemp>/client-matrix.md``, printed with ``-s``).
"""

from __future__ import annotations

import functools
import re
import warnings
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from ..labs.clientlab import (
    CLIENTS,
    Client,
    ClientFailed,
    DaemonUnavailable,
    Manifest,
    Pulled,
    Shape,
    missing_tools,
    mounts_under,
    multi,
    open_client,
    push_shape,
    standard_shapes,
)
from ..labs.e2elab import Relay, registry, require_tools, unavailable
from ..labs.proclab import REPO_ROOT, free_port, start, stop, wait_ready, write_config

pytestmark = pytest.mark.e2e
MiB = 1024 * 1024
ARM64 = "linux/arm64"
# The proxy's access log line for a blob it served.
SERVED_BLOB = re.compile(r"access: GET /v2/\S+/blobs/(sha256:[0-9a-f]{64}) 20[06]\b")


@dataclass
class ProxyLab:
    registry_url: str
    relay: Relay
    proxy_host: str
    log: Path

    def upstream_blob_gets(self) -> Counter[str]:
        return Counter(
            path.rsplit("/", 1)[1]
            for method, path in self.relay.requests
            if method == "GET" and "/blobs/" in path
        )

    def log_mark(self) -> int:
        return self.log.stat().st_size

    def served_since(self, mark: int) -> set[str]:
        """The blobs the proxy answered with 200/206 since ``mark`` (its access log)."""
        with self.log.open("rb") as log:
            log.seek(mark)
            return set(SERVED_BLOB.findall(log.read().decode(errors="replace")))

    async def push(self, shapes: list[Shape]) -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            for shape in shapes:
                await push_shape(client, self.registry_url, shape)


@asynccontextmanager
async def proxy_lab(
    tmp_path: Path, bytes_per_second: float | None = None
) -> AsyncIterator[ProxyLab]:
    """Distribution, a counting relay, and the proxy with the relay as upstream ``docker.io``."""
    require_tools()
    with registry(tmp_path) as upstream:
        relay = Relay(int(upstream.url.rsplit(":", 1)[1]), bytes_per_second)
        async with relay.running():
            config = write_config(
                tmp_path / "streamsync.toml",
                tmp_path / "cache",
                f"http://127.0.0.1:{relay.port}",
                name="docker.io",
            )
            port = free_port()
            log = tmp_path / "proxy.log"
            process = start(tmp_path, port, config, output=log)
            try:
                try:
                    await wait_ready(f"http://127.0.0.1:{port}", process)
                except RuntimeError:
                    raise RuntimeError(
                        f"the proxy did not start:\n{log.read_text()[-3000:]}"
                    ) from None
                yield ProxyLab(upstream.url, relay, f"127.0.0.1:{port}", log)
            finally:
                stop(process)


def require_clients(kinds: tuple[str, ...]) -> None:
    """Skip (fail in CI) without the tools.  Called from sync fixtures: pytest-trio 0.8 drops
    the reason of a skip raised inside the trio run."""
    require_tools()
    if missing := [tool for kind in kinds for tool in missing_tools(kind)]:
        unavailable(f"{', '.join(missing)} not installed (scripts/test installs them)")


@pytest.fixture
def installed(kind: str) -> None:
    require_clients((kind,))


@pytest.fixture
def all_installed() -> None:
    require_clients(CLIENTS)


@asynccontextmanager
async def client_of(kind: str, workdir: Path, proxy_host: str) -> AsyncIterator[Client]:
    """:func:`open_client`, skipping (failing in CI) when its daemon cannot start here; and
    after it, nothing left mounted."""
    try:
        async with open_client(kind, workdir, proxy_host) as client:
            yield client
    except DaemonUnavailable as error:
        # A warning too: pytest-trio 0.8 drops the reason of a skip raised in the trio run.
        warnings.warn(pytest.PytestWarning(f"{kind} skipped: {error}"), stacklevel=1)
        unavailable(f"{kind}: {error}")
    assert not mounts_under(workdir), f"{kind} left mounts: {mounts_under(workdir)}"


@dataclass
class Row:
    client: str
    image: str
    cell: str
    ok: bool
    seconds: float
    error: str = ""

    def line(self) -> str:
        verdict = "ok" if self.ok else "FAIL"
        error = self.error.replace("\n", " ").replace("|", "/")[:300]
        cells = [self.client, self.image, self.cell, verdict, f"{self.seconds:.1f}", error]
        return "| " + " | ".join(cells) + " |"


def record(rows: list[Row], table: Path) -> None:
    new = not table.exists()
    with table.open("a") as out:
        if new:
            out.write("| client | image | pull | result | s | error |\n")
            out.write("| --- | --- | --- | --- | --- | --- |\n")
        out.writelines(row.line() + "\n" for row in rows)
    print("\n" + "\n".join(row.line() for row in rows))


@pytest.fixture
def matrix_table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "client-matrix.md"


@functools.cache
def matrix_shapes() -> list[Shape]:
    """One set for every client's lab (each lab has its own registry and proxy, so each starts
    cold): building the 64 MiB layer once saves seconds per client."""
    return standard_shapes()


def mismatches(pulled: Pulled, shape: Shape, child: Manifest) -> list[str]:
    """How what the client has differs from what the upstream holds."""
    problems = []
    if pulled.top != shape.digest:
        problems.append(f"resolved to {pulled.top}, the upstream's tag is {shape.digest}")
    if pulled.image is not None and pulled.image != child.digest:
        problems.append(f"image manifest {pulled.image}, upstream {child.platform}: {child.digest}")
    if pulled.config != child.config_digest:
        problems.append(f"config {pulled.config}, upstream {child.platform}: {child.config_digest}")
    return problems


async def pull_cell(lab: ProxyLab, client: Client, shape: Shape, cell: str) -> Row:
    """One pull; then removal from the client's store, so the next cell downloads again.

    ``cold`` and ``arm64`` must cost exactly one upstream GET per blob; ``warm`` and
    ``digest`` (same blobs, now cached) none.  Every blob of the image must have been served
    by the proxy, so a client that fell back to Docker Hub or kept a local copy cannot pass."""
    platform = ARM64 if cell == "arm64" else None
    child = shape.child(platform or "linux/amd64")
    at = f"@{shape.digest}" if cell == "digest" else f":{shape.tag}"
    reference = f"docker.io/{shape.repository}{at}"
    upstream_before, mark = lab.upstream_blob_gets(), lab.log_mark()
    started = trio.current_time()
    try:
        try:
            pulled = await client.pull(reference, platform)
        finally:
            seconds = trio.current_time() - started
        problems = mismatches(pulled, shape, child)
        if unserved := set(child.blobs()) - lab.served_since(mark):
            problems.append(f"the proxy did not serve {sorted(unserved)}")
        upstream = lab.upstream_blob_gets() - upstream_before
        expected = Counter(dict.fromkeys(child.blobs(), 1) if cell in ("cold", "arm64") else {})
        if upstream != expected:
            problems.append(f"upstream blob GETs {dict(upstream)}, expected {dict(expected)}")
        await client.remove(reference)
    except (ClientFailed, AssertionError, trio.TooSlowError) as error:
        return Row(client.name, shape.name, cell, False, trio.current_time() - started, str(error))
    return Row(client.name, shape.name, cell, not problems, seconds, "; ".join(problems))


def cells(shape: Shape) -> list[str]:
    return ["cold", "warm", "digest", *(["arm64"] if shape.multi else [])]


@pytest.mark.parametrize("kind", CLIENTS)
@pytest.mark.usefixtures("installed")
async def test_client_pulls_every_shape_cold_warm_by_digest_and_for_arm64(
    kind: str, tmp_path: Path, matrix_table: Path
) -> None:
    shapes = await trio.to_thread.run_sync(matrix_shapes)
    rows: list[Row] = []
    async with proxy_lab(tmp_path) as lab:
        await lab.push(shapes)
        async with client_of(kind, tmp_path / kind, lab.proxy_host) as client:
            for shape in shapes:
                for cell in cells(shape):
                    rows.append(await pull_cell(lab, client, shape, cell))
    record(rows, matrix_table)
    failed = [row.line() for row in rows if not row.ok]
    assert not failed, f"{len(failed)} of {len(rows)} pulls failed:\n" + "\n".join(failed)


@pytest.mark.usefixtures("all_installed")
async def test_five_clients_at_once_cost_one_upstream_get_per_blob(
    tmp_path: Path, matrix_table: Path
) -> None:
    # A Docker manifest list, the commonest shape on Docker Hub, with layers that take about
    # a second each upstream (4 MB/s per connection), so the five pulls overlap on every blob.
    shape = await trio.to_thread.run_sync(multi, "fleet", "docker", [4 * MiB, 4 * MiB])
    child = shape.child()
    rows: list[Row] = []
    async with proxy_lab(tmp_path, bytes_per_second=4e6) as lab, AsyncExitStack() as stack:
        await lab.push([shape])
        clients = [
            await stack.enter_async_context(client_of(kind, tmp_path / kind, lab.proxy_host))
            for kind in CLIENTS
        ]

        async def one(client: Client) -> None:
            started = trio.current_time()
            try:
                pulled = await client.pull(f"docker.io/{shape.repository}:{shape.tag}")
                problems = mismatches(pulled, shape, child)
            except (ClientFailed, AssertionError, trio.TooSlowError) as error:
                problems = [str(error)]
            seconds = trio.current_time() - started
            rows.append(
                Row(client.name, shape.name, "together", not problems, seconds, "; ".join(problems))
            )

        async with trio.open_nursery() as nursery:
            for client in clients:
                nursery.start_soon(one, client)
        upstream = lab.upstream_blob_gets()
        manifests = f"/{shape.repository}/manifests/"
        by_tag = lab.relay.count("GET", f"{manifests}{shape.tag}")
        by_digest = lab.relay.count("GET", f"{manifests}sha256:")
        heads = lab.relay.count("HEAD", manifests)
    record(rows, matrix_table)
    summary = f"5 clients at once: upstream manifest GETs by tag {by_tag}, by digest {by_digest}"
    summary += f", HEADs {heads}"
    print(summary)
    with matrix_table.open("a") as table:
        table.write(f"\n{summary}\n\n")
    failed = [row.line() for row in rows if not row.ok]
    assert not failed, "\n".join(failed)
    assert {digest: upstream[digest] for digest in child.blobs()} == dict.fromkeys(child.blobs(), 1)
    # Each manifest once (the list, by tag or by digest, and the amd64 child), whatever the
    # mix of HEAD-then-GET clients (docker, containerd) and GET-by-tag ones (containers/image):
    # on Docker Hub every manifest GET counts against the pull limit.  Was 5 by tag + 1.
    assert (by_tag + by_digest, heads <= 1) == (2, True), summary


def test_the_readme_shows_the_snippets_the_matrix_uses() -> None:
    # The matrix configures every client from docs/clients/; users read the README.  They
    # must be the same text, or the README would document something no test runs.
    readme = (REPO_ROOT / "README.md").read_text()
    blocks = {block.strip() for block in re.findall(r"```[a-z]*\n(.*?)```", readme, re.DOTALL)}
    snippets = sorted((REPO_ROOT / "docs" / "clients").iterdir())
    assert {path.name for path in snippets} == {"daemon.json", "hosts.toml", "registries.conf"}
    for path in snippets:
        assert path.read_text().strip() in blocks, f"README.md does not show {path} verbatim"
