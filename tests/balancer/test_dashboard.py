"""The dashboard without a browser: rates from counters, the event feed, the sessions count,
subscribers (slow ones dropped, all ended at shutdown), the page's headers and the token.

The stream itself, a closed tab and SIGTERM with a page open run against a real balancer
process at the end; the page in a real browser is in test_dashboard_browser.py.
"""

from __future__ import annotations

import json
import logging
import random
import signal
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from balancer import (
    AffinityCookie,
    ConfigError,
    Metrics,
    Pool,
    Router,
    Sticky,
    create_admin_app,
    load_settings,
)
from balancer.control._dashboard import (
    HISTORY,
    SESSIONS_MAX,
    WINDOW,
    BackendRow,
    Dashboard,
    RedisStatus,
    Snapshot,
    quantile,
)
from balancer.control._events import EventFeed
from balancer.datapath._metrics import BUCKETS
from redis_plumbing import RedisServer
from tests.helpers import FakeClock, Stream, free_port, wait_for
from tests.processes import balancer

B1, B2 = "http://127.0.0.1:9001", "http://127.0.0.1:9002"
TOKEN = "dashboard-token-0123"


# -- pure parts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "setting", "words"),
    [
        (["--dashboard-mode", "sticky-ish"], "--dashboard-mode", "expected one of sticky"),
        (["--dashboard-redis", "http://127.0.0.1:6379"], "--dashboard-redis", "redis://"),
    ],
)
def test_dashboard_options_name_the_bad_flag(argv: list[str], setting: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(["--backend", B1, *argv], {})
    assert info.value.setting == setting
    assert words in str(info.value)


def test_dashboard_options_from_flags_and_environment() -> None:
    settings = load_settings(["--backend", B1, "--dashboard-mode", "hybrid"], {})
    assert settings.dashboard_mode == "hybrid"
    env = {"BALANCER_DASHBOARD_REDIS": "redis://:pw@127.0.0.1:6379/0"}
    settings = load_settings(["--backend", B1], env)
    assert settings.dashboard_redis == "redis://:pw@127.0.0.1:6379/0"
    assert "pw" not in repr(settings)  # kept out of logs


def histogram(**by_bound: int) -> list[int]:
    """Non-cumulative buckets from counts keyed like b0_001 (the 0.001 bound) or inf."""
    buckets = [0] * (len(BUCKETS) + 1)
    for key, count in by_bound.items():
        index = len(BUCKETS) if key == "inf" else BUCKETS.index(float(key[1:].replace("_", ".")))
        buckets[index] = count
    return buckets


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        (0.5, histogram(), None),
        (0.5, histogram(b0_001=10), 0.00075),  # halfway through (0.0005, 0.001]
        (0.99, histogram(b0_001=10), 0.000995),
        (0.5, histogram(b0_0005=4), 0.00025),  # the first bucket starts at 0
        (0.5, histogram(b0_001=50, b0_1=50), 0.001),  # exactly at a boundary
        (0.99, histogram(b0_001=50, b0_1=50), 0.05 + 0.05 * 0.98),
        (0.99, histogram(b0_001=1, inf=99), 10.0),  # +Inf: the last finite bound
    ],
)
def test_quantile_from_buckets(q: float, buckets: list[int], expected: float | None) -> None:
    result = quantile(q, buckets)
    assert result == expected if expected is None else result == pytest.approx(expected)


def test_event_feed_keeps_events_not_log_lines_and_forgets_the_oldest() -> None:
    logger = logging.getLogger("balancer.test-feed")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    feed = EventFeed(capacity=3, clock=FakeClock(1000.0), logger=logger)
    feed.attach()
    try:
        logger.warning("a free-text line is not an event")
        for i in range(5):
            logger.info("e", extra={"balancer_event": f"e{i}", "balancer_fields": {"i": i}})
        logger.info(
            "x",
            extra={"balancer_event": "odd", "balancer_fields": {"error": OSError("no"), "l": (1,)}},
        )
    finally:
        feed.detach()
    events = feed.after(0)
    assert [e.name for e in events] == ["e3", "e4", "odd"]
    assert [e.seq for e in events] == [4, 5, 6]
    assert events[-1].fields == {"error": "no", "l": [1]}  # JSON-safe
    assert [e.name for e in feed.after(5)] == ["odd"]
    assert feed.after(6) == []
    assert [e.name for e in feed.after(0, limit=1)] == ["odd"]
    json.dumps([e.as_json() for e in events])


