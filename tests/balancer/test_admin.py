from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from balancer import (
    AffinityCookie,
    BackendState,
    Decision,
    Metrics,
    Pool,
    Router,
    Sticky,
    create_admin_app,
)
from tests.helpers import FakeClock
from tests.processes import balancer, demo_app

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
        (b'{"url": "ftp://x:1"}', 400, "invalid_url"),
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


async def test_add_a_backend_with_options(client: httpx.AsyncClient, pool: Pool) -> None:
    body = {"url": "http://127.0.0.1:9003", "weight": 4, "backup": True, "max_conns": 7}
    response = await client.post("/backends", json=body)
    assert response.status_code == 201
    described = response.json()
    assert (described["configured_weight"], described["backup"], described["max_conns"]) == (
        4,
        True,
        7,
    )
    added = pool[described["id"]]
    assert (added.configured_weight, added.backup, added.max_conns) == (4, True, 7)
    cases: list[tuple[dict[str, object], str]] = [
        ({"weight": 0}, "invalid_weight"),
        ({"weight": True}, "invalid_weight"),
        ({"max_conns": -1}, "invalid_max_conns"),
        ({"backup": "yes"}, "invalid_backup"),
    ]
    for bad, reason in cases:
        refused = await client.post("/backends", json={"url": "http://127.0.0.1:9004", **bad})
        assert (refused.status_code, refused.json()["reason"]) == (400, reason)


async def test_patch_changes_a_weight_and_the_pools_generation(
    client: httpx.AsyncClient, pool: Pool
) -> None:
    backend = next(iter(pool))
    generation = pool.generation
    response = await client.patch(f"/backends/{backend.id}", json={"weight": 5})
    assert response.status_code == 200
    assert response.json()["configured_weight"] == 5
    assert backend.configured_weight == 5
    assert pool.generation == generation + 1  # the router rebuilds its table
    listed = (await client.get("/backends")).json()["backends"]
    assert [b["configured_weight"] for b in listed] == [5, 1]


@pytest.mark.parametrize(
    "body",
    [{"weight": 0}, {"weight": 257}, {"weight": 1.5}, {"weight": "2"}, {}, {"weight": 2, "x": 1}],
)
async def test_patch_bad_input_is_400(client: httpx.AsyncClient, pool: Pool, body: object) -> None:
    backend = next(iter(pool))
    response = await client.patch(f"/backends/{backend.id}", json=body)
    assert response.status_code == 400
    assert response.json()["reason"] == "invalid_weight"
    assert "from 1 to 256" in response.json()["error"]
    assert backend.configured_weight == 1
    unknown = await client.patch("/backends/nope", json={"weight": 2})
    assert (unknown.status_code, unknown.json()["reason"]) == (404, "unknown_backend")
    assert (await client.patch(f"/backends/{backend.id}", content=b"{")).status_code == 400


async def test_patch_needs_the_token(guarded: httpx.AsyncClient, pool: Pool) -> None:
    backend = next(iter(pool))
    refused = await guarded.patch(f"/backends/{backend.id}", json={"weight": 3})
    assert refused.status_code == 401
    assert backend.configured_weight == 1
    headers = {"Authorization": f"Bearer {TOKEN}"}
    allowed = await guarded.patch(f"/backends/{backend.id}", json={"weight": 3}, headers=headers)
    assert allowed.status_code == 200
    assert backend.configured_weight == 3


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


# -- sessions, one at a time -------------------------------------------------------------


class Sessions:
    """A router over `pool` with clients pinned through it, and its admin app."""

    def __init__(self, pool: Pool, token: str | None = None) -> None:
        self.clock = FakeClock(1000.0)
        self.affinity = AffinityCookie(secrets=["s" * 16])
        self.router = Router(
            pool, sticky=Sticky.parse("cookie:sid"), affinity=self.affinity, clock=self.clock
        )
        app = create_admin_app(
            pool=pool, metrics=Metrics(pool), clock=self.clock, token=token, router=self.router
        )
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8081"
        )

    def header(self, session: str, backend_id: str) -> bytes:
        return f"sid={session}; lb_affinity=".encode() + self.affinity.sign(backend_id)

    def visit(self, session: str, backend_id: str) -> str:
        """A request of `session` pinned to `backend_id`; the backend it reached."""
        return self.decide(session, backend_id).backend.id

    def decide(self, session: str, backend_id: str) -> Decision:
        """The router's decision for a request of `session` carrying a pin to `backend_id`."""
        header = self.header(session, backend_id)
        return self.router.decide(client_ip="1.2.3.4", cookie_header=header, now=self.clock())


@pytest.fixture
async def sessions(pool: Pool) -> AsyncIterator[Sessions]:
    made = Sessions(pool)
    async with made.client:
        yield made


