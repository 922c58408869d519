"""``python -m balancer --listen HOST:PORT --backend URL ... --sticky cookie:NAME|ip|none``.

Every option: ``python -m balancer --help``, and the table in ``balancer/_config.py``.

With ``--spawn N --worker-cmd TEMPLATE`` (or ``--app MODULE:ATTR``) the balancer also
starts and supervises its workers: SIGHUP or SIGUSR2 restarts them one at a time,
SIGTTIN and SIGTTOU add and remove one, SIGTERM and SIGINT stop everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from types import FrameType

from ._affinity import generate_secret
from ._balancer import Balancer
from ._config import Settings, load_or_exit
from ._log import configure_logging, log_event
from ._proxy import tune_gc
from ._supervisor import Command

__all__ = ["main"]


def _run_loop(settings: Settings, *, reuse_port: bool, admin_port_offset: int) -> None:
    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)  # the handler only sets a flag
        balancer = Balancer(settings, admin_port_offset=admin_port_offset)
        supervisor = balancer.supervisor
        if supervisor is not None:
            # The handlers only enqueue; the supervisor's loop does the work.
            for signum, command in (
                (signal.SIGHUP, Command.RESTART),
                (signal.SIGUSR2, Command.RESTART),
                (signal.SIGTTIN, Command.SCALE_UP),
                (signal.SIGTTOU, Command.SCALE_DOWN),
            ):
                loop.add_signal_handler(signum, supervisor.enqueue, command)
        tune_gc()  # start-up is done: everything is imported and configured
        await balancer.serve(stop, reuse_port=reuse_port)

    try:
        import uvloop  # noqa: PLC0415 - optional: the data path is ~2x faster on it
    except ImportError:  # pragma: no cover
        asyncio.run(serve())
    else:
        uvloop.run(serve())


def _worker(settings: Settings, index: int) -> int:
    if sys.platform == "linux":
        # PR_SET_PDEATHSIG: a worker whose parent is killed (even by SIGKILL) gets
        # SIGTERM and drains, rather than live on as an orphan.
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
        if os.getppid() == 1:
            return 0  # the parent died before the line above
    try:
        _run_loop(settings, reuse_port=True, admin_port_offset=index)
    except OSError as exc:
        print(f"balancer: worker {index}: {exc}", file=sys.stderr)
        return 1
    return 0


class _Forward:
    """SIGTERM/SIGINT in the parent: pass it on to every worker (and nothing else)."""

    def __init__(self) -> None:
        self.children: set[int] = set()

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)


def _supervise(settings: Settings) -> int:
    """``--workers N``: N processes accept on one port (SO_REUSEPORT); each is a whole
    balancer with the same backends and secret, so they agree on every pin. Worker i
    serves its admin app on the admin port + i."""
    forward = _Forward()
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for index in range(settings.workers):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os._exit(_worker(settings, index))
        forward.children.add(pid)
    log_event("workers started", workers=settings.workers, pids=sorted(forward.children))
    status = 0
    while forward.children:
        try:
            pid, code = os.wait()
        except ChildProcessError:  # pragma: no cover
            break
        forward.children.discard(pid)
        exit_code = os.waitstatus_to_exitcode(code)
        if exit_code != 0:
            log_event("worker exited", pid=pid, code=exit_code)
            status = 1
    return status


def main(argv: Sequence[str] | None = None) -> None:
    settings = load_or_exit(argv, generate=False)
    configure_logging(settings.log_format)
    if not settings.affinity_secrets:
        if settings.sticky.mode == "cookie":
            # Before any fork: one line, however many --workers share the secret.
            log_event(
                "no_affinity_secret",
                level=logging.WARNING,
                hint="no --affinity-secret given: this balancer signs its pins with a secret "
                "of its own, so replicas will not agree on them (a client sent to another "
                "replica loses its pin); give every replica the same --affinity-secret",
            )
        settings = replace(settings, affinity_secrets=(generate_secret(),))
    if settings.workers > 1:
        sys.exit(_supervise(settings))
    try:
        _run_loop(settings, reuse_port=False, admin_port_offset=0)
    except OSError as exc:
        # Binding is the one runtime failure a user causes: say which address.
        print(f"balancer: error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
