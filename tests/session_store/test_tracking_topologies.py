"""HybridStore tracking on a real Sentinel setup and a real Redis Cluster (issue 16).

Sentinel: the tracking connection is on the primary the sentinels name, so a read of a
held session makes no Redis round trip there; after a failover no copy trusted under the
old primary is served (a write made on the new primary right after it is read back at
once), and tracking comes back on the new primary. Cluster: one tracking connection per
primary, so sessions on every shard are read without round trips and another writer's
change on each shard is seen; a lost tracking connection on one node stops cached reads
until it is back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial

import pytest
from redis.asyncio.connection import AbstractConnection, Connection
from redis.crc import key_slot

from session_store import Changes, HybridStore, RedisStore, StoreUnavailable
from session_store._tracking import ClusterTracker, Tracker
from tests.helpers import async_wait_until
from tests.redis_sentinel import HOST, SentinelSetup, info, query
from tests.redis_topology import Cluster, start_cluster
from tests.session_store.test_tracking import _create, _fields, _held, _update

pytestmark = pytest.mark.anyio

READS = 100


def _evalsha_calls(port: int) -> int:
    """EVALSHA and EVAL calls the server at ``port`` has run (the hybrid store's version
    check and full load are its only read commands)."""
    stats = info(port, "commandstats")
    calls = 0
    for name in ("cmdstat_evalsha", "cmdstat_eval"):
        entry = stats.get(name)
        if entry is not None:
            calls += int(entry.split(",")[0].removeprefix("calls="))
    return calls


async def _tracking(*stores: HybridStore, within: float = 5.0) -> None:
    """Start each store's tracking and wait until its cached reads may be served."""
    for store in stores:
        assert store.tracker is not None, f"{store!r} has no tracking"
        store.tracker.start()
    await async_wait_until(
        lambda: all(s.tracker is not None and s.tracker.current for s in stores),
        within,
        "tracking to be current",
    )


async def _round_trips_per_read(store: HybridStore, session_id: str, ports: list[int]) -> float:
    before = sum(_evalsha_calls(port) for port in ports)
    for _ in range(READS):
        await store.load(session_id)
    return (sum(_evalsha_calls(port) for port in ports) - before) / READS


async def _seen_within(store: HybridStore, session_id: str, n: str, limit: float) -> float:
    """Read until ``store`` shows ``n``; fail after ``limit`` seconds. Returns the delay."""
    written = time.monotonic()
    while await _fields(store, session_id) != {"n": n}:
        assert time.monotonic() - written < limit, f"{store!r} served an older {session_id!r}"
        await asyncio.sleep(0.001)
    return time.monotonic() - written


# -- Sentinel ----------------------------------------------------------------------------------


@pytest.fixture
def sentinel() -> Iterator[SentinelSetup]:
    with SentinelSetup() as setup:
        yield setup


@pytest.fixture
async def sentinel_stores(
    sentinel: SentinelSetup, prefix: str
) -> AsyncIterator[tuple[HybridStore, HybridStore]]:
    """Instances A and B, hybrid with tracking, over ``redis+sentinel://``."""
    a = HybridStore(RedisStore.from_url(sentinel.url, prefix=prefix))
    b = HybridStore(RedisStore.from_url(sentinel.url, prefix=prefix))
    yield a, b
    for store in (a, b):
        await store.aclose()


def _tracked_port(store: HybridStore) -> int | None:
    tracker = store.tracker
    assert isinstance(tracker, Tracker)
    return tracker.address[1] if tracker.current and tracker.address else None


async def test_sentinel_hybrid_reads_make_no_round_trip_and_see_other_writes(
    sentinel: SentinelSetup, sentinel_stores: tuple[HybridStore, HybridStore]
) -> None:
    # Before: no tracker on Sentinel, 1.0 Redis round trip (an EVALSHA) per read.
    a, b = sentinel_stores
    await _create(a, "s", n="0")
    await _tracking(a, b)
    assert _tracked_port(a) == sentinel.current_primary().port
    await _held(a, "s")
    per_read = await _round_trips_per_read(a, "s", [sentinel.primary.port, sentinel.replica.port])
    print(f"sentinel hybrid: {per_read} Redis round trips per read")
    assert per_read == 0
    for n in range(1, 21):
        await _update(b, "s", n=str(n))
        await _seen_within(a, "s", str(n), 1.0)
        await _held(a, "s")


