from __future__ import annotations

from pathlib import Path

import pytest

from streamsync_trio import Config, UpstreamConfig

from .fakes import FakeRegistry

UPSTREAM = "registry.fake.test"


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
