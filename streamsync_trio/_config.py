"""The public configuration contract: a TOML file, validated strictly at start.

A misspelt key in a proxy's config is worse than a crash: the operator believes a setting is
in force that is not.  So every table is checked for unknown keys and wrong types, and the
error names the key (``upstream[1].read_timeout``) so it can be fixed without guessing.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ._reference import is_registry_host

CONFIG_ENV = "STREAMSYNC_CONFIG"
DEFAULT_CONFIG_FILE = "streamsync.toml"
DEFAULT_MAX_BLOB_SIZE = 64 * 1024**3


class ConfigError(Exception):
    """The configuration cannot be used; the message names the offending key."""


@dataclass(frozen=True)
class UpstreamConfig:
    name: str
    url: str
    default: bool = False
    username: str | None = None
    password_env: str | None = None
    tag_ttl: float = 300.0
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    max_retries: int = 5  # resumptions of one blob download before its clients see the error
    max_concurrent: int = 8  # upstream requests in flight at once (a blob holds one throughout)
    max_queue: int = 256  # requests waiting for a slot; beyond that clients get 429
    # A whole manifest, token or listing response, queueing included: read_timeout only
    # bounds the gap between bytes, and a document dripping a byte at a time must not hold
    # its slot (or its client) for ever.
    document_timeout: float = 30.0
    # Docker Hub stores official images under ``library/``; clients send bare ``alpine``.
    implicit_library: bool = False
    # Bytes one blob of this upstream may have when no stored manifest declares its size;
    # None: ``[storage] max_blob_size``.
    max_blob_size: int | None = None

    @property
    def password(self) -> str | None:
        """Read at use, not at load, so the secret never sits in a config object we might log."""
        if self.password_env is None:
            return None
        return os.environ.get(self.password_env)

    def __repr__(self) -> str:  # no credentials in reprs, ever
        return f"UpstreamConfig(name={self.name!r}, url={self.url!r}, default={self.default})"


# The public contract (issue 13): "replicate" (each node keeps what its clients pull) or
# "shard" (each node keeps only the digests it is the home of; the others it streams through).
PLACEMENTS = ("replicate", "shard")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"(?=.{{1,253}}$){_DNS_LABEL}(?:\.{_DNS_LABEL})*\.?")


@dataclass(frozen=True)
class ClusterConfig:
    """``[cluster]``: several proxies that fetch each blob from the upstream once between them.

    The peer secret is not a field: like upstream passwords it is read from the environment at
    use (:meth:`secret`), so it never sits in an object that might be logged.
    """

    node_url: str  # how the other nodes reach this one
    redis_url: str
    secret_env: str
    members: tuple[str, ...] = ()  # exactly one of members / members_dns is set
    members_dns: tuple[str, int] | None = None  # (name, port): a headless Service, say
    placement: str = "replicate"
    heartbeat_ttl: float = 3.0
    lease_ttl: float = 15.0

    def secret(self, environ: Mapping[str, str] | None = None) -> bytes:
        """The shared peer secret; a missing or empty variable is a config error, not a
        cluster whose peer requests anyone could forge."""
        environ = os.environ if environ is None else environ
        value = environ.get(self.secret_env, "")
        if not value:
            raise ConfigError(
                f"cluster.secret_env: the environment variable {self.secret_env} "
                "(the peer secret) is not set or empty"
            )
        return value.encode()


@dataclass(frozen=True)
class Config:
    storage_root: Path = Path("./data")
    max_size: int | None = None  # bytes of blobs the cache may hold; None: no cap
    # Bytes one blob may have when no stored manifest declares its size (then that size is the
    # bound).  Above the largest layer any common registry accepts (ECR: 52,000 MiB), far below
    # what a lying or endless upstream would otherwise put on the disk.
    max_blob_size: int = DEFAULT_MAX_BLOB_SIZE
    manifest_max_age_days: float = 30.0  # `cache gc` drops manifests and tags unused this long
    chunk_size: int = 1024 * 1024
    zero_copy: bool = True  # cached bytes leave with sendfile(2) where the server allows
    log_format: str = "text"  # or "json": one object a line
    htpasswd: Path | None = None  # client auth: off unless an htpasswd file is named
    auth_realm: str = "streamsync-trio"
    metrics_open: bool = False  # with auth on, may /metrics be scraped without credentials?
    cluster: ClusterConfig | None = None  # [cluster]: None runs a single node
    log_level: str = "info"
    upstreams: tuple[UpstreamConfig, ...] = field(
        default_factory=lambda: (
            UpstreamConfig(
                name="docker.io",
                url="https://registry-1.docker.io",
                default=True,
                implicit_library=True,
            ),
        )
    )

    @property
    def default_upstream(self) -> UpstreamConfig | None:
        return next((u for u in self.upstreams if u.default), None)

    def upstream_named(self, name: str) -> UpstreamConfig | None:
        return next((u for u in self.upstreams if u.name == name), None)


def load_config(environ: Mapping[str, str] | None = None) -> Config:
    """Load the file named by ``STREAMSYNC_CONFIG``, else ``./streamsync.toml``, else defaults."""
    environ = os.environ if environ is None else environ
    named = environ.get(CONFIG_ENV)
    if named:
        path = Path(named)
        if not path.is_file():
            raise ConfigError(f"{CONFIG_ENV}={named}: no such file")
    elif Path(DEFAULT_CONFIG_FILE).is_file():
        path = Path(DEFAULT_CONFIG_FILE)
    else:
        return Config()
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    try:
        config = parse_config(data)
        if config.cluster is not None:
            config.cluster.secret(environ)  # at start, not at the first peer request
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return config


class _Table:
    """Typed access to one TOML table that remembers which keys were read."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: must be a table")
        self._data: dict[str, Any] = data
        self._where = where
        self._seen: set[str] = set()

    def _key(self, key: str) -> str:
        return f"{self._where}.{key}" if self._where else key

    def get(self, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        self._seen.add(key)
        if key not in self._data:
            return default
        value = self._data[key]
        # bool is an int in Python; a ``chunk_size = true`` must not pass as 1.
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise ConfigError(f"{self._key(key)}: expected {_kind_name(kind)}, got a boolean")
        if not isinstance(value, kind):
            raise ConfigError(
                f"{self._key(key)}: expected {_kind_name(kind)}, got {type(value).__name__}"
            )
        return value

    def positive_number(self, key: str, default: float) -> float:
        value = float(self.get(key, (int, float), default))
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{self._key(key)}: must be a positive number")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self._data) - self._seen)
        if unknown:
            raise ConfigError(f"unknown key {self._key(unknown[0])}")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def parse_config(data: dict[str, Any]) -> Config:
    top = _Table(data, "")
    storage = _Table(top.get("storage", dict, {}), "storage")
    root = storage.get("root", str, "./data")
    raw_max_size = storage.get("max_size", (str, int), None)
    max_size = None if raw_max_size is None else parse_size(raw_max_size, "storage.max_size")
    manifest_max_age_days = storage.positive_number("manifest_max_age_days", 30.0)
    max_blob_size = parse_size(
        storage.get("max_blob_size", (str, int), DEFAULT_MAX_BLOB_SIZE), "storage.max_blob_size"
    )
    storage.finish()

    stream = _Table(top.get("stream", dict, {}), "stream")
    chunk_size = stream.get("chunk_size", int, 1024 * 1024)
    if not 4096 <= chunk_size <= 64 * 1024 * 1024:
        raise ConfigError("stream.chunk_size: must be between 4096 and 67108864 bytes")
    zero_copy = stream.get("zero_copy", bool, True)
    stream.finish()

    auth = _Table(top.get("auth", dict, {}), "auth")
    htpasswd = auth.get("htpasswd", str, None)
    auth_realm = auth.get("realm", str, "streamsync-trio")
    if '"' in auth_realm or not auth_realm.isprintable():
        raise ConfigError("auth.realm: must be printable and contain no quotes")
    metrics_open = auth.get("metrics_open", bool, False)
    auth.finish()

    log = _Table(top.get("log", dict, {}), "log")
    log_format = log.get("format", str, "text")
    if log_format not in ("text", "json"):
        raise ConfigError('log.format: must be "text" or "json"')
    log_level = log.get("level", str, "info").lower()
    if log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError('log.level: must be "debug", "info", "warning" or "error"')
    log.finish()

    raw_cluster = top.get("cluster", dict, None)
    cluster = None if raw_cluster is None else _parse_cluster(raw_cluster)
    raw_upstreams = top.get("upstream", list, None)
    top.finish()
    if raw_upstreams is None:
        upstreams = Config().upstreams
    else:
        upstreams = tuple(_parse_upstream(raw, i) for i, raw in enumerate(raw_upstreams))
        if not upstreams:
            raise ConfigError("upstream: at least one [[upstream]] is needed")
    names = [u.name for u in upstreams]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"upstream: name {name!r} is used twice")
    if sum(u.default for u in upstreams) > 1:
        raise ConfigError("upstream: more than one upstream has default = true")
    return Config(
        storage_root=Path(root),
        max_size=max_size,
        max_blob_size=max_blob_size,
        manifest_max_age_days=manifest_max_age_days,
        chunk_size=chunk_size,
        zero_copy=zero_copy,
        upstreams=upstreams,
        log_format=log_format,
        log_level=log_level,
        htpasswd=None if htpasswd is None else Path(htpasswd),
        auth_realm=auth_realm,
        metrics_open=metrics_open,
        cluster=cluster,
    )


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_size(value: str | int, key: str) -> int:
    """``20GiB``, ``500MB``, ``1.5TiB`` or a plain number of bytes."""
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
        unit = match.group(2).lower() if match else ""
        if match is None or unit not in _SIZE_UNITS:
            raise ConfigError(f'{key}: {value!r} is not a size like "20GiB" or "500MB"')
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise ConfigError(f"{key}: must be positive")
    return size


