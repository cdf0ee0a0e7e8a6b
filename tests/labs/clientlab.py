"""Client lab: real image shapes pushed to a real Distribution, and the real clients that pull them.

* The image builders write exact bytes with the registry HTTP API (blob upload ``POST``/``PUT``,
  manifest ``PUT`` with its ``Content-Type``), so a test knows every digest the upstream holds:
  a two-platform OCI index, the same as a Docker manifest list, a Docker v2s2 image, an OCI
  image, a 64 MiB-layer image.  Layers are real gzip'd tars holding one file, and configs carry
  the ``diff_ids`` of those tars, so every client can unpack what it pulls.
* The runners drive podman, buildah, skopeo, containerd (``ctr`` against a containerd this lab
  starts) and docker (a ``dockerd`` this lab starts), each configured with the snippet the
  README includes from ``docs/clients/``, and each with private roots, sockets and state under
  the test's tmp dir, so nothing touches the machine's own stores or daemons.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import httpx
import trio

from .proclab import REPO_ROOT, child_pids, with_signal

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MiB = 1024 * 1024
DOCKER_CLI = "/usr/bin/docker"  # Debian's docker.io client (a /usr/local/bin/docker may differ)

# The media types of a manifest's parts, per family: OCI, or Docker schema 2.
FAMILIES = {
    "oci": (OCI_INDEX, OCI_MANIFEST, OCI_CONFIG, OCI_LAYER),
    "docker": (DOCKER_LIST, DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER),
}


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Manifest:
    """One image manifest as pushed: its exact bytes and what it names."""

    data: bytes
    media_type: str
    platform: str  # "linux/amd64"
    config: bytes
    layers: tuple[bytes, ...]  # gzip'd tars

    @property
    def digest(self) -> str:
        return digest_of(self.data)

    @property
    def config_digest(self) -> str:
        return digest_of(self.config)

    def blobs(self) -> dict[str, bytes]:
        return {digest_of(blob): blob for blob in (self.config, *self.layers)}


@dataclass(frozen=True)
class Shape:
    """An image as the upstream holds it under ``library/<name>:<tag>``.

    ``top`` is what the tag points at: an index/list, or a single image manifest."""

    name: str
    tag: str
    top: bytes
    media_type: str
    children: Mapping[str, Manifest] = field(default_factory=dict)  # platform -> manifest

    @property
    def repository(self) -> str:
        return f"library/{self.name}"

    @property
    def digest(self) -> str:
        return digest_of(self.top)

    @property
    def multi(self) -> bool:
        return self.media_type in (OCI_INDEX, DOCKER_LIST)

    def blobs(self) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        for child in self.children.values():
            found.update(child.blobs())
        return found

    def child(self, platform: str = "linux/amd64") -> Manifest:
        """The manifest a client on ``platform`` ends up with (the only one, if single)."""
        if not self.multi:
            [only] = self.children.values()
            return only
        return self.children[platform]


def layer(path: str, content: bytes) -> tuple[bytes, str]:
    """A gzip'd tar with one regular file; returns (compressed bytes, diff_id)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(path)
        info.size = len(content)
        info.mode = 0o644
        info.mtime = 0
        tar.addfile(info, io.BytesIO(content))
    # compresslevel 1: the 64 MiB random layer does not shrink anyway, and it is fast.
    return gzip.compress(raw.getvalue(), compresslevel=1, mtime=0), digest_of(raw.getvalue())


