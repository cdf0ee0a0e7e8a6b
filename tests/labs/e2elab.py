"""End-to-end lab: a real Distribution registry, a counting relay, real images, skopeo.

* :func:`registry` starts Debian's ``docker-registry`` on a free loopback port.
* :func:`build_image` writes an OCI image layout with random layers, and :func:`push` copies it
  into the registry with ``skopeo``.
* :class:`Relay` sits between the proxy and the registry: it counts the requests that cross it
  (so a test knows exactly what the upstream was asked) and can pace the registry's answers
  per connection, a WAN stand-in that makes concurrent downloads overlap for real.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import NoReturn

import httpx
import pytest
import trio

from .proclab import free_port

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
REQUEST_LINE = re.compile(rb"(GET|HEAD|POST|PUT|PATCH|DELETE) (/[^ \r\n]*) HTTP/1\.[01]\r\n")


def require_tools() -> None:
    """Skip without docker-registry/skopeo, unless CI requires the e2e tests to run."""
    missing = [tool for tool in ("docker-registry", "skopeo") if shutil.which(tool) is None]
    if missing:
        unavailable(f"{', '.join(missing)} not installed (apt-get install docker-registry skopeo)")


def unavailable(message: str) -> NoReturn:
    """Skip a test that cannot run here; in CI (``STREAMSYNC_REQUIRE_E2E=1``) fail it instead."""
    if os.environ.get("STREAMSYNC_REQUIRE_E2E") == "1":
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class Registry:
    url: str
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextmanager
def registry(workdir: Path, extra_config: str = "") -> Iterator[Registry]:
    """A real Distribution on a free loopback port; ``extra_config`` is more top-level YAML
    (an ``auth:`` or ``middleware:`` section, say)."""
    port = free_port()
    config = workdir / "registry.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {workdir / 'registry-data'}\n"
        "  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n" + extra_config
    )
    with open(workdir / "registry.log", "wb") as log:
        process = subprocess.Popen(
            ["docker-registry", "serve", str(config)], stdout=log, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                httpx.get(f"{url}/v2/", timeout=1)
                break
            except httpx.TransportError:
                if process.poll() is not None:
                    raise RuntimeError((workdir / "registry.log").read_text()) from None
                time.sleep(0.05)
        yield Registry(url, process)
    finally:
        Registry(url, process).stop()


@dataclass
class Image:
    layout: Path
    tag: str
    manifest_digest: str
    config_digest: str
    layers: dict[str, bytes]  # digest -> gzip'd layer bytes

    def blobs(self) -> list[str]:
        return [self.config_digest, *self.layers]


def build_image(directory: Path, layer_sizes: list[int], tag: str = "v1") -> Image:
    """An OCI image layout with random (hence unique) gzip'd tar layers."""
    blobs_dir = directory / "blobs" / "sha256"
    blobs_dir.mkdir(parents=True)

    def put(data: bytes) -> str:
        hexdigest = hashlib.sha256(data).hexdigest()
        (blobs_dir / hexdigest).write_bytes(data)
        return f"sha256:{hexdigest}"

    layers: dict[str, bytes] = {}
    diff_ids = []
    for index, size in enumerate(layer_sizes):
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w") as tar:
            info = tarfile.TarInfo(f"layer{index}.bin")
            info.size = size
            tar.addfile(info, io.BytesIO(os.urandom(size)))
        diff_ids.append("sha256:" + hashlib.sha256(raw.getvalue()).hexdigest())
        compressed = gzip.compress(raw.getvalue(), compresslevel=1)
        layers[put(compressed)] = compressed
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "config": {},
        }
    ).encode()
    config_digest = put(config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": digest,
                    "size": len(data),
                }
                for digest, data in layers.items()
            ],
        }
    ).encode()
    manifest_digest = put(manifest)
    layout_index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": manifest_digest,
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (directory / "index.json").write_text(json.dumps(layout_index))
    (directory / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    return Image(directory, tag, manifest_digest, config_digest, layers)


async def skopeo(*args: str) -> str:
    result = await trio.run_process(
        ["skopeo", *args], capture_stdout=True, capture_stderr=True, check=False
    )
    if result.returncode != 0:
        raise AssertionError(f"skopeo {' '.join(args)} failed:\n{result.stderr.decode()}")
    return result.stdout.decode()


async def push(image: Image, registry_url: str, repo: str) -> None:
    host = registry_url.removeprefix("http://")
    await skopeo(
        "copy",
        "--dest-tls-verify=false",
        f"oci:{image.layout}:{image.tag}",
        f"docker://{host}/{repo}:{image.tag}",
    )


async def pull(proxy_url: str, reference: str, destination: Path) -> dict[str, bytes]:
    """skopeo copy from the proxy into a dir: layout; returns its blobs, each verified."""
    host = proxy_url.removeprefix("http://")
    await skopeo(
        "copy", "--src-tls-verify=false", f"docker://{host}/{reference}", f"dir:{destination}"
    )
    return await trio.to_thread.run_sync(verified_blobs, destination)


def verified_blobs(directory: Path) -> dict[str, bytes]:
    blobs = {}
    for path in directory.iterdir():
        if re.fullmatch(r"[0-9a-f]{64}", path.name):
            data = path.read_bytes()
            assert hashlib.sha256(data).hexdigest() == path.name, f"{path} is corrupt"
            blobs[f"sha256:{path.name}"] = data
    return blobs


@dataclass
class Relay:
    """A TCP relay that records every request crossing it and can pace the answers."""

    target_port: int
    bytes_per_second: float | None = None
    requests: list[tuple[str, str]] = field(default_factory=list)
    port: int = 0

    def count(self, method: str, fragment: str) -> int:
        return sum(1 for m, path in self.requests if m == method and fragment in path)

    async def _pipe(
        self, source: trio.SocketStream, sink: trio.SocketStream, *, requests: bool
    ) -> None:
        pending = b""
        try:
            while data := await source.receive_some(65536):
                if requests:
                    # GET/HEAD carry no body, so request lines can be found in the byte stream.
                    pending += data
                    for match in REQUEST_LINE.finditer(pending):
                        self.requests.append((match[1].decode(), match[2].decode()))
                    pending = pending[-256:] if not pending.endswith(b"\r\n\r\n") else b""
                elif self.bytes_per_second:
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
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        except OSError:
            await client.aclose()
            return
        async with client, upstream, trio.open_nursery() as nursery:
            nursery.start_soon(partial(self._pipe, client, upstream, requests=True))
            nursery.start_soon(partial(self._pipe, upstream, client, requests=False))

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Relay]:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1")
            )
            self.port = listeners[0].socket.getsockname()[1]
            try:
                yield self
            finally:
                nursery.cancel_scope.cancel()