def _parse_upstream(raw: Any, index: int) -> UpstreamConfig:
    table = _Table(raw, f"upstream[{index}]")
    name = table.get("name", str, None)
    if name is None:
        raise ConfigError(f"upstream[{index}].name: missing")
    if not is_registry_host(name):
        raise ConfigError(
            f"upstream[{index}].name: {name!r} must look like a registry host "
            "(contain '.' or ':' or be 'localhost') so it cannot be mistaken for a namespace"
        )
    url = table.get("url", str, None)
    if url is None:
        raise ConfigError(f"upstream[{index}].url: missing")
    parts = urlsplit(url)
    if "@" in parts.netloc:
        # The URL is logged and shown on the status page; credentials have their own keys.
        raise ConfigError(
            f"upstream[{index}].url: no credentials in the URL; use username and password_env"
        )
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ConfigError(f"upstream[{index}].url: {url!r} must be an http(s) URL with a host")
    raw_max_blob_size = table.get("max_blob_size", (str, int), None)
    max_blob_size = (
        None
        if raw_max_blob_size is None
        else parse_size(raw_max_blob_size, f"upstream[{index}].max_blob_size")
    )
    username = table.get("username", str, None)
    password_env = table.get("password_env", str, None)
    if (username is None) != (password_env is None):
        raise ConfigError(f"upstream[{index}].password_env: username and password_env go together")
    upstream = UpstreamConfig(
        name=name,
        url=url.rstrip("/"),
        default=table.get("default", bool, False),
        username=username,
        password_env=password_env,
        tag_ttl=float(table.get("tag_ttl", (int, float), 300)),
        connect_timeout=table.positive_number("connect_timeout", 10.0),
        read_timeout=table.positive_number("read_timeout", 30.0),
        max_retries=table.get("max_retries", int, 5),
        max_concurrent=table.get("max_concurrent", int, 8),
        max_queue=table.get("max_queue", int, 256),
        document_timeout=table.positive_number("document_timeout", 30.0),
        implicit_library=table.get("implicit_library", bool, name == "docker.io"),
        max_blob_size=max_blob_size,
    )
    if not math.isfinite(upstream.tag_ttl) or upstream.tag_ttl < 0:
        raise ConfigError(f"upstream[{index}].tag_ttl: must be a finite number >= 0")
    if not 0 <= upstream.max_retries <= 100:
        raise ConfigError(f"upstream[{index}].max_retries: must be between 0 and 100")
    if not 1 <= upstream.max_concurrent <= 1024:
        raise ConfigError(f"upstream[{index}].max_concurrent: must be between 1 and 1024")
    if not 0 <= upstream.max_queue <= 100_000:
        raise ConfigError(f"upstream[{index}].max_queue: must be between 0 and 100000")
    table.finish()
    return upstream


