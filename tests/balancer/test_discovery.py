"""The balancer's registry watcher: in-process against a real Redis, then a real balancer
process discovering real demo_app instances under load, with Redis restarted meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from balancer import BackendPolicy, BackendState, Discovery, DrainPolicy, Pool
from redis_plumbing import RedisServer
from service_registry import Instance, Registry
from tests.helpers import async_wait_for, async_wait_until, free_port, lost_cancels, wait_for
from tests.processes import Process, balancer

pytestmark = pytest.mark.anyio


class Lines(logging.Handler):
    """The `balancer` logger's events (it does not propagate once configured)."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append(record.getMessage())


@pytest.fixture
def events() -> Iterator[Lines]:
    logger = logging.getLogger("balancer")
    handler = Lines()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


@pytest.fixture
async def registry(redis_server: RedisServer) -> AsyncIterator[Registry]:
    registry = Registry.from_url(redis_server.url, f"svc-{secrets.token_hex(4)}")
    try:
        yield registry
    finally:
        await registry.aclose()


def of(registry: Registry, n: int, ttl: float = 3.0) -> Instance:
    return Instance(registry.service, f"i{n}", f"http://127.0.0.1:{9000 + n}", ttl=ttl)


def urls(pool: Pool) -> list[str]:
    return sorted(b.url for b in pool)


async def test_refresh_mirrors_the_registry_and_leaves_static_backends_alone(
    registry: Registry,
) -> None:
    static = "http://127.0.0.1:9001"
    pool = Pool([static])
    discovery = Discovery(pool, registry)
    await registry.register(of(registry, 1))  # the same URL as the static backend
    await registry.register(of(registry, 2))
    changes = await discovery.refresh()
    assert [i.id for i in changes.added] == ["i1", "i2"]
    assert urls(pool) == [static, "http://127.0.0.1:9002"]
    await registry.deregister("i1")
    await registry.deregister("i2")
    await discovery.refresh()
    # i2 left (not died): it drains first; i1's URL was configured: not discovery's.
    (left,) = (b for b in pool if b.url != static)
    assert left.state is BackendState.DRAINING
    left.finish_drain("now")
    await discovery.refresh()
    assert urls(pool) == [static]


async def test_a_discovered_backend_gets_slow_start(registry: Registry) -> None:
    pool = Pool(policy=BackendPolicy(slow_start=10.0))
    discovery = Discovery(pool, registry, clock=lambda: 100.0)
    await registry.register(of(registry, 1))
    await discovery.refresh()
    (backend,) = list(pool)
    assert backend.ramp_from == 100.0
    assert backend.weight(101.0) == pytest.approx(0.1)


async def test_notices_add_and_remove_long_before_the_next_full_read(
    registry: Registry,
) -> None:
    pool = Pool()
    # A full read only every 30 s: anything faster than that came from a notice.
    discovery = Discovery(pool, registry, interval=30.0)
    task = asyncio.create_task(discovery.run())
    try:
        await async_wait_until(discovery.synced.is_set, within=5, what="the first read")

        async def subscribed() -> bool:
            numsub = await registry.client.pubsub_numsub(registry.channel)
            return bool(numsub and numsub[0][1] > 0)

        await async_wait_for(subscribed, within=5, what="the watcher to subscribe")
        await registry.register(of(registry, 3))
        await async_wait_until(lambda: len(pool) == 1, within=2, what="the instance to join")
        await registry.deregister("i3")
        (backend,) = list(pool)
        await async_wait_until(
            lambda: backend.state is BackendState.DRAINING, within=2, what="the drain"
        )
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_deregistered_instance_drains_then_leaves_a_dead_one_leaves_at_once(
    registry: Registry, events: Lines
) -> None:
    # No notices (refresh only): the read itself tells a deregistration from a death.
    clock = [100.0]
    policy = BackendPolicy(drain=DrainPolicy(idle=1.0, deadline=10.0))
    pool = Pool(policy=policy)
    discovery = Discovery(pool, registry, clock=lambda: clock[0])
    await registry.register(of(registry, 1))
    await registry.register(of(registry, 2, ttl=0.2))
    await registry.register(of(registry, 3))
    await discovery.refresh()
    one, _dead, three = sorted(pool, key=lambda b: b.url)
    await registry.deregister("i1")
    await registry.deregister("i3")
    await async_wait_for(  # i2 dies: no heartbeat within its ttl
        lambda: _gone(registry, "i2"), 3, "i2 to expire"
    )
    await discovery.refresh()
    assert [b.url for b in pool] == [one.url, three.url]  # the dead one at once
    assert (one.state, three.state) == (BackendState.DRAINING, BackendState.DRAINING)
    assert one.keep_pinned  # its pinned clients still reach it
    # i3 comes back before its drain ended (a cancelled preStop): it serves again.
    await registry.register(of(registry, 3))
    await discovery.refresh()
    assert three.state is BackendState.UP
    clock[0] += 0.5
    assert pool.drain_tick(clock[0]) == []
    await discovery.refresh()
    assert one in list(pool)  # draining still
    clock[0] += 0.5
    assert pool.drain_tick(clock[0]) == [(one, "idle")]  # the balancer's drain watch
    await discovery.refresh()
    assert [b.url for b in pool] == [three.url]
    undiscovered = [e for e in events.events if e.startswith("backend_undiscovered")]
    assert len(undiscovered) == 2, events.events


