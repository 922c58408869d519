"""Redis killed and restarted under the middleware: clear 503s, no hang, no lost hybrid writes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable

import httpx
import pytest
import redis.asyncio

from redis_plumbing import RedisServer
from session_store import Changes, HybridStore, RedisStore, StoreUnavailable
from tests.helpers import async_wait_for, async_wait_until
from tests.session_store.app import make_app

pytestmark = pytest.mark.anyio


def client_for(app: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),  # type: ignore[arg-type]
        base_url="http://testserver",
    )


@pytest.fixture
async def redis_store(own_redis: RedisServer) -> AsyncIterator[RedisStore]:
    store = RedisStore.from_url(own_redis.url, timeout=0.5)
    yield store
    await store.aclose()


async def test_redis_down_answers_503_quickly_then_recovers(
    own_redis: RedisServer, redis_store: RedisStore
) -> None:
    async with client_for(make_app(redis_store, retry_after=7)) as client:
        await client.post("/set", params={"a": "1"})
        own_redis.kill()
        started = time.monotonic()
        response = await client.get("/read")
        assert time.monotonic() - started < 2.0  # bounded by the store's timeout, no hang
        assert response.status_code == 503
        assert response.headers["retry-after"] == "7"
        assert "session store" in response.text
        # A request that writes fails the same way, at the response's start.
        write = await client.post("/set", params={"b": "2"})
        assert write.status_code == 503

        own_redis.start()  # same port, empty: the old session is gone, the app works
        response = await client.get("/read")
        assert response.status_code == 200
        assert response.json() == {}
        assert (await client.post("/set", params={"c": "3"})).status_code == 200
        assert (await client.get("/read")).json() == {"c": "3"}


async def test_redis_down_can_go_on_with_an_empty_session(
    own_redis: RedisServer, redis_store: RedisStore
) -> None:
    async with client_for(make_app(redis_store, on_unavailable="empty")) as client:
        await client.post("/set", params={"a": "1"})
        own_redis.kill()
        response = await client.get("/read")
        assert response.status_code == 200
        assert response.json() == {}
        assert (await client.post("/set", params={"b": "2"})).status_code == 200


async def test_store_raises_only_its_own_errors(
    own_redis: RedisServer, redis_store: RedisStore
) -> None:
    own_redis.kill()
    with pytest.raises(StoreUnavailable, match="redis"):
        await redis_store.load("x")
    with pytest.raises(StoreUnavailable):
        await redis_store.ping()


async def test_hybrid_serves_and_keeps_writes_through_a_redis_outage(
    own_redis: RedisServer,
) -> None:
    store = HybridStore(RedisStore.from_url(own_redis.url, timeout=0.5), retry_interval=0.05)
    async with client_for(make_app(store)) as client:
        await client.post("/set", params={"a": "1"})
        own_redis.kill()
        assert (await client.get("/read")).json() == {"a": "1"}
        assert (await client.post("/set", params={"b": "2"})).status_code == 200
        assert (await client.post("/append", params={"item": "x"})).status_code == 200
        assert store.pending == 1

        own_redis.start()  # back, and empty (no persistence)

        async def flushed() -> bool:
            return store.pending == 0

        await async_wait_for(flushed, within=10, what="the deferred writes to reach redis")
        # Another instance, reading Redis only, sees everything written during the outage.
        other = RedisStore.from_url(own_redis.url)
        sid = client.cookies["session"].split(".")[0]
        record = await other.load(sid)
        await other.aclose()
        assert record is not None
        assert dict(record.fields) == {"a": '"1"', "b": '"2"', "items": '["x"]'}
        assert (await client.get("/read")).json() == {"a": "1", "b": "2", "items": ["x"]}
    await store.aclose()


async def test_hybrid_restores_a_session_redis_lost(own_redis: RedisServer) -> None:
    store = HybridStore(RedisStore.from_url(own_redis.url, timeout=0.5))
    async with client_for(make_app(store)) as client:
        await client.post("/set", params={"a": "1"})
        own_redis.restart()  # empty again, with no outage seen by the store
        assert (await client.get("/read")).json() == {"a": "1"}
        other = RedisStore.from_url(own_redis.url)
        record = await other.load(client.cookies["session"].split(".")[0])
        await other.aclose()
        assert record is not None
        assert record.fields["a"] == '"1"'
    await store.aclose()


async def test_hybrid_never_serves_a_stale_copy(redis_server: RedisServer, prefix: str) -> None:
    # Two instances: the client is served by A, fails over to B, then returns to A.
    a = HybridStore(RedisStore.from_url(redis_server.url, prefix=prefix))
    b = HybridStore(RedisStore.from_url(redis_server.url, prefix=prefix))
    async with client_for(make_app(a)) as on_a, client_for(make_app(b)) as on_b:
        await on_a.post("/set", params={"n": "1"})
        on_b.cookies = on_a.cookies
        assert (await on_b.post("/set", params={"n": "2"})).status_code == 200
        assert (await on_a.get("/read")).json() == {"n": "2"}
    await a.aclose()
    await b.aclose()


async def test_hybrid_logout_elsewhere_is_not_undone_by_the_local_copy(
    redis_server: RedisServer, prefix: str
) -> None:
    a = HybridStore(RedisStore.from_url(redis_server.url, prefix=prefix))
    b = HybridStore(RedisStore.from_url(redis_server.url, prefix=prefix))
    async with client_for(make_app(a)) as on_a, client_for(make_app(b)) as on_b:
        await on_a.post("/set", params={"user": "alice"})
        cookie = on_a.cookies["session"]
        on_b.cookies = on_a.cookies
        assert (await on_b.post("/destroy")).status_code == 200
        on_a.cookies.clear()
        on_a.cookies.set("session", cookie, domain="testserver.local")
        assert (await on_a.get("/read")).json() == {}
    await a.aclose()
    await b.aclose()


async def test_hybrid_queues_a_write_behind_the_deferred_ones_when_redis_returns_empty(
    own_redis: RedisServer,
) -> None:
    # retry_interval=60: the flusher waits, so the deferred write is still queued when
    # the next one comes (issue 13: that one met the empty Redis and cleared the cookie).
    store = HybridStore(RedisStore.from_url(own_redis.url, timeout=0.5), retry_interval=60)
    now = time.time()
    assert await store.save("s", Changes({"a": "1", "n": "1"}), created=now, ttl=60, create=True)
    own_redis.kill()
    await store.save("s", Changes({"n": "2"}), created=now, ttl=60, create=False)
    own_redis.start()  # empty
    assert await store.save("s", Changes({"n": "3"}), created=now, ttl=60, create=False)
    assert store.pending == 1
    await store.flush()
    other = RedisStore.from_url(own_redis.url)
    record = await other.load("s")
    await other.aclose()
    await store.aclose()
    assert record is not None
    assert dict(record.fields) == {"a": "1", "n": "3"}  # in order: 3 was not undone by 2


async def test_hybrid_write_brings_back_a_session_redis_lost(own_redis: RedisServer) -> None:
    store = HybridStore(RedisStore.from_url(own_redis.url, timeout=0.5))
    now = time.time()
    assert await store.save("s", Changes({"a": "1"}), created=now, ttl=60, create=True)
    own_redis.restart()  # empty, with no outage seen by the store
    assert await store.save("s", Changes({"b": "2"}), created=now, ttl=60, create=False)
    other = RedisStore.from_url(own_redis.url)
    record = await other.load("s")
    await other.aclose()
    await store.aclose()
    assert record is not None
    assert dict(record.fields) == {"a": "1", "b": "2"}


async def test_hybrid_write_does_not_bring_back_a_destroyed_session(
    redis_server: RedisServer, prefix: str
) -> None:
    store = HybridStore(RedisStore.from_url(redis_server.url, prefix=prefix))
    other = RedisStore.from_url(redis_server.url, prefix=prefix)
    now = time.time()
    assert await store.save("s", Changes({"a": "1"}), created=now, ttl=60, create=True)
    await other.destroy("s", ttl=60)  # a logout on another instance
    assert await store.save("s", Changes({"b": "2"}), created=now, ttl=60, create=False) is None
    assert await other.load("s") is None
    await other.aclose()
    await store.aclose()


async def test_hybrid_serves_from_memory_after_interleaved_writes_when_redis_goes(
    own_redis: RedisServer,
) -> None:
    store = HybridStore(RedisStore.from_url(own_redis.url, timeout=0.5))
    other = RedisStore.from_url(own_redis.url)
    now = time.time()
    for sid in ("s", "t"):
        assert await store.save(sid, Changes({"a": "1"}), created=now, ttl=60, create=True)
        # A write the local copy did not see (another request, another instance): ours
        # lands on a version it cannot bring forward.
        assert await other.save(sid, Changes({"b": "2"}), created=now, ttl=60, create=False)
        assert await store.save(sid, Changes({"c": "3"}), created=now, ttl=60, create=False)
    await other.aclose()
    # Redis up: never the local copy, which lacks b.
    record = await store.load("s")
    assert record is not None
    assert dict(record.fields) == {"a": "1", "b": "2", "c": "3"}
    own_redis.kill()
    # Redis gone: memory serves what it has (it answered 503 when the copy was dropped).
    record = await store.load("t")
    assert record is not None
    assert dict(record.fields) == {"a": "1", "c": "3"}
    await store.aclose()


async def test_hybrid_never_serves_a_stale_copy_across_a_redis_restart(
    own_redis: RedisServer,
) -> None:
    # Versions must not start again at 1 when a session is written back into an empty
    # Redis: A's copy of the old version 1 would then pass for the new version 1.
    a = HybridStore(RedisStore.from_url(own_redis.url, timeout=0.5))
    b = HybridStore(RedisStore.from_url(own_redis.url, timeout=0.5))
    now = time.time()
    assert await a.save("s", Changes({"a": "1"}), created=now, ttl=60, create=True)
    assert await b.load("s") is not None
    assert await b.save("s", Changes({"b": "2"}), created=now, ttl=60, create=False)
    own_redis.restart()  # empty
    # B writes the session back whole (with b), then A, which never saw b, writes too.
    assert await b.save("s", Changes({"c": "3"}), created=now, ttl=60, create=False)
    assert await a.save("s", Changes({"d": "4"}), created=now, ttl=60, create=False)
    record = await a.load("s")
    await a.aclose()
    await b.aclose()
    assert record is not None
    assert dict(record.fields) == {"a": "1", "b": "2", "c": "3", "d": "4"}


async def test_a_stalled_redis_is_bounded_by_the_stores_deadline_not_socket_timeouts(
    own_redis: RedisServer,
) -> None:
    # Issue 16: redis-py's socket_timeout puts a wait_for on every send (~9 us of CPU a
    # request); the store bounds each call with one deadline timer of its own instead.
    store = RedisStore.from_url(own_redis.url, timeout=0.3)
    admin = RedisStore.from_url(own_redis.url)
    try:
        await store.ping()
        assert isinstance(store.client, redis.asyncio.Redis)
        assert store.client.connection_pool.connection_kwargs.get("socket_timeout") is None
        await admin.client.execute_command("CLIENT", "PAUSE", "1500", "ALL")
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match=r"within 0\.3 s"):
            await store.load("x")
        assert time.monotonic() - started < 1.0  # the deadline, not the pause
        await admin.client.execute_command("CLIENT", "UNPAUSE")
        assert await store.load("x") is None  # the connection cut off was not pooled
    finally:
        await store.aclose()
        await admin.aclose()


async def _two_sessions(store: RedisStore) -> None:
    """Sessions "a" and "b", each with a field of its own: a reply read for the wrong call
    shows."""
    for name in ("a", "b"):
        saved = await store.save(name, Changes({name: name}), created=1.0, ttl=60, create=True)
        assert saved is not None


async def test_a_call_past_its_deadline_fails_and_its_connection_is_not_reused(
    own_redis: RedisServer,
) -> None:
    # (A WRITE pause holds every script, and lets the admin's UNPAUSE through.)
    # Issue 16: each call's deadline is one loop timer that aborts the connection (an
    # asyncio.timeout cost ~28,000 instructions a call). Without it the load below waits out
    # the whole pause and succeeds; a connection kept after its reply was late would give
    # the next load "a"'s reply, sent when the pause ends.
    store = RedisStore.from_url(own_redis.url, timeout=0.3)
    admin = RedisStore.from_url(own_redis.url)
    try:
        await _two_sessions(store)
        for operation in ("load", "save"):
            await admin.client.execute_command("CLIENT", "PAUSE", "3000", "WRITE")
            started = time.monotonic()
            pending: Awaitable[object] = (
                store.load("a")
                if operation == "load"
                else store.save("a", Changes({"x": "1"}), created=1.0, ttl=60, create=False)
            )
            with pytest.raises(StoreUnavailable, match=r"within 0\.3 s"):
                await pending
            assert time.monotonic() - started < 0.3 + 0.4, operation  # the deadline, not the pause
            await admin.client.execute_command("CLIENT", "UNPAUSE")
            record = await store.load("b")
            assert record is not None, operation
            assert dict(record.fields) == {"b": "b"}, operation  # its own reply
    finally:
        await store.aclose()
        await admin.aclose()


async def test_a_cancel_during_a_call_is_raised_and_the_connection_discarded(
    own_redis: RedisServer,
) -> None:
    # The deadline cancels no task: a caller's cancel must come out as CancelledError (not
    # a StoreUnavailable, not swallowed), and the connection it left mid-reply not be kept.
    store = RedisStore.from_url(own_redis.url, timeout=5.0)
    admin = RedisStore.from_url(own_redis.url)
    try:
        await _two_sessions(store)
        assert store._idle  # the connection the next call takes: its read is in flight
        await admin.client.execute_command("CLIENT", "PAUSE", "3000", "WRITE")
        started = time.monotonic()
        task = asyncio.create_task(store.load("a"))
        await async_wait_until(lambda: not store._idle, within=2.0, what="the load's send")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - started < 1.0  # the cancel, not the pause nor the deadline
        await admin.client.execute_command("CLIENT", "UNPAUSE")
        record = await store.load("b")
        assert record is not None
        assert dict(record.fields) == {"b": "b"}  # its own reply, not the cancelled load's
    finally:
        await store.aclose()
        await admin.aclose()
