"""streamsync-trio: a pull-through caching proxy for OCI registries with streaming sync.

The public surface is small on purpose: :func:`create_app` and the configuration types.  The
modules with a leading underscore are the implementation:

* ``_streaming``  single-flight downloads and their subscribers (the core, no HTTP)
* ``_store``      the content-addressed cache on disk
* ``_manifests``  manifest and tag caching
* ``_upstream``   the upstream registry client (auth, timeouts, error mapping)
* ``_reference``, ``_routing``, ``_ranges``  pure parsing of what clients ask
* ``_eviction``   keeping the cache under its size cap (LRU)
* ``_http``       the Quart layer that translates HTTP to the above
* ``_auth``, ``_metrics``, ``_status``, ``_logging``  client auth, Prometheus metrics, the
  status page, structured logs: read-only views of the state above
* ``_cli``, ``_serve``, ``_prefetch``  the ``streamsync-trio`` command
"""

from ._config import Config, ConfigError, UpstreamConfig, load_config, parse_config
from ._errors import RegistryError
from .edge import create_app

__all__ = [
    "Config",
    "ConfigError",
    "RegistryError",
    "UpstreamConfig",
    "create_app",
    "load_config",
    "parse_config",
]
__version__ = "0.1.0"