def image_manifest(family: str, platform: str, sizes: list[int]) -> Manifest:
    """An image for ``platform`` with one random file per layer (so every image is unique)."""
    _, manifest_type, config_type, layer_type = FAMILIES[family]
    system, architecture = platform.split("/")
    layers, diff_ids = [], []
    for index, size in enumerate(sizes):
        compressed, diff_id = layer(f"streamsync/{architecture}-{index}.bin", os.urandom(size))
        layers.append(compressed)
        diff_ids.append(diff_id)
    config = json.dumps(
        {
            "architecture": architecture,
            "os": system,
            "config": {"Cmd": ["/bin/true"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created_by": "streamsync clientlab"} for _ in sizes],
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": {"mediaType": config_type, "digest": digest_of(config), "size": len(config)},
            "layers": [
                {"mediaType": layer_type, "digest": digest_of(blob), "size": len(blob)}
                for blob in layers
            ],
        },
        indent=3,  # as Docker and Distribution write them; clients must keep the exact bytes
    ).encode()
    return Manifest(manifest, manifest_type, platform, config, tuple(layers))


def single(name: str, family: str, sizes: list[int], tag: str = "v1") -> Shape:
    child = image_manifest(family, "linux/amd64", sizes)
    return Shape(name, tag, child.data, child.media_type, {child.platform: child})


def multi(name: str, family: str, sizes: list[int], tag: str = "v1") -> Shape:
    """A linux/amd64 + linux/arm64 index (OCI) or manifest list (Docker)."""
    list_type = FAMILIES[family][0]
    children = {p: image_manifest(family, p, sizes) for p in ("linux/amd64", "linux/arm64")}
    top = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": list_type,
            "manifests": [
                {
                    "mediaType": child.media_type,
                    "digest": child.digest,
                    "size": len(child.data),
                    "platform": {
                        "architecture": platform.split("/")[1],
                        "os": platform.split("/")[0],
                    },
                }
                for platform, child in children.items()
            ],
        },
        indent=3,
    ).encode()
    return Shape(name, tag, top, list_type, children)


def standard_shapes(prefix: str = "") -> list[Shape]:
    """The matrix's five shapes; ``prefix`` keeps names apart when several sets share a registry."""
    small = [4096, 64 * 1024]
    return [
        multi(f"{prefix}ociindex", "oci", small),
        multi(f"{prefix}dockerlist", "docker", small),
        single(f"{prefix}dockerv2", "docker", small),
        single(f"{prefix}ociimage", "oci", small),
        single(f"{prefix}big", "oci", [64 * MiB]),
    ]


async def push_shape(client: httpx.AsyncClient, registry_url: str, shape: Shape) -> None:
    """Push every blob, every child manifest by digest, then the top manifest by tag."""
    repository = shape.repository
    for digest, blob in shape.blobs().items():
        await push_blob(client, registry_url, repository, digest, blob)
    for child in shape.children.values():
        await push_manifest(
            client, registry_url, repository, child.digest, child.data, child.media_type
        )
    await push_manifest(client, registry_url, repository, shape.tag, shape.top, shape.media_type)


