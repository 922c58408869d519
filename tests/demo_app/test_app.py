"""The demo app in-process: every endpoint, and its answers to bad input."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import httpx
import pytest

from demo_app import AppSettings, create_app
from demo_app._app import MAX_CART_ITEMS, MAX_ITERATIONS, MAX_WAIT_MS
from redis_plumbing import RedisServer

pytestmark = pytest.mark.anyio


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(AppSettings(instance_id="<b>i1</b>"))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver"
    ) as client:
        yield client


async def test_counter_and_session(client: httpx.AsyncClient) -> None:
    assert (await client.post("/api/counter")).json()["count"] == 1
    second = (await client.post("/api/counter")).json()
    assert second["count"] == 2
    assert second["instance"] == "<b>i1</b>"
    session = (await client.get("/api/session")).json()
    assert session["session"] == {"count": 2}
    assert isinstance(session["pid"], int)


async def test_cart_appends_and_validates(client: httpx.AsyncClient) -> None:
    assert (await client.post("/api/cart", json={"item": "book"})).json()["cart"] == ["book"]
    assert (await client.post("/api/cart", json={"item": "pen"})).json()["cart"] == ["book", "pen"]
    for bad in ({"item": ""}, {"item": 3}, {"nope": "x"}, ["item"], {"item": "x" * 101}):
        response = await client.post("/api/cart", json=bad)
        assert response.status_code == 400
        assert "item" in response.json()["error"]
    response = await client.post("/api/cart", content=b"{not json")
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]


async def test_full_cart_is_413(client: httpx.AsyncClient) -> None:
    for i in range(MAX_CART_ITEMS):
        assert (await client.post("/api/cart", json={"item": f"i{i}"})).status_code == 200
    response = await client.post("/api/cart", json={"item": "one more"})
    assert response.status_code == 413
    assert "full" in response.json()["error"]


async def test_logout_destroys(client: httpx.AsyncClient) -> None:
    await client.post("/api/counter")
    response = await client.post("/api/logout")
    assert "expires=Thu, 01 Jan 1970 00:00:00 GMT" in response.headers["set-cookie"]
    assert (await client.get("/api/session")).json()["session"] == {}


@pytest.mark.parametrize(
    ("query", "status"),
    [("1000", 200), ("0", 200), ("abc", 400), ("-1", 400), (str(MAX_ITERATIONS + 1), 400)],
)
async def test_work_bounds_its_input(client: httpx.AsyncClient, query: str, status: int) -> None:
    response = await client.get("/work", params={"iterations": query})
    assert response.status_code == status
    if status == 200:
        assert response.json()["iterations"] == int(query)
    else:
        assert "iterations" in response.json()["error"]


@pytest.mark.parametrize(
    ("query", "status"),
    [("0", 200), ("50", 200), ("abc", 400), ("-1", 400), (str(MAX_WAIT_MS + 1), 400)],
)
async def test_work_waits_without_cpu_within_bounds(
    client: httpx.AsyncClient, query: str, status: int
) -> None:
    started = time.monotonic()
    response = await client.get("/work", params={"wait_ms": query})
    assert response.status_code == status
    if status == 200:
        assert time.monotonic() - started >= int(query) / 1000
        assert response.json()["wait_ms"] == int(query)
        assert response.json()["iterations"] == 0  # a wait alone burns no CPU
    else:
        assert "wait_ms" in response.json()["error"]


async def test_page_escapes_what_it_shows(client: httpx.AsyncClient) -> None:
    await client.post("/api/cart", json={"item": "<script>alert(1)</script>"})
    page = (await client.get("/")).text
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;b&gt;i1&lt;/b&gt;" in page


async def test_health_and_readiness(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).text == "ok\n"
    assert (await client.get("/readyz")).status_code == 200


async def test_not_ready_when_redis_is_down(own_redis: RedisServer) -> None:
    app = create_app(AppSettings(instance_id="r", store="redis", redis_url=own_redis.url))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver"
    ) as client:
        assert (await client.get("/readyz")).status_code == 200
        own_redis.kill()
        response = await client.get("/readyz")
        assert response.status_code == 503
        assert "not ready" in response.text
        assert (await client.get("/healthz")).status_code == 200  # alive, just not ready
