from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from balancer import BackendState, Metrics, Pool, create_admin_app

B1, B2 = "http://127.0.0.1:9001", "http://127.0.0.1:9002"
TOKEN = "s3cret-token"

pytestmark = pytest.mark.anyio


@pytest.fixture
def pool() -> Pool:
    return Pool([B1, B2])


@pytest.fixture
async def client(pool: Pool) -> AsyncIterator[httpx.AsyncClient]:
    app = create_admin_app(pool=pool, metrics=Metrics(pool), clock=lambda: 100.0)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8081") as client:
        yield client


@pytest.fixture
async def guarded(pool: Pool) -> AsyncIterator[httpx.AsyncClient]:
    app = create_admin_app(pool=pool, metrics=Metrics(pool), token=TOKEN)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8081") as client:
        yield client


async def test_healthz(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_list_backends(client: httpx.AsyncClient, pool: Pool) -> None:
    a, b = list(pool)
    a.request_started()
    b.request_started()
    b.request_finished(failed=True, now=0.0)
    b.mark_down("status 500", 0.0)
    response = await client.get("/backends")
    assert response.status_code == 200
    body = response.json()
    assert body["pool"] == "<Pool [up: 1, draining: 0, drained: 0, down: 1]>"
    first, second = body["backends"]
    assert first["id"] == a.id
    assert first["url"] == B1
    assert (first["state"], first["in_flight"], first["requests_total"]) == ("up", 1, 1)
    assert second["state"] == "down"
    assert second["down_reason"] == "status 500"
    assert (second["failures_total"], second["healthy"], second["ejected_for"]) == (1, False, None)


async def test_add_backend(client: httpx.AsyncClient, pool: Pool) -> None:
    response = await client.post("/backends", json={"url": "http://127.0.0.1:9003/"})
    assert response.status_code == 201
    added = response.json()
    assert added["url"] == "http://127.0.0.1:9003"
    assert added["state"] == "up"
    assert added["id"] in pool
    again = await client.post("/backends", json={"url": "http://127.0.0.1:9003"})
    assert again.status_code == 409
    assert again.json()["reason"] == "exists"


async def test_add_a_named_backend(client: httpx.AsyncClient, pool: Pool) -> None:
    body = {"url": "http://localhost:9003", "name": "app3"}
    response = await client.post("/backends", json=body)
    assert response.status_code == 201
    assert response.json()["id"] == "app3"
    assert pool["app3"].url == "http://localhost:9003"
    again = await client.post("/backends", json={"url": "http://127.0.0.1:9004", "name": "app3"})
    assert again.status_code == 409


async def test_backends_shows_the_routing_fingerprint(pool: Pool) -> None:
    app = create_admin_app(pool=pool, metrics=Metrics(pool), fingerprint=lambda: "0123abcd4567")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8081") as client:
        body = (await client.get("/backends")).json()
    assert body["fingerprint"] == "0123abcd4567"


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        (b"not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "missing_url"),
        (b'{"url": 7}', 400, "missing_url"),
        (b"{}", 400, "missing_url"),
        (b'{"url": "https://x:1"}', 400, "invalid_url"),
        (b'{"url": "http://x:1/path"}', 400, "invalid_url"),
        (b'{"url": "http://x:1", "name": 7}', 400, "invalid_name"),
        (b'{"url": "http://x:1", "name": "a b"}', 400, "invalid_name"),
        (b'{"url": "http://127.0.0.1:9001", "name": "again"}', 409, "exists"),
        (b'{"url": "' + b"x" * 5000 + b'"}', 413, "body_too_large"),
    ],
)
async def test_add_backend_bad_input(
    client: httpx.AsyncClient, pool: Pool, body: bytes, status: int, reason: str
) -> None:
    response = await client.post("/backends", content=body)
    assert response.status_code == status
    assert response.json()["reason"] == reason
    assert response.json()["error"]
    assert len(pool) == 2


async def test_drain_enable_remove(client: httpx.AsyncClient, pool: Pool) -> None:
    backend = next(iter(pool))
    response = await client.post(f"/backends/{backend.id}/drain")
    assert response.status_code == 200
    assert response.json()["state"] == "draining"
    assert backend.state is BackendState.DRAINING
    again = await client.post(f"/backends/{backend.id}/drain")
    assert again.status_code == 409
    assert again.json() == {
        "error": f"cannot drain backend {backend.id}: it is already draining",
        "reason": "invalid_transition",
    }
    response = await client.post(f"/backends/{backend.id}/enable")
    assert response.json()["state"] == "up"
    assert (await client.post(f"/backends/{backend.id}/enable")).status_code == 409
    response = await client.delete(f"/backends/{backend.id}")
    assert response.status_code == 200
    assert backend.id not in pool


