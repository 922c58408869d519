"""The shared pin table, `--pin-store URL` (issue 15, part 2).

In-process: `PinStore` against a real Redis (writes with a TTL, lookups, Redis down). Then
real processes: demo_app instances keeping sessions in their own memory behind balancer
replicas with different affinity secrets; a session is lost when its counter starts again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator, Sequence

import httpx
import pytest
import redis

from balancer import PinStore, PinTable
from redis_plumbing import RedisServer, redis_client
from tests.helpers import async_wait_until, wait_for
from tests.processes import Process, balancer, demo_app
from tests.redis_topology import start_cluster

SECRET_A = "pin-store-secret-of-replica-a-0123"
SECRET_B = "pin-store-secret-of-replica-b-4567"
SESSIONS = 30
FOLLOWING = 3  # requests per session through the second replica
PREFIX = "balancer:pin:"


# -- PinStore, in process ------------------------------------------------------------------


@contextlib.asynccontextmanager
async def store_for(url: str, **options: float) -> AsyncIterator[PinStore]:
    store = PinStore(redis_client(url), ttl=3600, url=url, **options)  # type: ignore[arg-type]
    store.start()
    try:
        yield store
    finally:
        await store.aclose()


async def looked_up(store: PinStore, session: bytes) -> str | None:
    answer: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
    store.lookup(session, answer.set_result)
    return await asyncio.wait_for(answer, 5)


@pytest.mark.anyio
async def test_learned_pins_are_written_with_a_ttl_and_found_by_another_store(
    own_redis: RedisServer,
) -> None:
    table = PinTable()
    async with store_for(own_redis.url) as writer, store_for(own_redis.url) as reader:
        writer.attach(table)
        assert table.remote
        for i in range(300):  # more than one pipeline
            table.learn(f"session-{i}".encode(), f"app{i % 3}", 0.0)
        await async_wait_until(lambda: writer.written == 300, 5, "300 pins written")
        assert await looked_up(reader, b"session-7") == "app1"
        assert await looked_up(reader, b"unknown") is None
        # Two requests of one session waiting at once: one GET.
        answers: list[str | None] = []
        reader.lookup(b"session-8", answers.append)
        reader.lookup(b"session-8", answers.append)
        await async_wait_until(lambda: len(answers) == 2, 5, "both answers")
        assert answers == ["app2", "app2"]
        assert reader.lookups == {"hit": 2, "miss": 1, "error": 0, "unavailable": 0}
    with redis.Redis.from_url(own_redis.url) as check:
        keys = list(check.scan_iter(match=PREFIX + "*", count=1000))
        assert len(keys) == 300
        # The key is a digest: the cookie's value (a credential) is nowhere in Redis.
        assert not [k for k in keys if b"session" in k]
        assert 3500 < check.ttl(keys[0]) <= 3600


@pytest.mark.anyio
async def test_redis_down_answers_none_at_once_and_drops_pins_then_recovers(
    own_redis: RedisServer,
) -> None:
    async with store_for(own_redis.url, lookup_timeout=0.1, retry_after=0.3) as store:
        store.put(b"before", "app1")
        await async_wait_until(lambda: store.written == 1, 5, "the first pin written")
        own_redis.stop()
        started = time.monotonic()
        assert await looked_up(store, b"before") is None  # refused: the hash decides
        assert await looked_up(store, b"before") is None  # marked down: not even tried
        assert time.monotonic() - started < 1.0
        assert store.lookups["error"] == 1
        assert store.lookups["unavailable"] == 1
        store.put(b"while-down", "app2")
        assert store.dropped["unavailable"] >= 1
        own_redis.start()  # empty: the test server keeps nothing on disk
        deadline = time.monotonic() + 5
        while store.lookups["miss"] == 0:  # asked again once retry_after has passed
            assert time.monotonic() < deadline, store
            assert await looked_up(store, b"before") is None
            await asyncio.sleep(0.05)
        store.put(b"after", "app3")
        await async_wait_until(lambda: store.written == 2, 5, "the pin after recovery")
        assert await looked_up(store, b"after") == "app3"


@pytest.mark.anyio
async def test_a_slow_answer_costs_only_its_own_lookup(own_redis: RedisServer) -> None:
    """A timeout does not mark Redis down (a refusal does, above): a burst of new sessions
    on a busy core must not turn every lookup after it into "none" for retry_after."""
    async with store_for(own_redis.url, lookup_timeout=0.05, retry_after=60) as store:
        store.put(b"paused", "app1")
        await async_wait_until(lambda: store.written == 1, 5, "the pin written")
        with redis.Redis.from_url(own_redis.url) as admin:
            admin.execute_command("CLIENT", "PAUSE", 300, "ALL")  # ms: every command waits
        assert await looked_up(store, b"paused") is None  # 0.05 s, then the hash decides
        deadline = time.monotonic() + 5
        while await looked_up(store, b"paused") != "app1":
            assert time.monotonic() < deadline, store
            await asyncio.sleep(0.02)
        assert store.lookups["error"] >= 1
        assert store.lookups["unavailable"] == 0


@pytest.mark.anyio
async def test_a_cluster_takes_the_pins_of_one_pipeline_across_its_slots() -> None:
    """The keys of one batch hash to slots of every primary: the pipeline is not a
    transaction, so redis-py's cluster client splits it by node."""
    with start_cluster() as cluster:
        async with store_for(cluster.url) as store:
            for i in range(100):
                store.put(f"session-{i}".encode(), f"app{i % 3}")
            await async_wait_until(lambda: store.written == 100, 10, "100 pins written")
            assert await looked_up(store, b"session-5") == "app2"
            assert store.dropped == {"full": 0, "unavailable": 0}


