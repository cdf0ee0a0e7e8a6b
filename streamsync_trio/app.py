"""The ASGI app hypercorn serves: ``hypercorn -c hypercorn.toml streamsync_trio.app:app``.

The configuration is loaded at import, so a bad config stops the server at start with a
message naming the key, instead of surfacing on the first request.
"""

from __future__ import annotations

import sys

from ._config import ConfigError, load_config
from ._logging import configure
from .edge import create_app
from .ops import tune_malloc

try:
    config = load_config()
    configure(config.log_format, config.log_level)
    tune_malloc()
    app = create_app(config)
except ConfigError as exc:
    # A clean one-line message (hypercorn would otherwise print a long traceback around it).
    print(f"streamsync-trio: invalid configuration: {exc}", file=sys.stderr)
    raise SystemExit(2) from None
