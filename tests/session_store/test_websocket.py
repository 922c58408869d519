"""WebSocket endpoints change the session: saved when the socket closes, or at once with
``await save_session(websocket)``. Through a real uvicorn on a free port, a real WebSocket
client (websockets) and a real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import connect

from redis_plumbing import RedisServer
from session_store import RedisStore, SessionMiddleware, save_session
from tests.helpers import async_wait_for, async_wait_until, free_port
from tests.session_store.app import SECRET

pytestmark = pytest.mark.anyio


def make_app(store: RedisStore) -> Starlette:
    async def read(request: Request) -> JSONResponse:
        return JSONResponse(dict(request.session))

    async def start(request: Request) -> JSONResponse:
        request.session["n"] = 0
        return JSONResponse({})

    async def count(websocket: WebSocket) -> None:
        """Each message adds one to n; "save" saves at once; the socket closes when told."""
        await websocket.accept()
        try:
            while True:
                text = await websocket.receive_text()
                if text == "close":
                    await websocket.close()
                    return
                if text == "save":
                    await save_session(websocket)
                else:
                    websocket.session["n"] += 1
                await websocket.send_text(str(websocket.session["n"]))
        except WebSocketDisconnect:
            return

    async def fresh(websocket: WebSocket) -> None:
        # No cookie can follow the handshake: a session started here is not kept.
        await websocket.accept()
        websocket.session["n"] = 99
        await websocket.close()

    app = Starlette(
        routes=[
            Route("/read", read),
            Route("/start", start, methods=["POST"]),
            WebSocketRoute("/ws", count),
            WebSocketRoute("/fresh", fresh),
        ]
    )
    app.add_middleware(SessionMiddleware, store=store, secret_key=SECRET)
    return app


@pytest.fixture
async def store(redis_server: RedisServer, prefix: str) -> AsyncIterator[RedisStore]:
    store = RedisStore.from_url(redis_server.url, prefix=prefix)
    yield store
    await store.aclose()


@pytest.fixture
async def port(store: RedisStore) -> AsyncIterator[int]:
    """A uvicorn serving the app on 127.0.0.1, in this test's event loop."""
    port = free_port()
    config = uvicorn.Config(make_app(store), host="127.0.0.1", port=port, lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    await async_wait_until(lambda: server.started or task.done(), within=10, what="uvicorn")
    assert server.started
    yield port
    server.should_exit = True
    await asyncio.wait_for(task, 10)


async def start_session(client: httpx.AsyncClient) -> str:
    """A session with n = 0, made over HTTP; its cookie."""
    response = await client.post("/start")
    assert response.status_code == 200
    return client.cookies["session"]


def http(port: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}")


async def test_a_change_made_over_a_websocket_is_saved_when_it_closes(port: int) -> None:
    async with http(port) as client:
        cookie = await start_session(client)
        headers = {"Cookie": f"session={cookie}"}
        async with connect(f"ws://127.0.0.1:{port}/ws", additional_headers=headers) as ws:
            for expected in ("1", "2", "3"):
                await ws.send("+1")
                assert await ws.recv() == expected
            await ws.send("close")
            with pytest.raises(Exception):  # noqa: B017, PT011  # the server closed it
                await ws.recv()
        # The close frame reaches the client before the app's return saves the session:
        # the next request may come first, so it waits (bounded) for the save.
        seen: list[int] = []

        async def read() -> bool:
            seen.append((await client.get("/read")).json()["n"])
            return seen[-1] == 3

        await async_wait_for(read, within=5, what="the websocket's change in the session")
        assert seen[-1] == 3


async def test_a_client_that_disconnects_still_has_its_change_saved(port: int) -> None:
    async with http(port) as client:
        cookie = await start_session(client)
        headers = {"Cookie": f"session={cookie}"}
        async with connect(f"ws://127.0.0.1:{port}/ws", additional_headers=headers) as ws:
            await ws.send("+1")
            assert await ws.recv() == "1"
        # The client went away without the app closing: the app's return saves it.
        seen: list[int] = []

        async def read() -> bool:
            seen.append((await client.get("/read")).json()["n"])
            return seen[-1] == 1

        await async_wait_for(read, within=5, what="the change of a websocket closed by its client")


async def test_save_session_saves_at_once_while_the_socket_stays_open(port: int) -> None:
    async with http(port) as client:
        cookie = await start_session(client)
        headers = {"Cookie": f"session={cookie}"}
        async with connect(f"ws://127.0.0.1:{port}/ws", additional_headers=headers) as ws:
            await ws.send("+1")
            assert await ws.recv() == "1"
            await ws.send("save")
            assert await ws.recv() == "1"
            # Saved while the socket is open: an HTTP request sees it now, no waiting.
            assert (await client.get("/read")).json() == {"n": 1}
            await ws.send("+1")
            assert await ws.recv() == "2"
            await ws.send("save")
            assert await ws.recv() == "2"
            assert (await client.get("/read")).json() == {"n": 2}


async def test_a_session_started_on_a_websocket_is_not_kept(port: int, store: RedisStore) -> None:
    async with connect(f"ws://127.0.0.1:{port}/fresh") as ws:
        with pytest.raises(Exception):  # noqa: B017, PT011  # the server closed it
            await ws.recv()
    # Nothing was created: no cookie could carry its id to the client.
    keys = [key async for key in store.client.scan_iter(f"{store.prefix}*")]
    assert keys == []
