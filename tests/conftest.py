from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio.testing

from streamsync_trio.core._store import Store

from .labs.fakes import UPSTREAM, FakeRegistry
from .labs.redislab import RedisServer
from .labs.wirelab import READER


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


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    """A store at the root of the configuration the CLI loads."""
    root = tmp_path / "cache"
    config = tmp_path / "streamsync.toml"
    config.write_text(
        f'[storage]\nroot = "{root}"\n\n[[upstream]]\nname = "{UPSTREAM}"\n'
        f'url = "https://{UPSTREAM}"\ndefault = true\n'
    )
    monkeypatch.setenv("STREAMSYNC_CONFIG", str(config))
    return Store(root)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server of this test's own on a free loopback port, stopped afterwards."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.get_closest_marker("both_readers"):
        metafunc.parametrize("blob_reader", ["httpx", "wire"], indirect=True)


@pytest.fixture(autouse=True)
def blob_reader(request: pytest.FixtureRequest) -> Iterator[str]:
    """The upstream blob reader of this test (``wirelab.READER``): httpx unless the test is
    marked ``both_readers``, which runs it with each."""
    READER[0] = getattr(request, "param", "httpx")
    yield READER[0]
    READER[0] = "httpx"
