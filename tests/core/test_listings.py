"""Tag lists and referrers (``_listings``): parsing, page following, pagination, the cache."""

from __future__ import annotations

import json
import string
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from streamsync_trio import RegistryError
from streamsync_trio.core._listings import (
    INDEX_MEDIA_TYPE,
    LISTING_DEADLINE,
    MAX_PAGES,
    BadListing,
    ListingCache,
    fetch_all,
    next_page_params,
    paginate,
    parse_referrers,
    parse_tag_query,
    parse_tags,
    render_referrers,
    render_tags,
    sorted_tags,
    tags_link,
    upstream_not_found,
)
from streamsync_trio.upstream._client import Passthrough

PATH = "/v2/library/app/tags/list"
JSON = "application/json"
DIGEST = "sha256:" + "a" * 64

# -- parsing ----------------------------------------------------------------------------------


def test_tags_are_read_and_the_upstream_name_is_ignored() -> None:
    body = json.dumps({"name": "library/app", "tags": ["v2", "v1"]}).encode()
    assert parse_tags(body, "application/json; charset=utf-8") == ["v2", "v1"]
    assert parse_tags(b'{"name":"x","tags":null}', JSON) == []
    assert parse_tags(b'{"name":"x"}', None) == []


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b'<html><script>alert(1)</script>{"tags":[]}</html>', "text/html"),
        (b'{"tags":["v1"]}', "text/html"),  # JSON in HTML clothing is still refused
        (b'{"tags":["v1"', JSON),
        (b'["v1"]', JSON),
        (b'{"tags":"v1"}', JSON),
        (b'{"tags":[1]}', JSON),
        (b'{"tags":["<script>"]}', JSON),
        (b'{"tags":["-v1"]}', JSON),
        (json.dumps({"tags": ["t" * 129]}).encode(), JSON),
        (b"[" * 100_000, JSON),  # too deep for the parser
    ],
    ids=["html", "html-type", "cut", "array", "string", "number", "script", "dash", "long", "deep"],
)
def test_what_is_no_tag_list_is_refused(body: bytes, content_type: str) -> None:
    with pytest.raises(BadListing):
        parse_tags(body, content_type)


def descriptor(artifact_type: str | None = "application/vnd.example.sbom", **extra: Any) -> Any:
    entry: dict[str, Any] = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": DIGEST,
        "size": 123,
        "annotations": {"org.example": "x"},
    }
    if artifact_type is not None:
        entry["artifactType"] = artifact_type
    entry.update(extra)
    return entry


def index(*descriptors: Any) -> bytes:
    return json.dumps(
        {"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": list(descriptors)}
    ).encode()


def test_referrers_are_read_with_their_artifact_type() -> None:
    referrers = parse_referrers(index(descriptor(), descriptor(None)), INDEX_MEDIA_TYPE)
    assert [r.artifact_type for r in referrers] == ["application/vnd.example.sbom", None]
    assert json.loads(referrers[0].encoded) == descriptor()


@pytest.mark.parametrize(
    "bad",
    [
        descriptor(size=-1),
        descriptor(size=True),
        descriptor(size="1"),
        descriptor(digest="not a digest"),
        descriptor(mediaType=None),
        descriptor(artifactType=7),
        descriptor(annotations={"a": 1}),
        "a string",
    ],
)
def test_invalid_descriptors_are_refused(bad: Any) -> None:
    with pytest.raises(BadListing):
        parse_referrers(index(descriptor(), bad), INDEX_MEDIA_TYPE)


def test_a_referrers_answer_must_be_an_index() -> None:
    with pytest.raises(BadListing):
        parse_referrers(b'{"schemaVersion":1,"manifests":[]}', INDEX_MEDIA_TYPE)
    with pytest.raises(BadListing):
        parse_referrers(index(), "text/html")


@pytest.mark.parametrize(
    ("link", "expected"),
    [
        (f'<{PATH}?last=b&n=2>; rel="next"', {"last": "b", "n": "2"}),
        (f"<{PATH}?last=b>;rel=next", {"last": "b"}),
        (f'<https://other.example{PATH}?last=b>; rel="next"', {"last": "b"}),  # host ignored
        (f'<{PATH}?last=a>; rel="prev", <{PATH}?last=c>; rel="next"', {"last": "c"}),
        ('</v2/other/repo/tags/list?last=b>; rel="next"', None),  # another repository
        (f'<{PATH}?last=b>; rel="prev"', None),
        (f'<{PATH}>; rel="next"', None),  # no query: would ask for page one again
        (f'<{PATH}?last={"x" * 2000}>; rel="next"', None),
        ("garbage", None),
        (None, None),
    ],
)
def test_next_page_params(link: str | None, expected: dict[str, str] | None) -> None:
    assert next_page_params(link, PATH) == expected


