"""Several upstreams and real client configuration, end to end.

Two real Distribution registries behind one proxy: names pick an upstream by path prefix or
by containerd's ``?ns=``, bare names go to the default. And skopeo configured the way the
README tells podman/cri-o users (a ``registries.conf`` mirror) pulls through the proxy.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from ..labs.e2elab import (
    Image,
    Relay,
    build_image,
    push,
    registry,
    require_tools,
    skopeo,
    verified_blobs,
)
from ..labs.proclab import free_port, start, stop, wait_ready

pytestmark = pytest.mark.e2e
MiB = 1024 * 1024
REPO = "team/app"


@dataclass
class TwoUpstreams:
    proxy_url: str
    registries: dict[str, str]  # upstream name -> registry URL
    relays: dict[str, Relay]  # upstream name -> the relay counting its requests


@asynccontextmanager
async def two_upstreams(tmp_path: Path) -> AsyncIterator[TwoUpstreams]:
    require_tools()
    names = ("one.registry.test", "two.registry.test")
    async with AsyncExitStack() as stack:
        registries, relays = {}, {}
        for name in names:
            workdir = tmp_path / name
            workdir.mkdir()
            running = stack.enter_context(registry(workdir))
            relay = Relay(int(running.url.rsplit(":", 1)[1]))
            await stack.enter_async_context(relay.running())
            registries[name], relays[name] = running.url, relay
        config = tmp_path / "streamsync.toml"
        config.write_text(
            f'[storage]\nroot = "{tmp_path / "cache"}"\n'
            + "".join(
                f'[[upstream]]\nname = "{name}"\nurl = "http://127.0.0.1:{relays[name].port}"\n'
                + ("default = true\n" if name == names[0] else "")
                for name in names
            )
        )
        port = free_port()
        process = start(tmp_path, port, config)
        proxy_url = f"http://127.0.0.1:{port}"
        try:
            await wait_ready(proxy_url, process)
            yield TwoUpstreams(proxy_url, registries, relays)
        finally:
            stop(process)


async def image_in(lab: TwoUpstreams, upstream: str, workdir: Path, tag: str) -> Image:
    image = await trio.to_thread.run_sync(build_image, workdir, [256 * 1024], tag)
    await push(image, lab.registries[upstream], REPO)
    return image


async def test_prefix_ns_and_default_route_to_the_right_upstream(tmp_path: Path) -> None:
    async with two_upstreams(tmp_path) as lab:
        first = await image_in(lab, "one.registry.test", tmp_path / "first", "first")
        second = await image_in(lab, "two.registry.test", tmp_path / "second", "second")
        host = lab.proxy_url.removeprefix("http://")

        # Bare name: the default upstream.
        await skopeo(
            "copy",
            "--src-tls-verify=false",
            f"docker://{host}/{REPO}:first",
            f"dir:{tmp_path / 'bare'}",
        )
        assert set(first.layers) <= set(verified_blobs(tmp_path / "bare"))
        # Path prefix: the second upstream.
        await skopeo(
            "copy",
            "--src-tls-verify=false",
            f"docker://{host}/two.registry.test/{REPO}:second",
            f"dir:{tmp_path / 'prefix'}",
        )
        assert set(second.layers) <= set(verified_blobs(tmp_path / "prefix"))
        # containerd's ?ns=: the second upstream, with the bare name in the path.
        async with httpx.AsyncClient() as client:
            response = await client.get(
                f"{lab.proxy_url}/v2/{REPO}/manifests/second",
                params={"ns": "two.registry.test"},
                headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
            )
            assert response.status_code == 200
            assert response.headers["Docker-Content-Digest"] == second.manifest_digest
            # The tag exists only on the second upstream.
            wrong = await client.get(f"{lab.proxy_url}/v2/{REPO}/manifests/second")
            assert wrong.status_code == 404

        one, two = lab.relays["one.registry.test"], lab.relays["two.registry.test"]
        assert all(one.count("GET", f"/blobs/{d}") == 1 for d in first.layers)
        assert all(two.count("GET", f"/blobs/{d}") == 1 for d in second.layers)
        assert not any(one.count("GET", f"/blobs/{d}") for d in second.layers)


async def test_skopeo_with_a_registries_conf_mirror_pulls_through_the_proxy(
    tmp_path: Path,
) -> None:
    async with two_upstreams(tmp_path) as lab:
        image = await image_in(lab, "one.registry.test", tmp_path / "image", "mirrored")
        registry_host = lab.registries["one.registry.test"].removeprefix("http://")
        proxy_host = lab.proxy_url.removeprefix("http://")
        # The README's podman/cri-o/skopeo snippet, with this lab's addresses.
        conf = tmp_path / "registries.conf"
        conf.write_text(
            f'[[registry]]\nlocation = "{registry_host}"\ninsecure = true\n'
            f'[[registry.mirror]]\nlocation = "{proxy_host}"\ninsecure = true\n'
        )
        await skopeo(
            "--registries-conf",
            str(conf),
            "copy",
            f"docker://{registry_host}/{REPO}:mirrored",
            f"dir:{tmp_path / 'out'}",
        )
        assert set(image.layers) <= set(verified_blobs(tmp_path / "out"))
        # It came through the proxy: the relay behind the proxy saw every layer once.
        relay = lab.relays["one.registry.test"]
        assert all(relay.count("GET", f"/blobs/{d}") == 1 for d in image.layers)
