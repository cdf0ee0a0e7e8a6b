"""Pure parsing: names, tags, digests, API paths, routing, Range headers and the config file.

Everything here is synchronous and touches no network; tables of inputs keep the grammar
visible at a glance.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from streamsync_trio import Config, ConfigError, RegistryError, UpstreamConfig, load_config
from streamsync_trio._config import CONFIG_ENV, parse_config
from streamsync_trio._reference import (
    Digest,
    Endpoint,
    is_digest_like,
    is_host_like,
    parse_digest,
    parse_v2_path,
    validate_name,
    validate_tag,
)
from streamsync_trio.edge._ranges import parse_range
from streamsync_trio.upstream._routing import route

SHA256_HEX = "0123456789abcdef" * 4
SHA512_HEX = "0123456789abcdef" * 8
SHA256 = f"sha256:{SHA256_HEX}"


def check(error: pytest.ExceptionInfo[RegistryError], status: int, code: str) -> None:
    assert (error.value.status, error.value.code) == (status, code)
    assert error.value.to_json().startswith(b'{"errors": [{"code": "' + code.encode())


# -- repository names -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "alpine",
        "library/alpine",
        "a",
        "0",
        "a.b",
        "a_b",
        "a__b",
        "a-b",
        "a---b",
        "a.b_c__d-e/f0/g-h.i",
        "ghcr.io",  # a valid component on its own: only routing gives host-likes meaning
        "a" * 255,
        "/".join(["abc"] * 64),  # 255 characters with separators
    ],
)
def test_valid_names(name: str) -> None:
    assert len(name) <= 255
    assert validate_name(name) == name


INVALID_NAMES = {
    "empty": "",
    "upper case": "UPPER",
    "upper case in a later component": "library/Alpine",
    "double dot": "a..b",
    "triple dot": "a...b",
    "three underscores": "a___b",
    "leading slash": "/alpine",
    "trailing slash": "alpine/",
    "double slash": "a//b",
    "leading dot": ".alpine",
    "leading dash": "-alpine",
    "leading underscore": "_alpine",
    "trailing dash": "alpine-",
    "trailing dot": "alpine.",
    "dot-dot component": "a/../b",
    "dot component": "a/./b",
    "space": "a b",
    "colon": "a:b",
    "at sign": "a@b",
    "backslash": "a\\b",
    "non-ascii": "ä",
    "256 characters": "a" * 256,
    "256 characters with separators": "/".join(["abc"] * 64) + "d",
}


@pytest.mark.parametrize("name", INVALID_NAMES.values(), ids=INVALID_NAMES.keys())
def test_invalid_names(name: str) -> None:
    with pytest.raises(RegistryError) as error:
        validate_name(name)
    check(error, 400, "NAME_INVALID")


def test_overlong_name_is_truncated_in_the_error_detail() -> None:
    with pytest.raises(RegistryError) as error:
        validate_name("a" * 10_000)
    assert error.value.detail == {"name": "a" * 255}
    assert "255" in error.value.message


# -- tags -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tag", ["latest", "3.20", "v1.2.3-rc_1", "_private", "A", "0", "UPPER.lower", "t" * 128]
)
def test_valid_tags(tag: str) -> None:
    assert validate_tag(tag) == tag


@pytest.mark.parametrize(
    "tag", ["", ".hidden", "-dash", "t" * 129, "a+b", "a b", "a/b", "a@b", "ä", "a\n"]
)
def test_invalid_tags(tag: str) -> None:
    # A reference that is no tag cannot name a manifest: "not found", as the spec answers.
    with pytest.raises(RegistryError) as error:
        validate_tag(tag)
    assert (error.value.status, error.value.code) == (404, "MANIFEST_UNKNOWN")


# -- digests ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "algorithm", "hex_"),
    [(SHA256, "sha256", SHA256_HEX), (f"sha512:{SHA512_HEX}", "sha512", SHA512_HEX)],
)
def test_valid_digests(text: str, algorithm: str, hex_: str) -> None:
    digest = parse_digest(text)
    assert digest == Digest(algorithm, hex_)
    assert str(digest) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sha256",  # missing colon
        SHA256_HEX,  # missing algorithm and colon
        "sha256:",
        ":" + SHA256_HEX,
        "sha256:" + SHA256_HEX[:-1],  # 63 hex
        "sha256:" + SHA256_HEX + "0",  # 65 hex
        "sha256:" + SHA256_HEX.upper(),  # upper-case hex
        "sha256:" + "g" * 64,  # not hex
        "SHA256:" + SHA256_HEX,  # upper-case algorithm
        "sha512:" + SHA256_HEX,  # sha512 needs 128
        "sha256:" + SHA512_HEX,  # sha256 needs 64
        "md5:" + "0" * 32,  # unknown algorithm
        "sha384:" + "0" * 96,  # well-formed but not verifiable here
        "sha256+b64u:" + SHA256_HEX,  # algorithm with a component we do not know
        "sha256:" + SHA256_HEX + "\n",
        "sha256::" + SHA256_HEX,
        "sha256:" + "0" * 500,  # very long
    ],
)
def test_invalid_digests(text: str) -> None:
    with pytest.raises(RegistryError) as error:
        parse_digest(text)
    check(error, 400, "DIGEST_INVALID")
    assert len(str(error.value.detail["digest"])) <= 200


def test_unknown_algorithm_is_named_in_the_error() -> None:
    with pytest.raises(RegistryError) as error:
        parse_digest("md5:" + "0" * 32)
    assert "md5" in error.value.message


@pytest.mark.parametrize(
    ("reference", "expected"), [("latest", False), (SHA256, True), ("a:b", True)]
)
def test_is_digest_like(reference: str, expected: bool) -> None:
    assert is_digest_like(reference) is expected


@pytest.mark.parametrize(
    ("component", "expected"),
    [
        ("ghcr.io", True),
        ("localhost", True),
        ("localhost:5000", True),
        ("registry:5000", True),
        ("library", False),
        ("local-host", False),
        ("", False),
    ],
)
def test_is_host_like(component: str, expected: bool) -> None:
    assert is_host_like(component) is expected


# -- API paths --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("alpine/manifests/3.20", Endpoint("manifest", "alpine", "3.20")),
        ("library/alpine/manifests/latest", Endpoint("manifest", "library/alpine", "latest")),
        (f"a/b/c/manifests/{SHA256}", Endpoint("manifest", "a/b/c", SHA256)),
        (f"library/alpine/blobs/{SHA256}", Endpoint("blob", "library/alpine", SHA256)),
        ("ghcr.io/org/app/tags/list", Endpoint("tags", "ghcr.io/org/app", "")),
        (f"org/app/referrers/{SHA256}", Endpoint("referrers", "org/app", SHA256)),
        # The endpoint is recognised from the right: names may contain endpoint words.
        ("a/manifests/b/manifests/1", Endpoint("manifest", "a/manifests/b", "1")),
        ("tags/list/tags/list", Endpoint("tags", "tags/list", "")),
        (f"blobs/blobs/{SHA256}", Endpoint("blob", "blobs", SHA256)),
    ],
)
def test_parse_v2_path_read_endpoints(path: str, method: str, expected: Endpoint) -> None:
    assert parse_v2_path(path, method) == expected


@pytest.mark.parametrize(
    ("path", "method"),
    [
        ("app/blobs/uploads/", "POST"),
        ("app/blobs/uploads/", "GET"),
        ("org/app/blobs/uploads/0f3c-uuid", "PATCH"),
        ("org/app/blobs/uploads/0f3c-uuid", "PUT"),
        ("org/app/blobs/uploads/0f3c-uuid", "GET"),
        ("org/app/blobs/uploads/0f3c-uuid", "DELETE"),
        ("app/blobs/uploads", "POST"),
        ("app/manifests/latest", "PUT"),
        (f"app/manifests/{SHA256}", "DELETE"),
        (f"app/blobs/{SHA256}", "DELETE"),
        ("app/tags/list", "POST"),
        (f"app/referrers/{SHA256}", "PATCH"),
    ],
)
def test_write_endpoints_are_unsupported(path: str, method: str) -> None:
    with pytest.raises(RegistryError) as error:
        parse_v2_path(path, method)
    check(error, 405, "UNSUPPORTED")


@pytest.mark.parametrize(
    "path",
    [
        "",
        "app",
        "app/manifests",
        "manifests/latest",  # no name
        "/manifests/latest",  # empty name
        "app/manifests/",  # empty reference
        "app/blobs/",
        "tags/list",
        "app/tags/lists",
        "app/catalog/x",
        "app/foo/bar",
    ],
)
def test_unknown_paths_are_404(path: str) -> None:
    with pytest.raises(RegistryError) as error:
        parse_v2_path(path, "GET")
    check(error, 404, "NOT_FOUND")


# -- routing ----------------------------------------------------------------------------------


def upstream(name: str, **settings: Any) -> UpstreamConfig:
    return UpstreamConfig(name=name, url=f"https://{name}", **settings)


ROUTING = Config(
    upstreams=(
        upstream("docker.io", default=True, implicit_library=True),
        upstream("ghcr.io"),
        upstream("localhost:5000"),
        upstream("localhost"),
    )
)
NO_DEFAULT = Config(upstreams=(upstream("ghcr.io"), upstream("quay.io")))


@pytest.mark.parametrize(
    ("config", "name", "ns", "upstream_name", "repo"),
    [
        (ROUTING, "alpine", None, "docker.io", "library/alpine"),
        (ROUTING, "library/alpine", None, "docker.io", "library/alpine"),
        (ROUTING, "org/app", None, "docker.io", "org/app"),
        (ROUTING, "docker.io/alpine", None, "docker.io", "library/alpine"),
        (ROUTING, "docker.io/org/app", None, "docker.io", "org/app"),
        (ROUTING, "ghcr.io/org/app", None, "ghcr.io", "org/app"),
        (ROUTING, "ghcr.io/app", None, "ghcr.io", "app"),  # no implicit library/ here
        (ROUTING, "localhost:5000/team/app", None, "localhost:5000", "team/app"),
        (ROUTING, "localhost/app", None, "localhost", "app"),
        # containerd's ?ns= selects the upstream and the name is the upstream's own.
        (ROUTING, "alpine", "docker.io", "docker.io", "library/alpine"),
        (ROUTING, "org/app", "ghcr.io", "ghcr.io", "org/app"),
        (ROUTING, "ghcr.io/org/app", "ghcr.io", "ghcr.io", "org/app"),
        (ROUTING, "app", "localhost:5000", "localhost:5000", "app"),
        (ROUTING, "alpine", "", "docker.io", "library/alpine"),  # empty ns: as if absent
        (NO_DEFAULT, "ghcr.io/org/app", None, "ghcr.io", "org/app"),
        (NO_DEFAULT, "org/app", "quay.io", "quay.io", "org/app"),
    ],
)
def test_route(config: Config, name: str, ns: str | None, upstream_name: str, repo: str) -> None:
    target = route(config, name, ns)
    assert (target.upstream.name, target.repo) == (upstream_name, repo)


@pytest.mark.parametrize(
    ("config", "name", "ns", "status", "code"),
    [
        (ROUTING, "quay.io/org/app", None, 404, "NAME_UNKNOWN"),  # unknown prefix
        (ROUTING, "alpine", "quay.io", 404, "NAME_UNKNOWN"),  # unknown ns
        (ROUTING, "ghcr.io/org/app", "quay.io", 404, "NAME_UNKNOWN"),
        (NO_DEFAULT, "alpine", None, 404, "NAME_UNKNOWN"),  # no default upstream
        (NO_DEFAULT, "org/app", None, 404, "NAME_UNKNOWN"),
        (ROUTING, "ghcr.io", None, 400, "NAME_INVALID"),  # a prefix and nothing after it
        (ROUTING, "ghcr.io/Org/app", None, 400, "NAME_INVALID"),
        (ROUTING, "ghcr.io//app", None, 400, "NAME_INVALID"),
        (ROUTING, "UPPER", None, 400, "NAME_INVALID"),
        (ROUTING, "a..b", None, 400, "NAME_INVALID"),
        (ROUTING, "Alpine", "docker.io", 400, "NAME_INVALID"),
    ],
)
def test_route_errors(config: Config, name: str, ns: str | None, status: int, code: str) -> None:
    with pytest.raises(RegistryError) as error:
        route(config, name, ns)
    check(error, status, code)


def test_route_error_names_the_missing_upstream() -> None:
    with pytest.raises(RegistryError, match=r"quay\.io"):
        route(ROUTING, "alpine", "quay.io")


# -- ranges -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, 100, None),
        ("bytes=0-9", 100, (0, 10)),
        ("bytes=0-0", 100, (0, 1)),
        ("bytes=10-", 100, (10, 100)),
        ("bytes=99-", 100, (99, 100)),
        ("bytes=0-99", 100, (0, 100)),
        ("bytes=90-200", 100, (90, 100)),  # last beyond the end: clamped (RFC 9110)
        ("bytes=-10", 100, (90, 100)),
        ("bytes=-100", 100, (0, 100)),
        ("bytes=-500", 100, (0, 100)),
        ("Bytes=1-2", 100, (1, 3)),
        ("  bytes=1-2  ", 100, (1, 3)),
        ("bytes= 1 - 2", 100, (1, 3)),
        ("items=0-5", 100, None),  # other units are ignored
        ("none", 100, None),
        ("", 100, None),
    ],
)
def test_parse_range(header: str | None, size: int, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(
    ("header", "size"),
    [
        ("bytes=100-", 100),  # starts at the end
        ("bytes=150-160", 100),  # beyond the size
        ("bytes=5-4", 100),  # last before first
        ("bytes=-0", 100),  # empty suffix
        ("bytes=-", 100),
        ("bytes=", 100),
        ("bytes=abc", 100),
        ("bytes=1-x", 100),
        ("bytes=1--2", 100),
        ("bytes=0-1,5-6", 100),  # multi-range
        ("bytes=0-1, 5-6", 100),
        ("bytes=0-", 0),  # nothing to serve from an empty blob
        ("bytes=-5", 0),
    ],
)
def test_unsatisfiable_ranges_are_416(header: str, size: int) -> None:
    with pytest.raises(RegistryError) as error:
        parse_range(header, size)
    assert error.value.status == 416
    assert error.value.headers == {"Content-Range": f"bytes */{size}"}


# -- configuration ----------------------------------------------------------------------------


def test_config_defaults() -> None:
    config = parse_config({})
    assert config == Config()
    assert config.storage_root == Path("./data")
    assert config.chunk_size == 1024 * 1024
    assert config.zero_copy is True
    (hub,) = config.upstreams
    assert (hub.name, hub.url, hub.default, hub.implicit_library) == (
        "docker.io",
        "https://registry-1.docker.io",
        True,
        True,
    )
    assert (hub.tag_ttl, hub.connect_timeout, hub.read_timeout, hub.max_retries) == (
        300.0,
        10.0,
        30.0,
        5,
    )
    assert (hub.username, hub.password_env, hub.password) == (None, None, None)
    assert config.default_upstream is hub
    assert config.upstream_named("docker.io") is hub
    assert config.upstream_named("ghcr.io") is None


def full_config() -> dict[str, Any]:
    return {
        "storage": {"root": "/var/cache/streamsync"},
        "stream": {"chunk_size": 4 * 1024 * 1024, "zero_copy": False},
        "upstream": [
            {
                "name": "ghcr.io",
                "url": "https://ghcr.io/",
                "default": True,
                "username": "robot",
                "password_env": "GHCR_TOKEN",
                "tag_ttl": 0,
                "connect_timeout": 2,
                "read_timeout": 7.5,
                "max_retries": 0,
                "implicit_library": True,
            },
            {"name": "docker.io", "url": "https://registry-1.docker.io"},
            {"name": "localhost:5000", "url": "http://127.0.0.1:5000/prefix"},
        ],
    }


def test_config_every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_config(full_config())
    assert config.storage_root == Path("/var/cache/streamsync")
    assert config.chunk_size == 4 * 1024 * 1024
    assert config.zero_copy is False
    ghcr, hub, local = config.upstreams
    assert ghcr == UpstreamConfig(
        name="ghcr.io",
        url="https://ghcr.io",  # trailing slash stripped
        default=True,
        username="robot",
        password_env="GHCR_TOKEN",
        tag_ttl=0.0,
        connect_timeout=2.0,
        read_timeout=7.5,
        max_retries=0,
        implicit_library=True,
    )
    assert config.default_upstream is ghcr
    # implicit_library defaults on for docker.io only.
    assert (hub.default, hub.implicit_library) == (False, True)
    assert (local.url, local.implicit_library) == ("http://127.0.0.1:5000/prefix", False)
    # The password is read from the environment at use, and never shown in a repr.
    monkeypatch.delenv("GHCR_TOKEN", raising=False)
    assert ghcr.password is None
    monkeypatch.setenv("GHCR_TOKEN", "hunter2")
    assert ghcr.password == "hunter2"
    assert "hunter2" not in repr(ghcr) and "robot" not in repr(ghcr)
    assert "hunter2" not in repr(config)


def with_upstream(**settings: Any) -> dict[str, Any]:
    return {"upstream": [{"name": "r.test", "url": "https://r.test", **settings}]}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        # unknown keys, named with their table
        ({"bogus": 1}, "unknown key bogus"),
        ({"storage": {"root": "x", "rot": "y"}}, "unknown key storage.rot"),
        ({"stream": {"chunk": 1}}, "unknown key stream.chunk"),
        (with_upstream(bogus=True), "unknown key upstream[0].bogus"),
        (
            {
                "upstream": [
                    {"name": "a.test", "url": "http://a"},
                    {"name": "b.test", "url": "http://b", "x": 1},
                ]
            },
            "unknown key upstream[1].x",
        ),
        (with_upstream(read_timout=3), "unknown key upstream[0].read_timout"),
        # wrong types
        ({"storage": 5}, "storage: expected"),
        ({"storage": {"root": 5}}, "storage.root: expected a string, got int"),
        ({"stream": {"chunk_size": "big"}}, "stream.chunk_size: expected an integer, got str"),
        ({"stream": {"chunk_size": True}}, "stream.chunk_size: expected an integer, got a boolean"),
        ({"stream": {"chunk_size": 65536.0}}, "stream.chunk_size: expected an integer"),
        ({"stream": {"zero_copy": "yes"}}, "stream.zero_copy: expected"),
        ({"upstream": {"name": "r.test"}}, "upstream: expected"),
        ({"upstream": [5]}, "upstream[0]: must be a table"),
        (with_upstream(max_retries=True), "upstream[0].max_retries: expected an integer"),
        (with_upstream(max_retries=1.5), "upstream[0].max_retries: expected an integer"),
        (with_upstream(tag_ttl=True), "upstream[0].tag_ttl: expected an integer or a number"),
        (with_upstream(tag_ttl="5m"), "upstream[0].tag_ttl: expected"),
        (with_upstream(read_timeout=False), "upstream[0].read_timeout: expected"),
        (with_upstream(connect_timeout="10"), "upstream[0].connect_timeout: expected"),
        (with_upstream(default="yes"), "upstream[0].default: expected a boolean, got str"),
        (with_upstream(default=1), "upstream[0].default: expected a boolean, got int"),
        (with_upstream(implicit_library=0), "upstream[0].implicit_library: expected a boolean"),
        (with_upstream(username=5, password_env="P"), "upstream[0].username: expected a string"),
        ({"upstream": [{"name": 5, "url": "https://r.test"}]}, "upstream[0].name: expected"),
        ({"upstream": [{"name": "r.test", "url": 5}]}, "upstream[0].url: expected a string"),
        # out-of-range values
        ({"stream": {"chunk_size": 4095}}, "stream.chunk_size: must be between"),
        ({"stream": {"chunk_size": 64 * 1024 * 1024 + 1}}, "stream.chunk_size: must be between"),
        (with_upstream(read_timeout=0), "upstream[0].read_timeout: must be a positive number"),
        (with_upstream(connect_timeout=-1), "upstream[0].connect_timeout: must be a positive"),
        (with_upstream(read_timeout=math.inf), "upstream[0].read_timeout: must be a positive"),
        (with_upstream(read_timeout=math.nan), "upstream[0].read_timeout: must be a positive"),
        (with_upstream(tag_ttl=-1), "upstream[0].tag_ttl: must be a finite number >= 0"),
        (with_upstream(max_retries=-1), "upstream[0].max_retries: must be between 0 and 100"),
        (with_upstream(max_retries=101), "upstream[0].max_retries: must be between 0 and 100"),
        # upstream tables that cannot work
        ({"upstream": []}, "at least one"),
        ({"upstream": [{"url": "https://r.test"}]}, "upstream[0].name: missing"),
        ({"upstream": [{"name": "r.test"}]}, "upstream[0].url: missing"),
        (
            {
                "upstream": [
                    {"name": "r.test", "url": "http://a"},
                    {"name": "r.test", "url": "http://b"},
                ]
            },
            "name 'r.test' is used twice",
        ),
        (
            {
                "upstream": [
                    {"name": "a.test", "url": "http://a", "default": True},
                    {"name": "b.test", "url": "http://b", "default": True},
                ]
            },
            "more than one upstream has default = true",
        ),
        (
            {"upstream": [{"name": "library", "url": "https://r.test"}]},
            "upstream[0].name: 'library' must look like a registry host",
        ),
        ({"upstream": [{"name": "r.test/x", "url": "https://r.test"}]}, "upstream[0].name"),
        ({"upstream": [{"name": "", "url": "https://r.test"}]}, "upstream[0].name"),
        (with_upstream(url="ftp://r.test"), "upstream[0].url: 'ftp://r.test' must be an http(s)"),
        (with_upstream(url="r.test"), "upstream[0].url"),
        (with_upstream(url="https://"), "upstream[0].url"),
        (with_upstream(url="https://r.test/?x=1"), "upstream[0].url"),
        (with_upstream(url="https://r.test/#top"), "upstream[0].url"),
        (with_upstream(username="robot"), "upstream[0].password_env: username and password_env"),
        (
            with_upstream(password_env="TOKEN"),
            "upstream[0].password_env: username and password_env",
        ),
    ],
)
def test_config_errors_name_the_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(data)
    assert message in str(error.value)


def test_config_unknown_keys_are_reported_in_order() -> None:
    with pytest.raises(ConfigError, match=r"^unknown key upstream\[0\]\.alpha$"):
        parse_config(with_upstream(zulu=1, alpha=2))


def test_config_accepts_a_zero_tag_ttl_and_zero_retries() -> None:
    (only,) = parse_config(with_upstream(tag_ttl=0, max_retries=0, read_timeout=0.5)).upstreams
    assert (only.tag_ttl, only.max_retries, only.read_timeout) == (0.0, 0, 0.5)
    assert only.default is False


def test_config_rejects_a_nan_tag_ttl() -> None:
    with pytest.raises(ConfigError, match=r"upstream\[0\]\.tag_ttl"):
        parse_config(with_upstream(tag_ttl=math.nan))


@pytest.mark.parametrize("name", ["..", "."])
def test_config_rejects_upstream_names_that_are_path_tricks(name: str) -> None:
    with pytest.raises(ConfigError, match=r"upstream\[0\]\.name"):
        parse_config({"upstream": [{"name": name, "url": "https://r.test"}]})


# -- loading the file ---------------------------------------------------------------------------

TOML = """\
[storage]
root = "/srv/cache"

