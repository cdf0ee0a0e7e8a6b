"""The spec lab: content pushed to a real Distribution with the registry HTTP API, and the
targets the spec tests read it through (Distribution itself, the proxy, the proxy by prefix).

The setup pushes with plain HTTP (``POST``/``PUT`` uploads, ``PUT`` manifests), not with a
client tool, so the bytes and digests of every manifest are the test's own: an OCI image, an
OCI index of two platforms, a Docker schema 2 image, a Docker manifest list, an artifact with
a ``subject`` and the referrers tag-schema index that lists it, and a set of tags chosen to
exercise ASCII ordering (digits, upper case, ``_``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .e2elab import registry, require_tools
from .proclab import free_port, start, stop

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
SBOM_TYPE = "application/vnd.example.sbom.v1"
ALL_MANIFEST_TYPES = (OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST)

REPO = "spec/pull"
OTHER_REPO = "spec/other"  # exists, but holds none of REPO's blobs
UPSTREAM_NAME = "upstream.spec.test"  # the proxy's prefix for the Distribution upstream
EXTRA_TAGS = ("v1.0", "V2", "10", "9", "_private", "latest", "Zeta", "alpha-1")

# The spec's error codes (spec.md, "Error Codes"): "The code field MUST be one of the following"
SPEC_ERROR_CODES = frozenset(
    {
        "BLOB_UNKNOWN",
        "BLOB_UPLOAD_INVALID",
        "BLOB_UPLOAD_UNKNOWN",
        "DIGEST_INVALID",
        "MANIFEST_BLOB_UNKNOWN",
        "MANIFEST_INVALID",
        "MANIFEST_UNKNOWN",
        "NAME_INVALID",
        "NAME_UNKNOWN",
        "SIZE_INVALID",
        "UNAUTHORIZED",
        "DENIED",
        "UNSUPPORTED",
        "TOOMANYREQUESTS",
    }
)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Manifest:
    tag: str
    media_type: str
    body: bytes

    @property
    def digest(self) -> str:
        return digest_of(self.body)


@dataclass
class Content:
    """Everything pushed, as the tests expect to read it back."""

    blobs: dict[str, bytes] = field(default_factory=dict)  # digest -> bytes, all in REPO
    manifests: dict[str, Manifest] = field(default_factory=dict)  # shape -> manifest
    other_blob: str = ""  # a blob pushed to OTHER_REPO only
    big_blob: str = ""  # a layer big enough for Range requests
    subject: str = ""  # the manifest the artifact refers to
    artifact: Manifest | None = None

    @property
    def tags(self) -> list[str]:
        return [m.tag for m in self.manifests.values() if m.tag]


@dataclass(frozen=True)
class Target:
    """Where a test sends its requests, and the repository name it uses there."""

    id: str
    url: str
    prefix: str = ""  # the proxy's upstream prefix, or nothing

    def name(self, repo: str = REPO) -> str:
        return f"{self.prefix}/{repo}" if self.prefix else repo

    def v2(self, rest: str, repo: str = REPO) -> str:
        return f"{self.url}/v2/{self.name(repo)}/{rest}"


class Pusher:
    """The registry HTTP API's push side, as much of it as the setup needs."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    def blob(self, repo: str, data: bytes) -> str:
        digest = digest_of(data)
        started = self.client.post(f"/v2/{repo}/blobs/uploads/")
        assert started.status_code == 202, started.text
        location = started.headers["Location"]
        separator = "&" if "?" in location else "?"
        done = self.client.put(
            f"{location}{separator}digest={digest}",
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        assert done.status_code == 201, done.text
        return digest

    def manifest(self, repo: str, reference: str, media_type: str, body: bytes) -> None:
        answer = self.client.put(
            f"/v2/{repo}/manifests/{reference}", content=body, headers={"Content-Type": media_type}
        )
        assert answer.status_code == 201, answer.text


def _image(push: Pusher, content: Content, kind: str, arch: str, layer_sizes: list[int]) -> bytes:
    """Push an image's config and layers to REPO; return its manifest (not pushed)."""
    oci = kind == "oci"
    config = canonical({"architecture": arch, "os": "linux", "rootfs": {"type": "layers"}})
    layers = [os.urandom(size) for size in layer_sizes]
    for blob in (config, *layers):
        content.blobs[push.blob(REPO, blob)] = blob
    return canonical(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST if oci else DOCKER_MANIFEST,
            "config": {
                "mediaType": OCI_CONFIG if oci else DOCKER_CONFIG,
                "digest": digest_of(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": OCI_LAYER if oci else DOCKER_LAYER,
                    "digest": digest_of(layer),
                    "size": len(layer),
                }
                for layer in layers
            ],
        }
    )


