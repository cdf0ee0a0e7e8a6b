"""The ``streamsync-trio`` command (also ``python -m streamsync_trio``).

Subcommands are thin: each parses its arguments and calls one function of the package.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import trio

from .._config import Config, ConfigError, load_config, parse_size
from ..core import Finding, ScrubReport, Store, collect_garbage, content_listing, prune_links, scrub
from ._prefetch import prefetch
from ._serve import serve


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


def _open_store(config: Config) -> Store:
    """The cache, in today's format: the proxy migrates an older one at start, and so does
    every cache command (``cache verify`` would otherwise flag every old manifest)."""
    store = Store(config.storage_root)
    store.migrate_manifests()
    return store


def _cache_stats(args: argparse.Namespace) -> int:
    config = _load()
    store = _open_store(config)
    usage = store.scan()
    cap = "none" if config.max_size is None else _human(config.max_size)
    print(f"cache      {store.root}")
    print(f"blobs      {usage.blobs} ({_human(usage.bytes)}; cap {cap})")
    for kind, count in store.counts().items():
        print(f"{kind:<10} {count}")
    return 0


def _cache_gc(args: argparse.Namespace) -> int:
    config = _load()
    max_size = config.max_size
    if args.max_size is not None:
        try:
            max_size = parse_size(args.max_size, "--max-size")
        except ConfigError as exc:
            print(f"streamsync-trio: {exc}", file=sys.stderr)
            return 2
    store = _open_store(config)
    result = collect_garbage(store, max_size, config.manifest_max_age_days, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {result['blobs_removed']} blob(s), {_human(result['bytes_freed'])}")
    if not args.dry_run:
        print(
            f"removed {result['manifests_removed']} manifest(s) and {result['tags_removed']} "
            f"tag record(s) unused for {config.manifest_max_age_days:g} days"
        )
    # Last: the blobs and manifests removed above leave their links dangling.
    links = prune_links(store, dry_run=args.dry_run)
    print(f"{verb} {links} repository link(s) to content no longer stored")
    return 0


def _cache_verify(args: argparse.Namespace) -> int:
    """Exit 1 when anything was damaged (and quarantined), 0 when all is intact."""
    config = _load()
    store = _open_store(config)
    listing = content_listing(store)
    total = sum(size for _, _, size in listing)

    def found(finding: Finding) -> None:
        where = f"moved to {finding.moved_to}" if finding.moved_to else "left in place"
        print(f"DAMAGED {finding.path}: {finding.problem}; {where}")

    if args.quiet:
        report = scrub(store, listing, on_finding=found)
    elif sys.stdout.isatty():
        report = _scrub_with_bar(store, listing, total, found)
    else:
        report = scrub(store, listing, _ProgressLines(total), found)
    if not args.quiet:
        print(
            f"verified {report.checked} file(s), {_human(report.bytes)} in "
            f"{report.seconds:.1f} s ({_human(int(report.throughput))}/s); "
            f"{len(report.findings)} damaged"
            + (f", quarantined under {store.quarantine_dir}" if report.findings else "")
            + (f"; {report.changed} changed while checked" if report.changed else "")
        )
    return 1 if report.findings else 0


def _scrub_with_bar(
    store: Store,
    listing: list[tuple[str, Path, int]],
    total: int,
    found: Callable[[Finding], None],
) -> ScrubReport:
    # Imported here: ``rich`` takes a while to import, and only this command on a TTY needs it.
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (BarColumn(), DownloadColumn(binary_units=True), TransferSpeedColumn())
    # The bar redraws in place on stdout; ``print`` meanwhile (a damaged file) is shown
    # above it, and the bar goes when done, leaving the summary.
    with Progress("verifying", *columns, TimeRemainingColumn(), transient=True) as progress:
        task = progress.add_task("verify", total=total)
        return scrub(store, listing, partial(progress.advance, task), found)


class _ProgressLines:
    """Progress for a log, not a terminal: one line to stderr every ``INTERVAL`` seconds."""

    INTERVAL = 10.0

    def __init__(self, total: int) -> None:
        self._total = total
        self._done = 0
        self._next = time.monotonic() + self.INTERVAL

    def __call__(self, count: int) -> None:
        self._done += count
        if time.monotonic() >= self._next:
            self._next += self.INTERVAL
            share = 100 * self._done / self._total if self._total else 100.0
            print(
                f"verified {_human(self._done)} of {_human(self._total)} ({share:.0f} %)",
                file=sys.stderr,
            )


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{size} B"
        value /= 1024
    raise AssertionError("unreachable")


def _serve(args: argparse.Namespace) -> int:
    return serve(Path(args.hypercorn_config), args.bind, args.graceful_timeout, args.workers)


def _prefetch(args: argparse.Namespace) -> int:
    outcomes = trio.run(partial(prefetch, args.proxy, args.images, args.platform, quiet=args.quiet))
    return 0 if all(outcome.error is None for outcome in outcomes) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamsync-trio",
        description="Pull-through caching proxy for OCI registries (streaming sync).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serving = commands.add_parser(
        "serve", help="run the proxy in this process (graceful on SIGTERM and Ctrl-C)"
    )
    serving.add_argument(
        "--hypercorn-config", default="hypercorn.toml", help="hypercorn settings (TOML)"
    )
    serving.add_argument(
        "--bind", action="append", help="address to listen on, e.g. 0.0.0.0:5000 (repeatable)"
    )
    serving.add_argument(
        "--graceful-timeout",
        type=float,
        help="seconds in-flight responses get after SIGTERM (default: hypercorn.toml's)",
    )
    serving.add_argument(
        "--workers",
        type=int,
        help="worker processes sharing the port and the cache (default: hypercorn.toml's)",
    )
    serving.set_defaults(run=_serve)
    check = commands.add_parser("check-config", help="validate the configuration and exit")
    check.set_defaults(run=_check_config)

    warm = commands.add_parser(
        "prefetch", help="pull images through a running proxy to warm its cache"
    )
    warm.add_argument("images", nargs="+", metavar="IMAGE", help="e.g. alpine:3.20")
    warm.add_argument("--proxy", default="http://127.0.0.1:5000", help="the proxy's URL")
    warm.add_argument(
        "--platform", default="linux/amd64", help="os/arch[/variant] from an index, or all"
    )
    warm.add_argument("--quiet", action="store_true", help="no progress, no summary")
    warm.set_defaults(run=_prefetch)

    cache = commands.add_parser("cache", help="inspect or trim the cache (the config's root)")
    cache_commands = cache.add_subparsers(dest="cache_command", required=True)
    stats = cache_commands.add_parser("stats", help="what the cache holds")
    stats.set_defaults(run=_cache_stats)
    gc = cache_commands.add_parser(
        "gc",
        help="evict least recently used blobs down to the size cap; drop stale manifests/tags",
    )
    gc.add_argument("--max-size", help="cap to apply instead of [storage] max_size, e.g. 20GiB")
    gc.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    gc.set_defaults(run=_cache_gc)
    verify = cache_commands.add_parser(
        "verify",
        help="hash every stored blob and manifest; quarantine damaged ones (exit 1 if any)",
    )
    verify.add_argument(
        "--quiet", action="store_true", help="no progress, no summary: only damaged files"
    )
    verify.set_defaults(run=_cache_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    return run(args)
