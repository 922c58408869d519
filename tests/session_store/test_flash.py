"""Flash messages through the middleware, on memory and on a real Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from redis_plumbing import RedisServer
from session_store import (
    MemoryStore,
    RedisStore,
    Session,
    SessionError,
    SessionMiddleware,
    SessionStore,
    flash,
    get_flashed_messages,
)
from tests.session_store.app import SECRET

pytestmark = pytest.mark.anyio


def make_app(store: SessionStore) -> Starlette:
    async def save(request: Request) -> Response:
        flash(request, "Saved.", "success")
        if "warn" in request.query_params:
            flash(request, request.query_params["warn"], "warning")
        return RedirectResponse("/page", status_code=303)

    async def page(request: Request) -> Response:
        only = request.query_params.getlist("only")
        return JSONResponse(get_flashed_messages(request, category_filter=only))

    async def plain(request: Request) -> Response:
        flash(request, "Hello.")
        return JSONResponse({})

    app = Starlette(
        routes=[
            Route("/save", save, methods=["POST"]),
            Route("/page", page),
            Route("/plain", plain),
        ]
    )
    app.add_middleware(SessionMiddleware, store=store, secret_key=SECRET)
    return app


@pytest.fixture(params=["memory", "redis"])
async def client(
    request: pytest.FixtureRequest, redis_server: RedisServer, prefix: str
) -> AsyncIterator[httpx.AsyncClient]:
    store: SessionStore = (
        MemoryStore()
        if request.param == "memory"
        else RedisStore.from_url(redis_server.url, prefix=prefix)
    )
    transport = httpx.ASGITransport(app=make_app(store))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://testserver", follow_redirects=True
    ) as client:
        yield client
    await store.aclose()


async def test_a_flashed_message_is_shown_once_after_the_redirect(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/save")
    assert response.url.path == "/page"
    assert response.json() == [["success", "Saved."]]
    assert (await client.get("/page")).json() == []


async def test_messages_add_up_in_order_until_shown(client: httpx.AsyncClient) -> None:
    await client.get("/plain")
    response = await client.post("/save", params={"warn": "Disk nearly full."})
    assert response.json() == [
        ["message", "Hello."],
        ["success", "Saved."],
        ["warning", "Disk nearly full."],
    ]


async def test_a_category_filter_leaves_the_other_messages(client: httpx.AsyncClient) -> None:
    await client.get("/plain")
    await client.get("/plain")
    await client.post("/save", params={"warn": "Careful."}, follow_redirects=False)
    assert (await client.get("/page", params={"only": "warning"})).json() == [
        ["warning", "Careful."]
    ]
    assert (await client.get("/page", params={"only": ["success", "nothing"]})).json() == [
        ["success", "Saved."]
    ]
    assert (await client.get("/page")).json() == [["message", "Hello."], ["message", "Hello."]]
    assert (await client.get("/page")).json() == []


def test_bad_arguments_are_named() -> None:
    with pytest.raises(TypeError, match="both strings"):
        flash(Session(), 42)  # type: ignore[arg-type]
    with pytest.raises(SessionError, match="SessionMiddleware in front"):
        get_flashed_messages(Request({"type": "http", "headers": []}))


def test_a_damaged_entry_is_skipped_not_a_500() -> None:
    session = Session({"_flashes": [["success", "ok"], "junk", [1]]})
    assert get_flashed_messages(session) == [("success", "ok")]
    assert "_flashes" not in session