def _index(media_type: str, children: dict[str, tuple[str, bytes]]) -> bytes:
    return canonical(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "manifests": [
                {
                    "mediaType": child_type,
                    "digest": digest_of(body),
                    "size": len(body),
                    "platform": {"architecture": arch, "os": "linux"},
                }
                for arch, (child_type, body) in children.items()
            ],
        }
    )


def populate(client: httpx.Client) -> Content:
    """Push the spec tests' content to the Distribution behind ``client``."""
    push = Pusher(client)
    content = Content()

    def put(shape: str, tag: str, media_type: str, body: bytes) -> Manifest:
        push.manifest(REPO, tag or digest_of(body), media_type, body)
        manifest = Manifest(tag, media_type, body)
        content.manifests[shape] = manifest
        return manifest

    oci_amd64 = put(
        "oci-image",
        "oci-image",
        OCI_MANIFEST,
        _image(push, content, "oci", "amd64", [300_000, 1000]),
    )
    content.big_blob = json.loads(oci_amd64.body)["layers"][0]["digest"]
    oci_arm64 = put("oci-arm64", "", OCI_MANIFEST, _image(push, content, "oci", "arm64", [2000]))
    children = {"amd64": (OCI_MANIFEST, oci_amd64.body), "arm64": (OCI_MANIFEST, oci_arm64.body)}
    put("oci-index", "oci-index", OCI_INDEX, _index(OCI_INDEX, children))
    v2_amd64 = put(
        "docker-v2s2",
        "docker-v2s2",
        DOCKER_MANIFEST,
        _image(push, content, "docker", "amd64", [3000]),
    )
    v2_arm64 = put(
        "docker-arm64", "", DOCKER_MANIFEST, _image(push, content, "docker", "arm64", [4000])
    )
    children = {
        "amd64": (DOCKER_MANIFEST, v2_amd64.body),
        "arm64": (DOCKER_MANIFEST, v2_arm64.body),
    }
    put("docker-list", "docker-list", DOCKER_LIST, _index(DOCKER_LIST, children))
    for tag in EXTRA_TAGS:
        put(f"tag:{tag}", tag, OCI_MANIFEST, oci_amd64.body)
    _artifact(push, content, oci_amd64)
    push.manifest(OTHER_REPO, "only", OCI_MANIFEST, _other_image(push, content))
    return content


def _artifact(push: Pusher, content: Content, subject: Manifest) -> None:
    """An SBOM whose ``subject`` is the OCI image, and the referrers tag-schema index that a
    client pushes for it where the registry has no referrers API (spec: "Referrers Tag
    Schema")."""
    empty = b"{}"
    sbom = canonical({"spdxVersion": "SPDX-2.3"})
    for blob in (empty, sbom):
        content.blobs[push.blob(REPO, blob)] = blob
    body = canonical(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": SBOM_TYPE,
            "config": {"mediaType": OCI_EMPTY, "digest": digest_of(empty), "size": 2},
            "layers": [
                {"mediaType": SBOM_TYPE + "+json", "digest": digest_of(sbom), "size": len(sbom)}
            ],
            "subject": {
                "mediaType": OCI_MANIFEST,
                "digest": subject.digest,
                "size": len(subject.body),
            },
        }
    )
    push.manifest(REPO, digest_of(body), OCI_MANIFEST, body)
    content.artifact = Manifest("", OCI_MANIFEST, body)
    content.subject = subject.digest
    fallback = canonical(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": digest_of(body),
                    "size": len(body),
                    "artifactType": SBOM_TYPE,
                }
            ],
        }
    )
    tag = subject.digest.replace(":", "-")
    push.manifest(REPO, tag, OCI_INDEX, fallback)
    content.manifests["referrers-tag"] = Manifest(tag, OCI_INDEX, fallback)