def _parse_cluster(raw: Any) -> ClusterConfig:
    """``[cluster]``: every key checked, since a node that silently ignores a misspelt
    ``members`` would fetch every blob on its own and nobody would notice."""
    table = _Table(raw, "cluster")
    node_url = table.get("node_url", str, None)
    if node_url is None:
        raise ConfigError("cluster.node_url: missing (how the other nodes reach this one)")
    node_url = _peer_url(node_url, "cluster.node_url")
    raw_members = table.get("members", list, None)
    raw_dns = table.get("members_dns", str, None)
    if (raw_members is None) == (raw_dns is None):
        raise ConfigError("cluster.members: give exactly one of members or members_dns")
    members: tuple[str, ...] = ()
    if raw_members is not None:
        members = _parse_members(raw_members, node_url)
    redis_url = table.get("redis_url", str, None)
    if redis_url is None:
        raise ConfigError("cluster.redis_url: missing")
    secret_env = table.get("secret_env", str, None)
    if secret_env is None or not _ENV_NAME.fullmatch(secret_env):
        raise ConfigError("cluster.secret_env: the NAME of an environment variable is needed")
    placement = table.get("placement", str, "replicate")
    if placement not in PLACEMENTS:
        raise ConfigError('cluster.placement: must be "replicate" or "shard"')
    cluster = ClusterConfig(
        node_url=node_url,
        redis_url=_redis_url(redis_url),
        secret_env=secret_env,
        members=members,
        members_dns=None if raw_dns is None else _members_dns(raw_dns),
        placement=placement,
        heartbeat_ttl=_ttl(table, "heartbeat_ttl", 3.0),
        lease_ttl=_ttl(table, "lease_ttl", 15.0),
    )
    table.finish()
    return cluster


