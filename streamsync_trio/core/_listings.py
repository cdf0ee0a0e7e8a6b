"""Tag lists and referrers: fetched whole, checked, and served as documents of our own making.

An upstream's listing is never passed through.  Three facts make that necessary:

* The upstream names its own repository (``library/alpine``) while the client asked for ours
  (``docker.io/alpine``), and its ``Link`` header points at its own paths, maybe another host.
* Not every upstream honours ``n`` and ``last`` (Distribution 2.8 ignores both), while the
  distribution spec says the list MUST be in lexical order, MUST hold ``n`` entries when that
  many remain, and MUST be empty without a ``Link`` when ``n`` is 0.  Clients page through it.
* Whatever the upstream sends (``text/html`` with a ``<script>``, a body that is no listing),
  the client must get JSON of the promised shape, or an error.

So the proxy asks for the upstream's whole list (following the upstream's own ``Link`` pages,
within bounds of pages, bytes and entries), keeps it briefly in a cache bounded in bytes, and
answers every ``n``/``last`` (or ``artifactType``) from that one copy.  Everything here is pure
except :func:`fetch_all`, which only calls the fetch function it is given.
"""

from __future__ import annotations

import bisect
import json
import re
import sys
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import trio

from .._errors import RegistryError, upstream_timeout, upstream_unavailable
from .._reference import is_tag
from ..upstream import Passthrough

TAGS_CONTENT_TYPE = "application/json"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"

# How much of an upstream listing we are willing to collect: generous for real repositories
# (100,000 tags of 30 characters are about 3.5 MB of JSON), finite for hostile ones.  Beyond
# these bounds the client gets a 502 that says so rather than a list silently cut short.
MAX_PAGES = 100
MAX_LISTING_BYTES = 16 * 1024 * 1024  # all pages' bodies together
MAX_ENTRIES = 200_000  # tags, or referrer descriptors
LISTING_DEADLINE = 60.0  # seconds for all pages together (each request has its own bounds too)
LISTING_TTL = 10.0  # seconds a collected listing answers requests ("cached briefly")
CACHE_MAX_BYTES = 32 * 1024 * 1024  # what all cached listings may hold together