def test_an_upstream_404_keeps_its_code_when_it_has_one() -> None:
    oci = json.dumps({"errors": [{"code": "NAME_UNKNOWN", "message": "no such repo"}]})
    error = upstream_not_found(oci.encode(), "UNSUPPORTED", "fallback")
    assert (error.status, error.code, error.message) == (404, "NAME_UNKNOWN", "no such repo")
    for body in (
        b"404 page not found\n",
        b'{"errors":[{"code":"<b>"}]}',
        b'{"errors":[{"code":"NOT_FOUND","message":"not a spec code"}]}',
        b'{"errors":[{"code":["NAME_UNKNOWN"]}]}',
        b"{}",
    ):
        error = upstream_not_found(body, "UNSUPPORTED", "fallback")
        assert (error.status, error.code, error.message) == (404, "UNSUPPORTED", "fallback")


# -- following pages --------------------------------------------------------------------------


class Pages:
    """An upstream whose tag list comes in pages, each with a ``Link`` to the next."""

    def __init__(self, tags: list[str], per_page: int, *, link: str | None = None) -> None:
        self.tags = tags
        self.per_page = per_page
        self.link = link
        self.asked: list[dict[str, str]] = []

    async def __call__(self, params: dict[str, str]) -> Passthrough:
        self.asked.append(params)
        start = int(params.get("start", "0"))
        page = self.tags[start : start + self.per_page]
        headers = {"Content-Type": JSON}
        if start + self.per_page < len(self.tags):
            headers["Link"] = self.link or f'<{PATH}?start={start + self.per_page}>; rel="next"'
        return Passthrough(200, json.dumps({"name": "x", "tags": page}).encode(), headers)


def not_found(body: bytes) -> RegistryError:
    return upstream_not_found(body, "NAME_UNKNOWN", "not found")


async def test_all_pages_are_collected() -> None:
    tags = [f"t{i}" for i in range(25)]
    pages = Pages(tags, 10)
    got = await fetch_all(pages, PATH, parse_tags, upstream="up", not_found=not_found)
    assert got == tags
    assert pages.asked == [{}, {"start": "10"}, {"start": "20"}]


async def test_a_link_loop_ends_the_listing() -> None:
    pages = Pages([f"t{i}" for i in range(25)], 10, link=f'<{PATH}?start=10>; rel="next"')
    got = await fetch_all(pages, PATH, parse_tags, upstream="up", not_found=not_found)
    assert got == [f"t{i}" for i in range(20)]
    assert len(pages.asked) == 2  # page two points at itself: not asked again


async def test_endless_pages_are_refused() -> None:
    pages = Pages([f"t{i}" for i in range(MAX_PAGES + 5)], 1)
    with pytest.raises(RegistryError) as error:
        await fetch_all(pages, PATH, parse_tags, upstream="up", not_found=not_found)
    assert (error.value.status, error.value.code) == (502, "UNAVAILABLE")
    assert len(pages.asked) == MAX_PAGES


async def test_a_first_page_404_is_the_answer_and_a_later_one_a_502() -> None:
    async def missing(params: dict[str, str]) -> Passthrough:
        body = b'{"errors":[{"code":"NAME_UNKNOWN","message":"gone"}]}'
        return Passthrough(404, body, {"Content-Type": JSON})

    with pytest.raises(RegistryError) as error:
        await fetch_all(missing, PATH, parse_tags, upstream="up", not_found=not_found)
    assert (error.value.status, error.value.code) == (404, "NAME_UNKNOWN")

    pages = Pages(["a", "b"], 1)

    async def second_missing(params: dict[str, str]) -> Passthrough:
        return await (missing(params) if params else pages(params))

    with pytest.raises(RegistryError) as error:
        await fetch_all(second_missing, PATH, parse_tags, upstream="up", not_found=not_found)
    assert error.value.status == 502