# -- replicas, real processes --------------------------------------------------------------


@pytest.fixture(scope="module")
def apps() -> Iterator[list[Process]]:
    """Three instances, shared by the tests: each client has a session of its own."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(demo_app(f"app{i}")) for i in range(1, 4)]


def pins_in(url: str) -> int:
    with redis.Redis.from_url(url) as client:
        return sum(1 for _ in client.scan_iter(match=PREFIX + "*", count=1000))


def create_sessions(url: str) -> list[httpx.Client]:
    """SESSIONS clients, each with its own cookie jar and a session created through `url`."""
    clients = []
    for _ in range(SESSIONS):
        client = httpx.Client(timeout=5)
        clients.append(client)
        reply = client.post(url + "/api/counter")
        assert reply.status_code == 200, reply.text
        assert reply.json()["count"] == 1
    return clients


def kept_sessions(clients: Sequence[httpx.Client], url: str) -> int:
    """How many of `clients` go on with their session through `url` (every counter right)."""
    kept = 0
    for client in clients:
        try:
            counts = [client.post(url + "/api/counter") for _ in range(FOLLOWING)]
        finally:
            client.close()
        assert all(r.status_code == 200 for r in counts), [r.text for r in counts]
        kept += [r.json()["count"] for r in counts] == list(range(2, 2 + FOLLOWING))
    return kept


def replica(
    apps: Sequence[Process], secret: str, store: str | None
) -> contextlib.AbstractContextManager[tuple[Process, str | None]]:
    names = [f"app{i}={a.url}" for i, a in enumerate(apps, 1)]
    options = ["--sticky", "cookie:sid", "--affinity-secret", secret]
    if store is not None:
        options += ["--pin-store", store]
    return balancer(names, *options)


@pytest.mark.parametrize("shared", [True, False], ids=["pin-store", "no-pin-store"])
def test_replicas_with_other_secrets_agree_on_every_session_through_the_store(
    apps: list[Process], own_redis: RedisServer, shared: bool
) -> None:
    """Sessions created through replica A go on through replica B, which cannot verify A's
    affinity cookie: with a shared --pin-store all of them; without, only those the hash
    of the session cookie happens to send back (about 1 in 3)."""
    store = own_redis.url if shared else None
    with (
        replica(apps, SECRET_A, store) as (a, _),
        replica(apps, SECRET_B, store) as (b, _),
    ):
        clients = create_sessions(a.url)
        if shared:
            wait_for(lambda: pins_in(own_redis.url) == SESSIONS, 5, "every pin in Redis")
        kept = kept_sessions(clients, b.url)
    print(f"sessions kept through the other replica: {kept} of {SESSIONS}")
    if shared:
        assert kept == SESSIONS
    else:
        assert kept < SESSIONS * 2 // 3  # the hash's luck only: most are lost


def test_a_restarted_balancer_finds_the_pins_it_learned_before(
    apps: list[Process], own_redis: RedisServer
) -> None:
    """The restarted balancer has another secret too: neither its memory nor the clients'
    affinity cookies can place the sessions, only Redis."""
    with replica(apps, SECRET_A, own_redis.url) as (first, _):
        clients = create_sessions(first.url)
        wait_for(lambda: pins_in(own_redis.url) == SESSIONS, 5, "every pin in Redis")
    with replica(apps, SECRET_B, own_redis.url) as (second, _):
        assert kept_sessions(clients, second.url) == SESSIONS


def test_with_redis_down_requests_succeed_by_the_hash_and_nothing_hangs(
    apps: list[Process], own_redis: RedisServer
) -> None:
    with (
        replica(apps, SECRET_A, own_redis.url) as (a, admin_a),
        replica(apps, SECRET_B, own_redis.url) as (b, admin_b),
    ):
        own_redis.stop()
        started = time.monotonic()
        clients = create_sessions(a.url)  # every pin learned is dropped
        kept = kept_sessions(clients, b.url)  # every lookup fails: the hash decides
        elapsed = time.monotonic() - started
        # 120 requests; each lookup waits at most 0.1 s, and not at all for a second after
        # a failure.
        assert elapsed < 10, elapsed
        assert 0 < kept < SESSIONS  # some by the hash's luck, not all
        assert admin_a is not None
        assert admin_b is not None
        metrics_a = httpx.get(admin_a + "/metrics", timeout=5).text
        metrics_b = httpx.get(admin_b + "/metrics", timeout=5).text
    assert 'balancer_pin_store_dropped_total{reason="unavailable"}' in metrics_a
    assert _value(metrics_a, 'balancer_pin_store_dropped_total{reason="unavailable"}') >= 1
    lookups = _value(metrics_b, 'balancer_pin_store_lookups_total{result="error"}')
    lookups += _value(metrics_b, 'balancer_pin_store_lookups_total{result="unavailable"}')
    assert lookups == SESSIONS


def _value(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in the metrics")
