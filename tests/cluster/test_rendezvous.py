"""Rendezvous hashing: a membership change moves only the digests it must, about 1/N."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest

from streamsync_trio.cluster import home, ranked, weight

DIGESTS = [f"sha256:{hashlib.sha256(str(i).encode()).hexdigest()}" for i in range(10_000)]


def nodes(n: int) -> list[str]:
    return [f"http://10.0.0.{i}:5000" for i in range(1, n + 1)]


def homes(members: list[str]) -> dict[str, str | None]:
    return {digest: home(digest, members) for digest in DIGESTS}


def test_no_members_no_home() -> None:
    assert home(DIGESTS[0], []) is None
    assert ranked(DIGESTS[0], []) == []


def test_home_is_the_first_ranked_and_independent_of_order() -> None:
    members = nodes(5)
    for digest in DIGESTS[:200]:
        order = ranked(digest, members)
        assert sorted(order) == sorted(members)
        assert home(digest, members) == order[0] == home(digest, reversed(members))
        assert ranked(digest, [*members, members[0]]) == order  # duplicates count once


def test_weight_is_stable_across_processes() -> None:
    # A fixed value: Python's hash() is salted per process, which would break agreement
    # between nodes; BLAKE2b of the same bytes is the same everywhere.
    expected = hashlib.blake2b(b"http://a:1\0sha256:x", digest_size=8).digest()
    assert weight("http://a:1", "sha256:x") == int.from_bytes(expected, "big")


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_digests_spread_evenly(n: int) -> None:
    counts = Counter(homes(nodes(n)).values())
    assert len(counts) == n
    for count in counts.values():
        assert abs(count - len(DIGESTS) / n) < 0.1 * len(DIGESTS) / n + 100


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_removing_a_member_moves_only_its_digests(n: int) -> None:
    members = nodes(n)
    before = homes(members)
    gone = members[n // 2]
    after = homes([m for m in members if m != gone])
    moved = [d for d in DIGESTS if before[d] != after[d]]
    # Exactly the removed member's digests move, and nothing else: never between survivors.
    assert all(before[d] == gone for d in moved)
    assert len(moved) == sum(1 for d in DIGESTS if before[d] == gone)
    assert abs(len(moved) / len(DIGESTS) - 1 / n) < 0.02


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_adding_a_member_moves_only_digests_to_it(n: int) -> None:
    members = nodes(n)
    before = homes(members)
    new = "http://10.0.1.1:5000"
    after = homes([*members, new])
    moved = [d for d in DIGESTS if before[d] != after[d]]
    assert all(after[d] == new for d in moved)  # never from one old member to another
    assert abs(len(moved) / len(DIGESTS) - 1 / (n + 1)) < 0.02


def test_modulo_hashing_would_move_most_digests() -> None:
    # The comparison the design makes (zot hashes modulo the member count): the same change
    # from 4 to 5 members remaps about 80 % of digests there, about 20 % here.
    def modulo(digest: str, count: int) -> int:
        return int(digest[7:23], 16) % count

    moved_modulo = sum(1 for d in DIGESTS if modulo(d, 4) != modulo(d, 5))
    before, after = homes(nodes(4)), homes([*nodes(4), "http://10.0.1.1:5000"])
    moved_rendezvous = sum(1 for d in DIGESTS if before[d] != after[d])
    assert moved_modulo > 0.7 * len(DIGESTS)
    assert moved_rendezvous < 0.25 * len(DIGESTS)
