"""streamsync-trio prefetch against the real app (in-process hypercorn, fake upstream)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import trio

from streamsync_trio._reference import parse_digest
from streamsync_trio.ops._cli import main
from streamsync_trio.ops._prefetch import ImageRef, PrefetchError, parse_image, prefetch

from ..labs.fakes import FakeRegistry, Fault, digest_of
from ..labs.httplab import Running, real_time_fake, running_proxy

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def image(fake: FakeRegistry, repo: str, tag: str, layers: int = 2) -> list[str]:
    """An image in the fake upstream; returns its config and layer digests."""
    config_bytes = json.dumps({"os": "linux", "layers": layers, "tag": tag}).encode()
    config = fake.add_blob(config_bytes)
    digests = [fake.add_blob(os.urandom(100_000 + i)) for i in range(layers)]
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config,
            "size": len(config_bytes),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": d,
                "size": len(fake.blobs[d]),
            }
            for d in digests
        ],
    }
    fake.add_manifest(repo, tag, json.dumps(manifest).encode())
    return [config, *digests]


def multi_platform(fake: FakeRegistry, repo: str, tag: str) -> dict[str, list[str]]:
    """An index with linux/amd64 and linux/arm64; returns each platform's blobs."""
    platforms = {arch: image(fake, repo, f"{arch}-only") for arch in ("amd64", "arm64")}
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "size": len(fake.manifests[(repo, f"{arch}-only")][0]),
                "digest": digest_of(fake.manifests[(repo, f"{arch}-only")][0]),
                "platform": {"os": "linux", "architecture": arch},
            }
            for arch in platforms
        ],
    }
    fake.add_manifest(repo, tag, json.dumps(index).encode(), OCI_INDEX)
    return platforms


async def cached(proxy: Running, digests: list[str]) -> list[bool]:
    # A client has its last byte before the commit: let the downloads end first.
    await proxy.wait_idle()
    return [proxy.state.store.blob_size(parse_digest(d)) is not None for d in digests]


async def test_prefetch_warms_the_cache_for_the_chosen_platform(tmp_path: Path) -> None:
    fake = real_time_fake()
    plain = image(fake, "team/tool", "1.0")
    platforms = multi_platform(fake, "team/app", "2.0")
    async with running_proxy(tmp_path, fake) as proxy:
        outcomes = await prefetch(
            proxy.url, ["team/tool:1.0", "team/app:2.0"], "linux/arm64", quiet=True
        )
        assert [o.error for o in outcomes] == [None, None]
        assert outcomes[0].layers == 3
        assert all(await cached(proxy, plain))
        assert all(await cached(proxy, platforms["arm64"]))
        assert not any(await cached(proxy, platforms["amd64"]))


async def test_a_failing_image_does_not_stop_the_others_and_sets_the_exit_code(
    tmp_path: Path,
) -> None:
    fake = real_time_fake()
    good = image(fake, "team/good", "1")
    bad = image(fake, "team/bad", "1")
    fake.faults[bad[1]] = [Fault(corrupt_at=10)]  # the proxy aborts the body: never warmed
    async with running_proxy(tmp_path, fake, max_retries=0) as proxy:
        outcomes = await prefetch(
            proxy.url, ["team/missing:1", "team/bad:1", "Not/Valid", "team/good:1"], quiet=True
        )
        errors = [o.error for o in outcomes]
        assert errors[0] is not None and "MANIFEST_UNKNOWN" in errors[0]
        assert errors[1] is not None and "transfer failed" in errors[1]
        assert errors[2] is not None and "not an image reference" in errors[2]
        assert errors[3] is None
        assert all(await cached(proxy, good))
        code = await trio.to_thread.run_sync(
            main, ["prefetch", "--quiet", "--proxy", proxy.url, "team/good:1", "team/missing:1"]
        )
        assert code == 1
        code = await trio.to_thread.run_sync(
            main, ["prefetch", "--quiet", "--proxy", proxy.url, "team/good:1"]
        )
        assert code == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("alpine", ImageRef("alpine", "latest")),
        ("alpine:3.20", ImageRef("alpine", "3.20")),
        ("docker.io/library/alpine:3", ImageRef("library/alpine", "3")),
        ("ghcr.io/org/app:1.2", ImageRef("ghcr.io/org/app", "1.2")),
        ("localhost:5000/a/b", ImageRef("localhost:5000/a/b", "latest")),
        (f"a/b@sha256:{'c' * 64}", ImageRef("a/b", f"sha256:{'c' * 64}")),
    ],
)
def test_parse_image(text: str, expected: ImageRef) -> None:
    assert parse_image(text) == expected


@pytest.mark.parametrize("text", ["", "UPPER", "a:b:c", "a@sha256:short", "a/../b", "a b"])
def test_parse_image_rejects(text: str) -> None:
    with pytest.raises(PrefetchError):
        parse_image(text)