_MAX_LINK_PARAMS = 8
_MAX_LINK_PARAM_LENGTH = 1024
_LINK_RE = re.compile(r"<([^>]*)>\s*((?:;[^,<]*)*)")
_REL_NEXT_RE = re.compile(r';\s*rel\s*=\s*"?([^";]*)"?', re.IGNORECASE)
_DIGEST_RE = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
# The spec: an error's "code field MUST be one of" these.  An upstream's own 404 code is passed
# on only when it is one of them.
_SPEC_ERROR_CODES = frozenset(
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


class BadListing(ValueError):
    """The upstream's answer is not a listing of the promised shape."""


@dataclass(frozen=True, slots=True)
class Referrer:
    """One descriptor of a referrers list: its ``artifactType`` (for filtering) and its JSON."""

    artifact_type: str | None
    encoded: bytes


# -- parsing upstream answers -----------------------------------------------------------------


def _json_object(body: bytes, content_type: str | None, what: str) -> dict[str, Any]:
    media_type = (content_type or "application/json").split(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise BadListing(f"{what} came as {media_type[:100]!r}, not JSON")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise BadListing(f"{what} is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadListing(f"{what} is not a JSON object")
    return data


def parse_tags(body: bytes, content_type: str | None) -> list[str]:
    """The tags of one upstream ``tags/list`` page, ``{"name": ..., "tags": [...]}``.

    The upstream's ``name`` is not used (we report the name the client asked for).  A ``null``
    list is an empty one (some registries send it for a repository without tags).  Every entry
    must be a tag by the spec's grammar: anything else means the page is not a tag list.
    """
    data = _json_object(body, content_type, "tag list")
    tags = data.get("tags")
    if tags is None:
        return []
    if not isinstance(tags, list):
        raise BadListing("tag list has no list of tags")
    for tag in tags:
        if not isinstance(tag, str) or not is_tag(tag):
            raise BadListing(f"tag list holds an invalid tag {str(tag)[:100]!r}")
    return tags


def parse_referrers(body: bytes, content_type: str | None) -> list[Referrer]:
    """The descriptors of one upstream referrers page (an OCI image index).

    Each descriptor is checked for the fields the spec promises (``mediaType``, ``digest``,
    ``size``; ``artifactType`` and ``annotations`` typed when present) and kept as compact
    JSON, so serving a filtered list later is a join, not a re-parse.
    """
    data = _json_object(body, content_type, "referrers list")
    manifests = data.get("manifests")
    if manifests is None:
        return []
    if data.get("schemaVersion") != 2 or not isinstance(manifests, list):
        raise BadListing("referrers list is not an OCI image index")
    referrers = []
    for entry in manifests:
        if not _is_descriptor(entry):
            raise BadListing("referrers list holds an invalid descriptor")
        artifact_type = entry.get("artifactType")
        encoded = json.dumps(entry, separators=(",", ":"), ensure_ascii=False).encode()
        referrers.append(Referrer(artifact_type, encoded))
    return referrers


def _is_descriptor(entry: object) -> bool:
    if not isinstance(entry, dict):
        return False
    size = entry.get("size")
    digest = entry.get("digest")
    annotations = entry.get("annotations", {})
    return (
        isinstance(entry.get("mediaType"), str)
        and isinstance(digest, str)
        and len(digest) <= 200
        and _DIGEST_RE.fullmatch(digest) is not None
        and isinstance(size, int)
        and not isinstance(size, bool)
        and size >= 0
        and isinstance(entry.get("artifactType", ""), str)
        and isinstance(annotations, dict)
        and all(isinstance(v, str) for v in annotations.values())
    )


def next_page_params(link: str | None, path: str) -> dict[str, str] | None:
    """The query of the upstream's ``rel="next"`` page, if it names a page of ``path``.

    Only the query is taken: we always ask our own upstream, at the path we chose, so a
    ``Link`` naming another host or another repository can never send us there.
    """
    if not link:
        return None
    for match in _LINK_RE.finditer(link):
        rels = _REL_NEXT_RE.findall(match.group(2))
        if not any("next" in rel.lower().split() for rel in rels):
            continue
        parts = urlsplit(match.group(1))
        if parts.path != path:
            return None
        params = parse_qsl(parts.query, keep_blank_values=True)
        if not params or len(params) > _MAX_LINK_PARAMS:
            return None
        if any(len(k) + len(v) > _MAX_LINK_PARAM_LENGTH for k, v in params):
            return None
        return dict(params)
    return None


def upstream_not_found(body: bytes, default_code: str, message: str) -> RegistryError:
    """The 404 to pass on: the upstream's own OCI code (one of the spec's) and message when it
    sent them."""
    code, text = default_code, message
    try:
        error = json.loads(body)["errors"][0]
        if error["code"] in _SPEC_ERROR_CODES:
            code = error["code"]
            if isinstance(error.get("message"), str) and error["message"]:
                text = error["message"][:500]
    except (ValueError, LookupError, TypeError, RecursionError):
        pass
    return RegistryError(404, code, text)


async def fetch_all[T](
    fetch: Callable[[dict[str, str]], Awaitable[Passthrough]],
    path: str,
    parse: Callable[[bytes, str | None], list[T]],
    *,
    upstream: str,
    not_found: Callable[[bytes], RegistryError],
) -> list[T]:
    """Every entry of an upstream listing, following its ``Link`` pages within the bounds.

    An upstream 404 on the first page is the answer (the repository, or the API, is not
    there); anything unusable after that is a 502 naming the upstream, and a listing whose
    pages together take longer than ``LISTING_DEADLINE`` is a 504.
    """
    with trio.move_on_after(LISTING_DEADLINE):
        return await _fetch_pages(fetch, path, parse, upstream=upstream, not_found=not_found)
    raise upstream_timeout(upstream, f"listing not complete after {LISTING_DEADLINE:.0f} s")


async def _fetch_pages[T](
    fetch: Callable[[dict[str, str]], Awaitable[Passthrough]],
    path: str,
    parse: Callable[[bytes, str | None], list[T]],
    *,
    upstream: str,
    not_found: Callable[[bytes], RegistryError],
) -> list[T]:
    entries: list[T] = []
    received = 0
    params: dict[str, str] = {}
    seen: set[tuple[tuple[str, str], ...]] = set()
    for number in range(MAX_PAGES):
        page = await fetch(params)
        if page.status == 404 and number == 0:
            raise not_found(page.body)
        if page.status != 200:
            raise upstream_unavailable(upstream, f"listing page answered {page.status}")
        received += len(page.body)
        if received > MAX_LISTING_BYTES:
            raise upstream_unavailable(upstream, f"listing larger than {MAX_LISTING_BYTES} bytes")
        try:
            entries += parse(page.body, page.headers.get("Content-Type"))
        except BadListing as exc:
            raise upstream_unavailable(upstream, str(exc)) from None
        if len(entries) > MAX_ENTRIES:
            raise upstream_unavailable(upstream, f"listing longer than {MAX_ENTRIES} entries")
        following = next_page_params(page.headers.get("Link"), path)
        key = tuple(sorted((following or {}).items()))
        if following is None or key in seen:  # no next page, or a loop
            return entries
        seen.add(key)
        params = following
    raise upstream_unavailable(upstream, f"listing has more than {MAX_PAGES} pages")


# -- answering clients ------------------------------------------------------------------------


def parse_tag_query(args: Mapping[str, str]) -> tuple[int | None, str | None]:
    """``n`` and ``last`` of a client's ``tags/list`` request; 400 when they are no such thing.

    The spec: ``n`` is an integer, ``last`` "MUST be a proper tag".
    """
    raw_n, last = args.get("n"), args.get("last")
    n: int | None = None
    if raw_n is not None and raw_n != "":
        if not raw_n.isascii() or not raw_n.isdigit() or len(raw_n) > 9:
            raise RegistryError(
                400,
                "UNSUPPORTED",
                "n must be a non-negative integer below 10^9",
                detail={"n": raw_n[:50]},
            )
        n = int(raw_n)
    if last == "":
        last = None
    if last is not None and not is_tag(last):
        raise RegistryError(400, "UNSUPPORTED", "last must be a tag", detail={"last": last[:200]})
    return n, last


def sorted_tags(tags: Sequence[str]) -> tuple[str, ...]:
    """Each tag once, in "ASCIIbetical" order (Go's ``sort.Strings``, the spec's example)."""
    return tuple(sorted(set(tags)))


def paginate(
    tags: Sequence[str], n: int | None, last: str | None
) -> tuple[Sequence[str], str | None]:
    """The page of sorted ``tags`` after ``last`` with at most ``n`` entries, and the ``last``
    of the next page (None when this page ends the list).

    ``tags`` must be sorted and unique (:func:`sorted_tags`).  ``last`` need not be in the
    list: the page starts after where it would sort.
    """
    start = bisect.bisect_right(tags, last) if last is not None else 0
    if n is None:
        return tags[start:], None
    page = tags[start : start + n]
    if n == 0 or start + n >= len(tags):
        return page, None
    return page, page[-1]


def render_tags(name: str, tags: Sequence[str]) -> bytes:
    return json.dumps({"name": name, "tags": list(tags)}).encode()


def tags_link(name: str, n: int, last: str, ns: str | None = None) -> str:
    """The ``Link`` to the next page, on the proxy, under the name the client used."""
    query = f"n={n}&last={quote(last, safe='')}"
    if ns:
        query += f"&ns={quote(ns, safe='')}"
    return f'</v2/{name}/tags/list?{query}>; rel="next"'


def render_referrers(referrers: Sequence[Referrer], artifact_type: str | None) -> bytes:
    """The referrers list as one OCI image index, filtered by ``artifactType`` if asked."""
    chosen = [
        r.encoded for r in referrers if artifact_type is None or r.artifact_type == artifact_type
    ]
    head = json.dumps({"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE})[:-1].encode()
    return head + b',"manifests":[' + b",".join(chosen) + b"]}"


def tags_size(tags: Sequence[str]) -> int:
    """Bytes a cached tag list holds: each string object and its slot in the tuple."""
    return sys.getsizeof(tags) + sum(sys.getsizeof(tag) for tag in tags)


def referrers_size(referrers: Sequence[Referrer]) -> int:
    return sys.getsizeof(referrers) + sum(
        sys.getsizeof(r) + sys.getsizeof(r.encoded) + sys.getsizeof(r.artifact_type)
        for r in referrers
    )


# -- the cache --------------------------------------------------------------------------------


class _Flight[V]:
    """One fetch in progress, and its outcome once ``done`` is set."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.value: V | None = None
        self.error: RegistryError | None = None


class ListingCache[K, V]:
    """Listings for ``ttl`` seconds, holding at most ``max_bytes`` together.

    Every entry lives equally long, so insertion order is expiry order: expired entries are
    dropped from the front on every ``get`` and ``put``, and when a new entry does not fit,
    the oldest ones go first.  An entry bigger than the whole budget is not kept at all.
    ``clock`` is trio's, so tests can move time.
    """

    def __init__(
        self,
        *,
        ttl: float = LISTING_TTL,
        max_bytes: int = CACHE_MAX_BYTES,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.ttl = ttl
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[K, tuple[float, int, V]] = OrderedDict()
        self._pending: dict[K, _Flight[V]] = {}
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> V | None:
        self.expire()
        entry = self._entries.get(key)
        return entry[2] if entry is not None else None

    def put(self, key: K, value: V, size: int) -> None:
        self.expire()
        self._drop(key)
        if size > self.max_bytes:
            return
        while self.bytes + size > self.max_bytes:
            self._drop(next(iter(self._entries)))
        self._entries[key] = (self._clock() + self.ttl, size, value)
        self.bytes += size

    async def get_or_fetch(
        self, key: K, fetch: Callable[[], Awaitable[V]], size: Callable[[V], int]
    ) -> V:
        """The cached value, or the one ``fetch`` returns, fetched once for concurrent callers.

        Fifty clients listing a cold repository together make one upstream listing (maybe
        many pages), not fifty.  Whoever arrives first fetches; the others wait for its
        outcome and share it, the value or the error.  If the fetching request is cancelled
        (its client left), a waiting one takes over.
        """
        while True:
            cached = self.get(key)
            if cached is not None:
                return cached
            flight = self._pending.get(key)
            if flight is None:
                break
            await flight.done.wait()
            if flight.error is not None:
                error = flight.error
                raise RegistryError(error.status, error.code, error.message, headers=error.headers)
            if flight.value is not None:
                return flight.value
        flight = _Flight[V]()
        self._pending[key] = flight
        try:
            flight.value = await fetch()
        except RegistryError as exc:
            flight.error = exc
            raise
        finally:
            del self._pending[key]
            flight.done.set()
        self.put(key, flight.value, size(flight.value))
        return flight.value

    def expire(self) -> None:
        now = self._clock()
        while self._entries:
            key, (expires, _, _) = next(iter(self._entries.items()))
            if expires > now:
                return
            self._drop(key)

    def _drop(self, key: K) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry[1]

    async def expire_periodically(self) -> None:
        """Drop entries as they expire, even when no listing request comes to do it: a
        burst of listings must not hold its memory until the next one (a background task)."""
        while True:
            await trio.sleep(self.ttl)
            self.expire()