async def _gone(registry: Registry, instance_id: str) -> bool:
    return instance_id not in {i.id for i in (await registry.read()).instances}


async def test_a_cancelled_watcher_ends_wherever_the_cancel_lands(registry: Registry) -> None:
    """A balancer with --discover stops on SIGTERM by cancelling `run()`. On Python 3.11 a
    cancel that landed as a wait_for finished was lost (CPython gh-86296), in redis-py's
    writes and in the wait between reads: the watcher read on and the balancer never
    exited. Cancelled at each step of its first reads and its subscription, it ends.
    """
    await registry.register(of(registry, 1))

    async def run() -> None:
        await Discovery(Pool(), registry, interval=0.01).run()  # reads back to back

    assert await lost_cancels(run) == []


async def test_redis_down_keeps_the_last_set_logs_once_and_recovers(
    own_redis: RedisServer, events: Lines
) -> None:
    registry = Registry.from_url(own_redis.url, "demo", timeout=0.3)
    pool = Pool()
    discovery = Discovery(pool, registry, interval=0.05)
    task = asyncio.create_task(discovery.run())
    try:
        await registry.register(Instance("demo", "a", "http://127.0.0.1:9101", ttl=1.0))
        await registry.register(Instance("demo", "b", "http://127.0.0.1:9102", ttl=1.0))
        await async_wait_until(lambda: len(pool) == 2, within=3, what="both to join")
        await asyncio.to_thread(own_redis.stop)
        await async_wait_until(
            lambda: "registry_unreachable" in events.events, within=5, what="the outage"
        )
        await asyncio.to_thread(own_redis.start)
        await async_wait_until(
            lambda: "registry_recovered" in events.events, within=5, what="the recovery"
        )
        assert events.events.count("registry_unreachable") == 1  # logged once, not per read
        # Redis came back empty: both are kept for a ttl; "a" heartbeats again, "b" died.
        assert len(pool) == 2
        # (A longer ttl now, so that "a" outlives the grace, which "b" does not.)
        await registry.register(Instance("demo", "a", "http://127.0.0.1:9101", ttl=10.0))
        await async_wait_until(
            lambda: urls(pool) == ["http://127.0.0.1:9101"], within=3, what="b to go"
        )
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await registry.aclose()


# -- a real balancer, real instances, under load ------------------------------------------


