from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from balancer import (
    Backend,
    BackendPolicy,
    BackendState,
    CheckResult,
    HealthChecker,
    HealthPolicy,
    HealthTracker,
    Pool,
)
from balancer.control._health import apply_result
from tests.helpers import async_wait_until, free_port

# -- the pure part ---------------------------------------------------------------------------

# (rise, fall, starting healthy, results, transitions returned by observe)
TRACKS: list[tuple[int, int, bool, str, list[bool | None]]] = [
    (2, 3, True, "+++", [None, None, None]),
    (2, 3, True, "---", [None, None, False]),
    (2, 3, True, "--+---", [None, None, None, None, None, False]),  # a pass resets the count
    (2, 3, False, "++", [None, True]),
    (2, 3, False, "+-++", [None, None, None, True]),
    (1, 1, True, "-+-+", [False, True, False, True]),
    (2, 3, True, "---++", [None, None, False, None, True]),
]


@pytest.mark.parametrize(("rise", "fall", "healthy", "results", "expected"), TRACKS)
def test_tracker(
    rise: int, fall: int, healthy: bool, results: str, expected: list[bool | None]
) -> None:
    tracker = HealthTracker(rise=rise, fall=fall, healthy=healthy)
    assert [tracker.observe(r == "+") for r in results] == expected


def test_tracker_rejects_zero_thresholds() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        HealthTracker(rise=0, fall=1)


def test_apply_result_drives_the_backend_with_a_fake_clock() -> None:
    backend = Backend("http://127.0.0.1:9001", policy=BackendPolicy(slow_start=10.0))
    tracker = HealthTracker(rise=2, fall=2)
    now = 0.0
    for ok, detail, state in [
        (False, "status 503", BackendState.UP),
        (False, "status 503", BackendState.DOWN),
        (True, "status 200", BackendState.DOWN),
        (True, "status 200", BackendState.UP),
    ]:
        now += 1.0
        apply_result(backend, tracker, CheckResult(ok, detail), now)
        assert backend.state is state
        if state is BackendState.DOWN:
            assert backend.down_reason == "status 503"
    assert backend.weight(now) == pytest.approx(0.1)  # slow start began at the last check
    assert backend.weight(now + 5.0) == pytest.approx(0.5)


# -- against real servers --------------------------------------------------------------------


@dataclass
class Behaviour:
    status: int = 200
    hang: bool = False
    release: asyncio.Event = field(default_factory=asyncio.Event)


def make_app(behaviour: Behaviour) -> Starlette:
    async def healthz(request: Request) -> Response:
        if behaviour.hang:
            await behaviour.release.wait()
        return PlainTextResponse("ok", status_code=behaviour.status)

    return Starlette(routes=[Route("/healthz", healthz)])


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, Behaviour]]:
    behaviour = Behaviour()
    config = uvicorn.Config(
        make_app(behaviour),
        host="127.0.0.1",
        port=0,
        lifespan="off",
        log_level="warning",
        ws="none",
        timeout_graceful_shutdown=1,
    )
    srv = uvicorn.Server(config)
    task = asyncio.create_task(srv.serve())
    await async_wait_until(lambda: srv.started or task.done())
    assert srv.started, "the test server did not start"
    port = srv.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", behaviour
    finally:
        behaviour.release.set()
        srv.should_exit = True
        await asyncio.wait_for(task, 5.0)


def state_of(backend: Backend) -> BackendState:
    """The state, read through a call: mypy would keep an earlier `is` narrowing."""
    return backend.state


def refused_url() -> str:
    """A 127.0.0.1 port with nothing listening: bound, then closed."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    client = httpx.AsyncClient()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.mark.anyio
async def test_checks_against_real_servers(
    server: tuple[str, Behaviour], client: httpx.AsyncClient
) -> None:
    url, behaviour = server
    pool = Pool([url, refused_url()])
    live, dead = list(pool)
    checker = HealthChecker(
        pool, client, HealthPolicy(interval=1.0, timeout=0.3, rise=2, fall=2), clock=lambda: 0.0
    )
    results = await checker.check_once()
    assert results[live.id] == CheckResult(True, "status 200")
    assert not results[dead.id].ok
    assert results[dead.id].detail.startswith("connect error")
    assert dead.state is BackendState.UP  # one failure is under `fall`
    await checker.check_once()
    assert (live.state, dead.state) == (BackendState.UP, BackendState.DOWN)
    assert dead.down_reason is not None
    assert dead.down_reason.startswith("connect error")

    behaviour.status = 503
    await checker.check_once()
    results = await checker.check_once()
    assert results[live.id] == CheckResult(False, "status 503")
    assert state_of(live) is BackendState.DOWN
    assert live.down_reason == "status 503"

    behaviour.status = 200
    await checker.check_once()
    assert state_of(live) is BackendState.DOWN  # rise is 2
    await checker.check_once()
    assert state_of(live) is BackendState.UP


@pytest.mark.anyio
async def test_a_hanging_backend_times_out(
    server: tuple[str, Behaviour], client: httpx.AsyncClient
) -> None:
    url, behaviour = server
    behaviour.hang = True
    pool = Pool([url])
    backend = next(iter(pool))
    checker = HealthChecker(pool, client, HealthPolicy(timeout=0.2, rise=1, fall=1))
    results = await checker.check_once()
    assert results[backend.id] == CheckResult(False, "timeout after 0.2 s")
    assert backend.state is BackendState.DOWN


@pytest.mark.anyio
async def test_run_loops_and_releases_ejections(
    server: tuple[str, Behaviour], client: httpx.AsyncClient
) -> None:
    url, _ = server
    now = [100.0]
    pool = Pool([url], policy=BackendPolicy(eject_after=1, ejection_time=5.0))
    backend = next(iter(pool))
    backend.request_started()
    backend.request_finished(failed=True, now=now[0])

    def state() -> BackendState:
        return backend.state

    assert state() is BackendState.DOWN
    checker = HealthChecker(pool, client, HealthPolicy(interval=0.01), clock=lambda: now[0])
    task = asyncio.create_task(checker.run())
    try:
        await async_wait_until(lambda: bool(checker._trackers))  # a round has been applied
        assert state() is BackendState.DOWN  # ejected until 105, checks pass meanwhile
        now[0] = 105.0
        await async_wait_until(lambda: state() is BackendState.UP)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.mark.anyio
async def test_added_and_removed_backends_are_followed(
    server: tuple[str, Behaviour], client: httpx.AsyncClient
) -> None:
    url, _ = server
    pool = Pool([refused_url()])
    dead = next(iter(pool))
    checker = HealthChecker(pool, client, HealthPolicy(rise=1, fall=1))
    await checker.check_once()
    assert dead.state is BackendState.DOWN
    pool.remove(dead.id)
    added = pool.add(url)
    results = await checker.check_once()
    assert set(results) == {added.id}
    assert added.state is BackendState.UP
