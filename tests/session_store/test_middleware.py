"""The middleware, in-process through httpx.ASGITransport, on every real store."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from itsdangerous import TimestampSigner
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from redis_plumbing import RedisServer
from session_store import (
    Changes,
    HybridStore,
    MemoryStore,
    RedisStore,
    SessionMiddleware,
    SessionNotLoaded,
    SessionStore,
    SessionTooLarge,
)
from tests.helpers import FakeClock
from tests.session_store.app import SECRET, Gate, RecordingStore, make_app

CLEARED = "expires=Thu, 01 Jan 1970 00:00:00 GMT"  # how Starlette clears its cookie, and we

pytestmark = pytest.mark.anyio

StoreFactory = Callable[[], SessionStore]


@pytest.fixture(params=["memory", "redis", "hybrid"])
def store_factory(
    request: pytest.FixtureRequest, redis_server: RedisServer, prefix: str
) -> StoreFactory:
    kind = request.param

    def make() -> SessionStore:
        if kind == "memory":
            return MemoryStore()
        redis = RedisStore.from_url(redis_server.url, prefix=prefix)
        return redis if kind == "redis" else HybridStore(redis)

    return make


@pytest.fixture
async def store(store_factory: StoreFactory) -> AsyncIterator[RecordingStore]:
    store = RecordingStore(store_factory())
    yield store
    await store.aclose()


def use_cookie(client: httpx.AsyncClient, value: str) -> None:
    """Make ``value`` the only session cookie the client sends."""
    client.cookies.clear()
    client.cookies.set("session", value, domain="testserver.local")


def client_for(app: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),  # type: ignore[arg-type]
        base_url="http://testserver",
    )


async def test_counter_survives_requests(store: RecordingStore) -> None:
    async with client_for(make_app(store)) as client:
        first = await client.post("/set", params={"n": "1"})
        assert "session=" in first.headers["set-cookie"]
        second = await client.get("/read")
        assert second.json() == {"n": "1"}
        assert "set-cookie" not in second.headers  # the id did not change: no new cookie


async def test_request_without_cookie_or_use_makes_no_store_call(store: RecordingStore) -> None:
    async with client_for(make_app(store)) as client:
        response = await client.get("/noop")
        assert response.status_code == 200
        read = await client.get("/read")  # touches an empty session: still nothing to store
        assert read.json() == {}
    assert store.calls == []
    assert "set-cookie" not in response.headers
    assert "set-cookie" not in read.headers


async def test_unchanged_session_is_not_written(store: RecordingStore) -> None:
    clock = FakeClock()
    app = make_app(store, clock=clock, idle_timeout=600, touch_interval=60)
    async with client_for(app) as client:
        await client.post("/set", params={"a": "1"})
        store.calls.clear()
        await client.get("/read")
        await client.get("/read")
        assert store.calls == ["load", "load"]  # no write, and no touch within the interval


async def test_unchanged_session_touch_is_throttled(store: RecordingStore) -> None:
    # The store's ttl runs on its own clock; make the middleware see a session whose
    # idle time left is short, as after a quiet spell, by using a tiny touch interval.
    app = make_app(store, idle_timeout=600, touch_interval=0.0)
    async with client_for(app) as client:
        await client.post("/set", params={"a": "1"})
        store.calls.clear()
        await client.get("/read")
    assert store.calls == ["load", "touch"]


async def test_nested_change_is_saved(store: RecordingStore) -> None:
    async with client_for(make_app(store)) as client:
        await client.post("/append", params={"item": "a"})
        await client.post("/append", params={"item": "b"})
        assert (await client.get("/read")).json() == {"items": ["a", "b"]}


async def test_sessions_holding_the_same_texts_do_not_share_changes(
    store: RecordingStore,
) -> None:
    # Loads remember decoded texts (issue 16): only immutable values may be shared, so a
    # list changed in place in one session, or a value replaced, never shows in another.
    app = make_app(store)
    async with client_for(app) as one, client_for(app) as two:
        for client in (one, two):
            await client.post("/append", params={"item": "a"})
            await client.post("/set", params={"x": "1"})
        for _ in range(2):  # the second load of each is served from what the first decoded
            assert (await one.get("/read")).json() == {"items": ["a"], "x": "1"}
            assert (await two.get("/read")).json() == {"items": ["a"], "x": "1"}
        await one.post("/append", params={"item": "b"})
        await one.post("/set", params={"x": "2"})
        assert (await one.get("/read")).json() == {"items": ["a", "b"], "x": "2"}
        assert (await two.get("/read")).json() == {"items": ["a"], "x": "1"}
        store.calls.clear()
        await two.get("/read")
        assert "save" not in store.calls  # an unchanged session is still not written


async def test_only_changed_keys_are_written(store_factory: StoreFactory) -> None:
    inner = store_factory()
    app = make_app(inner)
    async with client_for(app) as client:
        await client.post("/set", params={"a": "1", "b": "2"})
        await client.post("/set", params={"b": "3"})
        assert (await client.get("/read")).json() == {"a": "1", "b": "3"}
    await inner.aclose()


async def test_parallel_requests_changing_different_keys_all_kept(
    store_factory: StoreFactory,
) -> None:
    store = store_factory()
    gate = Gate(expected=5)
    app = make_app(store, gate=gate)
    async with client_for(app) as client:
        await client.post("/set", params={"start": "1"})
        requests = [
            asyncio.create_task(client.post("/gated-set", params={f"key{i}": str(i)}))
            for i in range(5)
        ]
        # Every request has loaded the same version before any of them saves.
        async with asyncio.timeout(5):
            await gate.all_arrived.wait()
        gate.release.set()
        for response in await asyncio.gather(*requests):
            assert response.status_code == 200
        session = (await client.get("/read")).json()
    await store.aclose()
    assert session == {"start": "1", **{f"key{i}": str(i) for i in range(5)}}


async def test_logout_is_not_undone_by_a_concurrent_request(store_factory: StoreFactory) -> None:
    store = store_factory()
    gate = Gate(expected=1)
    app = make_app(store, gate=gate)
    async with client_for(app) as client:
        await client.post("/set", params={"user": "alice"})
        cookie = client.cookies["session"]
        slow = asyncio.create_task(client.post("/gated-set", params={"late": "1"}))
        async with asyncio.timeout(5):
            await gate.all_arrived.wait()
        logout = await client.post("/destroy")
        assert CLEARED in logout.headers["set-cookie"]
        gate.release.set()
        late = await slow
        assert CLEARED in late.headers["set-cookie"]
        use_cookie(client, cookie)
        assert (await client.get("/read")).json() == {}
    await store.aclose()


async def test_tampered_or_malformed_cookie_means_a_fresh_session(store: RecordingStore) -> None:
    async with client_for(make_app(store)) as client:
        await client.post("/set", params={"a": "1"})
        good = client.cookies["session"]
        for bad in (good[:-2] + "xx", "garbage", "", "a.b.c", good.replace(".", "", 1)):
            use_cookie(client, bad)
            response = await client.get("/read")
            assert response.status_code == 200
            assert response.json() == {}


async def test_unknown_id_is_not_adopted(store: RecordingStore) -> None:
    # A validly signed id the store never issued (an attacker's planted id).
    planted = TimestampSigner(
        SECRET.encode(), salt="session_store.cookie", digest_method=hashlib.sha256
    )
    async with client_for(make_app(store)) as client:
        use_cookie(client, planted.sign("attacker-chosen-id").decode())
        response = await client.post("/set", params={"a": "1"})
        assert response.status_code == 200
        assert "attacker-chosen-id" not in response.headers["set-cookie"]


async def test_expired_cookie_signature_means_a_fresh_session(store: RecordingStore) -> None:
    class OldSigner(TimestampSigner):
        def get_timestamp(self) -> int:
            return 1_000_000

    async with client_for(make_app(store, absolute_lifetime=3600)) as client:
        await client.post("/set", params={"a": "1"})
        sid = client.cookies["session"].split(".")[0]
        old = OldSigner(SECRET.encode(), salt="session_store.cookie", digest_method=hashlib.sha256)
        use_cookie(client, old.sign(sid).decode())
        assert (await client.get("/read")).json() == {}


async def test_absolute_lifetime_ends_an_active_session() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    app = make_app(store, clock=clock, idle_timeout=100, absolute_lifetime=250)
    async with client_for(app) as client:
        await client.post("/set", params={"a": "1"})
        for _ in range(2):  # active every 90 s: idle expiry never hits
            clock.advance(90)
            assert (await client.post("/set", params={"b": "2"})).status_code == 200
            assert (await client.get("/read")).json()["a"] == "1"
        clock.advance(90)  # 270 s since creation, over the 250 s lifetime
        assert (await client.get("/read")).json() == {}


async def test_idle_timeout_ends_a_quiet_session() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    app = make_app(store, clock=clock, idle_timeout=100)
    async with client_for(app) as client:
        await client.post("/set", params={"a": "1"})
        clock.advance(99)
        assert (await client.get("/read")).json() == {"a": "1"}
        clock.advance(101)
        assert (await client.get("/read")).json() == {}


async def test_cookie_attributes() -> None:
    app = make_app(
        MemoryStore(),
        cookie_name="sid",
        absolute_lifetime=7200,
        path="/app",
        domain="example.test",
        secure=True,
        same_site="strict",
    )
    async with client_for(app) as client:
        cookie = (await client.post("/set", params={"a": "1"})).headers["set-cookie"]
    attributes = [part.strip() for part in cookie.split(";")]
    assert attributes[0].startswith("sid=")
    # Starlette's spelling and order.
    assert attributes[1:] == [
        "path=/app",
        "Max-Age=7200",
        "httponly",
        "samesite=strict",
        "secure",
        "domain=example.test",
    ]


async def test_default_cookie_is_httponly_lax_and_not_secure() -> None:
    async with client_for(make_app(MemoryStore())) as client:
        response = await client.post("/set", params={"a": "1"})
    cookie = response.headers["set-cookie"]
    assert "; httponly;" in cookie
    assert "; samesite=lax" in cookie
    assert "secure" not in cookie
    assert response.headers["vary"] == "Cookie"


def test_bad_options_are_refused() -> None:
    app = make_app(MemoryStore())
    with pytest.raises(ValueError, match="secure=True"):
        make_app(MemoryStore(), same_site="none").build_middleware_stack()
    with pytest.raises(ValueError, match="positive"):
        make_app(MemoryStore(), idle_timeout=0).build_middleware_stack()
    with pytest.raises(ValueError, match="16 characters"):
        make_app(MemoryStore(), secret_keys=["short"]).build_middleware_stack()
    assert app.build_middleware_stack() is not None


async def test_regenerate_keeps_data_and_kills_the_old_id(store: RecordingStore) -> None:
    async with client_for(make_app(store)) as client:
        await client.post("/set", params={"cart": "book"})
        old = client.cookies["session"]
        response = await client.post("/regenerate")
        new = client.cookies["session"]
        assert "set-cookie" in response.headers
        assert new != old
        assert (await client.get("/read")).json() == {"cart": "book"}
        use_cookie(client, old)
        assert (await client.get("/read")).json() == {}


async def test_destroy_clears_store_and_cookie(store: RecordingStore) -> None:
    async with client_for(make_app(store)) as client:
        await client.post("/set", params={"a": "1"})
        sid = client.cookies["session"].split(".")[0]
        response = await client.post("/destroy")
        assert CLEARED in response.headers["set-cookie"]
        assert await store.inner.load(sid) is None
        assert (await client.get("/read")).json() == {}


async def test_lazy_mode_loads_only_on_request(store: RecordingStore) -> None:
    app = make_app(store, autoload=False)
    async with client_for(app) as client:
        await client.post("/explicit")
        store.calls.clear()
        assert (await client.get("/noop")).status_code == 200
        assert store.calls == []
        with pytest.raises(SessionNotLoaded, match="load_session"):
            await client.get("/read")
        response = await client.post("/explicit")
        assert response.json() == {"explicit": True}
        assert store.calls == ["load"]


async def test_streaming_response_saves_the_session(store: RecordingStore) -> None:
    async with client_for(make_app(store)) as client:
        response = await client.get("/stream")
        assert response.text == "chunk 0\nchunk 1\nchunk 2\n"
        assert (await client.get("/read")).json() == {"streamed": True}


async def test_size_limit_names_the_limit() -> None:
    async with client_for(make_app(MemoryStore(), max_size=64)) as client:
        assert (await client.post("/set", params={"a": "x" * 40})).status_code == 200
        with pytest.raises(SessionTooLarge, match="limit of 64 bytes"):
            await client.post("/set", params={"b": "x" * 40})


async def test_only_json_values_are_stored() -> None:
    async with client_for(make_app(MemoryStore())) as client:
        with pytest.raises(TypeError, match="only JSON values"):
            await client.post("/object")


async def test_secret_rotation_keeps_old_cookies_valid() -> None:
    store = MemoryStore()
    async with client_for(make_app(store)) as client:
        await client.post("/set", params={"a": "1"})
        cookie = client.cookies["session"]
    rotated = make_app(store, secret_keys=["a-brand-new-secret-key", SECRET])
    async with client_for(rotated) as client:
        use_cookie(client, cookie)
        assert (await client.get("/read")).json() == {"a": "1"}
        await client.post("/regenerate")
        new_cookie = client.cookies["session"]
    # The new cookie was signed with the NEW key: the old key alone rejects it.
    async with client_for(make_app(store)) as client:
        use_cookie(client, new_cookie)
        assert (await client.get("/read")).json() == {}


async def test_each_kind_of_value_is_stored_as_its_json_text() -> None:
    # Strings, ints, booleans and None skip the JSON encoder object (issue 16): their
    # texts must still be exactly its texts, and a value JSON cannot hold still a TypeError.
    values: dict[str, Any] = {
        "s": 'é"\\\n\u2028', "i": -12, "big": 10**30, "t": True, "f": False, "n": None,
        "x": 1.5, "l": [1, "a", None], "d": {"k": True},
    }  # fmt: skip

    async def put(request: Request) -> Response:
        request.session.update(values)
        return PlainTextResponse("ok")

    async def bad(request: Request) -> Response:
        request.session["bad"] = {1, 2}
        return PlainTextResponse("never sent")

    class Keeping(MemoryStore):
        """Remembers the texts of its last save."""

        texts: dict[str, str] | None = None

        async def save(
            self, session_id: str, changes: Changes, *, created: float, ttl: float, create: bool
        ) -> int | None:
            self.texts = dict(changes.updated)
            return await super().save(session_id, changes, created=created, ttl=ttl, create=create)

    store = Keeping()
    routes = [Route("/put", put, methods=["POST"]), Route("/bad", bad, methods=["POST"])]
    app = SessionMiddleware(Starlette(routes=routes), store=store, secret_key=SECRET)
    async with client_for(app) as client:
        assert (await client.post("/put")).status_code == 200
        texts = {
            k: json.dumps(v, separators=(",", ":"), ensure_ascii=False) for k, v in values.items()
        }
        assert store.texts == texts
        with pytest.raises(TypeError, match=r"session\['bad'\] cannot be stored"):
            await client.post("/bad")
