"""Announce an app instance in the service registry for the life of its server.

One line in any ASGI app's lifespan::

    async with registration.lifespan():
        yield

where ``registration = Registration("redis://127.0.0.1:6379/0", service="demo",
advertise="http://127.0.0.1:9001")``. The protocol is `service_registry`'s.

- Register only when ready: the server starts listening only after the lifespan's startup
  (uvicorn), so a task polls ``advertise + ready_path`` and registers once it answers 2xx.
- Heartbeat every ttl / 3 seconds; a Redis that is away is logged once and retried at the
  same pace, and a Redis that restarted empty gets the record again on the next beat.
- Leave first: on SIGTERM or SIGINT (the handler is chained in front of the server's own,
  when the lifespan runs in the main thread, as under uvicorn), deregister, wait
  `leave_wait` seconds (a watcher's refresh interval, so every balancer and client has
  stopped sending), then let the server stop. The lifespan's shutdown deregisters too, for
  servers whose signals we do not see; by then the server may no longer listen.
- Leave but go on serving: on SIGUSR1 (a Kubernetes preStop hook sends it, then waits a
  refresh interval before the SIGTERM comes; deploy/k8s/base/app.yaml), deregister at once
  and stop heartbeating; requests still arriving are served. A later SIGTERM stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from types import FrameType
from typing import Any

import httpx

from service_registry import DEFAULT_REGISTRY_TTL, Instance, Registry, RegistryError

__all__ = ["Registration"]

logger = logging.getLogger("demo_app.registry")

_READY_POLL = 0.05  # seconds between readiness probes of our own server
_LEAVE_WAIT = 1.0  # seconds: twice the balancer's default --discover-interval
_SignalHandler = Callable[[int, FrameType | None], Any]


class Registration:
    """One instance's membership in a service, bound to an ASGI lifespan.

    Raises RegistryError at construction for an invalid service, id, address or ttl.
    `registry` (for tests) replaces the one built from `registry_url`; `http` the client
    that probes readiness. Both are otherwise created in `lifespan()` and closed there.
    """

    def __init__(
        self,
        registry_url: str,
        *,
        service: str,
        advertise: str,
        instance_id: str,
        version: str = "",
        metadata: Mapping[str, str] | None = None,
        ttl: float = DEFAULT_REGISTRY_TTL,
        ready_path: str | None = "/readyz",
        leave_wait: float = _LEAVE_WAIT,
        handle_signals: bool = True,
        registry: Registry | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.instance = Instance(
            service=service,
            id=instance_id,
            address=advertise.rstrip("/"),
            version=version,
            metadata=dict(metadata or {}),
            ttl=ttl,
        )
        self.registry_url = registry_url
        self.ready_path = ready_path
        self.leave_wait = leave_wait
        self.handle_signals = handle_signals
        self._registry = registry
        self._http = http
        self.registered = asyncio.Event()
        self._left = False
        self._task: asyncio.Task[None] | None = None
        self._leaving: asyncio.Task[None] | None = None  # started by a signal
        self._unavailable = False

    def __repr__(self) -> str:
        return f"<Registration {self.instance.service}/{self.instance.id}>"

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Register when ready, heartbeat, and deregister on the way out (see the module)."""
        given_registry, given_http = self._registry, self._http
        self._left = False
        self.registered.clear()
        async with contextlib.AsyncExitStack() as stack:
            # What we create here is ours to close, and forgotten after: a second lifespan
            # of the same app (tests do that) starts afresh.
            stack.callback(self._forget, given_registry, given_http)
            if self._registry is None:
                self._registry = Registry.from_url(self.registry_url, self.instance.service)
                stack.push_async_callback(self._registry.aclose)
            if self._http is None:
                self._http = await stack.enter_async_context(
                    httpx.AsyncClient(trust_env=False, timeout=1.0)
                )
            self._task = asyncio.create_task(self._run(), name="registry-heartbeat")
            restore = self._chain_signals() if self.handle_signals else None
            try:
                yield
            finally:
                if restore is not None:
                    restore()
                await self.leave(wait=False)

    def _forget(self, registry: Registry | None, http: httpx.AsyncClient | None) -> None:
        self._registry, self._http = registry, http

    async def leave(self, *, wait: bool = True) -> None:
        """Stop heartbeating, deregister, and (with `wait`) wait `leave_wait` seconds.

        Idempotent. An unreachable Redis is logged: the TTL removes the instance anyway.
        """
        if self._left:
            return
        self._left = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        registry = self._registry
        if registry is not None and self.registered.is_set():
            try:
                await registry.deregister(self.instance.id)
                logger.info("deregistered %s from %s", self.instance.id, self.instance.service)
            except RegistryError as exc:
                logger.warning("could not deregister (its TTL will): %s", exc)
        if wait and self.registered.is_set():
            # Every watcher reads at least this often: after it, nobody sends us new work.
            await asyncio.sleep(self.leave_wait)

    async def _run(self) -> None:
        await self._wait_ready()
        registry = self._registry
        assert registry is not None
        interval = self.instance.ttl / 3
        while True:
            try:
                if await registry.register(self.instance):
                    logger.info(
                        "registered %s at %s in %s",
                        self.instance.id,
                        self.instance.address,
                        self.instance.service,
                    )
                self.registered.set()
                if self._unavailable:
                    self._unavailable = False
                    logger.info("registry reachable again")
            except RegistryError as exc:
                if not self._unavailable:
                    self._unavailable = True
                    logger.warning("registry unreachable, retrying every %.2f s: %s", interval, exc)
            # The heartbeat's schedule, not a wait for a condition.
            await asyncio.sleep(interval)

    async def _wait_ready(self) -> None:
        if self.ready_path is None:
            return
        http = self._http
        assert http is not None
        url = self.instance.address + self.ready_path
        while True:
            try:
                response = await http.get(url)
                if response.is_success:
                    return
            except httpx.HTTPError:
                pass  # not listening yet
            await asyncio.sleep(_READY_POLL)

    def _chain_signals(self) -> Callable[[], None] | None:
        """Put our SIGTERM/SIGINT handler in front of the server's, ours on SIGUSR1; an undo."""
        if threading.current_thread() is not threading.main_thread():
            return None
        loop = asyncio.get_running_loop()
        previous: dict[int, _SignalHandler] = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            handler = signal.getsignal(signum)
            if callable(handler):
                previous[signum] = handler

        def handle(signum: int, frame: FrameType | None) -> None:
            then = previous.get(signum)
            if self._left or then is None:
                if then is not None:
                    then(signum, frame)  # a second signal: stop now
                return

            async def leave_then_stop() -> None:
                await self.leave()
                then(signum, frame)

            def start() -> None:
                self._leaving = loop.create_task(leave_then_stop(), name="registry-leave")

            # Runs in the main thread between two bytecodes: only schedule work.
            loop.call_soon_threadsafe(start)

        for number in previous:
            signal.signal(number, handle)

        def leave_serving(signum: int, frame: FrameType | None) -> None:
            def start() -> None:
                self._leaving = loop.create_task(self.leave(wait=False), name="registry-leave")

            loop.call_soon_threadsafe(start)

        before_usr1 = signal.signal(signal.SIGUSR1, leave_serving)

        def restore() -> None:
            for number, handler in previous.items():
                if signal.getsignal(number) is handle:
                    signal.signal(number, handler)
            if signal.getsignal(signal.SIGUSR1) is leave_serving:
                signal.signal(signal.SIGUSR1, before_usr1)

        return restore