class Load(threading.Thread):
    """GETs through the balancer in a loop; counts answers by instance, and failures."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.stop = threading.Event()
        self.by_instance: dict[str, int] = {}
        self.failures: list[tuple[float, str]] = []  # (time.monotonic(), what)
        self.lock = threading.Lock()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self.stop.is_set():
                try:
                    response = client.get("/api/session")
                    if response.status_code != 200:
                        raise AssertionError(f"{response.status_code} {response.text[:80]}")
                    name = response.json()["instance"]
                    with self.lock:
                        self.by_instance[name] = self.by_instance.get(name, 0) + 1
                except (httpx.HTTPError, AssertionError) as exc:
                    with self.lock:
                        self.failures.append((time.monotonic(), f"{type(exc).__name__}: {exc}"))

    def served(self, name: str) -> int:
        with self.lock:
            return self.by_instance.get(name, 0)


def start_instance(name: str, redis_url: str, service: str) -> Process:
    port = free_port()
    args = [sys.executable, "-m", "demo_app", "--port", str(port), "--instance-id", name]
    args += ["--log-level", "warning", "--registry", redis_url, "--service", service]
    args += ["--registry-ttl", "1"]
    return Process(args, f"http://127.0.0.1:{port}")


def pool_urls(admin: str) -> list[str]:
    return sorted(b["url"] for b in httpx.get(admin + "/backends").json()["backends"])


def test_discovery_under_load_with_no_failed_requests(own_redis: RedisServer) -> None:
    service = "web"
    discover = f"redis://127.0.0.1:{own_redis.port}/0/{service}"
    first = start_instance("d1", own_redis.url, service)
    second = start_instance("d2", own_redis.url, service)
    third: Process | None = None
    load: Load | None = None
    try:
        for process in (first, second):
            process.wait_ready("/readyz")
        with balancer(
            [],
            "--discover", discover,
            "--discover-interval", "0.1",
            "--sticky", "none",
            "--health-interval", "0.5",
            "--health-timeout", "0.4",
            "--queue-timeout", "5",
        ) as (proxy, admin):  # fmt: skip
            assert admin is not None
            wait_for(lambda: len(pool_urls(admin)) == 2, 10, "both instances discovered")
            load = Load(proxy.url)
            load.start()
            wait_for(lambda: load.served("d1") > 0 and load.served("d2") > 0, 10, "traffic")

            # A new instance gets traffic within about a second of being ready.
            third = start_instance("d3", own_redis.url, service)
            wait_for(lambda: third.url in pool_urls(admin), 15, "d3 discovered")
            wait_for(lambda: load.served("d3") > 0, 2, "traffic on d3")

            # Redis restarts (empty): the balancer keeps its set; the heartbeats refill it.
            own_redis.restart()
            assert len(pool_urls(admin)) == 3
            served = load.served("d1")
            wait_for(lambda: load.served("d1") > served + 10, 5, "d1 still served")

            # Killed: connect errors are retried elsewhere; its TTL removes it.
            killed_at = time.monotonic()
            first.popen.send_signal(signal.SIGKILL)
            first.popen.wait()
            wait_for(lambda: first.url not in pool_urls(admin), 5, "d1 removed after its TTL")

            # Stopped gracefully: it deregisters first and leaves at once.
            second.popen.send_signal(signal.SIGTERM)
            wait_for(lambda: second.url not in pool_urls(admin), 2, "d2 removed on SIGTERM")
            assert second.popen.wait(10) == 0
            served = load.served("d3")
            wait_for(lambda: load.served("d3") > served + 10, 5, "d3 serving alone")
            load.stop.set()
            load.join(15)
            # A response that d1 had begun when it was killed cannot be finished by anyone
            # (the balancer cuts the client's connection, the honest signal): the one GET in
            # flight at that moment may end so. Any other failure is the balancer's.
            cut = [
                what
                for at, what in load.failures
                if killed_at <= at <= killed_at + 2 and "without sending complete message" in what
            ]
            others = [what for _, what in load.failures if what not in cut]
            assert others == [], others[:5]
            assert len(cut) <= 1, cut
    finally:
        if load is not None:
            load.stop.set()
        for started in (first, second, third):
            if started is not None:
                with contextlib.suppress(subprocess.SubprocessError, ValueError):
                    started.terminate()


def test_a_deregistered_instance_keeps_its_pinned_sessions_until_its_drain_ends(
    own_redis: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A preStop's deregistration (the demo's SIGUSR1: leave, go on serving) in sticky mode:
    the instance drains, its pinned clients keep their sessions while they keep coming, and
    it leaves the pool once they stopped (--drain-idle later), not at once."""
    service = "pinned"
    discover = f"redis://127.0.0.1:{own_redis.port}/0/{service}"
    apps = [start_instance(name, own_redis.url, service) for name in ("p1", "p2")]
    try:
        for app in apps:
            app.wait_ready("/readyz")
        with balancer(
            [],
            "--discover", discover, "--discover-interval", "0.1",
            "--sticky", "cookie:sid", "--drain-idle", "1", "--drain-deadline", "8",
        ) as (proxy, admin):  # fmt: skip
            assert admin is not None
            wait_for(lambda: len(pool_urls(admin)) == 2, 10, "both instances discovered")
            clients = [httpx.Client(base_url=proxy.url, timeout=10) for _ in range(12)]
            try:
                first = [c.post("/api/counter").json() for c in clients]
                pinned = [c for c, f in zip(clients, first, strict=True) if f["instance"] == "p1"]
                assert pinned, "no client was placed on p1"
                apps[0].popen.send_signal(signal.SIGUSR1)  # deregisters, serves on
                left_at = time.monotonic()

                answers = []
                while time.monotonic() < left_at + 2:  # they keep coming for 2 s
                    answers += [c.post("/api/counter").json() for c in pinned]
                last = time.monotonic()
                backends = httpx.get(admin + "/backends").json()["backends"]
                state = next((b["state"] for b in backends if b["url"] == apps[0].url), "gone")
                wait_for(lambda: apps[0].url not in pool_urls(admin), 3, "p1 to leave")
                gone_after = time.monotonic() - last
            finally:
                for client in clients:
                    client.close()
            proxy.popen.send_signal(signal.SIGTERM)  # to read its log
            proxy.popen.wait(15)
            log = [line for line in proxy.output().splitlines() if "backend_undiscovered" in line]
    finally:
        for app in apps:
            with contextlib.suppress(subprocess.SubprocessError, ValueError):
                app.terminate()
    moved = [a for a in answers if a["instance"] != "p1"]
    with capsys.disabled():
        print(
            f"\nderegistered in sticky mode: {len(pinned)} clients pinned, {len(answers)} of "
            f"their requests during the drain, {len(moved)} moved (p1 {state} then); "
            f"counts reached {sorted(a['count'] for a in answers)[-len(pinned) :]}; left the pool "
            f"{gone_after:.2f} s after the last pinned request; {log}"
        )
    assert not moved, moved[:3]
    assert state == "draining"
    assert all(a["count"] > 1 for a in answers)  # their sessions went on
    assert gone_after <= 1 + 1.5  # --drain-idle, plus a read, the watch's tick, slack
    assert len(log) == 1
    assert "how=deregistered" in log[0]
    assert "drained=idle" in log[0]