async def push_blob(
    client: httpx.AsyncClient, registry_url: str, repository: str, digest: str, blob: bytes
) -> None:
    started = await client.post(f"{registry_url}/v2/{repository}/blobs/uploads/")
    assert started.status_code == 202, started.text
    location = httpx.URL(registry_url).join(started.headers["Location"])
    done = await client.put(
        location.copy_merge_params({"digest": digest}),
        content=blob,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert done.status_code == 201, done.text


async def push_manifest(
    client: httpx.AsyncClient,
    registry_url: str,
    repository: str,
    reference: str,
    data: bytes,
    media_type: str,
) -> None:
    response = await client.put(
        f"{registry_url}/v2/{repository}/manifests/{reference}",
        content=data,
        headers={"Content-Type": media_type},
    )
    assert response.status_code == 201, response.text
    assert response.headers["Docker-Content-Digest"] == digest_of(data)


# ---------------------------------------------------------------------------------------------
# The clients.


DOCS = REPO_ROOT / "docs" / "clients"
PLACEHOLDER = "mirror:5000"


def snippet(name: str, proxy_host: str) -> str:
    """The README's snippet ``docs/clients/<name>``, pointed at the proxy under test."""
    text = (DOCS / name).read_text()
    assert PLACEHOLDER in text, f"{name} no longer names {PLACEHOLDER}"
    return text.replace(PLACEHOLDER, proxy_host)


class ClientFailed(Exception):
    """A client command exited non-zero; the message carries its stderr."""


async def run(
    command: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 300
) -> str:
    """Run a client command to completion; its stdout, or :class:`ClientFailed`."""
    with trio.fail_after(timeout):
        result = await trio.run_process(
            list(command),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={**os.environ, **(env or {})},
        )
    if result.returncode != 0:
        error = (result.stderr or result.stdout).decode(errors="replace").strip()
        raise ClientFailed(f"`{' '.join(command)}` exited {result.returncode}: {error}")
    return result.stdout.decode()


def only(values: Iterable[str]) -> str | None:
    """The single value, or ``None`` when there are none, or all of them when several (so a
    comparison with one expected digest fails and shows them)."""
    found = sorted(set(values))
    return found[0] if len(found) == 1 else (" + ".join(found) or None)


def after_at(references: Iterable[str]) -> list[str]:
    return [reference.rsplit("@", 1)[1] for reference in references]


@dataclass(frozen=True)
class Pulled:
    """What a client says it has after a pull."""

    top: str | None  # the digest the reference resolved to (an index/list, or the image)
    image: str | None  # the image manifest it used; None when the client does not say
    config: str | None  # the image's config digest (its image ID)


class Client(Protocol):
    name: str

    async def pull(self, reference: str, platform: str | None = None) -> Pulled: ...

    async def remove(self, reference: str) -> None:
        """Remove the image and its blobs from the client's store, so the next pull is
        a full download (from the proxy)."""


@dataclass
class ContainersClient:
    """podman or buildah (containers/image + containers/storage), with a private store."""

    name: str  # "podman" | "buildah"
    root: Path
    env: dict[str, str]
    runroot: Path  # podman refuses one longer than 50 characters, so not under tmp_path

    def base(self) -> list[str]:
        storage = ["--root", str(self.root / "root"), "--runroot", str(self.runroot)]
        return [self.name, *storage, "--storage-driver", "vfs"]

    async def pull(self, reference: str, platform: str | None = None) -> Pulled:
        options = ["--platform", platform] if platform else []
        await run([*self.base(), "pull", "-q", *options, reference], env=self.env)
        if self.name == "podman":
            output = await run([*self.base(), "image", "inspect", reference], env=self.env)
            [image] = json.loads(output)
            top = image["Digest"]
            child = only(set(after_at(image["RepoDigests"])) - {top}) or top
            return Pulled(top, child, f"sha256:{image['Id']}")
        inspect = ["inspect", "--type", "image", reference]
        image = json.loads(await run([*self.base(), *inspect], env=self.env))
        listing = await run([*self.base(), "images", "--json", reference], env=self.env)
        top = only(entry["digest"] for entry in json.loads(listing))
        return Pulled(top, image["FromImageDigest"], f"sha256:{image['FromImageID']}")

    async def remove(self, reference: str) -> None:
        await run([*self.base(), "rmi", "-f", reference], env=self.env)


@dataclass
class Skopeo:
    """skopeo copies into a fresh ``dir:`` each time: it has no store to remove from."""

    root: Path
    env: dict[str, str]
    name: str = "skopeo"
    copies: int = 0

    async def pull(self, reference: str, platform: str | None = None) -> Pulled:
        self.copies += 1
        destination = self.root / f"copy{self.copies}"
        options = []
        if platform:
            system, architecture = platform.split("/")
            options = ["--override-os", system, "--override-arch", architecture]
        source = f"docker://{reference}"
        # skopeo 1.9 ignores CONTAINERS_REGISTRIES_CONF; its flag names the same file.
        conf = ["--registries-conf", self.env["CONTAINERS_REGISTRIES_CONF"]]
        await run(["skopeo", *options, "copy", *conf, source, f"dir:{destination}"])
        raw = await run(["skopeo", *options, "inspect", *conf, "--raw", source])
        manifest, config = await trio.to_thread.run_sync(verified_copy, destination)
        return Pulled(digest_of(raw.encode()), digest_of(manifest), config)

    async def remove(self, reference: str) -> None:
        # The next pull copies into a new directory; this one has been checked.
        await trio.to_thread.run_sync(shutil.rmtree, self.root / f"copy{self.copies}")


def verified_copy(destination: Path) -> tuple[bytes, str]:
    """A ``dir:`` copy's manifest and config digest, every blob in it checked."""
    manifest = (destination / "manifest.json").read_bytes()
    config = str(json.loads(manifest)["config"]["digest"])
    for path in destination.iterdir():
        if len(path.name) == 64:
            assert digest_of(path.read_bytes()) == f"sha256:{path.name}", f"{path} is corrupt"
    assert (destination / config.removeprefix("sha256:")).exists(), f"{config} not copied"
    return manifest, config


@dataclass
class Containerd:
    """``ctr`` against a containerd this lab started, resolving through ``hosts.toml``."""

    address: Path
    hosts_dir: Path
    name: str = "containerd"

    def base(self) -> list[str]:
        return ["ctr", "--address", str(self.address), "--namespace", "streamsync"]

    async def pull(self, reference: str, platform: str | None = None) -> Pulled:
        options = ["--platform", platform] if platform else []
        pull = ["images", "pull", "--hosts-dir", str(self.hosts_dir), *options, reference]
        await run([*self.base(), *pull])
        listing = await run([*self.base(), "images", "ls"])
        top = only(
            row.split()[2] for row in listing.splitlines()[1:] if row.split()[0] == reference
        )
        # An image manifest in the content store carries a gc label naming its config: after
        # a pull into an empty store, exactly the one manifest it fetched does.
        manifests, configs = [], []
        for row in (await run([*self.base(), "content", "ls"])).splitlines()[1:]:
            fields = row.split()
            label = re.search(r"containerd\.io/gc\.ref\.content\.config=(sha256:[0-9a-f]{64})", row)
            if label:
                manifests.append(fields[0])
                configs.append(label[1])
        return Pulled(top, only(manifests) or "no image manifest", only(configs))

    async def remove(self, reference: str) -> None:
        # --sync: wait for the garbage collector, which deletes the unreferenced content.
        await run([*self.base(), "images", "rm", "--sync", reference])
        left = await run([*self.base(), "content", "ls", "--quiet"])
        assert not left.split(), f"containerd kept {left.split()} after removing {reference}"


@dataclass
class Docker:
    """The ``docker`` CLI against a dockerd this lab started."""

    socket: Path
    name: str = "docker"

    def base(self) -> list[str]:
        # Debian's client, not whatever else is on PATH.
        return [DOCKER_CLI, "-H", f"unix://{self.socket}"]

    async def pull(self, reference: str, platform: str | None = None) -> Pulled:
        options = ["--platform", platform] if platform else []
        await run([*self.base(), "pull", "-q", *options, reference])
        [image] = json.loads(await run([*self.base(), "image", "inspect", reference]))
        # Docker records what the reference resolved to (the list, for a list) and no child.
        return Pulled(only(after_at(image["RepoDigests"])), None, image["Id"])

    async def remove(self, reference: str) -> None:
        await run([*self.base(), "rmi", "-f", reference])


# ---------------------------------------------------------------------------------------------
# Daemons, each private to a test: its own config, root, state, socket; stopped and cleaned up.

TOOLS = {
    "podman": ["podman"],
    "buildah": ["buildah"],
    "skopeo": ["skopeo"],
    "containerd": ["containerd", "ctr"],
    "docker": ["/usr/sbin/dockerd", DOCKER_CLI],
}
CLIENTS = tuple(TOOLS)


class DaemonUnavailable(Exception):
    """A daemon would not start here (the test skips, or fails in CI)."""


def missing_tools(kind: str) -> list[str]:
    return [tool for tool in TOOLS[kind] if shutil.which(tool) is None]


def mounts_under(directory: Path) -> list[str]:
    """Mount points at or below ``directory``, deepest first (the order to unmount them)."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == str(directory) or point.startswith(f"{directory}/"):
            found.append(point)
    return sorted(found, key=len, reverse=True)


def stop_daemon(process: subprocess.Popen[bytes], workdir: Path) -> None:
    """SIGTERM, then SIGKILL; then anything it started that outlived it (dockerd's own
    containerd), by PID; then whatever it left mounted under ``workdir``."""
    children = {pid: command_line(pid) for pid in child_pids(process.pid)}
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    for pid, command in children.items():
        if command_line(pid) == command:  # still the process it started, not a reused PID
            with_signal(pid, signal.SIGKILL)
    for point in mounts_under(workdir):
        subprocess.run(["umount", point], check=False, capture_output=True)
    for point in mounts_under(workdir):
        subprocess.run(["umount", "--lazy", point], check=False, capture_output=True)


def command_line(pid: int) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None


def spawn(command: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def log_tail(log_path: Path) -> str:
    """The errors first (dockerd's own containerd logs a lot after them), then the end."""
    text = log_path.read_text(errors="replace")
    errors = [line for line in text.splitlines() if re.search(r"level=(fatal|error)", line)]
    return "\n".join([*errors[-5:], "...", text[-1500:]])


@asynccontextmanager
async def daemon(
    command: list[str], workdir: Path, ready: list[str], name: str
) -> AsyncIterator[None]:
    """Start ``command``, wait until the ``ready`` command succeeds; after, stop it, unmount
    what it left and remove its data (``workdir``), keeping its log beside it."""
    log_path = workdir.parent / f"{name}.log"
    process = spawn(command, log_path)
    try:
        up = False
        with trio.move_on_after(60):
            while not up and process.poll() is None:
                up = await succeeds(ready)
                await trio.sleep(0 if up else 0.2)
        if not up:
            state = "exited" if process.poll() is not None else "was not ready in 60 s"
            raise DaemonUnavailable(f"{name} {state}: {log_tail(log_path)}")
        yield
    finally:
        await trio.to_thread.run_sync(stop_daemon, process, workdir)
        if not mounts_under(workdir):  # else the test fails on them; never rm -r a mount
            await trio.to_thread.run_sync(shutil.rmtree, workdir)


async def succeeds(command: list[str]) -> bool:
    try:
        await run(command, timeout=10)
    except (ClientFailed, trio.TooSlowError):
        return False
    return True


@asynccontextmanager
async def containerd(workdir: Path) -> AsyncIterator[Path]:
    """containerd with everything under ``workdir``; only what pulls need (no CRI)."""
    with short_directory("containerd") as sockets:
        async with _containerd(workdir, sockets / "containerd.sock") as address:
            yield address


@contextmanager
def short_directory(kind: str) -> Iterator[Path]:
    """A directory with a short path, for unix sockets: their paths may not exceed 104-108
    bytes, which a pytest tmp_path plus a daemon's own layout can (dockerd's containerd
    failed to start with "unix socket path too long")."""
    directory = Path(tempfile.mkdtemp(prefix=f"ss-{kind}-", dir="/tmp"))
    try:
        yield directory
    finally:
        # The daemon has stopped by now (its context is inside this one); never rm -r a mount.
        for point in mounts_under(directory):
            subprocess.run(["umount", "--lazy", point], check=False, capture_output=True)
        if not mounts_under(directory):
            shutil.rmtree(directory, ignore_errors=True)


@asynccontextmanager
async def _containerd(workdir: Path, socket_path: Path) -> AsyncIterator[Path]:
    config = workdir / "containerd.toml"
    config.write_text(
        "version = 2\n"
        f'root = "{workdir / "root"}"\nstate = "{workdir / "state"}"\n'
        f"disabled_plugins = {json.dumps(CONTAINERD_UNNEEDED)}\n"
        f'[grpc]\n  address = "{socket_path}"\n'
        f'[ttrpc]\n  address = "{socket_path}.ttrpc"\n'
        '[debug]\n  address = ""\n[metrics]\n  address = ""\n'
        f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{workdir / "opt"}"\n'
    )
    ready = ["ctr", "--address", str(socket_path), "version"]
    async with daemon(["containerd", "--config", str(config)], workdir, ready, "containerd"):
        yield socket_path


CONTAINERD_UNNEEDED = [
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
]


@asynccontextmanager
async def dockerd(workdir: Path, proxy_host: str) -> AsyncIterator[Path]:
    """dockerd configured with the README's ``daemon.json`` plus private roots and socket.

    No networking of its own (no iptables, no bridge): it only pulls.  With no system
    containerd at /run/containerd it starts its own, under ``exec-root``.  ``vfs`` because
    overlay2 needs a backing filesystem that supports it, which a CI tmp dir may not."""
    with short_directory("dockerd") as short:
        async with _dockerd(workdir, short, proxy_host) as socket_path:
            yield socket_path


@asynccontextmanager
async def _dockerd(workdir: Path, short: Path, proxy_host: str) -> AsyncIterator[Path]:
    socket_path = short / "docker.sock"
    settings = json.loads(snippet("daemon.json", proxy_host))
    settings |= {
        "data-root": str(workdir / "data"),
        # Its own containerd's sockets live under exec-root: a short path (see above).
        "exec-root": str(short / "exec"),
        "pidfile": str(workdir / "docker.pid"),
        "hosts": [f"unix://{socket_path}"],
        "iptables": False,
        "ip-forward": False,
        "ip-masq": False,
        "bridge": "none",
        "storage-driver": "vfs",
    }
    config = workdir / "daemon.json"
    config.write_text(json.dumps(settings, indent=2))
    ready = [DOCKER_CLI, "-H", f"unix://{socket_path}", "version"]
    command = ["/usr/sbin/dockerd", "--config-file", str(config)]
    async with daemon(command, workdir, ready, "dockerd"):
        yield socket_path


def prepare(kind: str, workdir: Path, proxy_host: str) -> dict[str, str]:
    """Write the client's config from the README's snippet; the environment that selects it."""
    workdir.mkdir(parents=True, exist_ok=True)
    if kind == "containerd":
        hosts = workdir / "certs.d" / "docker.io"
        hosts.mkdir(parents=True)
        (hosts / "hosts.toml").write_text(snippet("hosts.toml", proxy_host))
        (workdir / "daemon").mkdir()
        return {}
    if kind == "docker":
        (workdir / "daemon").mkdir()
        return {}
    (workdir / "registries.conf").write_text(snippet("registries.conf", proxy_host))
    # Events to a file and cgroupfs: no systemd or journald in a CI container.
    (workdir / "containers.conf").write_text(
        '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
    )
    return {
        "CONTAINERS_REGISTRIES_CONF": str(workdir / "registries.conf"),
        "CONTAINERS_CONF": str(workdir / "containers.conf"),
    }


@asynccontextmanager
async def open_client(kind: str, workdir: Path, proxy_host: str) -> AsyncIterator[Client]:
    """A ready client of ``kind`` pointed at the proxy with the README's snippet."""
    env = prepare(kind, workdir, proxy_host)
    if kind == "containerd":
        async with containerd(workdir / "daemon") as address:
            yield Containerd(address, workdir / "certs.d")
    elif kind == "docker":
        async with dockerd(workdir / "daemon", proxy_host) as socket_path:
            yield Docker(socket_path)
    elif kind == "skopeo":
        yield Skopeo(workdir, env)
    else:
        runroot = Path(tempfile.mkdtemp(prefix=f"streamsync-{kind}-"))
        try:
            yield ContainersClient(kind, workdir, env, runroot)
        finally:
            shutil.rmtree(runroot, ignore_errors=True)
            shutil.rmtree(workdir / "root", ignore_errors=True)