async def test_sessions_of_a_backend_most_recent_first_bounded_by_limit(
    sessions: Sessions, pool: Pool
) -> None:
    one, two = list(pool)
    for i in range(5):
        sessions.visit(f"s{i}", one.id)
        sessions.clock.advance(10.0)
    sessions.visit("t0", two.id)
    sessions.clock.advance(400.0)  # past PINNED_WINDOW for the first ones...
    sessions.visit("s3", one.id)  # ... but not for the two seen again
    sessions.visit("s4", one.id)
    sessions.clock.advance(2.5)
    response = await sessions.client.get(f"/backends/{one.id}/sessions?limit=1")
    assert response.status_code == 200
    body = response.json()
    assert (body["backend"], body["window"], body["pinned"]) == (one.id, 300.0, 2)
    # The handle, never the cookie's value: "s4" appears nowhere.
    assert "s4" not in response.text
    assert body["sessions"] == [
        {"session": body["sessions"][0]["session"], "seen_ago": 2.5, "backend": one.id,
         "moving": False, "to": None}
    ]  # fmt: skip
    assert len(body["sessions"][0]["session"]) == 16
    both = (await sessions.client.get(f"/backends/{one.id}/sessions")).json()["sessions"]
    assert [s["seen_ago"] for s in both] == [2.5, 2.5]
    assert both[0]["session"] == body["sessions"][0]["session"]
    other = (await sessions.client.get(f"/backends/{two.id}/sessions")).json()
    assert (other["pinned"], other["sessions"]) == (0, [])  # t0: seen too long ago


@pytest.mark.parametrize(
    ("path", "status", "reason"),
    [
        ("/backends/nope/sessions", 404, "unknown_backend"),
        ("/backends/{id}/sessions?limit=0", 400, "invalid_limit"),
        ("/backends/{id}/sessions?limit=1001", 400, "invalid_limit"),
        ("/backends/{id}/sessions?limit=-1", 400, "invalid_limit"),
        ("/backends/{id}/sessions?limit=ten", 400, "invalid_limit"),
    ],
)
async def test_listing_sessions_bad_input(
    sessions: Sessions, pool: Pool, path: str, status: int, reason: str
) -> None:
    response = await sessions.client.get(path.format(id=next(iter(pool)).id))
    assert (response.status_code, response.json()["reason"]) == (status, reason)
    assert response.json()["error"]
    ok = await sessions.client.get(f"/backends/{next(iter(pool)).id}/sessions?limit=1000")
    assert ok.status_code == 200


async def handle_of(sessions: Sessions, backend_id: str) -> str:
    listed = await sessions.client.get(f"/backends/{backend_id}/sessions")
    name: str = listed.json()["sessions"][0]["session"]
    return name


async def test_move_a_session_its_next_request_lands_there_repinned_admin(
    sessions: Sessions, pool: Pool, caplog: pytest.LogCaptureFixture
) -> None:
    one, two = list(pool)
    assert sessions.visit("alice", one.id) == one.id
    name = await handle_of(sessions, one.id)
    with caplog.at_level("INFO", logger="balancer"):
        response = await sessions.client.post(f"/sessions/{name}/move", json={"backend": two.id})
    assert response.status_code == 200
    # Still pinned where it was until its next request carries the order out.
    assert response.json() == {
        "session": name,
        "seen_ago": 0.0,
        "backend": one.id,
        "moving": True,
        "to": two.id,
    }
    events = [r for r in caplog.records if getattr(r, "balancer_event", None) == "session_moved"]
    assert [e.balancer_fields for e in events] == [{"session": name, "backend": two.id}]  # type: ignore[attr-defined]
    # Its next request, still carrying the pin to `one`, goes to `two`: re-pinned, "admin".
    decision = sessions.decide("alice", one.id)
    assert (decision.backend.id, decision.reason) == (two.id, "admin")
    assert decision.set_cookie is not None
    assert sessions.visit("alice", two.id) == two.id  # and stays there
    listed = (await sessions.client.get(f"/backends/{two.id}/sessions")).json()["sessions"]
    assert [(s["session"], s["moving"]) for s in listed] == [(name, False)]


