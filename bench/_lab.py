"""A loopback lab for benchmarks: a real upstream registry, a WAN stand-in, and the proxy.

* ``docker-registry`` (CNCF Distribution) with filesystem storage: the upstream.
* nginx in front of it, limiting each connection to a rate (``limit_rate``), with an access
  log of bytes sent: the WAN link, and the meter of upstream bytes.
* streamsync-trio started exactly as the README says (hypercorn + hypercorn.toml).

Every process is started here, listens on 127.0.0.1 on a port chosen free at run time, and is
stopped through the PID we hold.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # the test CA comes from the tests' labs
from tests.labs.wirelab import Certificates as TestCA  # noqa: E402
from tests.labs.wirelab import make_ca  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        sys.exit(
            f"bench: missing {', '.join(missing)}; install with: "
            "apt-get install -y docker-registry skopeo nginx-light"
        )


def wait_http(url: str, timeout: float = 20.0, ca: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(url, timeout=1.0, verify=str(ca) if ca else True)
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextlib.contextmanager
def process(args: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[int]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
    try:
        yield proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Upstream:
    registry_url: str  # direct
    wan_url: str  # through nginx, rate limited
    access_log: Path

    def upstream_bytes(self, path_fragment: str = "/blobs/") -> int:
        """Bytes nginx sent for GETs whose path contains ``path_fragment``."""
        total = 0
        for line in self.access_log.read_text().splitlines():
            method, path, _status, sent = line.split(" ")
            if path_fragment in path and method == "GET":
                total += int(sent)
        return total


@contextlib.contextmanager
def upstream(workdir: Path, rate: str) -> Iterator[Upstream]:
    """Distribution behind nginx limiting each connection to ``rate`` (nginx syntax: 40m)."""
    registry_port, wan_port = free_port(), free_port()
    (workdir / "registry").mkdir(parents=True, exist_ok=True)
    registry_config = workdir / "registry.yml"
    registry_config.write_text(
        "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {workdir / 'registry'}\n"
        f"http:\n  addr: 127.0.0.1:{registry_port}\n"
    )
    access_log = workdir / "nginx-access.log"
    access_log.write_text("")
    nginx_config = workdir / "nginx.conf"
    nginx_config.write_text(
        f"""
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    log_format bytes '$request_method $request_uri $status $body_bytes_sent';
    access_log {access_log} bytes;
    client_body_temp_path {workdir}/nginx-body;
    proxy_temp_path {workdir}/nginx-proxy;
    fastcgi_temp_path {workdir}/nginx-fastcgi;
    uwsgi_temp_path {workdir}/nginx-uwsgi;
    scgi_temp_path {workdir}/nginx-scgi;
    client_max_body_size 0;
    server {{
        listen 127.0.0.1:{wan_port};
        location / {{
            proxy_pass http://127.0.0.1:{registry_port};
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_max_temp_file_size 0;
            limit_rate {rate};
        }}
    }}
}}
"""
    )
    with (
        process(["docker-registry", "serve", str(registry_config)], workdir / "registry.log"),
        process(["nginx", "-c", str(nginx_config), "-p", str(workdir)], workdir / "nginx.log"),
    ):
        registry_url = f"http://127.0.0.1:{registry_port}"
        wan_url = f"http://127.0.0.1:{wan_port}"
        wait_http(registry_url + "/v2/")
        wait_http(wan_url + "/v2/")
        yield Upstream(registry_url, wan_url, access_log)


def push_blob(registry_url: str, repo: str, size: int) -> str:
    """Upload a random blob of ``size`` bytes (monolithic upload) and return its digest."""
    return push_bytes(registry_url, repo, os.urandom(size))


def push_bytes(registry_url: str, repo: str, data: bytes) -> str:
    """Upload ``data`` as a blob (monolithic upload) and return its digest."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with httpx.Client(base_url=registry_url, timeout=120) as client:
        start = client.post(f"/v2/{repo}/blobs/uploads/")
        start.raise_for_status()
        location = start.headers["Location"]
        # The Location carries upload state in its query: append, do not replace.
        separator = "&" if "?" in location else "?"
        put = client.put(f"{location}{separator}digest={digest}", content=data)
        put.raise_for_status()
    return digest


