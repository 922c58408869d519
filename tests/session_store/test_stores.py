"""One contract, every store: each class below runs the same tests on a real store."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio

from redis_plumbing import RedisServer
from session_store import (
    Changes,
    HybridStore,
    MemoryStore,
    RedisStore,
    SessionStore,
    new_session_id,
)
from tests.helpers import FakeClock, async_wait_for

pytestmark = pytest.mark.anyio

NOW = 1_700_000_000.0


class StoreContract:
    """What every `SessionStore` promises. Subclasses provide the ``store`` fixture."""

    async def test_missing_session_loads_as_none(self, store: SessionStore) -> None:
        assert await store.load(new_session_id()) is None

    async def test_create_then_load(self, store: SessionStore) -> None:
        sid = new_session_id()
        version = await store.save(
            sid, Changes({"a": "1", "b": '"x"'}), created=NOW, ttl=60, create=True
        )
        assert version is not None
        record = await store.load(sid)
        assert record is not None
        assert dict(record.fields) == {"a": "1", "b": '"x"'}
        assert record.created == NOW
        assert record.version == version
        assert record.ttl is not None
        assert 0 < record.ttl <= 60

    async def test_create_refuses_an_existing_id(self, store: SessionStore) -> None:
        sid = new_session_id()
        assert await store.save(sid, Changes({"a": "1"}), created=NOW, ttl=60, create=True)
        assert await store.save(sid, Changes({"a": "2"}), created=NOW, ttl=60, create=True) is None
        record = await store.load(sid)
        assert record is not None
        assert record.fields["a"] == "1"

    async def test_update_refuses_a_missing_session(self, store: SessionStore) -> None:
        sid = new_session_id()
        assert await store.save(sid, Changes({"a": "1"}), created=NOW, ttl=60, create=False) is None
        assert await store.load(sid) is None

    async def test_updates_touch_only_their_keys(self, store: SessionStore) -> None:
        sid = new_session_id()
        await store.save(sid, Changes({"a": "1", "b": "1"}), created=NOW, ttl=60, create=True)
        # Two requests that loaded the same version, each changing its own key:
        first = await store.save(sid, Changes({"a": "2"}), created=NOW, ttl=60, create=False)
        second = await store.save(
            sid, Changes({"c": "3"}, frozenset({"b"})), created=NOW, ttl=60, create=False
        )
        assert first is not None
        assert second is not None
        assert second > first
        record = await store.load(sid)
        assert record is not None
        assert dict(record.fields) == {"a": "2", "c": "3"}
        assert record.version == second

    async def test_destroyed_session_is_never_brought_back(self, store: SessionStore) -> None:
        sid = new_session_id()
        await store.save(sid, Changes({"a": "1"}), created=NOW, ttl=60, create=True)
        await store.destroy(sid, ttl=60)
        assert await store.load(sid) is None
        # A request that loaded it before the logout now tries to save its change:
        assert await store.save(sid, Changes({"a": "2"}), created=NOW, ttl=60, create=False) is None
        assert await store.load(sid) is None

    async def test_touch_extends_and_ignores_missing(self, store: SessionStore) -> None:
        sid = new_session_id()
        await store.save(sid, Changes({"a": "1"}), created=NOW, ttl=5, create=True)
        await store.touch(sid, 100)
        record = await store.load(sid)
        assert record is not None
        assert record.ttl is not None
        assert record.ttl > 50
        await store.touch(new_session_id(), 100)  # no error, nothing created

    async def test_expires_after_ttl(self, store: SessionStore) -> None:
        sid = new_session_id()
        await store.save(sid, Changes({"a": "1"}), created=NOW, ttl=0.2, create=True)
        await self.wait_expired(store, sid)

    async def wait_expired(self, store: SessionStore, sid: str) -> None:
        async def gone() -> bool:
            return await store.load(sid) is None

        await async_wait_for(gone, within=5, what="the session to expire")

    async def test_ping(self, store: SessionStore) -> None:
        await store.ping()


class TestMemoryStore(StoreContract):
    @pytest.fixture
    def clock(self) -> FakeClock:
        return FakeClock()

    @pytest.fixture
    async def store(self, clock: FakeClock) -> AsyncIterator[MemoryStore]:
        store = MemoryStore(max_entries=100, clock=clock)
        yield store
        await store.aclose()

    async def wait_expired(self, store: SessionStore, sid: str) -> None:
        assert await store.load(sid) is not None
        assert isinstance(store, MemoryStore)
        store._clock.advance(0.3)  # type: ignore[attr-defined]
        assert await store.load(sid) is None

    async def test_evicts_least_recently_used_beyond_max_entries(self) -> None:
        store = MemoryStore(max_entries=3)
        ids = [new_session_id() for _ in range(4)]
        for sid in ids[:3]:
            await store.save(sid, Changes({"a": "1"}), created=NOW, ttl=60, create=True)
        await store.load(ids[0])  # now the most recently used
        await store.save(ids[3], Changes({"a": "1"}), created=NOW, ttl=60, create=True)
        assert len(store) == 3
        assert await store.load(ids[1]) is None
        assert await store.load(ids[0]) is not None

    async def test_loaded_record_does_not_change_under_a_later_save(self) -> None:
        store = MemoryStore()
        sid = new_session_id()
        await store.save(sid, Changes({"a": "1"}), created=NOW, ttl=60, create=True)
        before = await store.load(sid)
        await store.save(sid, Changes({"a": "2"}), created=NOW, ttl=60, create=False)
        assert before is not None
        assert before.fields["a"] == "1"

    def test_rejects_a_zero_bound(self) -> None:
        with pytest.raises(ValueError, match="max_entries"):
            MemoryStore(max_entries=0)


class TestRedisStore(StoreContract):
    # "lean": the store reads hiredis's parser itself (`_exchange`); "redis-py": what it
    # does where a redis-py release has moved that private parser, its own send and read.
    @pytest.fixture(params=["lean", "redis-py"])
    async def store(
        self, request: pytest.FixtureRequest, redis_server: RedisServer, prefix: str
    ) -> AsyncIterator[RedisStore]:
        store = RedisStore.from_url(redis_server.url, prefix=prefix)
        assert store._lean
        store._lean = request.param == "lean"
        yield store
        await store.aclose()

    async def test_layout_is_one_hash_with_a_cluster_hash_tag(
        self, store: RedisStore, prefix: str
    ) -> None:
        sid = new_session_id()
        await store.save(sid, Changes({"cart": "[1]"}), created=NOW, ttl=60, create=True)
        key = f"{prefix}{{{sid}}}"
        assert store.key(sid) == key
        raw = await store.client.hgetall(key)
        # The version starts at the server's clock in ms (then + 1), never at 1 again.
        version = int(raw.pop(b"m:v"))
        assert abs(version - time.time() * 1000) < 60_000
        assert raw == {b"m:c": str(int(NOW * 1000)).encode(), b"d:cart": b"[1]"}

    async def test_load_unless_current(self, store: RedisStore) -> None:
        sid = new_session_id()
        version = await store.save(sid, Changes({"a": "1"}), created=NOW, ttl=60, create=True)
        unchanged = await store.load_unless(sid, version)
        assert type(unchanged).__name__ == "Unchanged"
        changed = await store.load_unless(sid, (version or 0) - 1)
        assert changed is not None
        assert not isinstance(changed, type(unchanged))

    async def test_a_restart_between_calls_costs_no_call(self, own_redis: RedisServer) -> None:
        # The store keeps its connections between commands; a restart closes them under
        # it, and the next command connects again and is sent once more, not failed.
        store = RedisStore.from_url(own_redis.url)
        try:
            sid = new_session_id()
            await store.save(sid, Changes({"a": "1"}), created=NOW, ttl=60, create=True)
            for _ in range(3):
                own_redis.restart()  # empty, with no failed call seen by the store
                assert await store.load(sid) is None
                assert await store.save(sid, Changes({"a": "1"}), created=NOW, ttl=60, create=True)
                record = await store.load(sid)
                assert record is not None
                assert record.fields == {"a": "1"}
        finally:
            await store.aclose()

    async def test_a_callers_client_gets_its_connections_back(
        self, redis_server: RedisServer, prefix: str
    ) -> None:
        # A store keeps at most half the pool's connections between calls, and gives them
        # all back when closed: the caller's own client goes on with its whole pool.
        client = redis.asyncio.Redis.from_url(redis_server.url, max_connections=4)
        store = RedisStore(client, prefix=prefix)
        try:
            sid = new_session_id()
            await store.save(sid, Changes({"a": "1"}), created=NOW, ttl=60, create=True)
            await asyncio.gather(*(store.load(sid) for _ in range(4)))
            # Two kept by the store, two free for the caller.
            assert list(await asyncio.gather(client.ping(), client.ping())) == [True, True]
            await store.aclose()
            pings = await asyncio.gather(*(client.ping() for _ in range(4)))
            assert pings == [True] * 4
        finally:
            await client.aclose()


class TestHybridStore(StoreContract):
    @pytest.fixture
    async def store(self, redis_server: RedisServer, prefix: str) -> AsyncIterator[HybridStore]:
        store = HybridStore(RedisStore.from_url(redis_server.url, prefix=prefix))
        yield store
        await store.aclose()