async def test_drain_keeps_or_moves_sessions_and_ends_now_when_told(
    client: httpx.AsyncClient, pool: Pool
) -> None:
    first, second = list(pool)[:2]
    kept = (await client.post(f"/backends/{first.id}/drain")).json()
    assert (kept["state"], kept["keep_pinned"], kept["drained_reason"]) == ("draining", True, None)
    moved = (await client.post(f"/backends/{second.id}/drain?sessions=move")).json()
    assert moved["keep_pinned"] is False
    # ?now=1 on a running drain ends it: DRAINED, safe to remove.
    ended = (await client.post(f"/backends/{first.id}/drain?now=1")).json()
    assert (ended["state"], ended["drained_reason"]) == ("drained", "now")
    assert (await client.post(f"/backends/{first.id}/enable")).json()["state"] == "up"
    # ... and on an UP backend it drains and ends at once.
    at_once = (await client.post(f"/backends/{first.id}/drain?now=1")).json()
    assert at_once["state"] == "drained"
    for query, reason in (("sessions=drop", "invalid_sessions"), ("now=yes", "invalid_now")):
        bad = await client.post(f"/backends/{second.id}/drain?{query}")
        assert (bad.status_code, bad.json()["reason"]) == (400, reason)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/backends/nope/drain"),
        ("POST", "/backends/nope/enable"),
        ("DELETE", "/backends/nope"),
    ],
)
async def test_unknown_backend_is_404(client: httpx.AsyncClient, method: str, path: str) -> None:
    response = await client.request(method, path)
    assert response.status_code == 404
    assert response.json() == {"error": "no backend with id 'nope'", "reason": "unknown_backend"}


async def test_unknown_route_and_method_are_json(client: httpx.AsyncClient) -> None:
    missing = await client.get("/nowhere")
    assert (missing.status_code, missing.json()["reason"]) == (404, "not_found")
    wrong = await client.put("/backends")
    assert (wrong.status_code, wrong.json()["reason"]) == (405, "method_not_allowed")


async def test_metrics(client: httpx.AsyncClient, pool: Pool) -> None:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert f'balancer_backend_state{{backend="{next(iter(pool)).id}"' in response.text
    assert "# TYPE balancer_requests_total counter" in response.text


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer wrong"}, 401),
        ({"Authorization": TOKEN}, 401),
        ({"Authorization": f"Bearer {TOKEN}"}, 200),
    ],
)
async def test_token(guarded: httpx.AsyncClient, headers: dict[str, str], status: int) -> None:
    for path in ("/backends", "/metrics"):
        response = await guarded.get(path, headers=headers)
        assert response.status_code == status
        if status == 401:
            assert response.json()["reason"] == "unauthorized"
            assert response.headers["www-authenticate"].startswith("Bearer")
    assert (await guarded.get("/healthz")).status_code == 200  # probes need no token


async def test_token_guards_changes(guarded: httpx.AsyncClient, pool: Pool) -> None:
    backend = next(iter(pool))
    assert (await guarded.post(f"/backends/{backend.id}/drain")).status_code == 401
    assert backend.state is BackendState.UP


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("127.0.0.1:8081", 200),
        ("localhost:8081", 200),
        ("[::1]:8081", 200),
        ("127.0.0.2", 200),
        ("app.localhost", 200),
        ("evil.example:8081", 403),  # DNS rebinding: the attacker's name, our address
        ("10.0.0.1:8081", 403),
        ("[::1", 403),
    ],
)
async def test_without_a_token_only_a_loopback_host_is_served(
    client: httpx.AsyncClient, pool: Pool, host: str, status: int
) -> None:
    backend = next(iter(pool))
    for method, path in (("GET", "/backends"), ("POST", f"/backends/{backend.id}/drain")):
        response = await client.request(method, path, headers={"Host": host})
        assert response.status_code == status
        if status == 403:
            assert response.json()["reason"] == "host_not_allowed"
    assert backend.draining is (status == 200)


async def test_with_a_token_any_host_is_served(guarded: httpx.AsyncClient) -> None:
    headers = {"Host": "balancer.example:8081", "Authorization": f"Bearer {TOKEN}"}
    assert (await guarded.get("/backends", headers=headers)).status_code == 200
