"""The demo app: a Starlette app whose state lives in its session."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Scope

from session_store import (
    HybridStore,
    MemoryStore,
    RedisStore,
    SessionMiddleware,
    SessionStore,
    StoreUnavailable,
    load_session,
)

from ._page import render_page
from ._registration import Registration

__all__ = [
    "CHAOS_EXIT_CODE",
    "CHAOS_WINDOW",
    "MAX_CART_ITEMS",
    "MAX_ITEM_LENGTH",
    "MAX_ITERATIONS",
    "MAX_WAIT_MS",
    "STORE_TIMEOUT",
    "AppSettings",
    "create_app",
]

logger = logging.getLogger("demo_app")

StoreKind = Literal["memory", "redis", "hybrid"]

MAX_ITERATIONS = 20_000_000  # about a second of one core in CPython
MAX_WAIT_MS = 2000  # milliseconds /work?wait_ms= may wait
MAX_CART_ITEMS = 100
MAX_ITEM_LENGTH = 100  # characters
STORE_TIMEOUT = 1.0  # seconds: bounds each Redis call of the session store
# Only for the demo: every instance must share the key, and no one must rely on it.
DEMO_SECRET = "demo-app-insecure-secret-change-me"

# --chaos, the classic Node cluster demo: each worker dies at a random moment this many
# seconds (from, to) after it starts serving, with this exit code.
CHAOS_WINDOW = (1.0, 3.0)
CHAOS_EXIT_CODE = 70  # EX_SOFTWARE: an internal error, as an uncaught exception would be

_NO_SESSION_PATHS = frozenset({"/healthz", "/readyz", "/work", "/favicon.ico"})


@dataclass(frozen=True, slots=True)
class AppSettings:
    instance_id: str
    store: StoreKind = "memory"
    redis_url: str | None = None
    secret_keys: Sequence[str] = (DEMO_SECRET,)
    cookie_name: str = "sid"
    idle_timeout: float = 30 * 60  # seconds
    chaos: bool = False  # crash at a random moment in CHAOS_WINDOW after starting (tests only)
    # The service registry (docs/registry.md): announce this instance at `advertise` while
    # it serves. Off without `registry_url`.
    registry_url: str | None = None
    service: str = "demo"
    advertise: str | None = None  # http://host:port where callers reach this instance
    registry_ttl: float = 3.0  # seconds without a heartbeat before it counts as dead
    # Acknowledged writes (docs/session_store.md): a session write answers only once this
    # many replicas have it, else 503. 0: off (Redis's asynchronous replication as is).
    min_replicas_ack: int = 0
    ack_timeout_ms: int = 500  # milliseconds a write waits for those replicas


def _make_store(settings: AppSettings) -> SessionStore:
    if settings.store == "memory":
        return MemoryStore()
    if settings.redis_url is None:
        raise ValueError(f"--store {settings.store} needs --redis-url (or REDIS_URL)")
    redis = RedisStore.from_url(
        settings.redis_url,
        timeout=STORE_TIMEOUT,
        min_replicas_ack=settings.min_replicas_ack,
        ack_timeout_ms=settings.ack_timeout_ms,
    )
    return redis if settings.store == "redis" else HybridStore(redis)


def _spin(iterations: int) -> None:
    while iterations > 0:  # the classic Node cluster example's busy loop
        iterations -= 1


def _error(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status)


def create_app(settings: AppSettings) -> Starlette:
    """The demo app for one instance. The store is created here and closed on shutdown."""
    store = _make_store(settings)
    pid = os.getpid()
    registration = None
    if settings.registry_url is not None and settings.advertise is not None:
        registration = Registration(
            settings.registry_url,
            service=settings.service,
            advertise=settings.advertise,
            instance_id=settings.instance_id,
            metadata={"pid": str(pid), "store": settings.store},
            ttl=settings.registry_ttl,
        )

    def identity() -> dict[str, Any]:
        return {"instance": settings.instance_id, "pid": pid}

    async def index(request: Request) -> Response:
        session = dict(request.session.items())
        return HTMLResponse(render_page(settings.instance_id, pid, settings.store, session))

    async def get_session(request: Request) -> Response:
        return JSONResponse({**identity(), "session": dict(request.session.items())})

    async def counter(request: Request) -> Response:
        count = request.session.get("count", 0) + 1
        request.session["count"] = count
        return JSONResponse({**identity(), "count": count})

    async def cart(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, 'body must be JSON: {"item": "..."}')
        item = body.get("item") if isinstance(body, dict) else None
        if not isinstance(item, str) or not 0 < len(item) <= MAX_ITEM_LENGTH:
            return _error(400, f"'item' must be a string of 1 to {MAX_ITEM_LENGTH} characters")
        items: list[str] = request.session.setdefault("cart", [])
        if len(items) >= MAX_CART_ITEMS:
            return _error(413, f"the cart is full ({MAX_CART_ITEMS} items)")
        items.append(item)
        return JSONResponse({**identity(), "cart": items})

    async def logout(request: Request) -> Response:
        (await load_session(request)).destroy()
        return JSONResponse({**identity(), "session": {}})

    async def work(request: Request) -> Response:
        # wait_ms: time spent without CPU, as on a slow database: it builds requests in
        # flight (what --spawn MIN:MAX scales on) even on a 2-core machine. Given alone,
        # it burns no CPU (iterations defaults to 0 then).
        params = request.query_params
        raw = params.get("iterations", "0" if "wait_ms" in params else "1000000")
        try:
            iterations = int(raw)
        except ValueError:
            return _error(400, f"iterations must be an integer, not {raw[:32]!r}")
        if not 0 <= iterations <= MAX_ITERATIONS:
            return _error(400, f"iterations must be between 0 and {MAX_ITERATIONS}")
        raw = params.get("wait_ms", "0")
        try:
            wait_ms = int(raw)
        except ValueError:
            return _error(400, f"wait_ms must be an integer, not {raw[:32]!r}")
        if not 0 <= wait_ms <= MAX_WAIT_MS:
            return _error(400, f"wait_ms must be between 0 and {MAX_WAIT_MS}")
        if wait_ms:
            await asyncio.sleep(wait_ms / 1000)
        if iterations:
            # In a thread, so /healthz still answers while it burns CPU (the GIL is
            # handed over every few milliseconds).
            await run_in_threadpool(_spin, iterations)
        return JSONResponse({**identity(), "iterations": iterations, "wait_ms": wait_ms})

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def readyz(request: Request) -> Response:
        try:
            await store.ping()
        except StoreUnavailable as exc:
            return PlainTextResponse(f"not ready: {exc}\n", status_code=503)
        return PlainTextResponse("ready\n")

    def crash() -> None:
        # os._exit: no cleanup, no graceful close, in-flight requests cut, as a crash is.
        logger.error("--chaos: crashing on purpose (exit %d)", CHAOS_EXIT_CODE)
        os._exit(CHAOS_EXIT_CODE)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        timer = None
        if settings.chaos:
            timer = asyncio.get_running_loop().call_later(random.uniform(*CHAOS_WINDOW), crash)
        try:
            if registration is None:
                yield
            else:
                async with registration.lifespan():
                    yield
        finally:
            if timer is not None:
                timer.cancel()
            await store.aclose()

    def autoload(scope: Scope) -> bool:
        return scope["path"] not in _NO_SESSION_PATHS

    return Starlette(
        routes=[
            Route("/", index),
            Route("/api/session", get_session),
            Route("/api/counter", counter, methods=["POST"]),
            Route("/api/cart", cart, methods=["POST"]),
            Route("/api/logout", logout, methods=["POST"]),
            Route("/work", work),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
        ],
        middleware=[
            Middleware(
                SessionMiddleware,
                store=store,
                secret_keys=settings.secret_keys,
                cookie_name=settings.cookie_name,
                idle_timeout=settings.idle_timeout,
                autoload=autoload,
            )
        ],
        lifespan=lifespan,
    )