@pytest.mark.timeout(60)
async def test_sentinel_failover_serves_no_stale_copy_and_tracking_follows(
    sentinel: SentinelSetup, sentinel_stores: tuple[HybridStore, HybridStore], prefix: str
) -> None:
    a, _b = sentinel_stores
    ids = [f"s{n}" for n in range(20)]
    for session_id in ids:
        await _create(a, session_id, n="0")
    await _tracking(a)
    for session_id in ids:
        await _held(a, session_id)
    killed = time.monotonic()
    old = sentinel.kill_primary()  # SIGKILL, as a crash
    new = sentinel.wait_failover(old)
    promoted = time.monotonic() - killed
    # Another client writes every session on the new primary right away: not one read may
    # show the value from before, whatever copy A held.
    other = RedisStore.from_url(f"redis://{HOST}:{new.port}", prefix=prefix)
    try:
        for session_id in ids:
            assert await other.save(
                session_id, Changes({"n": "1"}), created=time.time(), ttl=60, create=False
            )
            assert await _fields(a, session_id) == {"n": "1"}
    finally:
        await other.aclose()
    # Tracking is back, on the new primary, within a bounded time: reads from memory again.
    await async_wait_until(lambda: _tracked_port(a) == new.port, 10, "tracking on the new primary")
    print(
        f"sentinel: promoted {promoted:.2f} s after the kill, "
        f"tracking on the new primary {time.monotonic() - killed:.2f} s after it"
    )
    await _held(a, "s0")
    per_read = await _round_trips_per_read(a, "s0", [new.port])
    assert per_read == 0


async def test_a_replica_is_never_tracked(sentinel: SentinelSetup) -> None:
    """A tracker sent to a replica (the sentinels' word out of date) refuses it: a replica's
    tracking does not see the writes made on the primary."""

    def to(port: int) -> Callable[[], AbstractConnection]:
        return lambda: Connection(host=HOST, port=port, protocol=2)

    on_replica = Tracker(to(sentinel.replica.port), "x:", lambda keys: None, primary_only=True)
    on_primary = Tracker(to(sentinel.primary.port), "x:", lambda keys: None, primary_only=True)
    try:
        on_replica.start()
        on_primary.start()
        await asyncio.wait_for(on_primary.subscribed_event.wait(), 5)
        # Many attempts (one each retry_interval, 50 ms), none subscribed.
        await asyncio.sleep(0.5)
        assert not on_replica.current
        assert on_replica.epoch == 0
    finally:
        await on_replica.aclose()
        await on_primary.aclose()


# -- Cluster -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with start_cluster() as running:
        yield running


@pytest.fixture
async def cluster_stores(
    cluster: Cluster, prefix: str
) -> AsyncIterator[tuple[HybridStore, HybridStore]]:
    a = HybridStore(RedisStore.from_url(cluster.url, prefix=prefix))
    b = HybridStore(RedisStore.from_url(cluster.url, prefix=prefix))
    yield a, b
    for store in (a, b):
        await store.aclose()


def _one_session_per_primary(cluster: Cluster, store: RedisStore) -> dict[int, str]:
    """Primary port -> a session id whose key that primary owns."""
    owners: dict[int, int] = {}  # slot -> port
    reply = query(cluster.primaries[0].port, "CLUSTER", "SLOTS")
    assert isinstance(reply, list)
    for first, last, master, *_ in reply:
        for slot in range(int(first), int(last) + 1):
            owners[slot] = int(master[1])
    chosen: dict[int, str] = {}
    for n in range(1000):
        session_id = f"session-{n}"
        chosen.setdefault(owners[key_slot(store.key(session_id).encode())], session_id)
        if len(chosen) == len(cluster.primaries):
            return chosen
    raise AssertionError("no session id for some primary in 1,000")


async def test_cluster_hybrid_reads_make_no_round_trip_and_see_writes_on_every_shard(
    cluster: Cluster, cluster_stores: tuple[HybridStore, HybridStore]
) -> None:
    # Before: no tracker on a Cluster, 1.0 Redis round trip (an EVALSHA) per read.
    a, b = cluster_stores
    sessions = _one_session_per_primary(cluster, a.redis)
    for session_id in sessions.values():
        await _create(a, session_id, n="0")
    await _tracking(a, b)
    tracker = a.tracker
    assert isinstance(tracker, ClusterTracker)
    assert {address[1] for address in tracker.trackers} == set(sessions)
    ports = [node.port for node in cluster.primaries]
    for session_id in sessions.values():
        await _held(a, session_id)
        per_read = await _round_trips_per_read(a, session_id, ports)
        print(f"cluster hybrid, {session_id}: {per_read} Redis round trips per read")
        assert per_read == 0
    for n in range(1, 6):
        for session_id in sessions.values():
            await _update(b, session_id, n=str(n))
            await _seen_within(a, session_id, str(n), 1.0)
            await _held(a, session_id)