COOKIE = Sticky("cookie", "sid")


def make_dashboard(
    urls: tuple[str, ...] = (B1, B2), *, sticky: Sticky = COOKIE
) -> tuple[Dashboard, Pool, Metrics, Router, FakeClock]:
    pool = Pool(urls)
    metrics = Metrics(pool)
    clock = FakeClock(100.0)
    router = Router(
        pool,
        sticky=sticky,
        affinity=AffinityCookie(secrets=["s" * 16]),
        rng=random.Random(1),
        clock=clock,
    )
    dashboard = Dashboard(
        pool=pool,
        metrics=metrics,
        feed=EventFeed(clock=clock),
        info={"mode": "hybrid"},
        router=router,
        clock=clock,
        wall=clock,
    )
    return dashboard, pool, metrics, router, clock


def ticked(dashboard: Dashboard) -> Snapshot:
    """`dashboard.tick()`, with a subscriber: a snapshot (None without one)."""
    snapshot = dashboard.tick()
    assert snapshot is not None
    return snapshot


def row(snapshot: Snapshot, backend_id: str) -> BackendRow:
    return next(b for b in snapshot["backends"] if b["id"] == backend_id)


def test_rates_error_rate_and_percentiles_come_from_counter_deltas() -> None:
    dashboard, pool, metrics, _, clock = make_dashboard()
    one, two = list(pool)
    dashboard.tick()
    subscriber = dashboard.subscribe()
    assert subscriber is not None
    for _ in range(4):
        clock.advance(1.0)
        for _ in range(9):
            metrics.request_done(one.id, 200, 0.0008)
        metrics.request_done(one.id, 502, 0.2)
        snapshot = ticked(dashboard)
    first = row(snapshot, one.id)
    assert first["rps"] == 10.0
    assert first["error_rate"] == 0.1
    assert first["p50_ms"] == pytest.approx(0.5 + 0.5 * (20 - 0) / 36, abs=0.01)
    assert first["p99_ms"] == pytest.approx(100 + 150 * (39.6 - 36) / 4, abs=0.01)
    second = row(snapshot, two.id)
    assert (second["rps"], second["error_rate"], second["p50_ms"]) == (0, None, None)
    assert second["state"] == "up"
    assert second["since"] == 100.0
    # Older than the window: the error rate is over the last WINDOW ticks only.
    for _ in range(WINDOW):
        clock.advance(1.0)
        for _ in range(10):
            metrics.request_done(one.id, 200, 0.0008)
        snapshot = ticked(dashboard)
    assert row(snapshot, one.id)["error_rate"] == 0.0
    # The chart's history: one point a tick, bounded.
    hello = dashboard.hello()
    history = hello["history"]
    assert isinstance(history, dict)
    assert history["rps"][one.id][-1] == 10.0
    for _ in range(HISTORY + 5):
        dashboard.tick()
    assert len(dashboard.hello()["history"]["rps"][one.id]) == HISTORY


def test_state_since_follows_changes() -> None:
    dashboard, pool, _, _, clock = make_dashboard()
    one = next(iter(pool))
    assert dashboard.subscribe() is not None
    clock.advance(5.0)
    one.mark_down("connection refused", clock())
    snapshot = ticked(dashboard)
    first = row(snapshot, one.id)
    assert (first["state"], first["reason"]) == ("down", "connection refused")
    assert first["since"] == 105.0
    clock.advance(3.0)
    assert row(ticked(dashboard), one.id)["since"] == 105.0


