"""Sessions by user: bind, list, log out everywhere with tombstones, on every store.

The Redis Cluster case is in test_cluster.py, on that module's cluster."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from redis_plumbing import RedisServer
from session_store import (
    Changes,
    HybridStore,
    MemoryStore,
    RedisStore,
    SessionError,
    SessionMiddleware,
    SessionStore,
    bind_user,
    load_session,
    logout_everywhere,
    new_session_id,
    user_sessions,
)
from tests.helpers import FakeClock
from tests.session_store.app import SECRET

pytestmark = pytest.mark.anyio


async def _saved(store: SessionStore, user: str, n: int) -> list[str]:
    """``n`` stored sessions bound to ``user``."""
    ids = []
    for _ in range(n):
        sid = new_session_id()
        assert await store.save(
            sid, Changes({"u": f'"{user}"'}), created=time.time(), ttl=60, create=True
        )
        await store.bind_user(sid, user, ttl=60)  # type: ignore[attr-defined]
        ids.append(sid)
    return ids


class UsersContract:
    """What every store promises about sessions by user. Subclasses provide ``store``."""

    async def test_lists_a_users_sessions_and_only_theirs(self, store: SessionStore) -> None:
        alice = await _saved(store, "alice", 3)
        bob = await _saved(store, "bob", 1)
        assert set(await user_sessions(store, "alice")) == set(alice)
        records = await user_sessions(store, "bob")
        assert list(records) == bob
        assert records[bob[0]].fields == {"u": '"bob"'}
        assert await user_sessions(store, "carol") == {}

    async def test_logout_everywhere_destroys_all_but_the_kept_one_for_good(
        self, store: SessionStore
    ) -> None:
        alice = await _saved(store, "alice", 3)
        bob = await _saved(store, "bob", 1)
        destroyed = await logout_everywhere(store, "alice", keep={alice[0]}, ttl=60)
        assert sorted(destroyed) == sorted(alice[1:])
        for sid in alice[1:]:
            assert await store.load(sid) is None
            # A request that loaded it before the logout saves its change after: refused.
            assert (
                await store.save(sid, Changes({"x": "1"}), created=0, ttl=60, create=False) is None
            )
            assert await store.load(sid) is None
        assert await store.load(alice[0]) is not None
        assert await store.load(bob[0]) is not None
        assert list(await user_sessions(store, "alice")) == [alice[0]]
        assert await logout_everywhere(store, "alice", keep={alice[0]}, ttl=60) == []

    async def test_a_session_gone_otherwise_leaves_the_index_when_listed(
        self, store: SessionStore
    ) -> None:
        alice = await _saved(store, "alice", 2)
        await store.destroy(alice[1], ttl=60)  # a plain logout on one device
        assert list(await user_sessions(store, "alice")) == [alice[0]]
        assert await store.user_session_ids("alice") == [alice[0]]  # type: ignore[attr-defined]

    async def test_bad_arguments_are_named(self, store: SessionStore) -> None:
        with pytest.raises(ValueError, match="user_id"):
            await user_sessions(store, "")
        with pytest.raises(ValueError, match="ttl"):
            await logout_everywhere(store, "alice")


class TestMemoryStore(UsersContract):
    @pytest.fixture
    async def store(self) -> AsyncIterator[SessionStore]:
        store = MemoryStore()
        yield store
        await store.aclose()

    async def test_a_binding_ends_with_the_sessions_lifetime(self) -> None:
        clock = FakeClock()
        store = MemoryStore(clock=clock)
        sid = new_session_id()
        await store.save(sid, Changes({"a": "1"}), created=clock(), ttl=10, create=True)
        await store.bind_user(sid, "alice", ttl=10)
        assert await store.user_session_ids("alice") == [sid]
        clock.advance(10)
        assert await store.user_session_ids("alice") == []


class TestRedisStore(UsersContract):
    @pytest.fixture
    async def store(self, redis_server: RedisServer, prefix: str) -> AsyncIterator[SessionStore]:
        store = RedisStore.from_url(redis_server.url, prefix=prefix)
        yield store
        await store.aclose()

    async def test_the_index_expires_with_its_last_session(
        self, redis_server: RedisServer, prefix: str
    ) -> None:
        store = RedisStore.from_url(redis_server.url, prefix=prefix)
        try:
            await store.bind_user("s1", "alice", ttl=30)
            await store.bind_user("s2", "alice", ttl=90)
            pttl = await store.client.pttl(store.user_key("alice"))
            assert 80_000 < pttl <= 90_000
            # Its own prefix: a client tracking "session:" is not told of index writes.
            assert not store.user_key("alice").startswith(prefix)
        finally:
            await store.aclose()


class TestHybridStore(UsersContract):
    @pytest.fixture
    async def store(self, redis_server: RedisServer, prefix: str) -> AsyncIterator[SessionStore]:
        store = HybridStore(RedisStore.from_url(redis_server.url, prefix=prefix))
        yield store
        await store.aclose()

    async def test_another_instances_cached_copy_does_not_come_back(
        self, redis_server: RedisServer, prefix: str
    ) -> None:
        here = HybridStore(RedisStore.from_url(redis_server.url, prefix=prefix))
        there = HybridStore(RedisStore.from_url(redis_server.url, prefix=prefix))
        try:
            sid, kept = await _saved(here, "alice", 2)
            assert await there.load(sid) is not None  # cached on the other instance
            assert await logout_everywhere(here, "alice", keep={kept}, ttl=60) == [sid]
            assert await there.load(sid) is None
            assert (
                await there.save(sid, Changes({"x": "1"}), created=0, ttl=60, create=False) is None
            )
            assert await here.load(sid) is None
        finally:
            await here.aclose()
            await there.aclose()


def make_app(store: SessionStore) -> Starlette:
    async def login(request: Request) -> JSONResponse:
        session = await load_session(request)
        session["user"] = request.query_params["user"]
        session.regenerate()
        bind_user(request, request.query_params["user"])
        return JSONResponse({})

    async def me(request: Request) -> JSONResponse:
        return JSONResponse({"user": request.session.get("user")})

    async def everywhere(request: Request) -> JSONResponse:
        destroyed = await logout_everywhere(request, request.session["user"])
        return JSONResponse({"destroyed": len(destroyed)})

    async def devices(request: Request) -> JSONResponse:
        session = await load_session(request)
        sessions = await user_sessions(store, session["user"])
        return JSONResponse({"n": len(sessions), "mine": session.id in sessions})

    async def bad(request: Request) -> JSONResponse:
        try:
            bind_user(request, "")
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse({})

    app = Starlette(
        routes=[
            Route("/login", login, methods=["POST"]),
            Route("/me", me),
            Route("/everywhere", everywhere, methods=["POST"]),
            Route("/devices", devices),
            Route("/bad", bad),
        ]
    )
    app.add_middleware(SessionMiddleware, store=store, secret_key=SECRET)
    return app


@pytest.fixture(params=["memory", "redis", "hybrid"])
async def any_store(
    request: pytest.FixtureRequest, redis_server: RedisServer, prefix: str
) -> AsyncIterator[SessionStore]:
    store: SessionStore
    if request.param == "memory":
        store = MemoryStore()
    else:
        redis = RedisStore.from_url(redis_server.url, prefix=prefix)
        store = redis if request.param == "redis" else HybridStore(redis)
    yield store
    await store.aclose()


async def test_log_out_everywhere_from_one_device(any_store: SessionStore) -> None:
    app = make_app(any_store)
    devices = [
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")
        for _ in range(3)
    ]
    other = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")
    try:
        for client in devices:
            assert (await client.post("/login", params={"user": "alice"})).status_code == 200
        await other.post("/login", params={"user": "bob"})
        assert (await devices[0].get("/devices")).json() == {"n": 3, "mine": True}
        assert (await devices[0].post("/everywhere")).json() == {"destroyed": 2}
        assert (await devices[0].get("/me")).json() == {"user": "alice"}
        for client in devices[1:]:
            assert (await client.get("/me")).json() == {"user": None}
        assert (await other.get("/me")).json() == {"user": "bob"}
        assert (await devices[0].get("/devices")).json() == {"n": 1, "mine": True}
        response = await devices[0].get("/bad")
        assert response.status_code == 400
        assert "user_id must be a non-empty string" in response.json()["error"]
    finally:
        for client in [*devices, other]:
            await client.aclose()


async def test_a_store_without_an_index_is_named() -> None:
    class Bare:
        """A store with no index of sessions by user."""

    with pytest.raises(SessionError, match="keeps no index"):
        await user_sessions(Bare(), "alice")  # type: ignore[arg-type]
