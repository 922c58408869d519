"""examples/fastapi_app.py, as a server runs it: its lifespan, its store from REDIS_URL."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import sys
from collections.abc import AsyncIterator
from types import ModuleType

import httpx
import pytest
from starlette.types import ASGIApp, Message

from redis_plumbing import RedisServer
from session_store import RedisStore

pytestmark = pytest.mark.anyio

MODULE = "examples.fastapi_app"


def fresh_example() -> ModuleType:
    sys.modules.pop(MODULE, None)
    return importlib.import_module(MODULE)


@contextlib.asynccontextmanager
async def running(app: ASGIApp) -> AsyncIterator[None]:
    """The app's lifespan, started and shut down as uvicorn does it."""
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    outbox: asyncio.Queue[Message] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}

    async def serve() -> None:
        await app(scope, inbox.get, outbox.put)

    task = asyncio.create_task(serve())
    await inbox.put({"type": "lifespan.startup"})
    async with asyncio.timeout(5):
        assert (await outbox.get())["type"] == "lifespan.startup.complete"
    try:
        yield
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        async with asyncio.timeout(5):
            assert (await outbox.get())["type"] == "lifespan.shutdown.complete"
            await task


async def test_cart_login_logout_in_redis(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SESSION_SECRET_KEY", "example-app-secret-key-0123456789")
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    monkeypatch.delenv("SESSION_STORE_URL", raising=False)
    app = fresh_example().app
    redis = RedisStore.from_url(redis_server.url)
    transport = httpx.ASGITransport(app=app)
    async with (
        running(app),
        httpx.AsyncClient(transport=transport, base_url="http://testserver") as client,
    ):
        assert (await client.post("/cart", params={"item": "book"})).json() == {"cart": ["book"]}
        anonymous = client.cookies["session"]
        assert (await client.post("/login", params={"user": "alice"})).json() == {"user": "alice"}
        assert client.cookies["session"] != anonymous  # a new id at login
        assert (await client.get("/cart")).json() == {"cart": ["book"]}
        # In the Redis that REDIS_URL names, under the new id only.
        assert await redis.load(client.cookies["session"].split(".")[0]) is not None
        assert await redis.load(anonymous.split(".")[0]) is None
        logout = await client.post("/logout")
        assert "expires=Thu, 01 Jan 1970 00:00:00 GMT" in logout.headers["set-cookie"]
        assert (await client.get("/cart")).json() == {"cart": []}
    await redis.aclose()


async def test_logout_everywhere_ends_the_other_devices_sessions(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SESSION_SECRET_KEY", "example-app-secret-key-0123456789")
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    monkeypatch.delenv("SESSION_STORE_URL", raising=False)
    app = fresh_example().app
    transport = httpx.ASGITransport(app=app)
    user = f"alice-{id(app)}"  # the one Redis is shared by the run: a user of this test's own
    async with running(app), contextlib.AsyncExitStack() as stack:
        laptop, phone, tablet = [
            await stack.enter_async_context(
                httpx.AsyncClient(transport=transport, base_url="http://testserver")
            )
            for _ in range(3)
        ]
        assert (await laptop.post("/logout-everywhere")).status_code == 401
        for device, item in ((laptop, "book"), (phone, "pen"), (tablet, "ink")):
            await device.post("/login", params={"user": user})
            await device.post("/cart", params={"item": item})
        assert (await laptop.post("/logout-everywhere")).json() == {"logged_out": 2}
        assert (await laptop.get("/cart")).json() == {"cart": ["book"]}
        for device in (phone, tablet):
            assert (await device.get("/cart")).json() == {"cart": []}
            assert (await device.post("/logout-everywhere")).status_code == 401


def test_without_a_key_it_says_which_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SESSION_SECRET_KEY", raising=False)
    with pytest.raises(SystemExit, match="set SESSION_SECRET_KEY"):
        fresh_example()
