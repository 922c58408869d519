"""HybridStore with Redis server-assisted client tracking, two instances on one real Redis.

A read of a session the instance holds makes no Redis round trip, and still never serves
what it must not: another instance's write is seen within the invalidation delay, its own
at once; a lost or silent tracking connection, a FLUSHDB and a write that lands while a
load is in flight each leave nothing stale behind.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Sequence

import httpx
import pytest

from redis_plumbing import RedisServer
from session_store import Changes, EncryptedStore, HybridStore, RedisStore, SessionStore
from session_store._tracking import ClusterTracker, Tracker
from tests.helpers import async_wait_until
from tests.session_store.app import make_app

pytestmark = pytest.mark.anyio

TTL = 60.0  # seconds


@pytest.fixture
async def stores(redis_server: RedisServer, prefix: str) -> AsyncIterator[tuple[HybridStore, ...]]:
    """Instances A and B (hybrid, tracking) and a plain RedisStore for the truth."""
    a = HybridStore(RedisStore.from_url(redis_server.url, prefix=prefix))
    b = HybridStore(RedisStore.from_url(redis_server.url, prefix=prefix))
    truth = HybridStore(RedisStore.from_url(redis_server.url, prefix=prefix), tracking=False)
    for store in (a, b):
        assert store.tracker is not None
        store.tracker.start()
        await asyncio.wait_for(store.tracker.subscribed_event.wait(), 5)
    yield a, b, truth
    for store in (a, b, truth):
        await store.aclose()


def client_for(app: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),  # type: ignore[arg-type]
        base_url="http://testserver",
    )


async def _create(store: HybridStore, session_id: str, **fields: str) -> None:
    version = await store.save(
        session_id, Changes(fields), created=time.time(), ttl=TTL, create=True
    )
    assert version is not None


async def _update(store: HybridStore, session_id: str, **fields: str) -> None:
    version = await store.save(
        session_id, Changes(fields), created=time.time(), ttl=TTL, create=False
    )
    assert version is not None


async def _fields(store: HybridStore, session_id: str) -> dict[str, str] | None:
    record = await store.load(session_id)
    return None if record is None else dict(record.fields)


async def _held(store: HybridStore, session_id: str) -> None:
    """Load until ``store`` serves ``session_id`` from memory (a fill, then a hit)."""
    for _ in range(50):
        hits = store.hits
        await store.load(session_id)
        if store.hits > hits:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{store!r} never served {session_id!r} from memory")


async def _fence(store: HybridStore, redis: RedisStore, name: str) -> None:
    """Return once ``store`` has received every invalidation Redis sent before now: a write
    of a key under the prefix, whose invalidation comes after all earlier ones."""
    before = store._invalidations
    await redis.client.set(f"{redis.prefix}fence-{name}", "1", px=10_000)
    await async_wait_until(lambda: store._invalidations > before, 5, "the fence's invalidation")


async def _evalsha_calls(redis: RedisStore) -> int:
    stats = await redis.client.info("commandstats")
    return sum(
        int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval")
    )


async def test_a_read_of_a_held_session_makes_no_redis_round_trip(
    stores: tuple[HybridStore, ...],
) -> None:
    # Before issue 16: one EVALSHA (a version check) per read, 100 of 100.
    a, _b, truth = stores
    await _create(a, "s", n="1")
    await _held(a, "s")
    before = await _evalsha_calls(truth.redis)
    for _ in range(100):
        assert await _fields(a, "s") == {"n": "1"}
    assert await _evalsha_calls(truth.redis) - before == 0


async def test_a_write_elsewhere_is_seen_within_the_invalidation_delay(
    stores: tuple[HybridStore, ...],
) -> None:
    a, b, _truth = stores
    await _create(a, "s", n="0")
    delays: list[float] = []
    for n in range(1, 101):
        await _held(a, "s")
        await _update(b, "s", n=str(n))
        written = time.monotonic()
        # From B's acknowledged write to A's first read that shows it.
        while await _fields(a, "s") != {"n": str(n)}:
            assert time.monotonic() - written < 1.0, f"A served write {n - 1} for 1 s"
            await asyncio.sleep(0)
        delays.append(time.monotonic() - written)
    delays.sort()
    print(
        f"invalidation delay, write on B to A's read of it: p50 {delays[49] * 1e6:.0f} us, "
        f"p99 {delays[98] * 1e6:.0f} us, max {delays[-1] * 1e6:.0f} us"
    )
    assert delays[98] < 0.3


async def test_an_instance_reads_its_own_write_at_once(stores: tuple[HybridStore, ...]) -> None:
    a, _b, _truth = stores
    await _create(a, "s", n="0")
    for n in range(1, 51):
        await _held(a, "s")
        await _update(a, "s", n=str(n))
        assert await _fields(a, "s") == {"n": str(n)}  # no wait: the very next read


async def test_a_killed_tracking_connection_stops_cached_reads_until_it_is_back(
    stores: tuple[HybridStore, ...],
) -> None:
    a, b, truth = stores
    assert isinstance(a.tracker, Tracker)
    await _create(a, "s", n="1")
    await _held(a, "s")
    old_id, epoch = a.tracker.client_id, a.tracker.epoch
    await truth.redis.client.execute_command("CLIENT", "KILL", "ID", str(old_id))
    await async_wait_until(lambda: a.tracker is not None and a.tracker.epoch != epoch, 5)
    # Lost: B's write is not invalidated at A, and A must not serve its copy.
    await _update(b, "s", n="2")
    hits = a.hits
    assert await _fields(a, "s") == {"n": "2"}
    assert a.hits == hits
    # Back (a new connection, new epoch): cached reads again, after one fill.
    await asyncio.wait_for(a.tracker.subscribed_event.wait(), 5)
    assert a.tracker.client_id != old_id
    await _held(a, "s")
    assert await _fields(a, "s") == {"n": "2"}


async def test_a_silent_tracking_connection_stops_cached_reads_after_the_lease(
    stores: tuple[HybridStore, ...],
) -> None:
    a, _b, truth = stores
    assert isinstance(a.tracker, Tracker)
    await _create(a, "s", n="1")
    await _held(a, "s")
    # Redis answers no client for 0.6 s: the tracking connection's PINGs go unanswered.
    await truth.redis.client.execute_command("CLIENT", "PAUSE", "600", "ALL")
    paused = time.monotonic()
    await async_wait_until(lambda: a.tracker is not None and not a.tracker.current, 2)
    assert time.monotonic() - paused < a.tracker.lease + 0.2
    hits = a.hits
    assert await _fields(a, "s") == {"n": "1"}  # asks Redis (it waits out the pause)
    assert a.hits == hits


async def test_flushdb_flushes_the_cache(own_redis: RedisServer) -> None:
    # A Redis of its own: FLUSHDB must not empty the other tests' sessions.
    a = HybridStore(RedisStore.from_url(own_redis.url, prefix="flush:"))
    admin = RedisStore.from_url(own_redis.url, prefix="flush:")
    try:
        assert a.tracker is not None
        await _create(a, "s", n="1")
        a.tracker.start()
        await asyncio.wait_for(a.tracker.subscribed_event.wait(), 5)
        await _held(a, "s")
        await admin.client.flushdb()
        await async_wait_until(lambda: a._flushed_at > 0, 5, "the flush's null invalidation")
        # Gone, not written back from the local copy as after a restart without persistence.
        assert await a.load("s") is None
        assert await admin.load("s") is None
    finally:
        await a.aclose()
        await admin.aclose()


async def test_a_write_that_lands_while_a_load_is_in_flight_leaves_no_stale_copy(
    stores: tuple[HybridStore, ...],
) -> None:
    a, b, truth = stores
    await _create(a, "s", n="0")
    stale = 0
    for n in range(1, 301):
        # A write on B makes A's copy untrusted, so A's next load fills it from Redis while
        # B's next write races it: often Redis runs A's load first, then B's write, and A
        # reads B's invalidation before the reply to its load, which shows the older value.
        await _update(b, "s", n=f"{n}-before")
        await _fence(a, truth.redis, f"{n}-before")
        await asyncio.gather(a.load("s"), _update(b, "s", n=str(n)))
        await _fence(a, truth.redis, str(n))
        if await _fields(a, "s") != {"n": str(n)}:
            stale += 1
    assert stale == 0, f"{stale} of 300 races left A serving an older session"


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
async def test_a_client_reads_its_own_write_on_another_instance_before_the_invalidation(
    stores: tuple[HybridStore, ...], encrypted: bool
) -> None:
    """The client writes on A, then reaches B before B has read the invalidation (a busy
    B, a slower path from Redis): B's copy is older than the version the client's cookie
    names, so B asks Redis. Before the version cookie, B served its old copy. The same
    through an `EncryptedStore` in front of each hybrid store."""
    a, b, _truth = stores
    key = secrets.token_urlsafe(32)

    def wrapped(store: HybridStore) -> SessionStore:
        return EncryptedStore(store, [key]) if encrypted else store

    assert isinstance(b.tracker, Tracker)
    late: list[Sequence[str] | None] = []
    deliver = b._invalidated
    b.tracker._on_invalidate = late.append  # B's invalidations held back, in order
    on_a, on_b = client_for(make_app(wrapped(a))), client_for(make_app(wrapped(b)))
    async with on_a, on_b:
        assert (await on_a.post("/set", params={"n": "1"})).status_code == 200
        on_b.cookies = on_a.cookies
        for _ in range(3):  # B fills its copy and then serves it from memory
            assert (await on_b.get("/read")).json() == {"n": "1"}
        hits = b.hits
        assert (await on_b.get("/read")).json() == {"n": "1"}
        assert b.hits == hits + 1
        for n in range(2, 12):
            assert (await on_a.post("/set", params={"n": str(n)})).status_code == 200
            on_b.cookies = on_a.cookies
            assert (await on_b.get("/read")).json() == {"n": str(n)}
            # Its next read, with no newer write, is served from memory again.
            assert (await on_b.get("/read")).json() == {"n": str(n)}
        assert late  # the invalidations did come, only later than the client
        for keys in late:
            deliver(keys)


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("redis://127.0.0.1:1", Tracker),
        ("redis+sentinel://127.0.0.1:1/primary", Tracker),
        ("redis+cluster://127.0.0.1:1", ClusterTracker),
    ],
    ids=["server", "sentinel", "cluster"],
)
async def test_every_topology_has_tracking(url: str, kind: type) -> None:
    # Before: Sentinel and Cluster had none, and asked Redis on every read (1.0 round trip
    # a read); test_tracking_topologies.py reads them without one.
    store = HybridStore(RedisStore.from_url(url))
    try:
        assert isinstance(store.tracker, kind)
    finally:
        await store.aclose()


async def test_tracking_can_be_turned_off(redis_server: RedisServer, prefix: str) -> None:
    store = HybridStore(RedisStore.from_url(redis_server.url, prefix=prefix), tracking=False)
    try:
        assert store.tracker is None
        await _create(store, "s", n="1")
        for _ in range(5):
            assert await _fields(store, "s") == {"n": "1"}
        assert store.hits == 0
    finally:
        await store.aclose()
