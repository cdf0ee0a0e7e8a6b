"""Optional client authentication: htpasswd with bcrypt, Basic challenges, open probes."""

from __future__ import annotations

import base64
from pathlib import Path

import bcrypt
import httpx
import pytest

from streamsync_trio import ConfigError, parse_config
from streamsync_trio.edge._auth import Htpasswd

from ..labs.httplab import real_time_fake, running_proxy


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def htpasswd(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "htpasswd"
    path.write_text("\n".join(lines) + "\n")
    return path


def entry(user: str, password: str) -> str:
    return f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()}"


@pytest.mark.parametrize("metrics_open", [False, True])
async def test_everything_but_probes_needs_credentials_when_auth_is_on(
    tmp_path: Path, metrics_open: bool
) -> None:
    path = htpasswd(tmp_path, ["# team", entry("ci", "hunter2"), "", entry("ops", "pw")])
    settings = {"htpasswd": path, "metrics_open": metrics_open}
    async with (
        running_proxy(tmp_path, real_time_fake(), settings=settings) as proxy,
        httpx.AsyncClient(base_url=proxy.url) as client,
    ):
        for path_ in ("/v2/", "/_status", "/_status.json", "/v2/library/app/manifests/v1"):
            refused = await client.get(path_)
            assert refused.status_code == 401, path_
            assert refused.headers["WWW-Authenticate"].startswith('Basic realm="')
            assert refused.json()["errors"][0]["code"] == "UNAUTHORIZED"
        for bad in (
            basic("ci", "wrong"),
            basic("nobody", "hunter2"),
            {"Authorization": "Basic !!"},
        ):
            assert (await client.get("/v2/", headers=bad)).status_code == 401
        assert (await client.get("/v2/", headers=basic("ci", "hunter2"))).status_code == 200
        assert (await client.get("/v2/", headers=basic("ops", "pw"))).status_code == 200
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200
        metrics = await client.get("/metrics")
        assert metrics.status_code == (200 if metrics_open else 401)


async def test_auth_is_off_by_default(tmp_path: Path) -> None:
    async with running_proxy(tmp_path, real_time_fake()) as proxy, httpx.AsyncClient() as client:
        assert (await client.get(f"{proxy.url}/v2/")).status_code == 200


async def test_a_verified_header_is_not_checked_again_within_a_minute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    users = Htpasswd.load(htpasswd(tmp_path, [entry("ci", "pw")]), "r")
    calls = 0
    real_checkpw = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        nonlocal calls
        calls += 1
        return real_checkpw(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting)
    header = basic("ci", "pw")["Authorization"]
    for _ in range(5):
        assert await users.user_for(header) == "ci"
    assert calls == 1
    for _ in range(3):  # failures are never remembered
        assert await users.user_for(basic("ci", "nope")["Authorization"]) is None
    assert calls == 4


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["ci:$apr1$abc$def"], "line 1: only bcrypt"),
        (["ci:{SHA}abc="], "line 1: only bcrypt"),
        (["ci:plain"], "line 1: only bcrypt"),
        (["justtext"], "line 1: expected user:hash"),
        (["# only a comment"], "has no users"),
    ],
)
def test_bad_htpasswd_files_are_config_errors(
    tmp_path: Path, lines: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        Htpasswd.load(htpasswd(tmp_path, lines), "r")


def test_duplicate_users_and_missing_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="line 2: user 'ci' twice"):
        Htpasswd.load(htpasswd(tmp_path, [entry("ci", "a"), entry("ci", "b")]), "r")
    with pytest.raises(ConfigError, match="cannot read"):
        Htpasswd.load(tmp_path / "missing", "r")


def test_auth_config_keys() -> None:
    config = parse_config({"auth": {"htpasswd": "/etc/h", "realm": "team", "metrics_open": True}})
    assert (config.htpasswd, config.auth_realm, config.metrics_open) == (
        Path("/etc/h"),
        "team",
        True,
    )
    with pytest.raises(ConfigError, match=r"auth\.realm"):
        parse_config({"auth": {"realm": 'a"b'}})
    with pytest.raises(ConfigError, match=r"unknown key auth\.user"):
        parse_config({"auth": {"user": "x"}})
