"""Repository scoping: knowing a digest is not access.

Content is stored once per digest, but a blob or manifest is served under repository R only if
R's manifest referenced it, or the upstream confirmed it for R.  The fake upstream keeps some
digests private to one repository, as a real registry does for a private repository's layers.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import trio

from ..labs.fakes import FakeRegistry, digest_of, image_manifest
from ..labs.httplab import MiB, fetch, real_time_fake, running_proxy

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


async def test_cached_private_blob_is_not_served_under_another_repository(
    tmp_path: Path,
) -> None:
    fake = real_time_fake()
    data = os.urandom(1 * MiB)
    digest = fake.add_blob(data)
    fake.private[digest] = {"secret/app"}
    async with running_proxy(tmp_path, fake) as proxy, httpx.AsyncClient() as client:
        response, body = await fetch(client, proxy.blob_url(digest, "secret/app"))
        assert response.status_code == 200
        assert body == data
        await proxy.wait_stored(digest)

        stolen = await client.get(proxy.blob_url(digest, "public/app"))
        assert stolen.status_code == 404
        assert stolen.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
        head = await client.head(proxy.blob_url(digest, "public/app"))
        assert head.status_code == 404
        # The owner still gets it from the cache, without another upstream GET.
        response, body = await fetch(client, proxy.blob_url(digest, "secret/app"))
        assert body == data
        assert len(fake.blob_gets(digest)) == 1


async def test_in_flight_private_blob_is_not_joined_from_another_repository(
    tmp_path: Path,
) -> None:
    fake = FakeRegistry(chunk_delay=0.01)  # 4 MiB over 0.64 s: surely in flight
    data = os.urandom(4 * MiB)
    digest = fake.add_blob(data)
    fake.private[digest] = {"secret/app"}
    async with running_proxy(tmp_path, fake) as proxy, httpx.AsyncClient() as client:
        async with trio.open_nursery() as nursery:
            results: list[bytes] = []

            async def owner() -> None:
                results.append((await fetch(client, proxy.blob_url(digest, "secret/app")))[1])

            nursery.start_soon(owner)
            await trio.sleep(0.2)
            assert len(proxy.state.downloads) == 1
            stolen = await client.get(proxy.blob_url(digest, "public/app"))
            assert stolen.status_code == 404
        assert results == [data]
        assert len(fake.blob_gets(digest)) == 1


async def test_shared_blob_is_confirmed_once_then_served_from_cache(tmp_path: Path) -> None:
    fake = real_time_fake()
    data = os.urandom(1 * MiB)
    digest = fake.add_blob(data)  # public: every repository has it (a shared base layer)
    async with running_proxy(tmp_path, fake) as proxy, httpx.AsyncClient() as client:
        await fetch(client, proxy.blob_url(digest, "one/app"))
        await proxy.wait_stored(digest)
        for _ in range(2):
            response, body = await fetch(client, proxy.blob_url(digest, "two/app"))
            assert response.status_code == 200
            assert body == data
        heads = [r for r in fake.requests if r.method == "HEAD"]
        assert [r.url.path for r in heads] == [f"/v2/two/app/blobs/{digest}"]
        assert len(fake.blob_gets(digest)) == 1


async def test_layers_of_a_fetched_manifest_need_no_confirmation(tmp_path: Path) -> None:
    fake = real_time_fake()
    layer = os.urandom(100_000)
    layer_digest = fake.add_blob(layer)
    config_digest = fake.add_blob(b"{}")
    fake.add_manifest("two/app", "v1", image_manifest(config_digest, [layer_digest]))
    async with running_proxy(tmp_path, fake) as proxy, httpx.AsyncClient() as client:
        await fetch(client, proxy.blob_url(layer_digest, "one/app"))
        await proxy.wait_stored(layer_digest)
        manifest = await client.get(f"{proxy.url}/v2/two/app/manifests/v1")
        assert manifest.status_code == 200
        _, body = await fetch(client, proxy.blob_url(layer_digest, "two/app"))
        assert body == layer
        assert [r for r in fake.requests if r.method == "HEAD"] == []


async def test_cached_manifest_digest_is_not_served_under_another_repository(
    tmp_path: Path,
) -> None:
    fake = real_time_fake()
    body = image_manifest(digest_of(b"{}"), [])
    digest = fake.add_manifest("secret/app", "v1", body)
    fake.private[digest] = {"secret/app"}
    async with running_proxy(tmp_path, fake) as proxy, httpx.AsyncClient() as client:
        own = await client.get(f"{proxy.url}/v2/secret/app/manifests/{digest}")
        assert own.status_code == 200
        assert own.content == body
        stolen = await client.get(f"{proxy.url}/v2/public/app/manifests/{digest}")
        assert stolen.status_code == 404
        assert stolen.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"


async def test_a_blob_another_worker_fetches_is_not_served_under_another_repository(
    tmp_path: Path,
) -> None:
    """Two apps on one cache are two worker processes: following the other worker's
    download, or finding the blob it just stored, is no proof of access either."""
    fake = FakeRegistry(chunk_delay=0.01)  # 4 MiB over 0.64 s: surely in flight
    data = os.urandom(4 * MiB)
    digest = fake.add_blob(data)
    fake.private[digest] = {"secret/app"}
    async with (
        running_proxy(tmp_path, fake) as owner,
        running_proxy(tmp_path, fake) as other,
        httpx.AsyncClient() as client,
        client.stream("GET", owner.blob_url(digest, "secret/app")) as response,
    ):
        assert response.status_code == 200
        stolen = await client.get(other.blob_url(digest, "public/app"))
        assert stolen.status_code == 404
        # The owner's own repository may follow from the other worker.
        followed = await client.get(other.blob_url(digest, "secret/app"), timeout=30)
        assert followed.status_code == 200 and followed.content == data
        await response.aread()
    async with running_proxy(tmp_path, fake) as third, httpx.AsyncClient() as client:
        assert (await client.get(third.blob_url(digest, "public/app"))).status_code == 404
    assert len(fake.blob_gets(digest)) == 1
