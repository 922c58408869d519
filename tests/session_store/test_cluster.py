"""Redis Cluster, for real: three primaries and three replicas made with the cluster commands.

What holds on a cluster (``redis+cluster://``): every command and script of a session runs on
the node that owns the session's slot, so sessions spread over the shards and the atomic
per-key write works unchanged; the registry's scripts run whole on its service's slot; the
demo's compare workload (real instances and balancer) loses no session in ``shared`` and
``hybrid`` modes; and when a primary is SIGKILLed under a load of session writes, the
cluster's own failover promotes its replica and, with ``min_replicas_ack=1``, no write that
was acknowledged is missing afterwards.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.crc import key_slot

from balancer.control._dashboard import RedisStatus
from demo_app.compare import main as compare
from service_registry import Instance, Registry
from session_store import Changes, RedisStore, StoreUnavailable, logout_everywhere, user_sessions
from tests.helpers import async_wait_until
from tests.redis_topology import Cluster, start_cluster

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """One cluster for the tests that do not break it."""
    with start_cluster() as running:
        yield running


def _slot_owners(cluster: Cluster) -> dict[int, int]:
    """Slot -> port of the primary that owns it now."""
    owners: dict[int, int] = {}
    with redis.Redis("127.0.0.1", cluster.running()[0].port, decode_responses=True) as client:
        for first, last, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
            for slot in range(first, last + 1):
                owners[slot] = int(master[1])
    return owners


async def test_sessions_spread_over_the_shards(cluster: Cluster) -> None:
    store = RedisStore.from_url(cluster.url, prefix="spread:")
    try:
        ids = [f"session-{n}" for n in range(300)]
        for session_id in ids:
            version = await store.save(
                session_id, Changes({"n": session_id}), created=time.time(), ttl=60, create=True
            )
            assert version is not None
        owners = _slot_owners(cluster)
        per_primary = Counter(owners[key_slot(store.key(s).encode())] for s in ids)
        assert set(per_primary) == {node.port for node in cluster.primaries}
        assert min(per_primary.values()) > 60  # about 100 each, of 300
        # And the keys are where the slot map says: each primary holds its share.
        for primary in cluster.primaries:
            with redis.Redis("127.0.0.1", primary.port) as client:
                assert (
                    len(list(client.scan_iter("spread:*", count=1000))) == per_primary[primary.port]
                )
        for session_id in ids[:30]:
            record = await store.load(session_id)
            assert record is not None
            assert record.fields == {"n": session_id}
    finally:
        await store.aclose()


async def test_store_operations_and_script_reload_on_a_cluster(cluster: Cluster) -> None:
    store = RedisStore.from_url(cluster.url, prefix="ops:")
    try:
        created = time.time()
        first = await store.save("a", Changes({"x": "1"}), created=created, ttl=60, create=True)
        assert first is not None
        # A node that lost its script cache (a restart, a promoted replica) loads it again.
        for node in cluster.primaries:
            with redis.Redis("127.0.0.1", node.port) as client:
                client.script_flush()
        version = await store.save(
            "a", Changes({"y": "2"}, frozenset({"x"})), created=created, ttl=60, create=False
        )
        assert version == first + 1
        record = await store.load("a")
        assert record is not None
        assert record.fields == {"y": "2"}
        await store.touch("a", 120)
        await store.destroy("a", ttl=60)
        assert await store.load("a") is None
        await store.ping()
    finally:
        await store.aclose()


async def test_logout_everywhere_on_a_cluster(cluster: Cluster) -> None:
    """A user's sessions sit on every shard, the user's index on one slot: each is destroyed
    (a tombstone on its own slot) and none comes back."""
    store = RedisStore.from_url(cluster.url, prefix="users:", min_replicas_ack=1)
    try:
        ids = [f"device-{n}" for n in range(12)]
        for session_id in ids:
            assert await store.save(
                session_id, Changes({"u": '"alice"'}), created=time.time(), ttl=60, create=True
            )
            await store.bind_user(session_id, "alice", ttl=60)
        owners = _slot_owners(cluster)
        assert len({owners[key_slot(store.key(s).encode())] for s in ids}) == 3
        assert set(await user_sessions(store, "alice")) == set(ids)
        destroyed = await logout_everywhere(store, "alice", keep={ids[0]}, ttl=60)
        assert sorted(destroyed) == sorted(ids[1:])
        for session_id in ids[1:]:
            assert await store.load(session_id) is None
            stale = Changes({"x": "1"})
            assert await store.save(session_id, stale, created=0, ttl=60, create=False) is None
        assert list(await user_sessions(store, "alice")) == [ids[0]]
    finally:
        await store.aclose()


async def test_registry_on_a_cluster(cluster: Cluster) -> None:
    registry = Registry.from_url(cluster.url, "clustered")
    try:
        async with registry.notices() as next_notice:
            instance = Instance("clustered", "i1", "http://127.0.0.1:9001", ttl=5)
            assert await registry.register(instance) is True
            deadline = time.monotonic() + 5
            notice = None
            while notice is None and time.monotonic() < deadline:
                notice = await next_notice(1.0)  # None also for the subscribe confirmation
            assert notice is not None
            assert (notice.event, notice.id) == ("up", "i1")
        snapshot = await registry.read()
        assert [i.id for i in snapshot.instances] == ["i1"]
        assert snapshot.epoch is not None
        assert await registry.deregister("i1") is True
        assert (await registry.read()).instances == ()
    finally:
        await registry.aclose()


async def test_the_dashboard_reports_on_a_cluster(cluster: Cluster) -> None:
    """`--dashboard-redis redis+cluster://...`: reachable, with the commands/s of all of
    its primaries (a cluster client's own INFO asks one node)."""
    status = RedisStatus(cluster.url)
    writer = redis.RedisCluster("127.0.0.1", cluster.running()[0].port)
    try:
        first = await status.sample(1.0)
        assert first["reachable"] is True, first
        for n in range(300):  # about 100 on each primary
            writer.set(f"dashboard:{n}", n)
        second = await status.sample(2.0)
        assert isinstance(second["ops"], float)
        assert 300 <= second["ops"] < 400, second  # one node's share would be about 100
    finally:
        writer.close()
        await status.aclose()


@pytest.mark.parametrize("mode", ["shared", "hybrid"])
def test_compare_workload_loses_no_session(
    cluster: Cluster, mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", cluster.url)
    out = tmp_path / "out.json"
    argv = ["--modes", mode, "--users", "16", "--requests", "6", "--kill", "1"]
    compare([*argv, "--concurrency", "8", "--json", str(out)])
    report = json.loads(out.read_text())["modes"][mode]
    assert report["completed"]
    assert report["requests"] == 16 * 6
    assert report["sessions_on_killed"] > 0
    assert report["sessions_lost"] == 0
    assert report["failed_requests"] < 8


@pytest.mark.parametrize("min_replicas_ack", [1, 0])
async def test_killing_a_primary_under_load(min_replicas_ack: int) -> None:
    """With ``min_replicas_ack=1`` no acknowledged write is lost; without, the count is
    printed (often 0 on one machine, where replication is fast, but never promised)."""
    with start_cluster() as own:
        store = RedisStore.from_url(
            own.url, prefix="ack:", min_replicas_ack=min_replicas_ack, ack_timeout_ms=500
        )
        try:
            lost = await _kill_a_primary_under_load(own, store)
        finally:
            await store.aclose()
    if min_replicas_ack:
        assert lost == []


async def _kill_a_primary_under_load(cluster: Cluster, store: RedisStore) -> list[str]:
    """SIGKILL the primary of a shard while 48 sessions are written in a loop; wait for
    the cluster's failover, bring the dead node back as a replica of its heir, wait for
    writes on that shard to be acknowledged again, then compare every session with the
    last write acknowledged for it. Returns the sessions that lost an acknowledged write."""
    sessions = [f"w{n}" for n in range(48)]
    created = time.time()
    acked: dict[str, int] = {}  # the last value a save acknowledged, per session
    for session_id in sessions:
        await store.save(session_id, Changes({"n": "0"}), created=created, ttl=600, create=True)
        acked[session_id] = 0
    owners = _slot_owners(cluster)
    victim = next(n for n in cluster.primaries if n.port == owners[key_slot(b"ack:{w0}")])
    heir = cluster.replica_of(victim)
    on_victim = [s for s in sessions if owners[key_slot(store.key(s).encode())] == victim.port]
    stop = asyncio.Event()
    failures: Counter[str] = Counter()
    missing: list[str] = []

    async def writer(session_id: str) -> None:
        n = acked[session_id]
        while not stop.is_set():
            n += 1
            try:
                version = await store.save(
                    session_id, Changes({"n": str(n)}), created=created, ttl=600, create=False
                )
            except StoreUnavailable as exc:  # WriteNotAcknowledged too
                failures[type(exc).__name__] += 1
                await asyncio.sleep(0.02)  # back off while the shard fails over
                continue
            if version is None:
                missing.append(session_id)  # the session itself is gone: a loss
                return
            acked[session_id] = n

    tasks = [asyncio.create_task(writer(s)) for s in sessions]
    try:
        await async_wait_until(lambda: min(acked.values()) >= 3, 10, "the load to run")
        killed_at = time.monotonic()
        cluster.kill(victim)
        await asyncio.to_thread(cluster.wait_promoted, heir)
        promoted_after = time.monotonic() - killed_at
        await asyncio.to_thread(cluster.rejoin, victim, heir)
        before = {s: acked[s] for s in on_victim}
        await async_wait_until(
            lambda: all(acked[s] > before[s] for s in on_victim),
            15,
            "writes to the failed shard's sessions to be acknowledged again",
        )
        recovered_after = time.monotonic() - killed_at
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    lost = list(missing)
    for session_id in sessions:
        record = await store.load(session_id)
        if record is None or int(record.fields["n"]) < acked[session_id]:
            lost.append(session_id)
    print(
        f"\ncluster, min_replicas_ack={store.min_replicas_ack}: replica promoted "
        f"{promoted_after:.1f} s after the kill, writes on that shard acknowledged again "
        f"{recovered_after:.1f} s after it (a replica rejoined); {sum(acked.values())} "
        f"acknowledged writes, refused: {dict(failures)}; lost acknowledged writes: {len(lost)}"
    )
    assert sum(failures.values()) > 0  # the kill was felt: it happened under load
    assert on_victim  # and it hit sessions that were being written
    return lost
