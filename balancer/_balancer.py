"""One balancer process: the proxy listener, the health checks and the admin app, on one pool."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.routing import BaseRoute

from redis_plumbing import redis_client
from service_registry import Registry

from ._config import Settings
from ._exceptions import ListenError, TlsError
from .control._admin import create_admin_app
from .control._cluster import (
    FRONT_ROUTES,
    AdminLog,
    ClusterMember,
    OtherProcesses,
    Peers,
    catch_up,
    internal_app,
    internal_routes,
)
from .control._dashboard import Dashboard, RedisStatus
from .control._discovery import Discovery
from .control._drains import PINNED_WINDOW, DrainWatch
from .control._events import (
    ADMIN_LISTENING,
    DISCOVERING,
    LISTENING,
    ROUTING_TABLE,
    SHUTTING_DOWN,
    STOPPED,
    TLS_RELOAD_FAILED,
    TLS_RELOADED,
    EventFeed,
)
from .control._health import HealthChecker
from .control._log import log_event, log_state_change
from .control._pin_store import SESSION_TTL, PinStore
from .control._proxied_tls import ProxiedTlsListener
from .control._reload import ConfigReloader
from .control._tls import TlsListener, backend_context
from .datapath._http2 import Http2Options
from .datapath._metrics import Metrics
from .datapath._pool import Pool
from .datapath._proxy import ProxyOptions, ProxyServer
from .datapath._router import Router
from .supervisors._autoscale import AutoscalePolicy
from .supervisors._supervisor import Supervisor, SupervisorOptions
from .supervisors._workers import RestartPolicy

__all__ = ["Balancer", "proxy_options", "restart_policy", "supervisor_options"]

logger = logging.getLogger("balancer")


def _listen_error(setting: str, host: str, port: int, exc: OSError) -> ListenError:
    """``exc`` from binding ``host:port`` as one line naming the flag and the address
    (asyncio's says "error while attempting to bind on address ('h', p)", the socket's
    only "[Errno 98] Address already in use")."""
    reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return ListenError(setting, address, reason)


def _served(tls: TlsListener) -> str:
    """The certificates served, for the logs: `cert (names), ...`, the default first."""
    certificates = tls.certificates
    return ", ".join(
        f"{pair.cert} ({' '.join(names) or 'no names'})"
        for pair, names in zip(certificates.pairs, certificates.names, strict=True)
    )


_ADMIN_EXIT_TIMEOUT = 5  # seconds the admin server may take to finish its responses


def proxy_options(settings: Settings) -> ProxyOptions:
    """The data path's share of the settings."""
    return ProxyOptions(
        max_request_line=settings.max_request_line,
        max_header_bytes=settings.max_header_bytes,
        header_timeout=settings.header_timeout,
        idle_timeout=settings.idle_timeout,
        connect_timeout=settings.upstream_connect_timeout,
        response_timeout=settings.upstream_response_timeout,
        keepalive_per_backend=settings.upstream_keepalive,
        retry_ratio=settings.retry_budget,
        retry_floor=settings.retry_floor,
        max_attempts=settings.max_attempts,
        trusted_proxies=tuple(str(network) for network in settings.trusted_proxies),
        proxy_protocol=settings.proxy_protocol,
        shutdown_deadline=settings.shutdown_deadline,
        queue_timeout=settings.queue_timeout,
        access_log=settings.access_log,
        repin_header=settings.repin_header,
    )


def supervisor_options(settings: Settings) -> SupervisorOptions | None:
    """The supervisor's share of the settings; None without --spawn."""
    spawn = settings.spawn
    if spawn is None:
        return None
    autoscale = None
    if isinstance(spawn, int):
        count = spawn
    else:
        count = spawn[0]
        autoscale = AutoscalePolicy(
            minimum=spawn[0],
            maximum=spawn[1],
            target=settings.autoscale_target,
            window=settings.autoscale_window,
            cooldown=settings.autoscale_cooldown,
        )
    return SupervisorOptions(
        command=settings.worker_command(),
        count=count,
        ready_path=settings.worker_ready_path,
        ready_timeout=settings.worker_ready_timeout,
        hang_timeout=settings.worker_hang_timeout,
        drain_deadline=settings.drain_deadline,
        stop_timeout=settings.worker_stop_timeout,
        restart=restart_policy(settings),
        autoscale=autoscale,
    )