@dataclass
class Proxy:
    url: str
    pid: int
    cache: Path


@contextlib.contextmanager
def proxy(
    workdir: Path,
    upstream_url: str,
    *,
    chunk_size: int = 1024 * 1024,
    workers: int = 1,
    env: dict[str, str] | None = None,
    client_tls: TestCA | None = None,
) -> Iterator[Proxy]:
    """streamsync-trio in front of ``upstream_url``; ``env`` adds to its environment (an
    HTTPS upstream signed by a test CA is trusted through ``SSL_CERT_FILE``, as httpx and the
    blob reader read it).  With ``client_tls`` it serves HTTPS with that CA's certificate
    (the repo's hypercorn.toml plus ``certfile``/``keyfile``)."""
    port = free_port()
    name = upstream_url.split("://", 1)[-1]
    cache = workdir / f"proxy-cache-{port}"
    config = workdir / f"streamsync-{port}.toml"
    config.write_text(
        f'[storage]\nroot = "{cache}"\n[stream]\nchunk_size = {chunk_size}\n'
        f'[log]\nlevel = "warning"\n'
        f'[[upstream]]\nname = "{name}"\nurl = "{upstream_url}"\ndefault = true\n'
    )
    env = {**os.environ, **(env or {}), "STREAMSYNC_CONFIG": str(config)}
    # The README's way: one process, hypercorn's trio server, the repo's hypercorn.toml.
    args = [sys.executable, "-m", "streamsync_trio", "serve", "--bind", f"127.0.0.1:{port}"]
    args += ["--workers", str(workers)]
    scheme = "http"
    if client_tls is not None:
        hypercorn = workdir / f"hypercorn-{port}.toml"
        hypercorn.write_text(
            (REPO_ROOT / "hypercorn.toml").read_text()
            + f'certfile = "{client_tls.cert}"\nkeyfile = "{client_tls.key}"\n'
        )
        args += ["--hypercorn-config", str(hypercorn)]
        scheme = "https"
    with process(args, workdir / "proxy.log", env) as pid:
        url = f"{scheme}://127.0.0.1:{port}"
        wait_http(url + "/v2/", ca=client_tls.ca if client_tls else None)
        yield Proxy(url, pid, cache)


