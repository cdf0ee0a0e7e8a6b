"""``streamsync-trio serve``: hypercorn's trio server, with our own signals and workers.

``hypercorn -c hypercorn.toml streamsync_trio.app:app`` works and stays supported, but its
multi-process runner costs a parent process and a resource tracker next to the one worker
(about 40 MiB more), spawns every worker as a fresh interpreter that imports everything again,
and exits 0 even when its worker died of a bad configuration.  This serves the same app
(``streamsync_trio.app:app``) with the same ``hypercorn.toml`` through hypercorn's trio worker:

* ``workers = 1``: in this process; SIGTERM and SIGINT start hypercorn's graceful shutdown.
* ``workers = N``: this process imports and checks everything once, opens the listening
  sockets, then forks N workers that share them (and, copy-on-write, the imported code).  It
  forwards SIGTERM/SIGINT, restarts a worker that dies, and exits with the workers.
  Downloads stay single-flight across workers through the cache's leases (``_lease``).

A bad configuration exits 2 before any worker starts.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import signal
import sys
import time
from functools import partial
from pathlib import Path

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.trio import serve as hypercorn_serve
from hypercorn.trio.run import worker_serve
from hypercorn.typing import Framework
from hypercorn.utils import wrap_app

log = logging.getLogger("streamsync_trio.serve")

_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
# A worker that fails this soon after its start is broken, not unlucky: no restart loop.
_MIN_WORKER_LIFETIME = 2.0
# Workers that keep dying (the OOM killer at work, say) are replaced ever more slowly: after
# a second death within _STABLE_LIFETIME of its start, 1 s, then 2, 4, ... up to 30 s, so
# the supervisor does not fork in a tight loop against whatever kills them.
_STABLE_LIFETIME = 30.0
_RESTART_DELAY_FIRST = 1.0
_RESTART_DELAY_MAX = 30.0


async def _until_signalled(supervisor: int | None = None) -> None:
    """Returns on the first SIGTERM or SIGINT: hypercorn's cue for a graceful shutdown.

    In a forked worker, also at once if its ``supervisor`` is already gone: the kernel's
    parent-death SIGTERM (``_stop_with_parent``) may have come while this worker was still
    starting and ignored it.  Looked at after the receiver is in place, so no death is missed.
    """
    with trio.open_signal_receiver(*_STOP_SIGNALS) as signals:
        if supervisor is not None and os.getppid() != supervisor:
            return
        async for _ in signals:
            return


def serve(
    hypercorn_toml: Path,
    binds: list[str] | None = None,
    graceful_timeout: float | None = None,
    workers: int | None = None,
) -> int:
    server = HypercornConfig()
    if hypercorn_toml.is_file():
        server = HypercornConfig.from_toml(hypercorn_toml)
    if binds:
        server.bind = binds
    if graceful_timeout is not None:
        server.graceful_timeout = graceful_timeout
    if workers is not None:
        server.workers = workers
    # Importing the app module loads and checks the configuration (exit 2 when it is bad),
    # sets up logging and process tuning: exactly what the hypercorn command gets.
    app = importlib.import_module("streamsync_trio.app").app
    if server.workers <= 1:
        trio.run(partial(hypercorn_serve, app, server, shutdown_trigger=_until_signalled))
        return 0
    return _Supervisor(app, server).run()


class _Supervisor:
    """The parent of forked workers: it serves nothing itself and never runs trio, so every
    fork starts from a process without threads or an event loop."""

    def __init__(self, app: Framework, server: HypercornConfig) -> None:
        self._app = app
        self._server = server
        self._workers: dict[int, float] = {}  # pid -> started at (monotonic)
        self._sockets: Sockets | None = None

    def run(self) -> int:
        server = self._server
        self._sockets = server.create_sockets()
        for sock in (*self._sockets.secure_sockets, *self._sockets.insecure_sockets):
            sock.listen(server.backlog)
        # Signals are taken synchronously with sigwait: no handler can run between a fork
        # and the bookkeeping of its pid.
        watched = {*_STOP_SIGNALS, signal.SIGCHLD}
        signal.pthread_sigmask(signal.SIG_BLOCK, watched)
        for _ in range(server.workers):
            self._spawn()
        log.info("serving with %d worker processes", server.workers)
        restarts: list[float] = []  # when to start a replacement (monotonic)
        quick_deaths = 0
        while True:
            if restarts:
                info = signal.sigtimedwait(watched, max(0.0, min(restarts) - time.monotonic()))
                received = None if info is None else info.si_signo
            else:
                received = signal.sigwait(watched)
            if received in _STOP_SIGNALS:
                return self._stop(0)
            for due in [due for due in restarts if due <= time.monotonic()]:
                restarts.remove(due)
                self._spawn()
            for pid, code, lifetime in self._reap():
                if code > 0 and lifetime < _MIN_WORKER_LIFETIME:
                    # Its start failed (say, an unwritable cache): another would fail alike.
                    log.error("worker %d failed at start (exit %d); stopping", pid, code)
                    return self._stop(1)
                # Killed (the OOM killer, an operator) or failed later: replace it.
                quick_deaths = quick_deaths + 1 if lifetime < _STABLE_LIFETIME else 0
                delay = _restart_delay(quick_deaths)
                log.warning("worker %d exited (%d); starting another in %.0f s", pid, code, delay)
                restarts.append(time.monotonic() + delay)

    def _spawn(self) -> None:
        supervisor = os.getpid()
        pid = os.fork()
        if pid == 0:
            _stop_with_parent()
            os._exit(self._work(supervisor))
        self._workers[pid] = time.monotonic()

    def _work(self, supervisor: int) -> int:
        """The forked worker: hypercorn's trio worker on the inherited sockets."""
        try:
            # Ignored outside the trigger's own receiver, which puts back what it found: a
            # Ctrl-C reaches the whole process group and the supervisor forwards a SIGTERM
            # too, and neither second signal may cut the graceful drain short (the
            # supervisor's deadline still ends a worker that does not stop).
            for signum in _STOP_SIGNALS:
                signal.signal(signum, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {*_STOP_SIGNALS, signal.SIGCHLD})
            trio.run(
                partial(
                    worker_serve,
                    wrap_app(self._app, self._server.wsgi_max_body_size, None),
                    self._server,
                    sockets=self._sockets,
                    shutdown_trigger=partial(_until_signalled, supervisor),
                )
            )
            return 0
        except BaseException:
            log.exception("worker %d failed", os.getpid())
            return 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()

    def _reap(self) -> list[tuple[int, int, float]]:
        """Workers that exited: (pid, exit code, seconds they lived); forgets them."""
        ended = []
        while self._workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            started = self._workers.pop(pid, None)
            if started is not None:
                code = os.waitstatus_to_exitcode(status)
                ended.append((pid, code, time.monotonic() - started))
        return ended

    def _stop(self, status: int) -> int:
        """Forward the stop to every worker and wait for them: they drain gracefully."""
        for pid in self._workers:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + self._server.graceful_timeout + 5
        while self._workers:
            for _, code, _ in self._reap():
                status = status or (0 if code == 0 else 1)
            if time.monotonic() > deadline:
                for pid in self._workers:
                    _signal(pid, signal.SIGKILL)
                deadline = float("inf")
            time.sleep(0.05)
        return status


def _restart_delay(quick_deaths: int) -> float:
    """Seconds before replacing a worker, after ``quick_deaths`` short-lived ones in a row."""
    if quick_deaths <= 1:
        return 0.0
    return min(_RESTART_DELAY_MAX, _RESTART_DELAY_FIRST * 2.0 ** (quick_deaths - 2))


def _stop_with_parent() -> None:
    """Have the kernel send this worker SIGTERM when the supervisor dies.

    A supervisor killed outright (``kill -9``, the OOM killer) cannot forward the stop, and
    orphaned workers would go on serving, holding the port that a restarted service needs.
    SIGTERM rather than SIGKILL: it reaches hypercorn's trigger, so in-flight responses get
    their graceful timeout.  A death before the trigger listens is caught by the trigger
    itself (``_until_signalled``).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("worker %d will not stop with its supervisor: prctl failed", os.getpid())


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
