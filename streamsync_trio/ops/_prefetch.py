"""``streamsync-trio prefetch``: pull images through a running proxy to warm its cache.

It is an ordinary registry client of the proxy: it resolves each image's manifest (choosing
the requested platform from an index), then reads the config and every layer through the
proxy, verifying each digest as the bytes arrive, so a layer counts as warmed only if the
proxy really served it whole and correct.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from .._reference import is_host_like
from ..core import DEFAULT_ACCEPT

INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
_NAME = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_REFERENCE_RE = re.compile(
    rf"(?P<name>(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?{_NAME}(?:/{_NAME})*)"
    r"(?::(?P<tag>[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}))?"
    r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?"
)
LAYERS_AT_ONCE = 4


class PrefetchError(Exception):
    """One image could not be warmed; the message says why."""


@dataclass(frozen=True)
class ImageRef:
    path: str  # what follows /v2/ on the proxy (host prefix kept, docker.io dropped)
    reference: str  # tag or digest

    @property
    def display(self) -> str:
        separator = "@" if self.reference.startswith("sha256:") else ":"
        return f"{self.path}{separator}{self.reference}"


def parse_image(text: str) -> ImageRef:
    """Docker's reference rules: ``alpine``, ``ghcr.io/org/app:1.2``, ``name@sha256:...``."""
    match = _REFERENCE_RE.fullmatch(text)
    if match is None:
        raise PrefetchError(f"{text!r} is not an image reference")
    name = match["name"]
    first, _, rest = name.partition("/")
    if rest and is_host_like(first):
        if first in ("docker.io", "index.docker.io", "registry-1.docker.io"):
            name = rest  # the proxy's default upstream serves Docker Hub names bare
    elif first != first.lower():
        raise PrefetchError(f"{text!r} is not an image reference (names are lower case)")
    return ImageRef(name, match["digest"] or match["tag"] or "latest")


@dataclass
class Outcome:
    image: str
    layers: int = 0
    size: int = 0
    seconds: float = 0.0
    error: str | None = None