def test_sessions_are_counted_per_backend_and_their_moves_reported() -> None:
    dashboard, pool, _, router, clock = make_dashboard()
    one, two = list(pool)
    affinity = AffinityCookie(secrets=["s" * 16])
    headers = {}
    for i in range(6):
        pinned = one if i < 4 else two
        header = f"sid=session{i}; lb_affinity=".encode() + affinity.sign(pinned.id)
        headers[i] = header
        assert router.decide(client_ip="1.2.3.4", cookie_header=header).backend is pinned
    router.decide(client_ip="1.2.3.4", cookie_header=b"other=1")  # no session: not counted
    assert dashboard.subscribe() is not None
    snapshot = ticked(dashboard)
    assert (row(snapshot, one.id)["sessions"], row(snapshot, two.id)["sessions"]) == (4, 2)
    # `one` goes down: its clients come back, are re-pinned to `two`, and that is an event.
    one.mark_down("timeout", clock())
    for i in range(4):
        assert router.decide(client_ip="1.2.3.4", cookie_header=headers[i]).backend is two
    clock.advance(1.0)
    snapshot = ticked(dashboard)
    # Sessions 4 and 5 were not seen again, but are remembered where they were.
    assert (row(snapshot, one.id)["sessions"], row(snapshot, two.id)["sessions"]) == (0, 6)
    moved = [e for e in dashboard.feed.after(0) if e.name == "sessions_moved"]
    assert [e.fields for e in moved] == [{"from": B1, "sessions": 4, "to": {B2: 4}}]
    # Forgotten SESSION_TTL seconds after leaving the router's cache.
    pool.add("http://127.0.0.1:9003")  # a new generation empties the cache
    router.decide(client_ip="1.2.3.4", cookie_header=b"x=1")
    clock.advance(1.0)
    assert row(ticked(dashboard), two.id)["sessions"] == 6  # seen until now
    clock.advance(301.0)
    assert row(ticked(dashboard), two.id)["sessions"] == 0


def test_a_draining_row_shows_its_pinned_sessions_falling_and_a_drained_one_why() -> None:
    dashboard, pool, _, router, clock = make_dashboard()
    one, two = list(pool)
    affinity = AffinityCookie(secrets=["s" * 16])

    def visit(session: str, backend_id: str) -> None:
        header = f"sid={session}; lb_affinity=".encode() + affinity.sign(backend_id)
        router.decide(client_ip="1.2.3.4", cookie_header=header, now=clock())

    for i in range(3):
        visit(f"s{i}", one.id)
    visit("t0", two.id)
    assert dashboard.subscribe() is not None
    first = row(ticked(dashboard), one.id)
    assert (first["pinned"], row(ticked(dashboard), two.id)["pinned"]) == (3, 1)
    assert (first["active"], first["drain_for"], first["drain_sessions"]) == (None, None, None)
    pool.drain(one.id, clock(), sessions="keep")  # --drain-idle: the policy's 10 s
    clock.advance(6.0)
    visit("s0", one.id)  # a pinned client keeps coming back
    draining = row(ticked(dashboard), one.id)
    assert (draining["state"], draining["drain_sessions"], draining["drain_for"]) == (
        "draining",
        "keep",
        6.0,
    )
    assert (draining["pinned"], draining["active"]) == (3, 3)
    clock.advance(6.0)  # s1 and s2 not seen for 12 s, s0 for 6
    assert row(ticked(dashboard), one.id)["active"] == 1
    clock.advance(5.0)
    assert row(ticked(dashboard), one.id)["active"] == 0
    assert [b.id for b, _ in pool.drain_tick(clock())] == [one.id]  # idle for 17 s
    drained = row(ticked(dashboard), one.id)
    assert (drained["state"], drained["drained_reason"]) == ("drained", "idle")
    assert (drained["active"], drained["drain_sessions"]) == (None, None)
    assert row(ticked(dashboard), two.id)["drained_reason"] is None


def test_sessions_are_not_shown_without_cookie_stickiness() -> None:
    dashboard, pool, *_ = make_dashboard(sticky=Sticky("none"))
    assert dashboard.subscribe() is not None
    snapshot = ticked(dashboard)
    assert row(snapshot, next(iter(pool)).id)["sessions"] is None
    assert row(snapshot, next(iter(pool)).id)["pinned"] is None
    assert snapshot["totals"]["sessions"] is None


def test_failovers_and_repins_become_one_event_per_tick() -> None:
    dashboard, _, metrics, _, _ = make_dashboard()
    assert dashboard.subscribe() is not None
    dashboard.tick()
    for _ in range(3):
        metrics.failover()
    metrics.repinned("down")
    snapshot = ticked(dashboard)
    events = snapshot["events"]
    assert isinstance(events, list)
    assert [(e["name"], e["fields"]) for e in events] == [
        ("failover", {"requests": 3, "repinned": 1})
    ]
    assert ticked(dashboard)["events"] == []