def restart_policy(settings: Settings) -> RestartPolicy:
    """When a crashed app worker (`--spawn`) or balancer process (`--workers`) restarts."""
    return RestartPolicy(
        backoff=settings.restart_backoff,
        backoff_max=settings.restart_backoff_max,
        min_uptime=settings.min_uptime,
        max_crashes=settings.max_crashes,
    )


class _AdminServer(uvicorn.Server):
    """uvicorn serving the admin app inside the balancer's loop. The balancer owns the
    process's signals: uvicorn must neither take SIGTERM nor raise it again on exit."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Balancer:
    """Everything one balancer process runs, built from `Settings`.

    `serve()` starts the listener (and the admin app when ``settings.admin`` is
    set), checks the backends until ``stop`` is set, then shuts down in order:
    stop accepting and finish in-flight requests (the proxy's deadline), stop
    the health checks, stop the admin app, close the health-check client.

    With ``settings.spawn``, the listener opens first (a request that comes before a
    worker is ready waits in the proxy's queue), then `supervisor` starts the workers;
    they are stopped right after the proxy has finished its requests.

    With ``settings.discover``, the registry watcher makes one read before the listener
    opens (bounded by the registry's timeout: an unreachable Redis only means starting
    with the configured backends), then follows the registry; it stops after the proxy has
    finished its requests, and its Redis client is closed last.

    With ``cluster`` (`--workers N` and `--admin`), it serves its internal admin endpoint,
    and process 0 the admin address for all of them (`control._cluster`); a restarted one
    replays its peers' admin log before the listener opens.

    With ``settings.config`` and ``argv`` (the command line it was started with, and
    ``environ``, default `os.environ`), `reloader` reads the file again on SIGHUP and
    POST /config/reload (`control._reload`).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        cluster: ClusterMember | None = None,
        clock: Callable[[], float] = time.monotonic,
        argv: Sequence[str] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.cluster = cluster  # with --workers N and --admin: this process's place in it
        self.peers: Peers | None = None  # with `cluster`, once serve() started
        self.pool = Pool(policy=settings.backend_policy(), on_change=log_state_change)
        for spec in settings.backend_options():
            self.pool.add(
                spec.url,
                name=spec.name,
                weight=spec.weight,
                backup=spec.backup,
                max_conns=spec.max_conns,
            )
        self.router = Router(
            self.pool,
            sticky=settings.sticky,
            affinity=settings.affinity() if settings.sticky.mode == "cookie" else None,
            balance=settings.balance,
            hash_balance_factor=settings.hash_balance_factor,
            table_size=settings.hash_table_size,
            on_pinned_down=settings.on_pinned_down,
            strict_window=settings.strict_window,
            clock=clock,
        )
        self.metrics = Metrics(pool=self.pool, sessions=self._pinned_sessions)
        self.router.on_repin = self.metrics.repinned
        self.drains = DrainWatch(self.pool, self.router.pins, clock=clock, on_tick=self.router.tick)
        self.reloader: ConfigReloader | None = None
        if settings.config is not None and argv is not None:
            self.reloader = ConfigReloader(
                settings,
                self.pool,
                argv=argv,
                environ=os.environ if environ is None else environ,
                clock=clock,
            )
            # A backend a reload removed leaves the pool once its drain has ended.
            self.drains.on_drained = self.reloader.drained
        self._fingerprint = ""
        self.pool.on_members = self._log_fingerprint
        self.proxy = ProxyServer(
            self.router, self.metrics, proxy_options(settings), clock=clock, backends=self.pool
        )
        # With --tls-cert: the listener's certificates (loaded and checked by _config).
        self.tls = (
            TlsListener(settings.tls_pairs(), http2=settings.http2) if settings.tls_certs else None
        )
        if self.tls is not None and settings.http2:
            # ALPN h2 connections are handed to the HTTP/2 protocol (datapath._http2).
            self.proxy.http2 = Http2Options().factory()
        # https:// backends are verified alike by the data path and the health checks.
        self.backend_tls = backend_context(settings.backend_ca)
        self.proxy.backend_tls = self.backend_tls
        options = supervisor_options(settings)
        self.supervisor = None if options is None else Supervisor(self.pool, options, clock=clock)
        self.admin: _AdminServer | None = None
        self.dashboard: Dashboard | None = None  # with --admin, once serve() started
        self.discovery: Discovery | None = None  # with --discover, once serve() started
        self.pin_store: PinStore | None = None  # with --pin-store, once serve() started
        self.ready = asyncio.Event()

    def _pinned_sessions(self) -> dict[str, int]:
        return self.router.sessions(self.clock() - PINNED_WINDOW)

    @property
    def port(self) -> int:
        """The port the proxy listens on (useful with port 0)."""
        return self.proxy.port

    async def serve(self, stop: asyncio.Event, *, reuse_port: bool = False) -> None:
        async with contextlib.AsyncExitStack() as stack:
            # Both addresses are bound before either serves: a port in use fails the start
            # with nothing served (the proxy used to listen first, then the admin bind failed).
            admin_sock = self._bind_admin()
            if admin_sock is not None:
                # Closed here if the start fails before uvicorn takes it (twice is harmless).
                stack.callback(admin_sock.close)
                # First: its event feed sees every event from here on.
                self.dashboard = self._dashboard()
                stack.callback(self.dashboard.feed.detach)
            client = await stack.enter_async_context(
                httpx.AsyncClient(trust_env=False, verify=self.backend_tls)
            )
            checker = HealthChecker(
                self.pool, client, self.settings.health_policy(), clock=self.clock
            )
            discovery = await self._start_discovery(stack)
            self._start_pin_store(stack)
            await self._join_cluster(stack)
            if self.supervisor is None:
                await self._listen(reuse_port)
                self._start_admin(admin_sock)
            else:
                # Listening before the workers are ready is safe: a request that comes
                # first waits in the queue (--queue-timeout) rather than be refused.
                self._start_admin(admin_sock)
                await self._listen(reuse_port)
                await self._start_workers(client, stop)
            health = asyncio.create_task(checker.run(), name="health-checks")
            drains = asyncio.create_task(self.drains.run(), name="drains")
            self.ready.set()
            try:
                await stop.wait()
            finally:
                await self._shutdown(health, discovery, drains)

    async def _start_discovery(self, stack: contextlib.AsyncExitStack) -> asyncio.Task[None] | None:
        """With --discover: the registry (closed by `stack`), one first read, the watcher."""
        target = self.settings.discover
        if target is None:
            return None
        registry = Registry.from_target(target)
        stack.push_async_callback(registry.aclose)
        self.discovery = Discovery(
            self.pool, registry, interval=self.settings.discover_interval, clock=self.clock
        )
        await self.discovery.refresh()
        log_event(DISCOVERING, registry=str(target), backends=len(self.pool))
        return asyncio.create_task(self.discovery.run(), name="discovery")

    def _start_pin_store(self, stack: contextlib.AsyncExitStack) -> None:
        """With --pin-store: the router's pin table shared in Redis (`control._pin_store`),
        its writer started; closed by `stack` after the proxy has finished its requests."""
        url = self.settings.pin_store
        if url is None:
            return
        # The client's own timeouts bound the writer; a lookup has its own, shorter one.
        store = PinStore(
            redis_client(url),
            ttl=self.settings.affinity_max_age or SESSION_TTL,
            url=url,
            clock=self.clock,
        )
        store.attach(self.router.pins)
        self.proxy.pin_lookup = store.lookup
        self.metrics.registry.register(store.collector())
        store.start()
        stack.push_async_callback(store.aclose)
        self.pin_store = store

    async def _start_workers(self, client: httpx.AsyncClient, stop: asyncio.Event) -> None:
        """Spawn the workers; wait until they are ready (or the ready timeout, or `stop`)."""
        supervisor = self.supervisor
        assert supervisor is not None
        await supervisor.start(client)
        loop_task = supervisor.loop_task
        assert loop_task is not None

        def loop_ended(task: asyncio.Task[None]) -> None:
            # The supervisor's loop only ends on shutdown; anything else is a bug, and a
            # balancer whose workers nobody watches must not go on as if all were well.
            if not task.cancelled() and task.exception() is not None and not stop.is_set():
                logger.error("the supervisor failed", exc_info=task.exception())
                stop.set()

        loop_task.add_done_callback(loop_ended)
        waits = [
            asyncio.ensure_future(supervisor.started.wait()),
            asyncio.ensure_future(stop.wait()),
        ]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    async def _listen(self, reuse_port: bool) -> None:
        listen = self.settings.listen
        try:
            if self.tls is not None and self.settings.proxy_protocol:
                # The PROXY header comes in clear before the handshake: a listener of its own.
                listener = ProxiedTlsListener(self.proxy, self.tls)
                await listener.start(listen.host, listen.port, reuse_port=reuse_port)
                self.proxy.adopt(listener, tls=True)
            else:
                await self.proxy.start(
                    listen.host,
                    listen.port,
                    reuse_port=reuse_port,
                    tls=self.tls,
                )
        except OSError as exc:
            raise _listen_error("--listen", listen.host, listen.port, exc) from exc
        log_event(
            LISTENING,
            address=f"{listen.host}:{self.proxy.port}",
            backends=len(self.pool),
            sticky=str(self.settings.sticky),
            fingerprint=self.router.fingerprint(),
            tls="off" if self.tls is None else _served(self.tls),
        )
        self._fingerprint = self.router.fingerprint()

    def reload_tls(self, source: str) -> dict[str, object]:
        """Read the listener's certificate files again (SIGUSR1, POST /tls/reload): new
        handshakes get them, open connections keep theirs. Returns what is served now;
        raises TlsError (logged; the certificates in use unchanged) if a file does not
        load, and RuntimeError without TLS."""
        tls = self.tls
        if tls is None:
            raise RuntimeError("the listener does not serve TLS")
        try:
            tls.reload()
        except TlsError as exc:
            log_event(
                TLS_RELOAD_FAILED,
                level=logging.WARNING,
                source=source,
                error=str(exc),
                served=_served(tls),
            )
            raise
        log_event(TLS_RELOADED, source=source, served=_served(tls))
        return {"reloads": tls.reloads, "certificates": _served(tls)}

    def _log_fingerprint(self) -> None:
        """The pool's membership changed: log the routing table's new fingerprint (once
        listening: the first is on the `listening` line)."""
        fingerprint = self.router.fingerprint()
        if self._fingerprint and fingerprint != self._fingerprint:
            self._fingerprint = fingerprint
            log_event(ROUTING_TABLE, fingerprint=fingerprint, backends=len(self.pool))

    def _bind_admin(self) -> socket.socket | None:
        """The admin app's socket, bound (not yet listening); None without --admin.

        Raises `ListenError` naming the address when it cannot be bound.
        """
        address = self.settings.admin
        if address is None:
            return None
        if self.cluster is not None:
            return self.cluster.admin  # reserved by the parent; process 0's only
        port = address.port
        sock = socket.socket(socket.AF_INET6 if ":" in address.host else socket.AF_INET)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address.host, port))
        except OSError as exc:
            sock.close()
            raise _listen_error("--admin", address.host, port, exc) from exc
        return sock

    def _admin_app(self, dashboard: Dashboard | None, front: Sequence[BaseRoute]) -> Starlette:
        return create_admin_app(
            pool=self.pool,
            metrics=self.metrics,
            token=self.settings.admin_token,
            clock=self.clock,
            workers=self.supervisor,
            dashboard=dashboard,
            fingerprint=self.router.fingerprint,
            pins=self.router.pins,
            router=self.router,
            front=front,
            tls_reload=None if self.tls is None else self.reload_tls,
            config_reload=None if self.reloader is None else self.reloader.reload,
        )

    async def _join_cluster(self, stack: contextlib.AsyncExitStack) -> None:
        """With --workers N and --admin: this process's internal admin endpoint on its
        loopback socket, and `peers`, the calls to every process's; a restarted process
        first replays its peers' admin log (`_cluster`), before it listens."""
        member = self.cluster
        if member is None:
            return
        client = await stack.enter_async_context(httpx.AsyncClient(trust_env=False))
        self.peers = Peers(member.addresses, client, token=self.settings.admin_token)
        log = AdminLog()
        app = self._admin_app(None, internal_routes())
        app.state.admin_log = log
        if member.restarts:
            await catch_up(member, self.peers, app, log)
        if self.dashboard is not None:  # process 0's: it shows the whole balancer
            self.dashboard.others = OtherProcesses(self.peers, member.index)
        config = uvicorn.Config(
            internal_app(app, log),
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=_ADMIN_EXIT_TIMEOUT,
        )
        server = _AdminServer(config)
        task = asyncio.create_task(server.serve(sockets=[member.internal]), name="admin-internal")

        async def stop() -> None:  # after _shutdown, before the client is closed
            server.should_exit = True
            await task

        stack.push_async_callback(stop)

    def _start_admin(self, sock: socket.socket | None) -> None:
        """Serve the admin app and the dashboard on ``sock`` (from `_bind_admin`)."""
        address = self.settings.admin
        if address is None or sock is None:
            return
        assert self.dashboard is not None  # made by serve() with --admin
        # With --workers N, this is the front: the whole balancer's admin address.
        app = self._admin_app(self.dashboard, () if self.peers is None else FRONT_ROUTES)
        app.state.peers = self.peers
        # The dashboard's streams are ended before the server is told to exit; the
        # timeout is the backstop for any other response that would hold the exit up.
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=_ADMIN_EXIT_TIMEOUT,
        )
        self.admin = _AdminServer(config)
        self._admin_task = asyncio.create_task(self.admin.serve(sockets=[sock]), name="admin")
        self._dashboard_task = asyncio.create_task(self.dashboard.run(), name="dashboard")
        self.admin_port: int = sock.getsockname()[1]
        log_event(ADMIN_LISTENING, address=f"{address.host}:{self.admin_port}")

    def _dashboard(self) -> Dashboard:
        """The dashboard, its event feed on the `balancer` logger, and what it shows."""
        settings = self.settings
        feed = EventFeed()
        feed.attach()
        redis_url = settings.dashboard_redis
        if redis_url is None and settings.discover is not None:
            redis_url = settings.discover.redis_url
        sticky = settings.sticky
        mode = settings.dashboard_mode or ("shared" if sticky.mode == "none" else None)
        info: dict[str, object] = {
            "mode": mode,
            "sticky": str(sticky),
            "listen": str(settings.listen),
            "admin": str(settings.admin),
            "pid": os.getpid(),
            "spawn": self.supervisor is not None,
            "drain_sessions": settings.drain_sessions,  # the drain button's default choice
            "discover": None if settings.discover is None else str(settings.discover),
        }
        return Dashboard(
            pool=self.pool,
            metrics=self.metrics,
            feed=feed,
            info=info,
            router=self.router,
            workers=self.supervisor,
            redis=None if redis_url is None else RedisStatus(redis_url),
            clock=self.clock,
        )

    async def _shutdown(
        self,
        health: asyncio.Task[None],
        discovery: asyncio.Task[None] | None = None,
        drains: asyncio.Task[None] | None = None,
    ) -> None:
        log_event(SHUTTING_DOWN, in_flight=sum(b.in_flight for b in self.pool))
        await self.proxy.shutdown()
        if self.supervisor is not None:
            await self.supervisor.shutdown()
        for task in (health, discovery, drains):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.admin is not None:
            dashboard = self.dashboard
            assert dashboard is not None
            # First end the page's streams: uvicorn waits for open responses to finish.
            dashboard.close()
            self._dashboard_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dashboard_task
            self.admin.should_exit = True
            await self._admin_task
            if dashboard.redis is not None:
                await dashboard.redis.aclose()
        log_event(STOPPED)
