"""The one small app the session benchmark serves three ways (``BENCH_KIND``):

- ``none``: no sessions at all, the ceiling;
- ``ours``: `session_store.SessionMiddleware` with `RedisStore`;
- ``hybrid``: the same with `HybridStore` in front of it (reads from memory, tracking);
- ``starsessions``: starsessions' middleware with its Redis store.

``GET /read`` reads ``count`` from the session; ``POST /write`` increments it.
Run with ``uvicorn --factory benchmarks.session_apps:create``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

SECRET = "benchmark-secret-key-0123456789"


def create() -> Starlette:
    kind = os.environ["BENCH_KIND"]
    redis_url = os.environ.get("REDIS_URL", "")
    counter = {"count": 0}

    async def read(request: Request) -> Response:
        if kind == "none":
            return PlainTextResponse(str(counter["count"]))
        return PlainTextResponse(str(request.session.get("count", 0)))

    async def write(request: Request) -> Response:
        if kind == "none":
            counter["count"] += 1
            return PlainTextResponse(str(counter["count"]))
        request.session["count"] = request.session.get("count", 0) + 1
        return PlainTextResponse(str(request.session["count"]))

    middleware: list[Middleware] = []
    closers: list[Any] = []
    if kind in ("ours", "hybrid"):
        from session_store import HybridStore, RedisStore, SessionMiddleware, SessionStore

        # BENCH_MIN_REPLICAS_ACK: WAIT for that many replicas after each save (redis_topology.py).
        acks = int(os.environ.get("BENCH_MIN_REPLICAS_ACK", "0"))
        redis_store = RedisStore.from_url(redis_url, min_replicas_ack=acks)
        store: SessionStore = HybridStore(redis_store) if kind == "hybrid" else redis_store
        closers.append(store)
        middleware.append(Middleware(SessionMiddleware, store=store, secret_keys=[SECRET]))
    elif kind == "starsessions":
        import redis.asyncio
        from starsessions import SessionAutoloadMiddleware
        from starsessions import SessionMiddleware as StarSessionMiddleware
        from starsessions.stores.redis import RedisStore as StarRedisStore

        client = redis.asyncio.Redis.from_url(redis_url)
        closers.append(client)
        middleware.append(
            Middleware(
                StarSessionMiddleware,
                store=StarRedisStore(connection=client),
                cookie_https_only=False,
                lifetime=3600,
            )
        )
        middleware.append(Middleware(SessionAutoloadMiddleware))
    elif kind != "none":
        raise ValueError(f"BENCH_KIND must be none, ours, hybrid or starsessions, not {kind!r}")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        for closer in closers:
            await closer.aclose()

    return Starlette(
        routes=[Route("/read", read), Route("/write", write, methods=["POST"])],
        middleware=middleware,
        lifespan=lifespan,
    )
