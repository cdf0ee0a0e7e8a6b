"""Where a node reads a digest it lacks: peer, lease, take-over or upstream."""

from __future__ import annotations

import pytest

from streamsync_trio.cluster import (
    Acquire,
    FromPeer,
    FromUpstream,
    Lease,
    TakeOver,
    home,
    route,
)

A, B, C = "http://10.0.0.1:5000", "http://10.0.0.2:5000", "http://10.0.0.3:5000"
ALL = (A, B, C)


def digest_homed_at(node: str, members: tuple[str, ...] = ALL) -> str:
    return next(d for d in (f"sha256:{i:064x}" for i in range(1000)) if home(d, members) == node)


def lease(node: str, nonce: str = "00ff00ff00ff00ff") -> Lease:
    return Lease(digest=digest_homed_at(A), node_url=node, nonce=nonce)


D = digest_homed_at(A)  # A is the home of D among A, B, C


def test_a_live_holder_is_streamed_from() -> None:
    assert route(D, B, lease(C), ALL) == FromPeer(C)
    assert route(D, A, lease(C), ALL) == FromPeer(C)  # even for the home node


def test_a_dead_holder_is_taken_over() -> None:
    stale = lease(C)
    assert route(D, B, stale, (A, B)) == TakeOver(stale)
    assert route(D, B, stale, ()) == TakeOver(stale)  # our own heartbeat lapsed too


def test_a_lease_of_our_own_url_is_a_dead_process_of_ours() -> None:
    stale = lease(B)
    assert route(D, B, stale, ALL) == TakeOver(stale)


def test_without_a_holder_the_home_is_asked() -> None:
    assert route(D, B, None, ALL) == FromPeer(A)
    assert route(D, C, None, ALL) == FromPeer(A)


def test_the_home_itself_acquires() -> None:
    assert route(D, A, None, ALL) == Acquire()


def test_a_dead_home_is_skipped_for_the_next_ranked() -> None:
    nxt = home(D, (B, C))
    assert nxt is not None
    other = C if nxt == B else B
    assert route(D, nxt, None, (B, C)) == Acquire()
    assert route(D, other, None, (B, C)) == FromPeer(nxt)


def test_we_count_as_a_member_even_when_our_heartbeat_lapsed() -> None:
    # Redis lost our key for a moment: we still rank ourselves, as the others will again.
    assert route(D, A, None, (B, C)) == Acquire()


def test_a_peer_request_is_never_forwarded() -> None:
    assert route(D, B, None, ALL, asked_by_peer=True) == Acquire()
    assert route(D, B, lease(C), ALL, asked_by_peer=True) == FromUpstream()
    stale = lease(C)
    assert route(D, B, stale, (A, B), asked_by_peer=True) == TakeOver(stale)


@pytest.mark.parametrize("me", [B, C])
def test_a_peer_that_failed_us_is_avoided(me: str) -> None:
    nxt = home(D, (B, C))  # the home once A is out of the picture
    expected = Acquire() if nxt == me else FromPeer(C if me == B else B)
    assert route(D, me, None, ALL, avoid=[A]) == expected
    assert route(D, me, None, ALL, avoid=[A, B, C]) == Acquire()  # we never avoid ourselves
    # The holder is alive (it renews its lease) but does not answer us: upstream, no lease.
    assert route(D, me, lease(A), ALL, avoid=[A]) == FromUpstream()