[[upstream]]
name = "ghcr.io"
url = "https://ghcr.io"
default = true
tag_ttl = 60
"""


def test_load_config_reads_the_file_named_by_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(TOML)
    config = load_config(environ={CONFIG_ENV: str(path)})
    assert config.storage_root == Path("/srv/cache")
    (ghcr,) = config.upstreams
    assert (ghcr.name, ghcr.default, ghcr.tag_ttl) == ("ghcr.io", True, 60.0)


def test_load_config_missing_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=f"{CONFIG_ENV}={missing}: no such file"):
        load_config(environ={CONFIG_ENV: str(missing)})


def test_load_config_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(environ={CONFIG_ENV: str(tmp_path)})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[storage\n", "proxy.toml: "),  # TOML syntax
        ("[storage]\nroot = 5\n", "proxy.toml: storage.root: expected a string"),
        ('[[upstream]]\nname = "r.test"\nurl = "http://r"\nbogus = 1\n', "upstream[0].bogus"),
    ],
)
def test_load_config_errors_name_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(environ={CONFIG_ENV: str(path)})
    assert message in str(error.value)
    assert str(path) in str(error.value)


def test_load_config_invalid_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_bytes(b'[storage]\nroot = "\xff"\n')
    with pytest.raises(ConfigError, match=r"proxy\.toml"):
        load_config(environ={CONFIG_ENV: str(path)})


def test_load_config_falls_back_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config(environ={}) == Config()
    (tmp_path / "streamsync.toml").write_text(TOML)
    assert load_config(environ={}).storage_root == Path("/srv/cache")
    # An empty STREAMSYNC_CONFIG is as if unset.
    assert load_config(environ={CONFIG_ENV: ""}).storage_root == Path("/srv/cache")


def test_load_config_reads_os_environ_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(TOML)
    monkeypatch.setenv(CONFIG_ENV, str(path))
    assert load_config().storage_root == Path("/srv/cache")
