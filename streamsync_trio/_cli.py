"""The ``streamsync-trio`` command (also ``python -m streamsync_trio``).

Subcommands are thin: each parses its arguments and calls one function of the package.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from ._config import Config, ConfigError, load_config


def _load() -> Config:
    try:
        return load_config()
    except ConfigError as exc:
        print(f"streamsync-trio: invalid configuration: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _check_config(args: argparse.Namespace) -> int:
    """hypercorn 0.18 exits 0 even when its worker dies at start (``run.py`` overwrites the
    worker's exit code), so ``scripts/serve`` runs this first to fail a bad config loudly."""
    config = _load()
    names = ", ".join(u.name + (" (default)" if u.default else "") for u in config.upstreams)
    print(f"configuration ok: cache {config.storage_root}, upstreams {names}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamsync-trio",
        description="Pull-through caching proxy for OCI registries (streaming sync).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check-config", help="validate the configuration and exit")
    check.set_defaults(run=_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    return run(args)