def tree_memory_bytes(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process and all its descendants, summed, from /proc."""
    rss = pss = 0
    for member in _tree(pid):
        try:
            for line in Path(f"/proc/{member}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
        except OSError:
            continue
    return rss, pss


@contextlib.contextmanager
def distribution_proxy(
    workdir: Path, upstream_url: str, env: dict[str, str] | None = None
) -> Iterator[Proxy]:
    """CNCF Distribution itself in pull-through proxy mode: the mirror users already know.

    Each start gets a cache of its own (cold); Go reads ``SSL_CERT_FILE`` from ``env`` too."""
    port = free_port()
    cache = workdir / f"distribution-cache-{port}"
    config = workdir / "distribution-proxy.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {cache}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
        f"proxy:\n  remoteurl: {upstream_url}\n"
    )
    args = ["docker-registry", "serve", str(config)]
    full_env = {**os.environ, **(env or {})}
    with process(args, workdir / f"distribution-proxy-{port}.log", full_env) as pid:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/v2/")
        yield Proxy(url, pid, cache)


def recycle_pages(workdir: Path, size: int) -> None:
    """Write ``size`` bytes to a scratch file in ``workdir`` and delete it, so that the next
    ``size`` bytes a mirror caches land in pages the machine has just freed.

    On a VM whose balloon reports free pages to the host (virtio_balloon here), the first
    touch of a page the host took back costs the guest a fault to the hypervisor: writing
    256 MiB to a new file measured 0.33-0.41 GB/s and 2.5-3.0 CPU s/GB, the same write
    right after a delete 4.4-4.9 GB/s and 0.2 CPU s/GB.  A benchmark that runs mirrors one
    after the other would otherwise hand the second mirror the pages the first one's cache
    just freed, and charge the first one for the hypervisor.  Every mirror gets this before
    each measured pull, so all of them write into pages in the same state."""
    scratch = workdir / "recycle-pages.tmp"
    piece = b"\0" * (1 << 20)
    with open(scratch, "wb") as out:
        for _ in range(0, size, len(piece)):
            out.write(piece)
    scratch.unlink()


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its live descendants (and their reaped children)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for member in _tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # utime, stime, cutime, cstime are fields 14-17 of stat; index 11-14 after the name.
        total += sum(int(value) for value in fields[11:15]) / ticks
    return total


def _tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    members, stack = [], [pid]
    while stack:
        current = stack.pop()
        members.append(current)
        stack.extend(children.get(current, []))
    return members


def push_image(workdir: Path, registry_url: str, repo: str, layers: int, layer_size: int) -> None:
    """Build an OCI layout of random layers and copy it into the registry with skopeo."""
    layout = workdir / "image-layout"
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> tuple[str, int]:
        hexdigest = hashlib.sha256(data).hexdigest()
        (blobs / hexdigest).write_bytes(data)
        return f"sha256:{hexdigest}", len(data)

    descriptors, diff_ids = [], []
    for index in range(layers):
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w") as tar:
            info = tarfile.TarInfo(f"layer{index}")
            info.size = layer_size
            tar.addfile(info, io.BytesIO(os.urandom(layer_size)))
        diff_ids.append("sha256:" + hashlib.sha256(raw.getvalue()).hexdigest())
        digest, size = put(gzip.compress(raw.getvalue(), compresslevel=1))
        descriptors.append(
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": digest,
                "size": size,
            }
        )
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    ).encode()
    config_digest, config_size = put(config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config_size,
            },
            "layers": descriptors,
        }
    ).encode()
    manifest_digest, manifest_size = put(manifest)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": manifest_digest,
                        "size": manifest_size,
                        "annotations": {"org.opencontainers.image.ref.name": "v1"},
                    }
                ],
            }
        )
    )
    host = registry_url.removeprefix("http://")
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--dest-tls-verify=false",
            f"oci:{layout}:v1",
            f"docker://{host}/{repo}:v1",
        ],
        check=True,
        capture_output=True,
    )


def make_test_ca(workdir: Path) -> TestCA:
    """A throw-away CA and a server certificate it signed for 127.0.0.1 (and localhost)."""
    return make_ca(workdir / "tls", ["IP:127.0.0.1", "DNS:localhost"])


@contextlib.contextmanager
def fast_upstream(workdir: Path, tls: TestCA | None = None) -> Iterator[str]:
    """Distribution on loopback with nothing in between (no nginx, no rate limit); with
    ``tls`` it serves HTTPS with the test CA's certificate.  Two of these may share one
    storage root: push through the plain one, read through either.  Yields its URL."""
    port = free_port()
    (workdir / "registry").mkdir(parents=True, exist_ok=True)
    scheme = "https" if tls else "http"
    config = workdir / f"registry-{scheme}.yml"
    tls_section = f"  tls:\n    certificate: {tls.cert}\n    key: {tls.key}\n" if tls else ""
    config.write_text(
        "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {workdir / 'registry'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n{tls_section}"
    )
    with process(["docker-registry", "serve", str(config)], workdir / f"registry-{scheme}.log"):
        url = f"{scheme}://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(url + "/v2/", timeout=1.0, verify=str(tls.ca) if tls else True)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield url