def _other_image(push: Pusher, content: Content) -> bytes:
    config = canonical({"architecture": "amd64", "os": "linux", "other": True})
    content.other_blob = push.blob(OTHER_REPO, config)
    return canonical(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": content.other_blob, "size": len(config)},
            "layers": [],
        }
    )


@dataclass
class SpecLab:
    registry_url: str
    proxy_url: str
    content: Content

    def targets(self) -> dict[str, Target]:
        return {
            "distribution": Target("distribution", self.registry_url),
            "proxy": Target("proxy", self.proxy_url),
            "proxy-prefixed": Target("proxy-prefixed", self.proxy_url, UPSTREAM_NAME),
        }


def _wait_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{url}/v2/", timeout=1)
            return
        except httpx.TransportError:
            if process.poll() is not None:
                raise RuntimeError("the proxy exited at start") from None
            time.sleep(0.05)
    raise RuntimeError(f"the proxy at {url} did not answer within 30 s")


@contextmanager
def spec_lab(workdir: Path) -> Iterator[SpecLab]:
    """Distribution with the content pushed, and the proxy (as the README starts it) in front."""
    require_tools()
    with registry(workdir) as upstream, httpx.Client(base_url=upstream.url) as client:
        content = populate(client)
        config = workdir / "streamsync.toml"
        config.write_text(
            f'[storage]\nroot = "{workdir / "cache"}"\n'
            f'[[upstream]]\nname = "{UPSTREAM_NAME}"\nurl = "{upstream.url}"\ndefault = true\n'
        )
        port = free_port()
        process = start(workdir, port, config)
        try:
            _wait_ready(f"http://127.0.0.1:{port}", process)
            yield SpecLab(upstream.url, f"http://127.0.0.1:{port}", content)
        finally:
            (workdir / "proxy.log").write_text(stop(process))


# -- reading answers --------------------------------------------------------------------------

_LINK_RE = re.compile(r'^<([^>]+)>\s*;\s*rel="?next"?$')


def next_link(response: httpx.Response) -> str | None:
    """The target of a ``Link: <...>; rel="next"`` (RFC 5988), or None; anything else fails."""
    link = response.headers.get("Link")
    if link is None:
        return None
    match = _LINK_RE.match(link.strip())
    assert match is not None, f'Link header not of the form <url>; rel="next": {link!r}'
    return match.group(1)


def error_codes(response: httpx.Response) -> list[str] | None:
    """The codes of a JSON error body, checked against the spec's format; None if not JSON.

    Spec ("Error Codes"): a 4XX body MAY be in any format; if it is JSON, it MUST be
    ``{"errors": [{"code": ..., "message": ..., "detail": ...}]}``, the code "MUST be one of"
    the table's, and only uppercase letters and underscores.
    """
    try:
        document = response.json()
    except ValueError:
        return None
    assert isinstance(document, dict) and isinstance(document.get("errors"), list), document
    codes = []
    for error in document["errors"]:
        assert re.fullmatch(r"[A-Z_]+", error["code"]), error
        assert error["code"] in SPEC_ERROR_CODES, f"{error['code']} is not a spec error code"
        assert isinstance(error.get("message", ""), str)
        codes.append(error["code"])
    return codes
