"""`session_store.fastapi.SessionDep` in FastAPI apps, on a real Redis (issue 16)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI, WebSocket
from starlette.types import ASGIApp

from redis_plumbing import RedisServer
from session_store import RedisStore, SessionError, SessionMiddleware
from session_store.fastapi import SessionDep

pytestmark = pytest.mark.anyio

SECRET_KEY = "fastapi-secret-key-0123456789"


@pytest.fixture
async def store(redis_server: RedisServer, prefix: str) -> AsyncIterator[RedisStore]:
    store = RedisStore.from_url(redis_server.url, prefix=prefix)
    yield store
    await store.aclose()


def counter_app(store: RedisStore, *, autoload: bool = True) -> FastAPI:
    app = FastAPI()
    app.add_middleware(SessionMiddleware, store=store, secret_key=SECRET_KEY, autoload=autoload)

    @app.post("/count")
    async def count(session: SessionDep) -> dict[str, int]:
        session["n"] = session.get("n", 0) + 1
        return {"n": session["n"]}

    @app.get("/count")
    async def read(session: SessionDep) -> dict[str, int]:
        return {"n": session.get("n", 0)}

    return app


def client_for(app: ASGIApp) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


@pytest.mark.parametrize("autoload", [True, False])
async def test_the_dependency_gives_a_loaded_session(store: RedisStore, autoload: bool) -> None:
    # autoload=False: the middleware loads nothing; the dependency loads it.
    async with client_for(counter_app(store, autoload=autoload)) as client:
        assert (await client.post("/count")).json() == {"n": 1}
        assert (await client.post("/count")).json() == {"n": 2}
        response = await client.get("/count")
    assert response.json() == {"n": 2}
    assert response.headers["vary"] == "Cookie"
    assert "set-cookie" not in response.headers


async def test_a_websocket_endpoint_reads_the_session(store: RedisStore) -> None:
    app = counter_app(store)
    seen: list[int] = []

    @app.websocket("/ws")
    async def ws(websocket: WebSocket, session: SessionDep) -> None:
        seen.append(session.get("n", 0))
        await websocket.close()

    async with client_for(app) as client:
        await client.post("/count")
        cookie = client.cookies["session"]
    scope = {
        "type": "websocket",
        "path": "/ws",
        "raw_path": b"/ws",
        "query_string": b"",
        "headers": [(b"cookie", f"session={cookie}".encode())],
        "scheme": "ws",
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 5000),
        "root_path": "",
        "subprotocols": [],
        "asgi": {"version": "3.0"},
    }
    sent: list[str] = []
    received = iter([{"type": "websocket.connect"}])

    async def receive() -> dict[str, str]:
        return next(received, {"type": "websocket.disconnect"})

    async def send(message: dict[str, object]) -> None:
        sent.append(str(message["type"]))

    await app(scope, receive, send)  # type: ignore[arg-type]
    assert seen == [1]
    assert sent == ["websocket.close"]


async def test_without_the_middleware_the_dependency_says_so() -> None:
    app = FastAPI()

    @app.get("/")
    async def read(session: SessionDep) -> dict[str, int]:
        return {}

    async with client_for(app) as client:
        with pytest.raises(SessionError, match=r"no session_store\.SessionMiddleware"):
            await client.get("/")
