"""End to end with real parts: Distribution upstream, the proxy as a process, skopeo pulls.

The proxy is started exactly as the README says (hypercorn + hypercorn.toml +
STREAMSYNC_CONFIG); a relay between it and the registry counts what the upstream was asked.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from ..labs.e2elab import Image, Registry, Relay, build_image, pull, push, registry, require_tools
from ..labs.proclab import free_port, start, stop, wait_ready, write_config

pytestmark = pytest.mark.e2e
MiB = 1024 * 1024
REPO = "team/app"


@dataclass
class Lab:
    registry: Registry
    relay: Relay
    proxy_url: str
    workdir: Path

    def blob_gets(self, digest: str) -> int:
        return self.relay.count("GET", f"/blobs/{digest}")

    def reference(self, image: Image) -> str:
        return f"{REPO}:{image.tag}"


@asynccontextmanager
async def lab(
    tmp_path: Path,
    *,
    bytes_per_second: float | None = None,
    workers: int = 1,
    **upstream: object,
) -> AsyncIterator[Lab]:
    require_tools()
    with registry(tmp_path) as upstream_registry:
        port = int(upstream_registry.url.rsplit(":", 1)[1])
        relay = Relay(port, bytes_per_second)
        async with relay.running():
            config = write_config(
                tmp_path / "streamsync.toml",
                tmp_path / "cache",
                f"http://127.0.0.1:{relay.port}",
                **upstream,
            )
            proxy_port = free_port()
            process = start(tmp_path, proxy_port, config, ("--workers", str(workers)))
            proxy_url = f"http://127.0.0.1:{proxy_port}"
            try:
                await wait_ready(proxy_url, process)
                yield Lab(upstream_registry, relay, proxy_url, tmp_path)
            finally:
                output = stop(process)
                (tmp_path / "proxy.log").write_text(output)


async def pushed_image(lab: Lab, name: str, layer_sizes: list[int]) -> Image:
    """Build and push an image tagged ``name``."""
    image = await trio.to_thread.run_sync(build_image, lab.workdir / name, layer_sizes, name)
    await push(image, lab.registry.url, REPO)
    return image


async def test_cold_pull_fetches_each_blob_once_and_warm_pull_fetches_nothing(
    tmp_path: Path,
) -> None:
    async with lab(tmp_path) as e2e:
        image = await pushed_image(e2e, "image", [1 * MiB, 2 * MiB, 3 * MiB])
        cold = await pull(e2e.proxy_url, e2e.reference(image), tmp_path / "cold")
        assert set(image.layers) <= set(cold)
        assert all(cold[digest] == data for digest, data in image.layers.items())
        assert image.config_digest in cold
        assert all(e2e.blob_gets(digest) == 1 for digest in image.blobs())

        requests_before = len(e2e.relay.requests)
        warm = await pull(e2e.proxy_url, e2e.reference(image), tmp_path / "warm")
        assert warm == cold
        assert len(e2e.relay.requests) == requests_before  # not even a manifest request
        assert all(e2e.blob_gets(digest) == 1 for digest in image.blobs())


@pytest.mark.parametrize("workers", [1, 2])
async def test_concurrent_pulls_share_one_upstream_download_per_blob(
    tmp_path: Path, workers: int
) -> None:
    # 8 MB/s per upstream connection: each 8 MiB layer takes about a second, so four
    # pulls started together overlap on every layer.  With two hypercorn worker processes
    # the pulls land on both, and the workers share each download through its lease.
    async with lab(tmp_path, bytes_per_second=8e6, workers=workers) as e2e:
        image = await pushed_image(e2e, "image", [8 * MiB, 8 * MiB, 4 * MiB])
        results: dict[int, dict[str, bytes]] = {}

        async def one(index: int) -> None:
            results[index] = await pull(
                e2e.proxy_url, e2e.reference(image), tmp_path / f"pull{index}"
            )

        async with trio.open_nursery() as nursery:
            for index in range(4):
                nursery.start_soon(one, index)
        assert len(results) == 4
        for blobs in results.values():
            assert all(blobs[digest] == data for digest, data in image.layers.items())
        assert {digest: e2e.blob_gets(digest) for digest in image.blobs()} == {
            digest: 1 for digest in image.blobs()
        }


async def test_pull_by_digest(tmp_path: Path) -> None:
    async with lab(tmp_path) as e2e:
        image = await pushed_image(e2e, "image", [512 * 1024])
        blobs = await pull(e2e.proxy_url, f"{REPO}@{image.manifest_digest}", tmp_path / "by-digest")
        assert set(image.layers) <= set(blobs)


async def test_blob_streams_before_the_upstream_finishes(tmp_path: Path) -> None:
    # 16 MiB at 4 MB/s takes four seconds upstream; the first bytes must arrive long before.
    async with lab(tmp_path, bytes_per_second=4e6) as e2e:
        image = await pushed_image(e2e, "image", [16 * MiB])
        [(digest, data)] = image.layers.items()
        url = f"{e2e.proxy_url}/v2/{REPO}/blobs/{digest}"
        hasher = hashlib.sha256()
        received = 0
        started = trio.current_time()
        first_byte_at = None
        async with httpx.AsyncClient(timeout=60) as client, client.stream("GET", url) as response:
            assert response.status_code == 200
            assert response.headers["Content-Length"] == str(len(data))
            assert response.headers["Docker-Content-Digest"] == digest
            async for chunk in response.aiter_raw():
                if first_byte_at is None:
                    first_byte_at = trio.current_time() - started
                hasher.update(chunk)
                received += len(chunk)
        total = trio.current_time() - started
        assert received == len(data)
        assert f"sha256:{hasher.hexdigest()}" == digest
        assert first_byte_at is not None
        assert first_byte_at < 1.0
        assert total > 3.0  # it really was paced: streaming, not store-and-forward
        assert e2e.blob_gets(digest) == 1


async def test_upstream_down_serves_the_cache_and_fails_cleanly_otherwise(
    tmp_path: Path,
) -> None:
    async with lab(tmp_path, tag_ttl=0) as e2e:
        image = await pushed_image(e2e, "image", [1 * MiB, 1 * MiB])
        uncached = await pushed_image(e2e, "other", [1 * MiB])
        await pull(e2e.proxy_url, e2e.reference(image), tmp_path / "first")

        e2e.registry.stop()

        # Cached image: tag served stale (tag_ttl = 0 forces a revalidation that fails).
        again = await pull(e2e.proxy_url, e2e.reference(image), tmp_path / "again")
        assert all(again[digest] == data for digest, data in image.layers.items())
        # Not cached: a prompt, honest error.
        [missing] = uncached.layers
        async with httpx.AsyncClient() as client:
            with trio.fail_after(10):
                response = await client.get(f"{e2e.proxy_url}/v2/{REPO}/blobs/{missing}")
        assert response.status_code in (502, 504)
        assert response.json()["errors"][0]["code"] == "UNAVAILABLE"
