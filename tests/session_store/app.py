"""A small app for middleware tests, and a store wrapper that records the calls it passes on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from session_store import Changes, SessionMiddleware, SessionRecord, SessionStore, load_session

SECRET = "test-secret-key-0123456789"


class RecordingStore:
    """Passes every call on to a real store and remembers which ones were made."""

    def __init__(self, inner: SessionStore) -> None:
        self.inner = inner
        self.calls: list[str] = []

    async def load(self, session_id: str) -> SessionRecord | None:
        self.calls.append("load")
        return await self.inner.load(session_id)

    async def save(
        self, session_id: str, changes: Changes, *, created: float, ttl: float, create: bool
    ) -> int | None:
        self.calls.append("create" if create else "update")
        return await self.inner.save(session_id, changes, created=created, ttl=ttl, create=create)

    async def touch(self, session_id: str, ttl: float) -> None:
        self.calls.append("touch")
        await self.inner.touch(session_id, ttl)

    async def destroy(self, session_id: str, *, ttl: float) -> None:
        self.calls.append("destroy")
        await self.inner.destroy(session_id, ttl=ttl)

    async def ping(self) -> None:
        await self.inner.ping()

    async def aclose(self) -> None:
        await self.inner.aclose()


class Gate:
    """Holds requests inside the app until released, so that they overlap for real."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.arrived = 0
        self.all_arrived = asyncio.Event()
        self.release = asyncio.Event()

    def arrive(self) -> None:
        self.arrived += 1
        if self.arrived >= self.expected:
            self.all_arrived.set()


def make_app(store: SessionStore, gate: Gate | None = None, **options: Any) -> Starlette:
    async def read(request: Request) -> Response:
        return JSONResponse(dict(request.session.items()))

    async def set_value(request: Request) -> Response:
        for key, value in request.query_params.items():
            request.session[key] = value
        return JSONResponse(dict(request.session.items()))

    async def append(request: Request) -> Response:
        request.session.setdefault("items", []).append(request.query_params["item"])
        return JSONResponse(dict(request.session.items()))

    async def gated_set(request: Request) -> Response:
        assert gate is not None
        session = await load_session(request)
        gate.arrive()
        await gate.release.wait()
        for key, value in request.query_params.items():
            session[key] = value
        return PlainTextResponse("ok")

    async def regenerate(request: Request) -> Response:
        (await load_session(request)).regenerate()
        return PlainTextResponse("ok")

    async def destroy(request: Request) -> Response:
        (await load_session(request)).destroy()
        return PlainTextResponse("ok")

    async def explicit(request: Request) -> Response:
        session = await load_session(request)
        session["explicit"] = True
        return JSONResponse(dict(session.items()))

    async def noop(request: Request) -> Response:
        return PlainTextResponse("no session here")

    async def stream(request: Request) -> Response:
        request.session["streamed"] = True

        async def body() -> AsyncIterator[bytes]:
            for i in range(3):
                yield f"chunk {i}\n".encode()

        return StreamingResponse(body(), media_type="text/plain")

    async def put_object(request: Request) -> Response:
        request.session["bad"] = object()
        return PlainTextResponse("ok")

    return Starlette(
        routes=[
            Route("/read", read),
            Route("/set", set_value, methods=["POST"]),
            Route("/append", append, methods=["POST"]),
            Route("/gated-set", gated_set, methods=["POST"]),
            Route("/regenerate", regenerate, methods=["POST"]),
            Route("/destroy", destroy, methods=["POST"]),
            Route("/explicit", explicit, methods=["POST"]),
            Route("/noop", noop),
            Route("/stream", stream),
            Route("/object", put_object, methods=["POST"]),
        ],
        middleware=[
            Middleware(SessionMiddleware, store=store, **{"secret_keys": [SECRET], **options})
        ],
    )
