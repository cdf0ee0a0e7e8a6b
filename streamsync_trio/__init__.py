"""streamsync-trio: a pull-through caching proxy for OCI registries with streaming sync.

The public surface is small on purpose: :func:`create_app` and the configuration types.  The
folders are the layers, each importing only those listed before it (``tests/test_layout.py``
holds them to it):

* top level   ``_config``, ``_errors``, ``_reference``, ``_logging``: the config contract, the
  one error type, OCI name/digest parsing, log formatting
* ``upstream/`` the registry client (auth, timeouts, error mapping) and routing
* ``core/``     the decisions, with no HTTP: single-flight downloads and their subscribers, who
  owns an in-flight digest, the store, eviction, manifests, listings, the blob service
* ``edge/``     the Quart/ASGI layer that translates HTTP to the core and back
* ``ops/``      the ``streamsync-trio`` command, ``serve --workers``, ``prefetch``
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
