from __future__ import annotations

from pathlib import Path

import pytest
import trio.testing

from streamsync_trio import Config, UpstreamConfig

from .fakes import FakeRegistry

UPSTREAM = "registry.fake.test"


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    """pytest-trio's autojump clock, but patient with worker threads.

    The core writes, hashes and reads files in worker threads.  With a zero threshold the
    clock jumps to the next deadline whenever every task waits, including while a thread is
    busy (trio #456), so virtual time would race ahead of disk I/O and timings would depend on
    the machine.  10 ms of real idleness before a jump keeps virtual timings exact.
    """
    return trio.testing.MockClock(autojump_threshold=0.01)


@pytest.fixture
def fake() -> FakeRegistry:
    return FakeRegistry()


def make_config(root: Path, **upstream: object) -> Config:
    """A config with one default upstream at the fake registry."""
    settings: dict[str, object] = {
        "name": UPSTREAM,
        "url": f"https://{UPSTREAM}",
        "default": True,
        "read_timeout": 5.0,
    }
    settings.update(upstream)
    return Config(
        storage_root=root,
        chunk_size=256 * 1024,
        upstreams=(UpstreamConfig(**settings),),  # type: ignore[arg-type]
    )
