"""``python -m balancer --listen HOST:PORT --backend URL ... --sticky cookie:NAME|ip|none``.

Every option: ``python -m balancer --help``, and the table in ``balancer/_config.py``.

With ``--spawn N --worker-cmd TEMPLATE`` (or ``--app MODULE:ATTR``) the balancer also
starts and supervises its app workers: SIGHUP or SIGUSR2 restarts them one at a time,
SIGTTIN and SIGTTOU add and remove one, SIGTERM and SIGINT stop everything. With
``--tls-cert``, SIGUSR1 reads the certificate files again (a bad one changes nothing).
Without ``--spawn``, SIGHUP reads the ``--config`` file again (`control._reload`: a bad
file changes nothing); with it, SIGHUP stays the rolling restart, and POST /config/reload
is the way to reload.

With ``--workers N`` this process forks N balancer processes sharing the port and
supervises them (`_processes.BalancerProcesses`); SIGTERM and SIGINT stop them all, SIGUSR1
and SIGHUP are passed on to each. With
``--admin`` too, it reserves the one admin address's sockets first (`_cluster.reserve`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace

from ._balancer import Balancer, _listen_error, restart_policy
from ._config import Settings, load_or_exit
from ._exceptions import ConfigError, TlsError
from .control._cluster import ClusterMember, ClusterSockets, reserve
from .control._events import CONFIG_RELOAD_FAILED, NO_AFFINITY_SECRET, TLS_RELOAD_FAILED
from .control._log import configure_logging, log_event
from .datapath._affinity import generate_secret
from .datapath._proxy import tune_gc
from .supervisors._processes import CANNOT_SERVE, BalancerProcesses
from .supervisors._supervisor import Command

__all__ = ["main"]


def _reload_tls(balancer: Balancer) -> None:
    if balancer.tls is None:  # a stray signal must not stop the balancer (its default)
        log_event(
            TLS_RELOAD_FAILED,
            level=logging.WARNING,
            source="signal",
            error="SIGUSR1 ignored: the listener does not serve TLS (no --tls-cert)",
        )
        return
    # A bad file is logged by reload_tls, and the certificates in use stay.
    with contextlib.suppress(TlsError):
        balancer.reload_tls("signal")


def _reload_config(balancer: Balancer) -> None:
    reloader = balancer.reloader
    if reloader is None:  # a stray signal must not stop the balancer (its default)
        log_event(
            CONFIG_RELOAD_FAILED,
            level=logging.WARNING,
            source="signal",
            error="SIGHUP ignored: the balancer was started without --config",
        )
        return
    # A bad file is logged by reload, and nothing changes.
    with contextlib.suppress(ConfigError):
        reloader.reload("signal")


def _run_loop(
    settings: Settings,
    *,
    reuse_port: bool,
    cluster: ClusterMember | None,
    argv: Sequence[str] | None = None,
    reload_first: bool = False,
) -> None:
    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)  # the handler only sets a flag
        balancer = Balancer(settings, cluster=cluster, argv=argv)
        loop.add_signal_handler(signal.SIGUSR1, _reload_tls, balancer)
        if balancer.supervisor is None:
            loop.add_signal_handler(signal.SIGHUP, _reload_config, balancer)
        if reload_first and balancer.reloader is not None:
            # A restarted process of --workers N was forked with the settings of the start:
            # it reads the file as its peers last reloaded it (a bad one: those settings).
            with contextlib.suppress(ConfigError):
                balancer.reloader.reload("restart")
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


def _serve_process(
    settings: Settings,
    sockets: ClusterSockets | None,
    argv: Sequence[str],
    index: int,
    restarts: int,
) -> int:
    """Balancer process `index` of `--workers N`, in its forked child: its exit code."""
    cluster = None if sockets is None else sockets.member(index, restarts)
    try:
        _run_loop(settings, reuse_port=True, cluster=cluster, argv=argv, reload_first=restarts > 0)
    except OSError as exc:
        print(f"balancer: balancer process {index}: {exc}", file=sys.stderr)
        return CANNOT_SERVE
    return 0


def _supervise(settings: Settings, argv: Sequence[str]) -> int:
    """``--workers N``: N balancer processes on one port, restarted when they crash."""
    sockets = None
    admin = settings.admin
    if admin is not None:
        try:
            sockets = reserve(admin.host, admin.port, settings.workers)
        except OSError as exc:
            error = _listen_error("--admin", admin.host, admin.port, exc)
            print(f"balancer: error: {error}", file=sys.stderr)
            return 1
    processes = BalancerProcesses(
        settings.workers,
        functools.partial(_serve_process, settings, sockets, argv),
        policy=restart_policy(settings),
        # Each drains for up to --shutdown-deadline itself; SIGKILL only past that.
        stop_timeout=settings.shutdown_deadline + settings.worker_stop_timeout,
    )
    try:
        return processes.run()
    finally:
        if sockets is not None:
            sockets.close()


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)  # kept: a reload reads it again
    settings = load_or_exit(argv, generate=False)
    configure_logging(settings.log_format, access_format=settings.access_log_format)
    if not settings.affinity_secrets:
        if settings.sticky.mode == "cookie":
            # Before any fork: one line, however many --workers share the secret.
            log_event(
                NO_AFFINITY_SECRET,
                level=logging.WARNING,
                hint="no --affinity-secret given: this balancer signs its pins with a secret "
                "of its own, so replicas will not agree on them (a client sent to another "
                "replica loses its pin); give every replica the same --affinity-secret",
            )
        settings = replace(settings, affinity_secrets=(generate_secret(),))
    if settings.workers > 1:
        sys.exit(_supervise(settings, argv))
    try:
        _run_loop(settings, reuse_port=False, cluster=None, argv=argv)
    except OSError as exc:
        # Binding is the one runtime failure a user causes: say which address.
        print(f"balancer: error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
