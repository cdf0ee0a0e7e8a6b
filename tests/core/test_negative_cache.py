"""Upstream 404s are remembered briefly (issue 14, "Risks to close": 16,000 requests for
missing digests made 16,000 upstream requests)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from streamsync_trio import RegistryError
from streamsync_trio._reference import parse_digest
from streamsync_trio.core._negative import TTL, NegativeCache, remembering

from ..labs.corelab import REPO, STALL_TIMEOUT, Lab, drain, open_lab
from ..labs.fakes import digest_of
from ..labs.httplab import real_time_fake, running_proxy

MISSING = digest_of(b"never pushed")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def not_found(what: str = "x") -> RegistryError:
    return RegistryError(404, "BLOB_UNKNOWN", f"{what} not found", detail={"digest": what})


def test_a_404_is_remembered_as_the_same_error_until_it_expires() -> None:
    clock = Clock()
    cache: NegativeCache[str] = NegativeCache(ttl=5.0, clock=clock)
    cache.check("a")  # nothing remembered: no error
    original = not_found("a")
    cache.note("a", original)
    for _ in range(3):
        with pytest.raises(RegistryError) as caught:
            cache.check("a")
        error = caught.value
        assert error is not original  # a fresh exception each time
        assert (error.status, error.code, error.message, error.detail) == (
            404,
            "BLOB_UNKNOWN",
            "a not found",
            {"digest": "a"},
        )
        assert error.to_json() == original.to_json()
    assert cache.hits == 3
    cache.check("b")  # other keys are not affected
    clock.now += 4.9
    with pytest.raises(RegistryError):
        cache.check("a")
    clock.now += 0.1
    cache.check("a")  # expired
    assert len(cache) == 0
    assert cache.hits == 4


@pytest.mark.parametrize("status", [401, 403, 429, 500, 502, 503, 504])
def test_only_404s_are_remembered(status: int) -> None:
    cache: NegativeCache[str] = NegativeCache(clock=Clock())
    cache.note("a", RegistryError(status, "UNAVAILABLE", "no"))
    cache.check("a")
    assert len(cache) == 0


def test_the_cache_is_bounded_and_drops_the_oldest_first() -> None:
    clock = Clock()
    cache: NegativeCache[int] = NegativeCache(ttl=5.0, max_entries=3, clock=clock)
    for key in range(3):
        cache.note(key, not_found())
        clock.now += 0.1
    cache.note(0, not_found())  # noted again: now the youngest
    cache.note(3, not_found())
    assert len(cache) == 3
    cache.check(1)  # the oldest went
    for key in (0, 2, 3):
        with pytest.raises(RegistryError):
            cache.check(key)
    # Expired entries go when the cache is next used, not only when it is full.
    clock.now += 10
    cache.check(99)
    assert len(cache) == 0


async def test_remembering_asks_once_per_ttl() -> None:
    calls = 0

    async def lookup() -> int:
        nonlocal calls
        calls += 1
        raise not_found()

    cache: NegativeCache[str] = NegativeCache()
    for _ in range(10):
        with pytest.raises(RegistryError):
            await remembering(cache, "k", lookup)
    assert calls == 1
    assert cache.hits == 9

    async def found() -> int:
        return 7

    assert await remembering(cache, "other", found) == 7


# -- the blob downloads ------------------------------------------------------------------------


async def attempt(lab: Lab, repo: str = REPO) -> RegistryError | None:
    """One client's GET of ``MISSING`` through the core: the error it gets, if any (from
    ``subscribe`` itself when the 404 is remembered, else from the download)."""
    try:
        subscriber = lab.registry.subscribe(
            parse_digest(MISSING),
            partial(lab.upstream.open_blob, repo, MISSING),
            stall_timeout=STALL_TIMEOUT,
            retry=lab.retry,
            origin=(lab.upstream.name, repo),
        )
    except RegistryError as error:
        return error
    return (await drain(subscriber)).error


async def test_a_storm_for_a_missing_blob_is_one_upstream_request_per_ttl(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    async with open_lab(tmp_path) as lab:
        errors = [await attempt(lab) for _ in range(50)]
        assert {(e.status, e.code) for e in errors if e is not None} == {(404, "BLOB_UNKNOWN")}
        assert None not in errors
        assert len(lab.fake.blob_gets(MISSING)) == 1
        assert lab.registry.not_found.hits == 49
        # Expired: asked again, and the blob pushed meanwhile is found.
        await trio.sleep(TTL)
        lab.fake.blobs[MISSING] = b"never pushed"
        assert await attempt(lab) is None
        assert len(lab.fake.blob_gets(MISSING)) == 2
        await trio.testing.wait_all_tasks_blocked()


async def test_a_404_is_remembered_per_repository(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    async with open_lab(tmp_path) as lab:
        for repo in ("library/a", "library/b", "library/a", "library/b"):
            error = await attempt(lab, repo)
            assert error is not None and error.status == 404
        assert len(lab.fake.blob_gets(MISSING)) == 2


# -- over HTTP ---------------------------------------------------------------------------------


async def test_repeated_requests_for_a_missing_blob_reach_the_upstream_once(
    tmp_path: Path,
) -> None:
    fake = real_time_fake()
    async with running_proxy(tmp_path, fake) as proxy, httpx.AsyncClient() as client:
        url = proxy.blob_url(MISSING)
        first = await client.get(url)
        assert first.status_code == 404
        answers = [await client.request(method, url) for method in ["GET", "HEAD"] * 10]
        assert {a.status_code for a in answers} == {404}
        codes = {a.json()["errors"][0]["code"] for a in answers if a.request.method == "GET"}
        assert codes == {first.json()["errors"][0]["code"]}
        upstream = [r for r in fake.requests if r.url.path.endswith(f"/blobs/{MISSING}")]
        assert len(upstream) == 1
        metrics = (await client.get(f"{proxy.url}/metrics")).text
        assert 'streamsync_negative_cache_hits_total{kind="blob"} 20.0' in metrics
        # Another repository is asked for itself.
        other = await client.get(proxy.blob_url(MISSING, repo="library/other"))
        assert other.status_code == 404
        upstream = [r for r in fake.requests if r.url.path.endswith(f"/blobs/{MISSING}")]
        assert len(upstream) == 2


async def test_repeated_requests_for_a_missing_manifest_reach_the_upstream_once(
    tmp_path: Path,
) -> None:
    fake = real_time_fake()
    async with running_proxy(tmp_path, fake) as proxy, httpx.AsyncClient() as client:
        url = f"{proxy.url}/v2/library/app/manifests/no-such-tag"
        accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
        first = await client.get(url, headers=accept)
        assert first.status_code == 404
        for _ in range(10):
            again = await client.get(url, headers=accept)
            assert (again.status_code, again.json()) == (404, first.json())
        assert len(fake.manifest_requests("GET")) + len(fake.manifest_requests("HEAD")) == 1
        metrics = (await client.get(f"{proxy.url}/metrics")).text
        assert 'streamsync_negative_cache_hits_total{kind="manifest"} 10.0' in metrics
