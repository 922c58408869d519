"""HybridStore: this instance's own writes do not cost it its copy (issue 16).

With client tracking in BCAST mode Redis sends every write's key to every tracker, the
writer's own included, and batches one event-loop cycle's keys into one message, each key
once (measured: two saves of one session at the same time came as one message in 76 of 300
tries). So a save's invalidation alone cannot tell "my write" from "my write
and another's"; the save script names its new version in a second key of the same message,
and the store keeps its copy only for a message that names its own version and no other.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Sequence

import pytest

from redis_plumbing import RedisServer
from session_store import Changes, HybridStore, RedisStore
from session_store._tracking import tracker_for
from tests.helpers import async_wait_for, async_wait_until
from tests.session_store.test_tracking import _evalsha_calls, _fence, _held

pytestmark = pytest.mark.anyio

TTL = 60.0  # seconds


async def _tracking(store: HybridStore) -> HybridStore:
    assert store.tracker is not None
    store.tracker.start()
    await asyncio.wait_for(store.tracker.subscribed_event.wait(), 5)
    return store


@pytest.fixture
async def pair(redis_server: RedisServer, prefix: str) -> AsyncIterator[tuple[HybridStore, ...]]:
    """A and B (hybrid, tracking) on one Redis; their RedisStores read the truth."""
    a = await _tracking(HybridStore(RedisStore.from_url(redis_server.url, prefix=prefix)))
    b = await _tracking(HybridStore(RedisStore.from_url(redis_server.url, prefix=prefix)))
    yield a, b
    await a.aclose()
    await b.aclose()


async def _save(store: HybridStore, session_id: str, *, create: bool = False, **f: str) -> int:
    version = await store.save(session_id, Changes(f), created=time.time(), ttl=TTL, create=create)
    assert version is not None
    return version


async def _blocked_client(redis: RedisStore) -> str:
    """The id of a client whose command waits in a paused Redis (CLIENT LIST's flag b)."""
    found: list[str] = []

    async def look() -> bool:
        listing = await redis.client.execute_command("CLIENT", "LIST", "TYPE", "normal")
        text = listing.decode() if isinstance(listing, bytes) else str(listing)
        found[:] = [line.split()[0][3:] for line in text.splitlines() if " flags=b " in line]
        return bool(found)

    await async_wait_for(look, 5, "a client waiting in the paused Redis")
    return found[0]


async def test_one_save_sends_one_message_naming_the_session_and_its_new_version(
    pair: tuple[HybridStore, ...],
) -> None:
    a, _b = pair
    got: list[Sequence[str] | None] = []
    # A tracker of its own that records what Redis sends (a HybridStore's gets the same).
    recorder = tracker_for(a.redis.client, a.redis.prefix, got.append)
    assert recorder is not None
    recorder.start()
    await asyncio.wait_for(recorder.subscribed_event.wait(), 5)

    async def fence(name: str) -> None:
        fence_key = f"{a.redis.prefix}fence-{name}"
        await a.redis.client.set(fence_key, "1", px=10_000)
        await async_wait_until(lambda: [fence_key] in got, 5, "the fence's invalidation")

    key = a.redis.key("s")
    versions = [await _save(a, "s", create=True, n="0")]
    # Every kind of save: fields set, fields deleted, a value set to what it was, nothing.
    for changes in (Changes({"n": "1"}), Changes({}, frozenset({"n"})), Changes({}), Changes({})):
        await fence(f"before-{len(versions)}")
        got.clear()
        version = await a.save("s", changes, created=time.time(), ttl=TTL, create=False)
        assert version is not None
        versions.append(version)
        await fence(f"after-{len(versions)}")
        # The save's one message (both its keys, once each), then the fence's.
        assert [sorted(keys or []) for keys in got[:-1]] == [[key, f"{key}#{version}"]], got
    assert versions == list(range(versions[0], versions[0] + 5))
    await recorder.aclose()


async def test_reads_after_an_own_write_make_no_redis_round_trip(
    pair: tuple[HybridStore, ...],
) -> None:
    a, _b = pair
    await _save(a, "s", create=True, n="0")
    await _held(a, "s")
    before = await _evalsha_calls(a.redis)
    hits = a.hits
    for n in range(1, 51):
        await _save(a, "s", n=str(n))
        for _ in range(9):
            record = await a.load("s")
            assert record is not None
            assert dict(record.fields) == {"n": str(n)}
    # 50 saves, and not one version check: 450 reads, all from memory.
    assert await _evalsha_calls(a.redis) - before == 50
    assert a.hits - hits == 450


async def test_own_and_foreign_writes_interleaved_never_leave_a_stale_copy(
    pair: tuple[HybridStore, ...],
) -> None:
    """1,000 rounds: a save on A and, in 3 rounds of 4, a save on B of the same session, with
    a read on A, all at once in a random order and spacing (Redis often runs both saves in
    one event-loop cycle and sends one message for both). After each round and A's fence
    (every invalidation sent so far received), A's reads must show Redis' session."""
    a, b = pair
    rng = random.Random(16)
    await _save(a, "s", create=True, a="0", b="0")
    stale: list[int] = []
    kept = 0  # rounds whose first read after the fence came from memory
    deadline = time.monotonic() + 60  # seconds

    async def later(steps: int, call: Awaitable[object]) -> None:
        for _ in range(steps):
            await asyncio.sleep(0)
        await call

    for n in range(1, 1001):
        assert time.monotonic() < deadline, f"1,000 rounds took over 60 s (at {n})"
        calls = [later(rng.randrange(4), _save(a, "s", a=str(n)))]
        if rng.random() < 0.75:
            calls.append(later(rng.randrange(4), _save(b, "s", b=str(n))))
        calls.append(later(rng.randrange(4), a.load("s")))
        await asyncio.gather(*calls)
        await _fence(a, a.redis, str(n))
        truth = await a.redis.load("s")
        assert truth is not None
        for read in range(2):
            hits = a.hits
            mine = await a.load("s")
            assert mine is not None
            if dict(mine.fields) != dict(truth.fields):
                stale.append(n)
            kept += read == 0 and a.hits > hits
    print(f"1,000 rounds: {len(stale)} stale reads, {kept} first reads from memory")
    assert not stale, f"A served a stale copy in {len(stale)} reads of 2,000: rounds {stale[:10]}"
    # The rounds with A's save alone (~250) keep A's copy: its next read is from memory.
    assert kept > 150, kept


async def test_a_destroy_elsewhere_in_the_same_redis_cycle_as_an_own_save_is_seen(
    pair: tuple[HybridStore, ...],
) -> None:
    """A logout on B that Redis runs in the same event-loop cycle as A's save of the same
    session, after it, comes in the save's message, once: A must still drop its copy. 500
    sessions, each saved on A and destroyed on B at once, in a random order and spacing."""
    a, b = pair
    rng = random.Random(17)
    served = []
    deadline = time.monotonic() + 60  # seconds

    async def later(steps: int, call: Awaitable[object]) -> None:
        for _ in range(steps):
            await asyncio.sleep(0)
        await call

    for n in range(500):
        assert time.monotonic() < deadline, f"500 rounds took over 60 s (at {n})"
        session_id = f"s{n}"
        await _save(a, session_id, create=True, n="0")
        await asyncio.gather(
            later(
                rng.randrange(3),
                a.save(session_id, Changes({"n": "1"}), created=0, ttl=TTL, create=False),
            ),
            later(rng.randrange(3), b.destroy(session_id, ttl=TTL)),
        )
        await _fence(a, a.redis, f"destroyed-{n}")
        assert await a.redis.load(session_id) is None
        if await a.load(session_id) is not None:
            served.append(n)
    assert not served, f"A served {len(served)} of 500 sessions destroyed on B: {served[:10]}"


async def test_a_write_that_fails_leaves_no_trusted_copy_behind(own_redis: RedisServer) -> None:
    """A's save gives up (Redis paused past A's timeout) while Redis runs it later anyway;
    then B writes. A must show B's write once its invalidation is in, never its own copy."""
    a = await _tracking(HybridStore(RedisStore.from_url(own_redis.url, timeout=0.2)))
    b = await _tracking(HybridStore(RedisStore.from_url(own_redis.url)))
    try:
        await _save(a, "s", create=True, n="0")
        await _held(a, "s")
        await b.redis.client.execute_command("CLIENT", "PAUSE", "500", "WRITE")
        # Deferred (Redis did not answer in time): A's memory holds it, Redis will too.
        await _save(a, "s", n="1")
        assert a.pending == 1
        await async_wait_until(lambda: a.pending == 0, 5, "A's deferred write pushed")
        await _save(b, "s", m="2")
        await _fence(a, b.redis, "after")
        record = await a.load("s")
        assert record is not None
        assert dict(record.fields) == {"n": "1", "m": "2"}
        # Killed mid-write: A's save waits in a paused Redis, its connection is killed, B
        # writes, Redis goes on. A's save fails (deferred, pushed later) or is sent again.
        for n in range(2, 12):
            await _held(a, "s")
            await b.redis.client.execute_command("CLIENT", "PAUSE", "2000", "WRITE")
            save = asyncio.ensure_future(_save(a, "s", n=str(n)))
            blocked = await _blocked_client(b.redis)
            await b.redis.client.execute_command("CLIENT", "KILL", "ID", blocked)
            other = asyncio.ensure_future(_save(b, "s", m=str(n)))
            await _blocked_client(b.redis)  # B's save waits too
            await b.redis.client.execute_command("CLIENT", "UNPAUSE")
            await asyncio.gather(save, other)
            await async_wait_until(lambda: a.pending == 0, 5, "A's deferred write pushed")
            await _fence(a, b.redis, f"killed-{n}")
            truth = await b.redis.load("s")
            record = await a.load("s")
            assert truth is not None
            assert record is not None
            assert dict(record.fields) == dict(truth.fields) == {"n": str(n), "m": str(n)}
    finally:
        await a.aclose()
        await b.aclose()