@dataclass
class Prefetcher:
    proxy: str
    platform: str  # "os/arch[/variant]" or "all"
    progress: Progress | None
    client: httpx.AsyncClient = field(init=False)

    async def manifest(self, path: str, reference: str) -> tuple[dict[str, Any], str]:
        response = await self.client.get(
            f"/v2/{path}/manifests/{reference}", headers={"Accept": DEFAULT_ACCEPT}
        )
        if response.status_code != 200:
            raise PrefetchError(f"manifest {reference}: {_error_text(response)}")
        try:
            document = json.loads(response.content)
        except ValueError:
            raise PrefetchError(f"manifest {reference} is not JSON") from None
        if not isinstance(document, dict):
            raise PrefetchError(f"manifest {reference} is not a JSON object")
        media_type = response.headers.get("Content-Type", "").split(";")[0]
        return document, document.get("mediaType") or media_type

    async def image(self, ref: ImageRef) -> Outcome:
        outcome = Outcome(ref.display)
        started = time.monotonic()
        try:
            document, media_type = await self.manifest(ref.path, ref.reference)
            manifests = [document]
            if media_type in INDEX_TYPES or "manifests" in document:
                manifests = []
                for child in self.platforms(document):
                    manifests.append((await self.manifest(ref.path, child))[0])
            blobs: dict[str, int] = {}
            for manifest in manifests:
                for descriptor in [manifest.get("config"), *manifest.get("layers", [])]:
                    if isinstance(descriptor, dict) and isinstance(descriptor.get("digest"), str):
                        blobs[descriptor["digest"]] = int(descriptor.get("size", 0))
            limiter = trio.CapacityLimiter(LAYERS_AT_ONCE)
            failures: list[str] = []
            async with trio.open_nursery() as nursery:
                for digest, size in blobs.items():
                    nursery.start_soon(self.blob, ref.path, digest, size, limiter, failures)
            if failures:
                raise PrefetchError("; ".join(failures))
            outcome.layers, outcome.size = len(blobs), sum(blobs.values())
        except PrefetchError as exc:
            outcome.error = str(exc)
        except httpx.HTTPError as exc:
            outcome.error = f"{type(exc).__name__}: {exc}"
        outcome.seconds = time.monotonic() - started
        return outcome

    def platforms(self, index: dict[str, Any]) -> list[str]:
        wanted = self.platform.split("/")
        chosen = []
        for entry in index.get("manifests", []):
            platform = entry.get("platform") or {}
            have = [platform.get("os"), platform.get("architecture"), platform.get("variant")]
            if self.platform == "all" or have[: len(wanted)] == wanted:
                chosen.append(entry["digest"])
        if not chosen:
            raise PrefetchError(f"no manifest for platform {self.platform}")
        return chosen if self.platform == "all" else chosen[:1]

    async def blob(
        self,
        path: str,
        digest: str,
        size: int,
        limiter: trio.CapacityLimiter,
        failures: list[str],
    ) -> None:
        async with limiter:
            task = self._task(digest, size)
            hasher = hashlib.sha256()
            received = 0
            try:
                async with self.client.stream("GET", f"/v2/{path}/blobs/{digest}") as response:
                    if response.status_code != 200:
                        await response.aread()
                        failures.append(f"{digest[:19]}: {_error_text(response)}")
                        return
                    async for chunk in response.aiter_raw():
                        hasher.update(chunk)
                        received += len(chunk)
                        self._advance(task, len(chunk))
            except httpx.HTTPError as exc:
                failures.append(f"{digest[:19]}: transfer failed ({type(exc).__name__})")
                return
            if f"sha256:{hasher.hexdigest()}" != digest:
                failures.append(f"{digest[:19]}: content does not match its digest")

    def _task(self, digest: str, size: int) -> TaskID | None:
        if self.progress is None:
            return None
        return self.progress.add_task(digest[7:19], total=size or None)

    def _advance(self, task: TaskID | None, count: int) -> None:
        if self.progress is not None and task is not None:
            self.progress.advance(task, count)


def _error_text(response: httpx.Response) -> str:
    try:
        error = response.json()["errors"][0]
        return f"{response.status_code} {error['code']}: {error['message']}"
    except (ValueError, KeyError, IndexError, TypeError):
        return f"HTTP {response.status_code}"


async def prefetch(
    proxy: str, images: list[str], platform: str = "linux/amd64", *, quiet: bool = False
) -> list[Outcome]:
    """Warm the proxy with ``images``; one outcome per image (never raises for an image)."""
    refs: list[ImageRef | Outcome] = []
    for text in images:
        try:
            refs.append(parse_image(text))
        except PrefetchError as exc:
            refs.append(Outcome(text, error=str(exc)))
    console = Console(stderr=True)
    show_bars = not quiet and console.is_terminal
    progress = (
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=console,
        )
        if show_bars
        else None
    )
    timeout = httpx.Timeout(60.0, connect=10.0)
    outcomes = []
    async with httpx.AsyncClient(base_url=proxy.rstrip("/"), timeout=timeout) as client:
        worker = Prefetcher(proxy, platform, progress)
        worker.client = client
        if progress is not None:
            progress.start()
        try:
            for ref in refs:
                outcome = ref if isinstance(ref, Outcome) else await worker.image(ref)
                outcomes.append(outcome)
                if not quiet and progress is None:
                    print(_line(outcome), file=sys.stderr)
        finally:
            if progress is not None:
                progress.stop()
    if not quiet:
        summary = Table(title="prefetch")
        for column in ("image", "blobs", "bytes", "seconds", "result"):
            summary.add_column(column)
        for o in outcomes:
            summary.add_row(
                o.image, str(o.layers), str(o.size), f"{o.seconds:.1f}", o.error or "ok"
            )
        Console().print(summary)
    return outcomes


def _line(outcome: Outcome) -> str:
    result = outcome.error or f"ok: {outcome.layers} blobs, {outcome.size} bytes"
    return f"{outcome.image}: {result}"
