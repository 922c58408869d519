"""Our middleware as a drop-in for Starlette's ``SessionMiddleware`` (issue 16).

The first part is Starlette's own tests/middleware/test_session.py, case by case, with
`session_store.SessionMiddleware` and a real store in place of Starlette's middleware:
the apps, the requests and the assertions are Starlette's, unchanged, but for two
things. The key is ``SECRET_KEY`` (Starlette's tests use "example": we refuse keys
under 16 characters), and the client is an `httpx.AsyncClient` on the test's own event
loop (a `TestClient` runs each client on a loop of its own, and one Redis connection
pool cannot serve two loops); its cookie jar is the same. Each case runs on a
`MemoryStore` and on a `RedisStore` on a real Redis.

The second part is what Starlette's tests do not cover: ``max_age=0``, the two spellings
of one setting, short keys, ``mark_modified``, a store chosen from the environment.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.datastructures import Secret
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from redis_plumbing import RedisServer
from session_store import (
    HybridStore,
    MemoryStore,
    RedisStore,
    Session,
    SessionMiddleware,
    SessionStore,
    store_from_env,
)

pytestmark = pytest.mark.anyio

SECRET_KEY = "example-secret-key-0123456789"

ClientFactory = Callable[..., httpx.AsyncClient]


@pytest.fixture(params=["memory", "redis"])
async def store(
    request: pytest.FixtureRequest, redis_server: RedisServer, prefix: str
) -> AsyncIterator[SessionStore]:
    store: SessionStore = (
        MemoryStore()
        if request.param == "memory"
        else RedisStore.from_url(redis_server.url, prefix=prefix)
    )
    yield store
    await store.aclose()


@pytest.fixture
def test_client_factory() -> ClientFactory:
    """Starlette's fixture's signature: ``factory(app, base_url=..., cookies=...)``."""

    def make(
        app: ASGIApp, base_url: str = "http://testserver", cookies: dict[str, str] | None = None
    ) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url=base_url, cookies=cookies
        )

    return make


def sessions(store: SessionStore, **options: Any) -> list[Middleware]:
    return [Middleware(SessionMiddleware, store=store, secret_key=SECRET_KEY, **options)]


def view_session(request: Request) -> JSONResponse:
    return JSONResponse({"session": request.session})


async def update_session(request: Request) -> JSONResponse:
    data = await request.json()
    request.session.update(data)
    return JSONResponse({"session": request.session})


async def inplace_update_session(request: Request) -> JSONResponse:
    data = await request.json()
    session = request.session
    session |= data
    return JSONResponse({"session": request.session})


async def popitem_session(request: Request) -> JSONResponse:
    request.session.popitem()
    return JSONResponse({"session": request.session})


async def clear_session(request: Request) -> JSONResponse:
    request.session.clear()
    return JSONResponse({"session": request.session})


def no_session_access(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


# Starlette's tests/middleware/test_session.py, ported.


async def test_session(store: SessionStore, test_client_factory: ClientFactory) -> None:
    app = Starlette(
        routes=[
            Route("/view_session", endpoint=view_session),
            Route("/update_session", endpoint=update_session, methods=["POST"]),
            Route("/clear_session", endpoint=clear_session, methods=["POST"]),
        ],
        middleware=sessions(store),
    )
    async with test_client_factory(app) as client:
        response = await client.get("/view_session")
        assert response.json() == {"session": {}}

        response = await client.post("/update_session", json={"some": "data"})
        assert response.json() == {"session": {"some": "data"}}

        # check cookie max-age
        set_cookie = response.headers["set-cookie"]
        max_age_matches = re.search(r"; Max-Age=([0-9]+);", set_cookie)
        assert max_age_matches is not None
        assert int(max_age_matches[1]) == 14 * 24 * 3600

        response = await client.get("/view_session")
        assert response.json() == {"session": {"some": "data"}}

        response = await client.post("/clear_session")
        assert response.json() == {"session": {}}

        response = await client.get("/view_session")
        assert response.json() == {"session": {}}


@pytest.mark.parametrize("partitioned", [False, True])
async def test_partitioned_session(
    store: SessionStore, test_client_factory: ClientFactory, partitioned: bool
) -> None:
    app = Starlette(
        routes=[
            Route("/update_session", endpoint=update_session, methods=["POST"]),
            Route("/clear_session", endpoint=clear_session, methods=["POST"]),
        ],
        middleware=sessions(store, https_only=True, same_site="none", partitioned=partitioned),
    )
    async with test_client_factory(app, base_url="https://testserver") as client:
        response = await client.post("/update_session", json={"some": "data"})
        attributes = response.headers["set-cookie"].split("; ")
        assert ("partitioned" in attributes) is partitioned

        response = await client.post("/clear_session")
        attributes = response.headers["set-cookie"].split("; ")
        assert ("partitioned" in attributes) is partitioned


async def test_session_expires(store: SessionStore, test_client_factory: ClientFactory) -> None:
    app = Starlette(
        routes=[
            Route("/view_session", endpoint=view_session),
            Route("/update_session", endpoint=update_session, methods=["POST"]),
        ],
        middleware=sessions(store, max_age=-1),
    )
    async with test_client_factory(app) as client:
        response = await client.post("/update_session", json={"some": "data"})
        assert response.json() == {"session": {"some": "data"}}

    # requests removes expired cookies from response.cookies, we need to
    # fetch session id from the headers and pass it explicitly
    expired_cookie_header = response.headers["set-cookie"]
    expired_session_match = re.search(r"session=([^;]*);", expired_cookie_header)
    assert expired_session_match is not None
    expired_session_value = expired_session_match[1]
    async with test_client_factory(app, cookies={"session": expired_session_value}) as client:
        response = await client.get("/view_session")
        assert response.json() == {"session": {}}


async def test_secure_session(store: SessionStore, test_client_factory: ClientFactory) -> None:
    app = Starlette(
        routes=[
            Route("/view_session", endpoint=view_session),
            Route("/update_session", endpoint=update_session, methods=["POST"]),
            Route("/clear_session", endpoint=clear_session, methods=["POST"]),
        ],
        middleware=sessions(store, https_only=True),
    )
    secure_client = test_client_factory(app, base_url="https://testserver")
    unsecure_client = test_client_factory(app, base_url="http://testserver")
    async with secure_client, unsecure_client:
        response = await unsecure_client.get("/view_session")
        assert response.json() == {"session": {}}

        response = await unsecure_client.post("/update_session", json={"some": "data"})
        assert response.json() == {"session": {"some": "data"}}

        response = await unsecure_client.get("/view_session")
        assert response.json() == {"session": {}}

        response = await secure_client.get("/view_session")
        assert response.json() == {"session": {}}

        response = await secure_client.post("/update_session", json={"some": "data"})
        assert response.json() == {"session": {"some": "data"}}

        response = await secure_client.get("/view_session")
        assert response.json() == {"session": {"some": "data"}}

        response = await secure_client.post("/clear_session")
        assert response.json() == {"session": {}}

        response = await secure_client.get("/view_session")
        assert response.json() == {"session": {}}


async def test_session_cookie_subpath(
    store: SessionStore, test_client_factory: ClientFactory
) -> None:
    second_app = Starlette(
        routes=[
            Route("/update_session", endpoint=update_session, methods=["POST"]),
        ],
        middleware=sessions(store, path="/second_app"),
    )
    app = Starlette(routes=[Mount("/second_app", app=second_app)])
    # Starlette's base_url is "http://testserver/second_app": its client of the day did
    # not join that path with the request's; httpx does (/second_app/second_app/...).
    async with test_client_factory(app, base_url="http://testserver") as client:
        response = await client.post("/second_app/update_session", json={"some": "data"})
    assert response.status_code == 200
    cookie = response.headers["set-cookie"]
    cookie_path_match = re.search(r"; path=(\S+);", cookie)
    assert cookie_path_match is not None
    cookie_path = cookie_path_match.groups()[0]
    assert cookie_path == "/second_app"


async def test_invalid_session_cookie(
    store: SessionStore, test_client_factory: ClientFactory
) -> None:
    app = Starlette(
        routes=[
            Route("/view_session", endpoint=view_session),
            Route("/update_session", endpoint=update_session, methods=["POST"]),
        ],
        middleware=sessions(store),
    )
    async with test_client_factory(app) as client:
        response = await client.post("/update_session", json={"some": "data"})
        assert response.json() == {"session": {"some": "data"}}

    # we expect it to not raise an exception if we provide a bogus session cookie
    async with test_client_factory(app, cookies={"session": "invalid"}) as client:
        response = await client.get("/view_session")
        assert response.json() == {"session": {}}


async def test_session_cookie(store: SessionStore, test_client_factory: ClientFactory) -> None:
    app = Starlette(
        routes=[
            Route("/view_session", endpoint=view_session),
            Route("/update_session", endpoint=update_session, methods=["POST"]),
        ],
        middleware=sessions(store, max_age=None),
    )
    async with test_client_factory(app) as client:
        response = await client.post("/update_session", json={"some": "data"})
        assert response.json() == {"session": {"some": "data"}}

        # check cookie max-age
        set_cookie = response.headers["set-cookie"]
        assert "Max-Age" not in set_cookie

        client.cookies.delete("session")
        response = await client.get("/view_session")
        assert response.json() == {"session": {}}


async def test_domain_cookie(store: SessionStore, test_client_factory: ClientFactory) -> None:
    app = Starlette(
        routes=[
            Route("/view_session", endpoint=view_session),
            Route("/update_session", endpoint=update_session, methods=["POST"]),
        ],
        middleware=sessions(store, domain=".example.com"),
    )
    async with test_client_factory(app) as client:
        response = await client.post("/update_session", json={"some": "data"})
        assert response.json() == {"session": {"some": "data"}}

        # check cookie max-age
        set_cookie = response.headers["set-cookie"]
        assert "domain=.example.com" in set_cookie

        client.cookies.delete("session")
        response = await client.get("/view_session")
        assert response.json() == {"session": {}}


async def test_set_cookie_only_on_modification(
    store: SessionStore, test_client_factory: ClientFactory
) -> None:
    app = Starlette(
        routes=[
            Route("/view_session", endpoint=view_session),
            Route("/update_session", endpoint=update_session, methods=["POST"]),
        ],
        middleware=sessions(store),
    )
    async with test_client_factory(app) as client:
        # Write to session - should send Set-Cookie
        response = await client.post("/update_session", json={"some": "data"})
        assert "set-cookie" in response.headers

        # Read-only access - should NOT send Set-Cookie
        response = await client.get("/view_session")
        assert response.json() == {"session": {"some": "data"}}
        assert "set-cookie" not in response.headers


async def test_vary_cookie_on_access(
    store: SessionStore, test_client_factory: ClientFactory
) -> None:
    app = Starlette(
        routes=[
            Route("/view_session", endpoint=view_session),
            Route("/update_session", endpoint=update_session, methods=["POST"]),
            Route("/no_session", endpoint=no_session_access),
        ],
        middleware=sessions(store),
    )
    async with test_client_factory(app) as client:
        # Modifying session should add Vary: Cookie
        response = await client.post("/update_session", json={"some": "data"})
        assert "cookie" in response.headers.get("vary", "").lower()

        # Reading a non-empty session should add Vary: Cookie
        response = await client.get("/view_session")
        assert "cookie" in response.headers.get("vary", "").lower()

        # Not accessing session at all should NOT add Vary: Cookie
        response = await client.get("/no_session")
        assert "cookie" not in response.headers.get("vary", "").lower()


@pytest.mark.parametrize("session_data", [{"a": "1"}, {"a": "1", "b": "2"}])
async def test_vary_cookie_on_session_pop(
    store: SessionStore, session_data: dict[str, str]
) -> None:
    async def pop_session(request: Request) -> JSONResponse:
        return JSONResponse({"value": request.scope["session"].pop("a")})

    app = Starlette(
        routes=[
            Route("/update_session", endpoint=update_session, methods=["POST"]),
            Route("/pop_session", endpoint=pop_session, methods=["POST"]),
        ],
        middleware=sessions(store),
    )
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.post("/update_session", json=session_data)
        assert response.json() == {"session": session_data}

        response = await client.post("/pop_session")
        assert response.json() == {"value": "1"}
        assert "set-cookie" in response.headers
        assert "cookie" in response.headers.get("vary", "").lower()


def test_session_tracks_modification() -> None:
    session = Session({"a": "1", "b": "2"})
    assert not session.modified

    # __setitem__
    session["c"] = "3"
    assert session.modified

    # __delitem__
    session = Session({"a": "1"})
    del session["a"]
    assert session.modified

    # clear
    session = Session({"a": "1"})
    session.clear()
    assert session.modified

    # pop with existing key
    session = Session({"a": "1"})
    session.pop("a")
    assert session.modified
    assert session.accessed

    # pop with missing key
    session = Session({"a": "1"})
    session.pop("missing", None)
    assert not session.modified
    assert not session.accessed

    # setdefault with missing key
    session = Session({"a": "1"})
    session.setdefault("b", "2")
    assert session.modified

    # setdefault with existing key
    session = Session({"a": "1"})
    session.setdefault("a", "2")
    assert not session.modified


@pytest.mark.parametrize(
    ("path", "data", "expected"),
    [
        ("/inplace_update_session", {"c": "3"}, {"a": "1", "b": "2", "c": "3"}),
        ("/popitem_session", None, {"a": "1"}),
    ],
)
async def test_session_persists_mutations(
    store: SessionStore,
    test_client_factory: ClientFactory,
    path: str,
    data: dict[str, str] | None,
    expected: dict[str, str],
) -> None:
    app = Starlette(
        routes=[
            Route("/view_session", endpoint=view_session),
            Route("/update_session", endpoint=update_session, methods=["POST"]),
            Route("/inplace_update_session", endpoint=inplace_update_session, methods=["POST"]),
            Route("/popitem_session", endpoint=popitem_session, methods=["POST"]),
        ],
        middleware=sessions(store),
    )
    async with test_client_factory(app) as client:
        response = await client.post("/update_session", json={"a": "1", "b": "2"})
        assert response.json() == {"session": {"a": "1", "b": "2"}}

        response = await client.post(path, json=data)
        assert response.json() == {"session": expected}

        response = await client.get("/view_session")
        assert response.json() == {"session": expected}


# Beyond Starlette's tests.


def _app(store: SessionStore, **options: Any) -> Starlette:
    async def mark(request: Request) -> PlainTextResponse:
        session: Session = request.scope["session"]
        session.mark_modified()
        return PlainTextResponse("ok")

    return Starlette(
        routes=[
            Route("/view_session", endpoint=view_session),
            Route("/update_session", endpoint=update_session, methods=["POST"]),
            Route("/clear_session", endpoint=clear_session, methods=["POST"]),
            Route("/mark", endpoint=mark, methods=["POST"]),
        ],
        middleware=sessions(store, **options),
    )


async def test_cookie_attributes_are_spelled_as_starlettes(
    test_client_factory: ClientFactory,
) -> None:
    # Starlette 1.10 writes exactly these; an app's own tests compare them.
    app = _app(MemoryStore(), max_age=3600, domain="example.test", https_only=True)
    async with test_client_factory(app, base_url="https://example.test") as client:
        created = (await client.post("/update_session", json={"a": 1})).headers["set-cookie"]
        cleared = (await client.post("/clear_session")).headers["set-cookie"]
    name_value, attributes = created.split("; ", 1)
    assert re.fullmatch(r"session=[\w.-]+", name_value)
    assert attributes == "path=/; Max-Age=3600; httponly; samesite=lax; secure; domain=example.test"
    assert cleared == (
        "session=; path=/; expires=Thu, 01 Jan 1970 00:00:00 GMT; "
        "httponly; samesite=lax; secure; domain=example.test"
    )


async def test_max_age_zero_keeps_nothing(
    store: SessionStore, test_client_factory: ClientFactory
) -> None:
    # As Starlette: a cookie the browser drops at once, and one never read back.
    app = _app(store, max_age=0)
    async with test_client_factory(app) as client:
        response = await client.post("/update_session", json={"some": "data"})
        assert response.json() == {"session": {"some": "data"}}
    assert "; Max-Age=0; " in response.headers["set-cookie"]
    value = re.search(r"session=([^;]*);", response.headers["set-cookie"])
    assert value is not None
    async with test_client_factory(app, cookies={"session": value[1]}) as client:
        assert (await client.get("/view_session")).json() == {"session": {}}


async def test_mark_modified_sends_the_cookie_again(
    store: SessionStore, test_client_factory: ClientFactory
) -> None:
    async with test_client_factory(_app(store)) as client:
        first = await client.post("/update_session", json={"a": 1})
        response = await client.post("/mark")
        assert response.headers["set-cookie"] == first.headers["set-cookie"]
        assert (await client.get("/view_session")).json() == {"session": {"a": 1}}


async def test_secret_key_may_be_a_starlette_secret(test_client_factory: ClientFactory) -> None:
    app = Starlette(
        routes=[Route("/update_session", endpoint=update_session, methods=["POST"])],
        middleware=[
            Middleware(SessionMiddleware, store=MemoryStore(), secret_key=Secret(SECRET_KEY))
        ],
    )
    async with test_client_factory(app) as client:
        response = await client.post("/update_session", json={"a": 1})
    assert response.json() == {"session": {"a": 1}}


async def test_a_response_start_without_headers_gets_the_cookie(
    test_client_factory: ClientFactory,
) -> None:
    # ASGI makes "headers" optional; Starlette's middleware adds the list, and so do we.
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        scope["session"]["a"] = 1
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = SessionMiddleware(app, store=MemoryStore(), secret_key=SECRET_KEY)
    async with test_client_factory(middleware) as client:
        response = await client.get("/")
    assert response.headers["set-cookie"].startswith("session=")
    assert response.headers["vary"] == "Cookie"


async def _noop(scope: Any, receive: Any, send: Any) -> None:
    """An ASGI app that is never called: these tests only build the middleware."""


@pytest.mark.parametrize(
    ("ours", "starlettes"),
    [
        ({"secret_keys": [SECRET_KEY]}, {"secret_key": SECRET_KEY}),
        ({"cookie_name": "sid"}, {"session_cookie": "sid"}),
        ({"secure": True}, {"https_only": True}),
        ({"absolute_lifetime": 60}, {"max_age": 60}),
        ({"persistent": False}, {"max_age": None}),
    ],
)
def test_two_spellings_of_one_setting_are_refused(
    ours: dict[str, Any], starlettes: dict[str, Any]
) -> None:
    options: dict[str, Any] = {"secret_key": SECRET_KEY, **ours, **starlettes}
    (mine,) = ours
    (theirs,) = starlettes
    with pytest.raises(TypeError, match=rf"{mine}.*{theirs}|{theirs}.*{mine}"):
        SessionMiddleware(_noop, store=MemoryStore(), **options)


def test_a_short_key_is_refused_in_one_line_that_names_the_fix() -> None:
    with pytest.raises(ValueError, match="at least 16 characters") as refused:
        SessionMiddleware(_noop, store=MemoryStore(), secret_key="example")
    message = str(refused.value)
    assert "\n" not in message
    assert 'python -c "import secrets; print(secrets.token_urlsafe(32))"' in message
    assert "example" not in message  # never print a secret, even a bad one


def test_no_key_at_all_is_refused() -> None:
    with pytest.raises(TypeError, match="secret_key"):
        SessionMiddleware(_noop, store=MemoryStore())


def test_a_key_where_the_store_goes_is_refused() -> None:
    # Starlette's second positional parameter is the key; ours is the store.
    with pytest.raises(TypeError, match="secret_key="):
        SessionMiddleware(_noop, SECRET_KEY)  # type: ignore[arg-type]


# The store chosen from the environment when none is given.


async def test_store_from_redis_url(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, test_client_factory: ClientFactory
) -> None:
    monkeypatch.delenv("SESSION_STORE_URL", raising=False)
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    routes = [
        Route("/view_session", endpoint=view_session),
        Route("/update_session", endpoint=update_session, methods=["POST"]),
    ]
    middleware = SessionMiddleware(Starlette(routes=routes), secret_key=SECRET_KEY)
    assert isinstance(middleware.store, RedisStore)
    async with test_client_factory(middleware) as client:
        await client.post("/update_session", json={"a": 1})
        sid = client.cookies["session"].split(".")[0]
        assert (await client.get("/view_session")).json() == {"session": {"a": 1}}
    # It is in that Redis.
    assert await middleware.store.load(sid) is not None
    await middleware.store.aclose()


@pytest.mark.parametrize(
    ("url", "kind"),
    [("memory://", MemoryStore), ("redis://{}", RedisStore), ("hybrid+redis://{}", HybridStore)],
)
async def test_session_store_url_comes_first(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, url: str, kind: type
) -> None:
    address = redis_server.url.partition("://")[2]
    monkeypatch.setenv("SESSION_STORE_URL", url.format(address))
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1")  # ignored
    store = store_from_env()
    assert isinstance(store, kind)
    await store.ping()
    await store.aclose()


def test_no_url_means_memory_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("SESSION_STORE_URL", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    with caplog.at_level(logging.WARNING, logger="session_store"):
        middleware = SessionMiddleware(_noop, secret_key=SECRET_KEY)
    assert isinstance(middleware.store, MemoryStore)
    (record,) = caplog.records
    assert "SESSION_STORE_URL" in record.getMessage()
    assert "REDIS_URL" in record.getMessage()
    assert "this process's memory" in record.getMessage()


def test_a_bad_store_url_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SESSION_STORE_URL", "postgres://db/sessions")
    with pytest.raises(ValueError, match="SESSION_STORE_URL"):
        store_from_env()


async def test_the_middleware_closes_the_store_it_chose(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A store made from the environment is the middleware's own: lifespan's end closes it.
    monkeypatch.delenv("SESSION_STORE_URL", raising=False)
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    app = Starlette(middleware=[Middleware(SessionMiddleware, secret_key=SECRET_KEY)])
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    events: list[str] = []

    async def receive() -> Any:
        message = next(messages)
        if message["type"] == "lifespan.startup":
            store = _session_middleware(app).store
            assert isinstance(store, RedisStore)
            close = store.aclose

            async def recording_close() -> None:
                events.append("store closed")
                await close()

            monkeypatch.setattr(store, "aclose", recording_close)
        return message

    async def send(message: Any) -> None:
        events.append(message["type"])

    await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    assert events == ["lifespan.startup.complete", "store closed", "lifespan.shutdown.complete"]


def _session_middleware(app: Starlette) -> SessionMiddleware:
    layer: Any = app.middleware_stack
    while not isinstance(layer, SessionMiddleware):
        layer = layer.app
    return layer
