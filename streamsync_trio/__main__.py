"""``python -m streamsync_trio check-config``: validate the configuration and exit.

hypercorn 0.18's multi-process runner reports exit status 0 even when its worker died at start
(``run.py`` overwrites the worker's exit code on its second ``_join_exited``), so
``scripts/serve`` checks the configuration first, to give a bad config a non-zero status.
"""

from __future__ import annotations

import sys

from ._config import ConfigError, load_config


def main(argv: list[str]) -> int:
    if argv != ["check-config"]:
        print("usage: python -m streamsync_trio check-config", file=sys.stderr)
        return 2
    try:
        config = load_config()
    except ConfigError as exc:
        print(f"streamsync-trio: invalid configuration: {exc}", file=sys.stderr)
        return 2
    names = ", ".join(u.name + (" (default)" if u.default else "") for u in config.upstreams)
    print(f"configuration ok: cache {config.storage_root}, upstreams {names}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