def test_a_slow_subscriber_is_dropped_and_close_ends_every_stream() -> None:
    dashboard, *_ = make_dashboard()
    slow, live = dashboard.subscribe(), dashboard.subscribe()
    assert slow is not None
    assert live is not None
    for _ in range(dashboard.max_queue + 1):
        live.messages.clear()  # `live` reads everything; `slow` reads nothing
        dashboard.tick()
    assert slow.closed == "dropped"
    assert slow.wake.is_set()
    assert live.closed is None
    assert dashboard.subscribers == 1
    dashboard.close()
    assert live.closed == "shutdown"
    assert dashboard.subscribers == 0
    assert dashboard.subscribe() is None  # shutting down: no new streams


def test_hello_carries_recent_events_and_a_full_snapshot() -> None:
    dashboard, pool, *_ = make_dashboard()
    dashboard.feed.add("backend_state", {"backend": "x", "new": "down"}, "WARNING")
    subscriber = dashboard.subscribe()
    assert subscriber is not None
    kind, _, data = subscriber.messages[0].decode().partition("\ndata: ")
    assert kind == "event: hello"
    hello = json.loads(data)
    assert [b["url"] for b in hello["backends"]] == [b.url for b in pool]
    assert hello["info"] == {"mode": "hybrid"}
    assert [e["name"] for e in hello["events"]] == ["backend_state"]


@pytest.mark.anyio
async def test_redis_status_reachable_with_its_commands_then_not(redis_server: RedisServer) -> None:
    status = RedisStatus(redis_server.url)
    try:
        first = await status.sample(1.0)
        assert first["reachable"] is True
        assert first["ops"] is None  # a rate needs two samples
        second = await status.sample(2.0)
        assert isinstance(second["ops"], float)
        assert second["ops"] >= 0
    finally:
        await status.aclose()
    nobody = RedisStatus(f"redis://user:secret@127.0.0.1:{free_port()}/0", timeout=0.2)
    try:
        down = await nobody.sample(1.0)
    finally:
        await nobody.aclose()
    assert down["reachable"] is False
    assert "secret" not in str(down["url"])  # the password is never shown


# -- the admin app: page, headers, token, same-origin guard -----------------------------------


@pytest.fixture
def dashboard_app() -> tuple[Dashboard, Pool]:
    dashboard, pool, _metrics, _, _ = make_dashboard()
    return dashboard, pool


@pytest.fixture
async def guarded(dashboard_app: tuple[Dashboard, Pool]) -> AsyncIterator[httpx.AsyncClient]:
    dashboard, pool = dashboard_app
    app = create_admin_app(pool=pool, metrics=dashboard.metrics, token=TOKEN, dashboard=dashboard)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8081") as client:
        yield client


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("path", "media"),
    [("/", "text/html"), ("/dashboard.js", "text/javascript"), ("/dashboard.css", "text/css")],
)
async def test_page_and_assets_load_without_the_token(
    guarded: httpx.AsyncClient, path: str, media: str
) -> None:
    response = await guarded.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(media)
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy
    assert response.headers["x-content-type-options"] == "nosniff"


@pytest.mark.anyio
async def test_the_page_has_no_inline_script_and_escapes_by_text_only(
    guarded: httpx.AsyncClient,
) -> None:
    page = (await guarded.get("/")).text
    assert "<script>" not in page
    assert "onclick" not in page
    script = (await guarded.get("/dashboard.js")).text
    assert ".innerHTML" not in script
    assert ".outerHTML" not in script
    assert "insertAdjacentHTML" not in script
    assert "document.write" not in script
    assert "eval(" not in script


@pytest.mark.anyio
async def test_the_stream_and_every_action_need_the_token(guarded: httpx.AsyncClient) -> None:
    assert (await guarded.get("/dashboard/stream")).status_code == 401
    assert (await guarded.get("/dashboard/stream?token=" + TOKEN)).status_code == 401
    assert (await guarded.post("/backends", json={"url": "http://127.0.0.1:1"})).status_code == 401


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Origin": "https://evil.example"}, 403),
        ({"Sec-Fetch-Site": "cross-site"}, 403),
        ({"Sec-Fetch-Site": "same-site", "Origin": "http://127.0.0.1:8081"}, 403),
        ({"Sec-Fetch-Site": "same-origin", "Origin": "http://127.0.0.1:8081"}, 200),
        ({}, 200),  # curl and scripts send neither
    ],
)
async def test_a_request_from_another_site_cannot_act(
    dashboard_app: tuple[Dashboard, Pool], headers: dict[str, str], status: int
) -> None:
    dashboard, pool = dashboard_app
    app = create_admin_app(pool=pool, metrics=dashboard.metrics, dashboard=dashboard)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8081") as client:
        one = next(iter(pool))
        response = await client.post(f"/backends/{one.id}/drain", headers=headers)
    assert response.status_code == status
    assert one.draining is (status == 200)