def _peer_url(url: str, key: str) -> str:
    """A node's base URL: scheme and host only, because peers build paths under it and sign
    them, and a base path would have to be stripped again on the other side."""
    parts = urlsplit(url)
    if "@" in parts.netloc:
        raise ConfigError(f"{key}: no credentials in the URL")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{key}: {url!r} must be an http(s) URL with a host")
    try:
        parts.port  # noqa: B018 - raises on a port out of range
    except ValueError:
        raise ConfigError(f"{key}: {url!r} has an invalid port") from None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{key}: {url!r} must have no path, query or fragment")
    return f"{parts.scheme}://{parts.netloc}"


def _parse_members(raw: list[Any], node_url: str) -> tuple[str, ...]:
    if not raw:
        raise ConfigError("cluster.members: must not be empty")
    members: list[str] = []
    for index, value in enumerate(raw):
        key = f"cluster.members[{index}]"
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__}")
        url = _peer_url(value, key)
        if url in members:
            raise ConfigError(f"{key}: {url!r} is listed twice")
        members.append(url)
    if node_url not in members:
        # Every node ranks digests over the same list; a node outside its own list would
        # never be anyone's home and its operator would not know why.
        raise ConfigError(f"cluster.members: must include this node's node_url {node_url!r}")
    return tuple(members)


def _members_dns(value: str) -> tuple[str, int]:
    name, _, port = value.rpartition(":")
    if not _DNS_NAME.fullmatch(name) or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f'cluster.members_dns: {value!r} must be "name:port"')
    return name, int(port)


def _redis_url(url: str) -> str:
    parts = urlsplit(url)
    if "@" in parts.netloc:
        # The URL is logged and shown on the status page.
        raise ConfigError("cluster.redis_url: no credentials in the URL")
    database = parts.path.removeprefix("/")
    if (
        parts.scheme not in ("redis", "rediss")
        or not parts.hostname
        or not (database == "" or database.isdigit())
        or parts.query
        or parts.fragment
    ):
        raise ConfigError(f"cluster.redis_url: {url!r} must look like redis://host:6379/0")
    return url


def _ttl(table: _Table, key: str, default: float) -> float:
    value = table.positive_number(key, default)
    if not 0.1 <= value <= 3600:
        raise ConfigError(f"cluster.{key}: must be between 0.1 and 3600 seconds")
    return value