async def test_a_listing_that_takes_too_long_is_a_504(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pages = Pages([f"t{i}" for i in range(50)], 1)

    async def slow(params: dict[str, str]) -> Passthrough:
        await trio.sleep(LISTING_DEADLINE / 10)  # each page in time, all of them not
        return await pages(params)

    with pytest.raises(RegistryError) as error:
        await fetch_all(slow, PATH, parse_tags, upstream="up", not_found=not_found)
    assert (error.value.status, error.value.code) == (504, "UNAVAILABLE")
    assert len(pages.asked) == 9  # the tenth page was still on its way at the deadline


async def test_a_bad_page_is_a_502_naming_the_upstream() -> None:
    async def html(params: dict[str, str]) -> Passthrough:
        return Passthrough(200, b"<script>x</script>", {"Content-Type": "text/html"})

    with pytest.raises(RegistryError) as error:
        await fetch_all(html, PATH, parse_tags, upstream="up.example", not_found=not_found)
    assert (error.value.status, error.value.code) == (502, "UNAVAILABLE")
    assert "up.example" in error.value.message


# -- answering clients ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ({}, (None, None)),
        ({"n": "0"}, (0, None)),
        ({"n": "25", "last": "v1.2"}, (25, "v1.2")),
        ({"n": "", "last": ""}, (None, None)),
        ({"last": "v1"}, (None, "v1")),
    ],
)
def test_tag_query(args: dict[str, str], expected: tuple[int | None, str | None]) -> None:
    assert parse_tag_query(args) == expected


@pytest.mark.parametrize(
    "args",
    [{"n": "-1"}, {"n": "1.5"}, {"n": "x"}, {"n": "\u0661"}, {"n": "9" * 10}, {"last": "../x"}],
)
def test_bad_tag_queries_are_400(args: dict[str, str]) -> None:
    with pytest.raises(RegistryError) as error:
        parse_tag_query(args)
    assert error.value.status == 400


def test_tags_sort_asciibetically_once_each() -> None:
    assert sorted_tags(["b", "B", "a", "_x", "10", "9", "a"]) == ("10", "9", "B", "_x", "a", "b")


TAGS = ("a", "b", "c", "d", "e")


@pytest.mark.parametrize(
    ("n", "last", "page", "next_last"),
    [
        (None, None, TAGS, None),
        (0, None, (), None),  # "When n is zero ... an empty list, and MUST NOT include a Link"
        (0, "b", (), None),
        (2, None, ("a", "b"), "b"),
        (2, "b", ("c", "d"), "d"),
        (2, "c", ("d", "e"), None),
        (5, None, TAGS, None),
        (9, None, TAGS, None),
        (None, "c", ("d", "e"), None),
        (2, "bb", ("c", "d"), "d"),  # last need not be a listed tag
        (2, "e", (), None),
        (2, "z", (), None),
    ],
)
def test_paginate(
    n: int | None, last: str | None, page: tuple[str, ...], next_last: str | None
) -> None:
    assert paginate(TAGS, n, last) == (page, next_last)


tag_text = st.text(string.ascii_letters + string.digits + "_.-", min_size=1, max_size=8).filter(
    lambda t: t[0] not in ".-"
)


@given(st.lists(tag_text, max_size=40), st.integers(min_value=1, max_value=45))
def test_walking_every_page_yields_the_sorted_list_once(tags: list[str], n: int) -> None:
    listing = sorted_tags(tags)
    walked: list[str] = []
    last: str | None = None
    for _ in range(len(listing) + 2):
        page, last = paginate(listing, n, last)
        assert len(page) == n or last is None  # fewer than n only on the last page
        walked += page
        if last is None:
            break
    assert walked == sorted(set(tags))


def test_rendered_tags_name_the_client_repository() -> None:
    assert json.loads(render_tags("docker.io/alpine", ["a"])) == {
        "name": "docker.io/alpine",
        "tags": ["a"],
    }
    assert tags_link("docker.io/alpine", 2, "v1.0") == (
        '</v2/docker.io/alpine/tags/list?n=2&last=v1.0>; rel="next"'
    )
    assert tags_link("library/alpine", 2, "b", "docker.io").endswith('&ns=docker.io>; rel="next"')


def test_rendered_referrers_are_an_index_filtered_on_request() -> None:
    sbom, sig = descriptor(), descriptor("application/vnd.example.sig")
    referrers = parse_referrers(index(sbom, sig, descriptor(None)), INDEX_MEDIA_TYPE)
    whole = json.loads(render_referrers(referrers, None))
    assert whole == {
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": [sbom, sig, descriptor(None)],
    }
    assert json.loads(render_referrers(referrers, "application/vnd.example.sig"))["manifests"] == [
        sig
    ]
    assert json.loads(render_referrers([], None))["manifests"] == []


