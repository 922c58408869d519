"""Encryption at rest: the store contract still holds through `EncryptedStore`, values
are sealed in Redis, keys rotate, and what does not open reads as absent, never a 500."""

from __future__ import annotations

import base64
import secrets
from collections.abc import AsyncIterator

import httpx
import pytest

from redis_plumbing import RedisServer
from session_store import (
    Changes,
    EncryptedStore,
    MemoryStore,
    RedisStore,
    SessionStore,
    logout_everywhere,
    new_session_id,
    user_sessions,
)
from tests.session_store.app import make_app
from tests.session_store.test_stores import NOW, StoreContract

pytestmark = pytest.mark.anyio

OLD, NEW = secrets.token_urlsafe(32), secrets.token_urlsafe(32)


@pytest.fixture
async def redis(redis_server: RedisServer, prefix: str) -> AsyncIterator[RedisStore]:
    store = RedisStore.from_url(redis_server.url, prefix=prefix)
    yield store
    await store.aclose()


class TestEncryptedRedisStore(StoreContract):
    """Every promise of a store, per-key merges included, with the values sealed."""

    @pytest.fixture
    def store(self, redis: RedisStore) -> SessionStore:
        return EncryptedStore(redis, [NEW, OLD])


class TestEncryptedMemoryStore(StoreContract):
    @pytest.fixture
    async def store(self) -> AsyncIterator[SessionStore]:
        store = EncryptedStore(MemoryStore(), [NEW])
        yield store
        await store.aclose()


async def _raw(redis: RedisStore, sid: str) -> dict[str, str]:
    raw = await redis.client.hgetall(redis.key(sid))
    return {_text(k): _text(v) for k, v in raw.items()}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def test_values_are_sealed_at_rest(redis: RedisStore) -> None:
    store = EncryptedStore(redis, [NEW])
    sid = new_session_id()
    await store.save(sid, Changes({"card": '"4111 1111"'}), created=NOW, ttl=60, create=True)
    stored = (await _raw(redis, sid))["d:card"]
    assert "4111" not in stored
    assert base64.urlsafe_b64decode(stored + "==")  # base64url text
    record = await store.load(sid)
    assert record is not None
    assert record.fields == {"card": '"4111 1111"'}


async def test_keys_rotate_newest_seals_all_open(redis: RedisStore) -> None:
    sid = new_session_id()
    before = EncryptedStore(redis, [OLD])
    await before.save(sid, Changes({"a": "1"}), created=NOW, ttl=60, create=True)
    rotated = EncryptedStore(redis, [NEW, OLD])
    await rotated.save(sid, Changes({"b": "2"}), created=NOW, ttl=60, create=False)
    record = await rotated.load(sid)
    assert record is not None
    assert record.fields == {"a": "1", "b": "2"}
    # The old key retired: what it sealed is dropped, what the new one sealed opens.
    retired = EncryptedStore(redis, [NEW])
    record = await retired.load(sid)
    assert record is not None
    assert record.fields == {"b": "2"}


async def test_what_does_not_open_is_dropped(redis: RedisStore) -> None:
    store = EncryptedStore(redis, [NEW])
    sid = new_session_id()
    await store.save(sid, Changes({"a": "1", "b": "2", "c": "3"}), created=NOW, ttl=60, create=True)
    raw = await _raw(redis, sid)
    flipped = raw["d:a"][:-2] + ("A" if raw["d:a"][-2] != "A" else "B") + raw["d:a"][-1]
    await redis.client.hset(
        redis.key(sid),
        mapping={
            "d:a": flipped,  # tampered with
            "d:b": raw["d:c"],  # another key's value copied over it
            "d:plain": "4",  # written before encryption was turned on
        },
    )
    record = await store.load(sid)
    assert record is not None
    assert record.fields == {"c": "3"}
    # Another session's value copied in does not open either.
    other = new_session_id()
    await redis.client.hset(redis.key(other), mapping={"m:c": "0", "m:v": "1", "d:c": raw["d:c"]})
    record = await store.load(other)
    assert record is not None
    assert record.fields == {}


async def test_a_wrong_key_reads_as_an_empty_session_not_a_500(redis: RedisStore) -> None:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=make_app(EncryptedStore(redis, [OLD]))),
        base_url="http://testserver",
    ) as client:
        await client.post("/set", params={"n": "1"})
        assert (await client.get("/read")).json() == {"n": "1"}
        cookie = client.cookies["session"]
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=make_app(EncryptedStore(redis, [NEW]))),
        base_url="http://testserver",
        cookies={"session": cookie},
    ) as client:
        response = await client.get("/read")
        assert response.status_code == 200
        assert response.json() == {}
        # And the session goes on under the new key.
        await client.post("/set", params={"m": "2"})
        assert (await client.get("/read")).json() == {"m": "2"}


async def test_the_user_index_passes_through(redis: RedisStore) -> None:
    store = EncryptedStore(redis, [NEW])
    sid = new_session_id()
    await store.save(sid, Changes({"u": '"alice"'}), created=NOW, ttl=60, create=True)
    await store.bind_user(sid, "alice", ttl=60)
    assert (await user_sessions(store, "alice"))[sid].fields == {"u": '"alice"'}
    assert await logout_everywhere(store, "alice", ttl=60) == [sid]
    assert await store.load(sid) is None


def test_bad_keys_are_named() -> None:
    with pytest.raises(ValueError, match=r"keys\[1\] is not a key.*token_urlsafe"):
        EncryptedStore(MemoryStore(), [NEW, "too-short"])
    with pytest.raises(ValueError, match="a list of keys"):
        EncryptedStore(MemoryStore(), NEW)
    with pytest.raises(ValueError, match="a list of keys"):
        EncryptedStore(MemoryStore(), [])
    assert EncryptedStore(MemoryStore(), [secrets.token_bytes(32)])  # raw bytes do too
