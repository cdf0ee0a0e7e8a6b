"""Upstream credentials never leak: not to logs, not to clients, not to other hosts."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import httpx
import pytest

from ..labs.fakes import FakeRegistry
from ..labs.httplab import fetch, running_proxy

PASSWORD = "s3cr3t-pa55word-XYZ"


async def test_credentials_and_tokens_never_reach_logs_clients_or_other_hosts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("UPSTREAM_PASSWORD", PASSWORD)
    fake = FakeRegistry(auth="bearer", credentials=("robot", PASSWORD), redirect_blobs=True)
    data = os.urandom(300_000)
    digest = fake.add_blob(data)
    async with (
        running_proxy(tmp_path, fake, username="robot", password_env="UPSTREAM_PASSWORD") as proxy,
        httpx.AsyncClient() as client,
    ):
        response, body = await fetch(client, proxy.blob_url(digest))
        assert response.status_code == 200
        assert body == data
        missing = await client.get(f"{proxy.url}/v2/library/app/manifests/nope")
        assert missing.status_code == 404

        # What the clients saw: no secret in any header or body.
        for text in (str(response.headers), str(missing.headers) + missing.text):
            assert PASSWORD not in text
            assert "tok-" not in text

    # The realm got the basic credentials; the registry got the token; the CDN got nothing.
    token_requests = [r for r in fake.requests if r.url.host == "auth.fake.test"]
    assert token_requests
    assert all(r.headers["Authorization"].startswith("Basic ") for r in token_requests)
    cdn_requests = [r for r in fake.requests if r.url.host == "cdn.fake.test"]
    assert cdn_requests
    assert all("Authorization" not in r.headers for r in cdn_requests)
    registry_requests = [r for r in fake.requests if r.url.host == "registry.fake.test"]
    assert any(r.headers.get("Authorization", "").startswith("Bearer ") for r in registry_requests)

    # Nothing that was logged, at any level, contains the password or a token.
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert PASSWORD not in logged
    assert "tok-" not in logged
    assert "robot:" not in logged