async def test_forget_a_session_its_next_request_is_placed_anew(
    sessions: Sessions, pool: Pool, caplog: pytest.LogCaptureFixture
) -> None:
    one = next(iter(pool))
    sessions.visit("bob", one.id)
    name = await handle_of(sessions, one.id)
    with caplog.at_level("INFO", logger="balancer"):
        response = await sessions.client.delete(f"/sessions/{name}")
    assert response.status_code == 200
    assert response.json()["backend"] == one.id
    assert (response.json()["moving"], response.json()["to"]) == (True, None)
    assert any(getattr(r, "balancer_event", None) == "session_forgotten" for r in caplog.records)
    listed = (await sessions.client.get(f"/backends/{one.id}/sessions")).json()["sessions"]
    assert [(s["session"], s["moving"], s["to"]) for s in listed] == [(name, True, None)]
    decision = sessions.decide("bob", one.id)
    assert decision.reason == "admin"  # placed anew, whichever backend that is


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "reason"),
    [
        ("DELETE", "/sessions/0123456789abcdef", None, 404, "unknown_session"),
        ("POST", "/sessions/0123456789abcdef/move", {"backend": "{one}"}, 404, "unknown_session"),
        ("DELETE", "/sessions/alice", None, 400, "invalid_session"),
        ("POST", "/sessions/ABC/move", {"backend": "{one}"}, 400, "invalid_session"),
        ("POST", "/sessions/{name}/move", {"backend": "nope"}, 404, "unknown_backend"),
        ("POST", "/sessions/{name}/move", {"backend": 7}, 400, "missing_backend"),
        ("POST", "/sessions/{name}/move", {}, 400, "missing_backend"),
        ("POST", "/sessions/{name}/move", {"backend": "{two}"}, 409, "backend_not_up"),
    ],
)
async def test_session_changes_bad_input(
    sessions: Sessions,
    pool: Pool,
    *,
    method: str,
    path: str,
    body: dict[str, object] | None,
    status: int,
    reason: str,
) -> None:
    one, two = list(pool)
    two.mark_down("timeout", 0.0)
    sessions.visit("carol", one.id)
    name = await handle_of(sessions, one.id)
    if body is not None and isinstance(body.get("backend"), str):
        body = {"backend": str(body["backend"]).format(one=one.id, two=two.id)}
    response = await sessions.client.request(method, path.format(name=name), json=body)
    assert (response.status_code, response.json()["reason"]) == (status, reason)
    assert response.json()["error"]
    listed = (await sessions.client.get(f"/backends/{one.id}/sessions")).json()["sessions"]
    assert [(s["session"], s["moving"]) for s in listed] == [(name, False)]  # unchanged


async def test_session_routes_need_the_token_and_the_same_origin(pool: Pool) -> None:
    guarded = Sessions(pool, token=TOKEN)
    one, two = list(pool)
    guarded.visit("dave", one.id)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with guarded.client as client:
        assert (await client.get(f"/backends/{one.id}/sessions")).status_code == 401
        listed = await client.get(f"/backends/{one.id}/sessions", headers=auth)
        handle = listed.json()["sessions"][0]["session"]
        for method, path in (
            ("POST", f"/sessions/{handle}/move"),
            ("DELETE", f"/sessions/{handle}"),
        ):
            assert (await client.request(method, path, json={"backend": two.id})).status_code == 401
            cross = {**auth, "Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"}
            refused = await client.request(method, path, json={"backend": two.id}, headers=cross)
            assert (refused.status_code, refused.json()["reason"]) == (403, "cross_origin")
        listed = await client.get(f"/backends/{one.id}/sessions", headers=auth)
        assert listed.json()["sessions"][0]["moving"] is False  # nothing changed


def test_a_moved_session_lands_on_its_new_backend_through_a_real_balancer() -> None:
    # Real processes: two demo_app instances behind `python -m balancer`, a client with a
    # session on one; the operator lists it, moves it; its next request is answered by the
    # other instance, with the re-pin's reason in --repin-header's header.
    with (
        demo_app("app0") as a,
        demo_app("app1") as b,
        balancer([a.url, b.url], "--sticky", "cookie:sid", "--repin-header", "X-Repin") as (
            lb,
            admin,
        ),
        httpx.Client(timeout=5) as client,
        httpx.Client(base_url=str(admin), timeout=5) as api,
    ):
        first = client.post(lb.url + "/api/counter")
        assert first.status_code == 200
        assert "x-repin" not in first.headers  # a new session is placed, not re-pinned
        here = first.json()["instance"]
        second = client.post(lb.url + "/api/counter").json()
        assert (second["instance"], second["count"]) == (here, 2)
        ids = {b["url"]: b["id"] for b in api.get("/backends").json()["backends"]}
        source = ids[a.url] if here == "app0" else ids[b.url]
        target = ids[b.url] if here == "app0" else ids[a.url]
        listed = api.get(f"/backends/{source}/sessions").json()
        assert listed["pinned"] == 1
        (session,) = listed["sessions"]
        assert session["seen_ago"] < 5
        moved = api.post(f"/sessions/{session['session']}/move", json={"backend": target})
        assert moved.status_code == 200, moved.text
        after = client.post(lb.url + "/api/counter")
        assert after.status_code == 200
        assert after.json()["instance"] != here
        assert after.headers["x-repin"] == "admin"
        again = client.post(lb.url + "/api/counter")  # pinned there now: no re-pin
        assert again.json()["instance"] == after.json()["instance"]
        assert "x-repin" not in again.headers
        # There now (with the app's memory store the session began afresh there, under a
        # new cookie: pinned too), and no longer where it was.
        there = api.get(f"/backends/{target}/sessions").json()["sessions"]
        assert session["session"] in [s["session"] for s in there]
        assert api.get(f"/backends/{source}/sessions").json()["pinned"] == 0
