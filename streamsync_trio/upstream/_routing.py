"""Which upstream serves a repository name, and under which upstream-side name.

Pure functions of the configuration and the request: the HTTP layer calls :func:`route` and
gets either a :class:`Route` or a :class:`RegistryError` with the right OCI code.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._config import Config, UpstreamConfig
from .._errors import name_invalid, name_unknown
from .._reference import is_host_like, is_registry_host, validate_name


@dataclass(frozen=True, slots=True)
class Route:
    upstream: UpstreamConfig
    repo: str  # the name as the upstream knows it (``library/alpine``)


def route(config: Config, name: str, ns: str | None = None) -> Route:
    """Pick the upstream for ``name``: containerd's ``?ns=``, then a path prefix, then the default.

    Prefixes are host-like (``ghcr.io``), and host-like strings are never valid first components
    of a repository on a registry that is itself addressed by host, so ``/v2/ghcr.io/org/app``
    cannot be confused with a namespace such as ``library/``.
    """
    first, _, rest = name.partition("/")
    if ns:
        upstream = config.upstream_named(ns)
        if upstream is None:
            raise name_unknown(name, f"no upstream is configured for ns={ns[:100]!r}")
        repo = rest if first == ns and rest else name
    elif is_host_like(first):
        if not is_registry_host(first):
            # ``..``, ``a\\b.c``: host-like by Docker's rule, but neither a host nor a name.
            raise name_invalid(name, f"{first[:100]!r} is neither a registry host nor a name")
        upstream = config.upstream_named(first)
        if upstream is None:
            raise name_unknown(name, f"no upstream is configured for {first[:100]!r}")
        repo = rest
    else:
        upstream = config.default_upstream
        if upstream is None:
            raise name_unknown(name, "no default upstream: prefix the name with an upstream")
        repo = name
    validate_name(repo)
    if upstream.implicit_library and "/" not in repo:
        repo = f"library/{repo}"
    return Route(upstream, repo)
