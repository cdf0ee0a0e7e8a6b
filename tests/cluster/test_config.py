"""The ``[cluster]`` table: optional, and checked as strictly as the rest of the config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from streamsync_trio import ConfigError, load_config, parse_config
from streamsync_trio._config import CONFIG_ENV, ClusterConfig

NODE = "http://10.0.0.5:5000"
OTHER = "http://10.0.0.6:5000"


def cluster(**keys: Any) -> dict[str, Any]:
    table: dict[str, Any] = {
        "node_url": NODE,
        "members": [NODE, OTHER],
        "redis_url": "redis://redis:6379/0",
        "secret_env": "STREAMSYNC_CLUSTER_SECRET",
    }
    table.update(keys)
    return {"cluster": {k: v for k, v in table.items() if v is not None}}


def test_without_the_table_nothing_changes() -> None:
    assert parse_config({}).cluster is None


def test_defaults() -> None:
    config = parse_config(cluster()).cluster
    assert config == ClusterConfig(
        node_url=NODE,
        redis_url="redis://redis:6379/0",
        secret_env="STREAMSYNC_CLUSTER_SECRET",
        members=(NODE, OTHER),
        members_dns=None,
        placement="replicate",
        heartbeat_ttl=3.0,
        lease_ttl=15.0,
    )


def test_every_key() -> None:
    config = parse_config(
        cluster(
            node_url="https://[fd00::5]:5000/",
            members=None,
            members_dns="streamsync.cache.svc.cluster.local:5000",
            redis_url="rediss://redis.internal:6380",
            secret_env="PEER_SECRET",
            placement="shard",
            heartbeat_ttl=1.5,
            lease_ttl=20,
        )
    ).cluster
    assert config is not None
    assert config.node_url == "https://[fd00::5]:5000"  # the trailing slash goes
    assert config.members == ()
    assert config.members_dns == ("streamsync.cache.svc.cluster.local", 5000)
    assert config.redis_url == "rediss://redis.internal:6380"
    assert (config.secret_env, config.placement) == ("PEER_SECRET", "shard")
    assert (config.heartbeat_ttl, config.lease_ttl) == (1.5, 20.0)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"node_url": None}, "cluster.node_url: missing"),
        ({"node_url": "10.0.0.5:5000"}, "cluster.node_url: '10.0.0.5:5000' must be an http(s)"),
        ({"node_url": "ftp://a:1"}, "cluster.node_url"),
        ({"node_url": "http://u:p@a:1"}, "cluster.node_url: no credentials"),
        ({"node_url": "http://a:99999"}, "cluster.node_url: 'http://a:99999' has an invalid"),
        ({"node_url": "http://a:1/v2"}, "cluster.node_url: 'http://a:1/v2' must have no path"),
        ({"node_url": "http://a:1?x=1"}, "must have no path, query or fragment"),
        ({"node_url": 5000}, "cluster.node_url: expected a string, got int"),
        ({"members": None}, "cluster.members: give exactly one of members or members_dns"),
        ({"members_dns": "svc:5000"}, "give exactly one of members or members_dns"),
        ({"members": []}, "cluster.members: must not be empty"),
        ({"members": "http://a:1"}, "cluster.members: expected list, got str"),
        ({"members": [NODE, 7]}, "cluster.members[1]: expected a string, got int"),
        ({"members": [NODE, "10.0.0.6"]}, "cluster.members[1]: '10.0.0.6' must be an http(s)"),
        ({"members": [NODE, OTHER, OTHER + "/"]}, "cluster.members[2]: 'http://10.0.0.6:5000' is"),
        ({"members": [OTHER]}, "cluster.members: must include this node's node_url"),
        (
            {"members": None, "members_dns": "svc"},
            "cluster.members_dns: 'svc' must be \"name:port\"",
        ),
        ({"members": None, "members_dns": "svc:0"}, "cluster.members_dns"),
        ({"members": None, "members_dns": "svc:65536"}, "cluster.members_dns"),
        ({"members": None, "members_dns": "s_v:80"}, "cluster.members_dns"),
        ({"members": None, "members_dns": ":80"}, "cluster.members_dns"),
        ({"members": None, "members_dns": "-a.b:80"}, "cluster.members_dns"),
        ({"redis_url": None}, "cluster.redis_url: missing"),
        ({"redis_url": "http://redis:6379"}, "cluster.redis_url: 'http://redis:6379' must look"),
        ({"redis_url": "redis://"}, "cluster.redis_url"),
        ({"redis_url": "redis://r:6379/x"}, "cluster.redis_url"),
        ({"redis_url": "redis://r:6379/0?timeout=1"}, "cluster.redis_url"),
        ({"redis_url": "redis://:pw@r:6379/0"}, "cluster.redis_url: no credentials"),
        ({"secret_env": None}, "cluster.secret_env: the NAME of an environment variable"),
        ({"secret_env": "my secret"}, "cluster.secret_env: the NAME"),
        ({"secret_env": ""}, "cluster.secret_env: the NAME"),
        ({"placement": "mirror"}, 'cluster.placement: must be "replicate" or "shard"'),
        ({"placement": "Shard"}, 'cluster.placement: must be "replicate" or "shard"'),
        ({"placement": 1}, "cluster.placement"),
        ({"heartbeat_ttl": 0}, "cluster.heartbeat_ttl: must be a positive number"),
        ({"heartbeat_ttl": 0.05}, "cluster.heartbeat_ttl: must be between 0.1 and 3600"),
        ({"lease_ttl": 7200}, "cluster.lease_ttl: must be between 0.1 and 3600"),
        ({"lease_ttl": float("nan")}, "cluster.lease_ttl: must be a positive number"),
        ({"lease_ttl": True}, "cluster.lease_ttl: expected an integer or a number, got a boolean"),
        ({"lease_ttl": "15s"}, "cluster.lease_ttl: expected an integer or a number, got str"),
    ],
)
def test_errors_name_the_key(keys: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(cluster(**keys))
    assert message in str(error.value)


def test_unknown_keys_are_errors() -> None:
    with pytest.raises(ConfigError, match=r"^unknown key cluster\.member$"):
        parse_config(cluster(member=[NODE]))


def test_the_table_must_be_a_table() -> None:
    with pytest.raises(ConfigError, match=r"^cluster: expected dict, got list$"):
        parse_config({"cluster": [NODE]})


def test_the_secret_is_read_from_the_environment_not_stored() -> None:
    config = parse_config(cluster()).cluster
    assert config is not None
    assert config.secret({"STREAMSYNC_CLUSTER_SECRET": "s3cret"}) == b"s3cret"
    assert "s3cret" not in repr(config)
    for environ in ({}, {"STREAMSYNC_CLUSTER_SECRET": ""}):
        with pytest.raises(ConfigError, match=r"STREAMSYNC_CLUSTER_SECRET .* is not set or empty"):
            config.secret(environ)


TOML = f"""
[cluster]
node_url = "{NODE}"
members = ["{NODE}", "{OTHER}"]
redis_url = "redis://127.0.0.1:6379/0"
secret_env = "PEER_SECRET"
"""


@pytest.mark.parametrize("secret", [None, ""])
def test_load_config_refuses_to_start_without_the_secret(
    tmp_path: Path, secret: str | None
) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(TOML)
    environ = {CONFIG_ENV: str(path)}
    if secret is not None:
        environ["PEER_SECRET"] = secret
    with pytest.raises(ConfigError, match=r"proxy\.toml: cluster\.secret_env: .*PEER_SECRET"):
        load_config(environ)


def test_load_config_with_the_secret(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(TOML)
    config = load_config({CONFIG_ENV: str(path), "PEER_SECRET": "x"})
    assert config.cluster is not None
    assert config.cluster.members == (NODE, OTHER)