def _moved_on(tracker: ClusterTracker, epoch: int) -> bool:
    return tracker.epoch != epoch


async def test_cluster_a_killed_tracking_connection_stops_cached_reads_until_it_is_back(
    cluster: Cluster, cluster_stores: tuple[HybridStore, HybridStore]
) -> None:
    a, b = cluster_stores
    sessions = _one_session_per_primary(cluster, a.redis)
    for session_id in sessions.values():
        await _create(a, session_id, n="0")
    await _tracking(a)
    tracker = a.tracker
    assert isinstance(tracker, ClusterTracker)
    for port, session_id in sessions.items():
        await _held(a, session_id)
        node = tracker.trackers[(HOST, port)]
        old_id, epoch = node.client_id, tracker.epoch
        assert old_id is not None
        assert query(port, "CLIENT", "KILL", "ID", str(old_id)) == 1
        killed = time.monotonic()
        await async_wait_until(partial(_moved_on, tracker, epoch), 5, "the loss to be seen")
        # Lost: B's write on that node is not invalidated at A, and A must not serve its copy.
        await _update(b, session_id, n=f"after-{port}")
        hits = a.hits
        assert await _fields(a, session_id) == {"n": f"after-{port}"}
        assert a.hits == hits
        # Back (a new connection on that node): cached reads again, after one fill.
        await async_wait_until(lambda: tracker.current, 5, "tracking to be back")
        print(f"cluster: tracking on {port} back {(time.monotonic() - killed) * 1e3:.0f} ms after")
        assert tracker.trackers[(HOST, port)].client_id != old_id
        await _held(a, session_id)
        assert await _fields(a, session_id) == {"n": f"after-{port}"}


@pytest.mark.timeout(60)
async def test_cluster_failover_serves_no_stale_copy_and_tracking_follows(prefix: str) -> None:
    # A cluster of its own: this one loses a primary.
    with start_cluster() as cluster:
        a = HybridStore(RedisStore.from_url(cluster.url, prefix=prefix))
        other = RedisStore.from_url(cluster.url, prefix=prefix)
        try:
            sessions = _one_session_per_primary(cluster, a.redis)
            for session_id in sessions.values():
                await _create(a, session_id, n="0")
            await _tracking(a)
            for session_id in sessions.values():
                await _held(a, session_id)
            victim = cluster.primaries[0]
            session_id = sessions[victim.port]
            replica = cluster.replica_of(victim)
            killed = time.monotonic()
            cluster.kill(victim)
            cluster.wait_promoted(replica)
            # Written on the promoted replica right away: no read vouched for by tracking (a
            # hit) shows the value from before. Until A's client has the new slot map its
            # calls fail, and it serves its copy as in any Redis outage (not a hit).
            await _update_store(other, session_id, "1")
            hits = a.hits
            deadline = time.monotonic() + 5
            while await _fields(a, session_id) != {"n": "1"}:
                assert a.hits == hits, "a copy from before the failover served as current"
                assert time.monotonic() < deadline, "A's client never reached the new primary"
                await asyncio.sleep(0.05)
            # Tracking follows: the promoted replica is tracked, the dead primary is not.
            tracker = a.tracker
            assert isinstance(tracker, ClusterTracker)
            primaries = {(HOST, node.port) for node in cluster.current_primaries()}
            await async_wait_until(
                lambda: set(tracker.trackers) == primaries and tracker.current,
                10,
                "tracking on the promoted replica",
            )
            print(f"cluster: tracking on the promoted replica {time.monotonic() - killed:.2f} s")
            await _held(a, session_id)
            assert await _round_trips_per_read(a, session_id, [replica.port]) == 0
        finally:
            await a.aclose()
            await other.aclose()


async def _update_store(store: RedisStore, session_id: str, n: str) -> None:
    # The failover may take a moment to reach the client's slot map: a few tries, bounded.
    deadline = time.monotonic() + 5
    while True:
        try:
            version = await store.save(
                session_id, Changes({"n": n}), created=time.time(), ttl=60, create=False
            )
        except StoreUnavailable:
            assert time.monotonic() < deadline, "the cluster took no write for 5 s"
            await asyncio.sleep(0.05)
            continue
        assert version is not None
        return