# -- a real balancer: the stream, a closed tab, SIGTERM with a page open ---------------------


def test_stream_over_a_real_balancer_closed_tabs_and_a_prompt_exit() -> None:
    backend = f"http://127.0.0.1:{free_port()}"  # nobody there: DOWN, and that is fine
    with balancer([backend], "--admin-token", TOKEN) as (lb, admin):
        assert admin is not None
        auth = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=admin, headers=auth, timeout=5) as client:
            with client.stream("GET", "/dashboard/stream") as first:
                assert first.headers["content-type"].startswith("text/event-stream")
                one = Stream(first)
                kind, hello = one.next()
                assert kind == "hello"
                assert hello["backends"][0]["url"] == backend
                with client.stream("GET", "/dashboard/stream") as second:
                    Stream(second).next()
                    wait_for(lambda: one.subscribers() == 2, 5, "two pages")
                # The second tab closed: its stream ends on the server.
                wait_for(lambda: one.subscribers() == 1, 5, "one page")
            # SIGTERM with a page open: the balancer ends the stream and exits promptly.
            with client.stream("GET", "/dashboard/stream") as open_page:
                page = Stream(open_page)
                page.next()
                began = time.monotonic()
                lb.popen.send_signal(signal.SIGTERM)
                assert lb.popen.wait(10) == 0
                took = time.monotonic() - began
                # The server ended the response: the rest (a tick sent before the SIGTERM,
                # at most) reads to its end; a stream left open would be a ReadTimeout here.
                assert len(page.rest()) <= 2
        assert took < 3.0, f"the balancer took {took:.1f} s to exit with a page open"


def test_forged_session_cookies_are_not_counted_and_the_map_is_bounded() -> None:
    # Any client can send a made-up session cookie; the issue counted 11,617 of them, the map
    # growing with each until SESSION_TTL. Without a valid pin none is counted; with a pin
    # copied from a real response (any client gets one) they are bounded by SESSIONS_MAX,
    # the ones the router decided on longest ago forgotten first.
    dashboard, pool, _, router, clock = make_dashboard()
    one, two = list(pool)
    affinity = AffinityCookie(secrets=["s" * 16])
    pin = b"; lb_affinity=" + affinity.sign(one.id)
    subscriber = dashboard.subscribe()
    assert subscriber is not None

    def tick() -> Snapshot:
        clock.advance(1.0)
        subscriber.messages.clear()  # read, as a page would: a stalled one is dropped
        return ticked(dashboard)

    def forge(numbers: range) -> Snapshot:
        for n in numbers:
            router.decide(client_ip="1.2.3.4", cookie_header=f"sid=forged{n}".encode() + pin)
            if n % 4000 == 0:  # the router's cache holds 4096 headers: read it before
                tick()
        return tick()

    for n in range(3000):
        router.decide(client_ip="1.2.3.4", cookie_header=f"sid=unpinned{n}".encode())
    assert tick()["totals"]["sessions"] == 0
    forged = SESSIONS_MAX + 2000
    snapshot = forge(range(forged))
    assert snapshot["totals"]["sessions"] == SESSIONS_MAX
    assert (row(snapshot, one.id)["sessions"], row(snapshot, two.id)["sessions"]) == (
        SESSIONS_MAX,
        0,
    )
    # A client pinned to `two` after the flood stays counted while fewer than SESSIONS_MAX
    # new values follow it: the oldest forged ones go first.
    real = b"sid=real; lb_affinity=" + affinity.sign(two.id)
    assert router.decide(client_ip="1.2.3.4", cookie_header=real).backend is two
    snapshot = forge(range(forged, forged + SESSIONS_MAX - 1))
    assert (row(snapshot, one.id)["sessions"], row(snapshot, two.id)["sessions"]) == (
        SESSIONS_MAX - 1,
        1,
    )