# -- the cache --------------------------------------------------------------------------------


async def test_cache_entries_expire(autojump_clock: trio.testing.MockClock) -> None:
    cache: ListingCache[str, int] = ListingCache(ttl=10, max_bytes=100)
    cache.put("a", 1, 10)
    await trio.sleep(5)
    cache.put("b", 2, 10)
    assert (cache.get("a"), cache.get("b"), cache.bytes) == (1, 2, 20)
    await trio.sleep(6)
    assert (cache.get("a"), cache.get("b"), cache.bytes, len(cache)) == (None, 2, 10, 1)
    await trio.sleep(5)
    cache.expire()
    assert (len(cache), cache.bytes) == (0, 0)


async def test_expired_entries_leave_memory_without_another_request(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Issue 14: memory held by listings stayed after their TTL until the next request."""
    cache: ListingCache[str, int] = ListingCache(ttl=10, max_bytes=100)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cache.expire_periodically)
        cache.put("a", 1, 50)
        await trio.sleep(21)
        assert (len(cache), cache.bytes) == (0, 0)  # nobody called get or put
        nursery.cancel_scope.cancel()


async def test_cache_stays_within_its_bytes(autojump_clock: trio.testing.MockClock) -> None:
    cache: ListingCache[int, str] = ListingCache(ttl=10, max_bytes=100)
    for key in range(150):  # the 150 distinct keys
        cache.put(key, "x", 30)
        assert cache.bytes <= 100
    assert len(cache) == 3
    assert [cache.get(k) for k in (146, 147, 148, 149)] == [None, "x", "x", "x"]
    cache.put(149, "y", 40)  # replacing an entry frees its old size first
    assert (cache.bytes, cache.get(149)) == (100, "y")
    cache.put("huge", "z", 101)  # type: ignore[arg-type]
    assert cache.get("huge") is None  # type: ignore[arg-type]
    assert cache.bytes == 100


async def test_concurrent_misses_share_one_fetch(autojump_clock: trio.testing.MockClock) -> None:
    cache: ListingCache[str, tuple[str, ...]] = ListingCache(ttl=10, max_bytes=1000)
    fetches = 0

    async def fetch() -> tuple[str, ...]:
        nonlocal fetches
        fetches += 1
        await trio.sleep(1)
        return ("a", "b")

    results: list[tuple[str, ...]] = []

    async def one() -> None:
        results.append(await cache.get_or_fetch("k", fetch, len))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(one)
    assert (fetches, results) == (1, [("a", "b")] * 20)
    await cache.get_or_fetch("k", fetch, len)
    assert fetches == 1  # cached
    await trio.sleep(11)
    await cache.get_or_fetch("k", fetch, len)
    assert fetches == 2  # expired


async def test_a_failed_fetch_fails_its_waiters_too(autojump_clock: trio.testing.MockClock) -> None:
    cache: ListingCache[str, tuple[str, ...]] = ListingCache()
    fetches = 0

    async def fetch() -> tuple[str, ...]:
        nonlocal fetches
        fetches += 1
        await trio.sleep(1)
        raise RegistryError(404, "NAME_UNKNOWN", "gone")

    errors: list[tuple[int, str]] = []

    async def one() -> None:
        try:
            await cache.get_or_fetch("k", fetch, len)
        except RegistryError as exc:
            errors.append((exc.status, exc.code))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(one)
    assert (fetches, errors) == (1, [(404, "NAME_UNKNOWN")] * 5)
    assert len(cache) == 0  # failures are not cached


async def test_a_cancelled_fetch_is_taken_over(autojump_clock: trio.testing.MockClock) -> None:
    cache: ListingCache[str, tuple[str, ...]] = ListingCache()
    fetches = 0

    async def fetch() -> tuple[str, ...]:
        nonlocal fetches
        fetches += 1
        await trio.sleep(1)
        return ("x",)

    got: list[tuple[str, ...]] = []

    async def waiter() -> None:
        got.append(await cache.get_or_fetch("k", fetch, len))

    async with trio.open_nursery() as nursery:
        with trio.move_on_after(0.5):  # the first client leaves mid-fetch
            nursery.start_soon(waiter)  # starts waiting behind it
            await cache.get_or_fetch("k", fetch, len)
    assert (fetches, got) == (2, [("x",)])
