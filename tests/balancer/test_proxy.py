"""The data path over real sockets: relay, keep-alive, the error edge, bad input, retries,
forwarding headers, upgrades and shutdown. Each test runs a ProxyServer and its backends
in the test's event loop, on free ports of 127.0.0.1."""

from __future__ import annotations

import asyncio

import pytest
import websockets.asyncio.client
import websockets.asyncio.server

from balancer import ProxyOptions
from tests.balancer.backends import (
    Client,
    HttpBackend,
    ListRouter,
    running_proxy,
)
from tests.helpers import free_port

pytestmark = pytest.mark.anyio


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {"use_uvloop": False}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    """Every socket test runs on both loops: the entry point picks uvloop when installed."""
    param: tuple[str, dict[str, bool]] = request.param
    return param


GET = b"GET /hello HTTP/1.1\r\nHost: example.test\r\n\r\n"


# -- relay ----------------------------------------------------------------------------


async def test_get_and_keep_alive_reuse_one_upstream_connection() -> None:
    async with HttpBackend() as backend, running_proxy([backend.url]) as (server, _, metrics):
        client = await Client.open(server.port)
        for _ in range(5):
            response = await client.request(GET)
            assert response.status == 200
            assert response.text == "hello from a"
        await client.close()
        second = await Client.open(server.port)
        assert (await second.request(GET)).status == 200
        await second.close()
    assert backend.connections == 1  # six requests, two clients, one upstream connection
    assert [status for _, status in metrics.done] == [200] * 6


async def test_the_upstream_pool_keeps_at_most_its_bound_idle() -> None:
    options = ProxyOptions(keepalive_per_backend=1)
    async with HttpBackend() as backend, running_proxy([backend.url], options) as (server, _, _m):
        slow = await Client.open(server.port)
        await slow.send(b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\na")
        await backend.wait_seen(1)  # holds one upstream connection
        fast = await Client.open(server.port)
        assert (await fast.request(GET)).status == 200  # needs a second one
        await slow.send(b"b")
        assert (await slow.read()).text == "ab"
        (pool,) = server.pools.values()
        assert (pool.opened, pool.idle) == (2, 1)  # the extra one was closed
        assert (await fast.request(GET)).status == 200
        assert pool.opened == 2  # and the kept one is reused
        await slow.close()
        await fast.close()


async def test_post_content_length_and_chunked_both_ways() -> None:
    async with HttpBackend() as backend, running_proxy([backend.url]) as (server, _, _m):
        client = await Client.open(server.port)
        response = await client.request(
            b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\nhello world"
        )
        assert (response.status, response.text) == (200, "hello world")
        response = await client.request(
            b"POST /echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )
        assert (response.status, response.text) == (200, "hello world")
        assert backend.seen[-1].header("transfer-encoding") == "chunked"
        response = await client.request(b"GET /chunked HTTP/1.1\r\nHost: h\r\n\r\n")
        assert response.text == "hello chunked world"
        assert response.header("transfer-encoding") == "chunked"
        assert response.header("x-trailer") is None  # trailers are not relayed
        response = await client.request(b"GET /until-close HTTP/1.1\r\nHost: h\r\n\r\n")
        assert response.text == "all of it"
        assert response.header("transfer-encoding") == "chunked"
        assert (await client.request(GET)).status == 200  # the client connection lives on
        await client.close()


async def test_head_interim_and_connection_close() -> None:
    async with HttpBackend() as backend, running_proxy([backend.url]) as (server, _, _m):
        client = await Client.open(server.port)
        await client.send(b"HEAD /hello HTTP/1.1\r\nHost: h\r\n\r\n")
        head = await client.read_head()
        assert head.startswith(b"HTTP/1.1 200")
        assert b"Content-Length: 12" in head
        response = await client.request(b"GET /interim HTTP/1.1\r\nHost: h\r\n\r\n")
        assert response.status == 103
        assert (await client.read()).text == "after hints"
        response = await client.request(
            b"GET /hello HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        )
        assert response.status == 200
        assert response.header("connection") == "close"
        assert await client.closed()
        await client.close()


async def test_http_10() -> None:
    async with HttpBackend() as backend, running_proxy([backend.url]) as (server, _, _m):
        client = await Client.open(server.port)
        response = await client.request(b"GET /hello HTTP/1.0\r\n\r\n")
        assert response.text == "hello from a"
        assert await client.closed()
        # An HTTP/1.1 upstream needs a Host: the address the client reached.
        assert backend.seen[-1].header("host") == f"127.0.0.1:{server.port}"
        keep = await Client.open(server.port)
        for _ in range(2):
            response = await keep.request(b"GET /hello HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            assert response.header("connection") == "keep-alive"
        response = await keep.request(b"GET /chunked HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert response.text == "hello chunked world"  # no chunked framing in HTTP/1.0...
        assert await keep.closed()  # ...so the close ends the body
        await client.close()
        await keep.close()


async def test_http_10_backend_answer_is_relayed_as_http_11() -> None:
    async with HttpBackend() as backend, running_proxy([backend.url]) as (server, _, _m):
        client = await Client.open(server.port)
        await client.send(b"GET /http10 HTTP/1.1\r\nHost: h\r\n\r\n")
        head = await client.read_head()
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"Keep-Alive" not in head  # hop-by-hop, from the backend's hop
        assert await client.reader.readexactly(6) == b"old ok"
        assert (await client.request(GET)).status == 200  # a fresh upstream connection
        await client.close()
    assert backend.connections == 2


async def test_upgrade_refused_by_the_backend_is_relayed_then_closed() -> None:
    async with HttpBackend() as backend, running_proxy([backend.url]) as (server, _, _m):
        client = await Client.open(server.port)
        response = await client.request(
            b"GET /hello HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        assert (response.status, response.text) == (200, "hello from a")
        assert backend.seen[-1].header("upgrade") == "websocket"
        assert await client.closed()
        await client.close()


async def test_expect_100_continue() -> None:
    async with HttpBackend() as backend, running_proxy([backend.url]) as (server, _, _m):
        client = await Client.open(server.port)
        await client.send(
            b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
        )
        assert (await client.read()).status == 100
        response = await client.request(b"body")
        assert (response.status, response.text) == (200, "body")
        assert backend.seen[-1].header("expect") is None  # answered here, not forwarded
        await client.close()


async def test_pipelined_requests_answered_in_order() -> None:
    async with HttpBackend() as backend, running_proxy([backend.url]) as (server, _, _m):
        client = await Client.open(server.port)
        await client.send(
            b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\none"
            + b"GET /chunked HTTP/1.1\r\nHost: h\r\n\r\n"
            + b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nthree"
        )
        texts = [(await client.read()).text for _ in range(3)]
        assert texts == ["one", "hello chunked world", "three"]
        await client.close()


async def test_early_response_before_the_body_is_sent() -> None:
    async with HttpBackend() as backend, running_proxy([backend.url]) as (server, _, _m):
        client = await Client.open(server.port)
        await client.send(b"POST /early HTTP/1.1\r\nHost: h\r\nContent-Length: 100000\r\n\r\n")
        response = await client.read()
        assert response.status == 413
        await client.send(b"x" * 100000)  # the rest is read and dropped
        assert (await client.request(GET)).status == 200
        await client.close()


# -- headers --------------------------------------------------------------------------


async def test_hop_by_hop_and_forwarded_headers_from_an_untrusted_peer() -> None:
    async with HttpBackend() as backend, running_proxy([backend.url]) as (server, router, _m):
        client = await Client.open(server.port)
        await client.request(
            b"GET /hello HTTP/1.1\r\nHost: shop.test\r\nConnection: keep-alive, X-Secret\r\n"
            b"X-Secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: x\r\n"
            b"X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Host: evil.test\r\n"
            b"Forwarded: for=6.6.6.6\r\nCookie: sid=42\r\nUpgrade: h2c\r\n\r\n"
        )
        seen = backend.seen[-1]
        for name in (
            "connection",
            "x-secret",
            "keep-alive",
            "te",
            "proxy-authorization",
            "upgrade",
        ):
            assert seen.header(name) is None, name
        assert seen.header("x-forwarded-for") == "127.0.0.1"
        assert seen.header("x-forwarded-proto") == "http"
        assert seen.header("x-forwarded-host") == "shop.test"
        assert seen.header("forwarded") == 'for=127.0.0.1;proto=http;host="shop.test"'
        assert len(seen.header("x-request-id") or "") == 16
        assert router.calls[-1][:2] == ("127.0.0.1", b"sid=42")
        await client.request(b"GET /hello HTTP/1.1\r\nHost: h\r\nX-Request-Id: abc\r\n\r\n")
        assert backend.seen[-1].header("x-request-id") == "abc"
        await client.close()


async def test_forwarded_headers_from_a_trusted_proxy_are_appended_to() -> None:
    options = ProxyOptions(trusted_proxies=("127.0.0.0/8",))
    async with (
        HttpBackend() as backend,
        running_proxy([backend.url], options) as (
            server,
            router,
            _m,
        ),
    ):
        client = await Client.open(server.port)
        await client.request(
            b"GET /hello HTTP/1.1\r\nHost: inner.test\r\n"
            b"X-Forwarded-For: 203.0.113.7, 127.0.0.9\r\nX-Forwarded-Proto: https\r\n"
            b"X-Forwarded-Host: shop.test\r\nForwarded: for=203.0.113.7\r\n\r\n"
        )
        seen = backend.seen[-1]
        assert seen.header("x-forwarded-for") == "203.0.113.7, 127.0.0.9, 127.0.0.1"
        assert seen.header("x-forwarded-proto") == "https"
        assert seen.header("x-forwarded-host") == "shop.test"
        assert seen.header("forwarded") == (
            'for=203.0.113.7, for=127.0.0.1;proto=http;host="inner.test"'
        )
        assert router.calls[-1][0] == "203.0.113.7"  # the first hop no trusted proxy added
        await client.close()


async def test_set_cookie_of_the_decision_is_added() -> None:
    async with HttpBackend() as backend:
        router = ListRouter([backend.url], set_cookie=b"lb=abc; Path=/; HttpOnly")
        async with running_proxy([backend.url], router=router) as (server, _, _m):
            client = await Client.open(server.port)
            response = await client.request(GET)
            assert response.header("set-cookie") == "lb=abc; Path=/; HttpOnly"
            await client.close()


# -- bad input ------------------------------------------------------------------------

BAD_INPUT = [
    pytest.param(
        b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        400,
        "smuggling",
        id="duplicate-content-length",
    ),
    pytest.param(
        b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n",
        400,
        "smuggling",
        id="content-length-and-chunked",
    ),
    pytest.param(
        b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 1, 2\r\n\r\nab",
        400,
        "smuggling",
        id="content-length-list",
    ),
    pytest.param(
        b"POST /echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        501,
        "transfer_encoding",
        id="unknown-transfer-coding",
    ),
    pytest.param(
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: h\r\n\r\n", 414, "uri_too_long", id="long-uri"
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: h\r\n" + b"X-Big: " + b"b" * 40000 + b"\r\n\r\n",
        431,
        "headers_too_large",
        id="big-headers",
    ),
    pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400, "bad_request", id="garbage"),
    pytest.param(b"GET / HTTP/1.1\r\nHo st: h\r\n\r\n", 400, "bad_request", id="bad-header"),
    pytest.param(b"GET / HTTP/1.1\r\n\r\n", 400, "bad_request", id="no-host"),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "bad_request", id="two-hosts"
    ),
    pytest.param(b"GET / HTTP/2.0\r\nHost: h\r\n\r\n", 505, "version", id="http-2-0"),
    pytest.param(b"GET / HTTP/1.2\r\nHost: h\r\n\r\n", 505, "version", id="http-1-2"),
    pytest.param(b"BREW / HTTP/1.1\r\nHost: h\r\n\r\n", 501, "method", id="unknown-method"),
    pytest.param(b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 501, "method", id="connect"),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: h\r\nExpect: teapot\r\n\r\n", 417, "expectation", id="expect"
    ),
]


@pytest.mark.parametrize(("raw", "status", "reason"), BAD_INPUT)
async def test_bad_input_is_answered_and_never_forwarded(
    raw: bytes, status: int, reason: str
) -> None:
    async with HttpBackend() as backend, running_proxy([backend.url]) as (server, _, metrics):
        client = await Client.open(server.port)
        response = await client.request(raw)
        assert response.status == status
        assert response.header("connection") == "close"
        assert await client.closed()
        assert metrics.rejections == [reason]
        await client.close()
    assert backend.seen == []


async def test_invalid_chunk_mid_body_is_answered_400() -> None:
    async with HttpBackend() as backend, running_proxy([backend.url]) as (server, _, metrics):
        client = await Client.open(server.port)
        await client.send(b"POST /sink HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
        await client.send(b"3\r\nabc\r\nzz\r\n")
        assert (await client.read()).status == 400
        assert await client.closed()
        assert metrics.rejections == ["bad_chunk"]
        await client.close()


async def test_bad_request_after_a_pipelined_good_one() -> None:
    async with HttpBackend() as backend, running_proxy([backend.url]) as (server, _, metrics):
        client = await Client.open(server.port)
        await client.send(GET + b"GARBAGE\x00\r\n\r\n")
        assert (await client.read()).status == 200
        assert (await client.read()).status == 400
        assert await client.closed()
        assert metrics.rejections == ["bad_request"]
        await client.close()
    assert len(backend.seen) == 1


async def test_header_timeout_answers_408_and_idle_timeout_closes() -> None:
    options = ProxyOptions(header_timeout=0.2, idle_timeout=0.2)
    async with (
        HttpBackend() as backend,
        running_proxy([backend.url], options) as (
            server,
            _,
            metrics,
        ),
    ):
        slow = await Client.open(server.port)
        await slow.send(b"GET / HTTP/1.1\r\nHost: h\r\n")  # and never the blank line
        assert (await slow.read()).status == 408
        assert await slow.closed()
        idle = await Client.open(server.port)
        assert (await idle.request(GET)).status == 200
        assert await idle.closed(within=5)
        assert metrics.rejections == ["header_timeout"]
        await slow.close()
        await idle.close()
    assert len(backend.seen) == 1


# -- the error edge, retries ------------------------------------------------------------


async def test_no_backend_is_503() -> None:
    router = ListRouter([])
    async with running_proxy([], router=router) as (server, _, _m):
        client = await Client.open(server.port)
        response = await client.request(GET)
        assert (response.status, response.text) == (503, "503 Service Unavailable\n")
        assert (await client.request(GET)).status == 503  # keep-alive survives it
        await client.close()


async def test_a_long_pipeline_answered_at_once_does_not_recurse() -> None:
    options = ProxyOptions(response_timeout=0.3, queue_timeout=0.0)
    async with (
        HttpBackend() as backend,
        running_proxy([backend.url], options) as (
            server,
            router,
            _m,
        ),
    ):
        client = await Client.open(server.port)
        await client.send(b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n" + GET * 3000)
        await backend.wait_seen(1)
        router.backends.clear()  # the 3000 queued requests will be answered at once
        assert (await client.read()).status == 504
        for _ in range(3000):
            assert (await client.read()).status == 503
        assert (await client.request(GET)).status == 503  # and the connection lives on
        await client.close()


async def test_connect_refused_is_retried_on_another_backend() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    async with HttpBackend("b") as live, running_proxy([dead, live.url]) as (server, router, m):
        client = await Client.open(server.port)
        response = await client.request(
            b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi"
        )
        assert (response.status, response.text) == (200, "hi")  # a POST: nothing was sent
        assert m.retries == [router.backends[0].id]
        assert router.calls[-1][2] == frozenset({router.backends[0].id})
        assert router.backends[0].failures_total == 1
        await client.close()


async def test_refused_connects_try_each_backend_once_whatever_max_attempts() -> None:
    # Refused connects never reached a backend: they are not attempts (three dead workers,
    # not reaped yet, took a GET's every attempt). Each backend is still tried once.
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(3)]
    options = ProxyOptions(max_attempts=2)
    async with (
        HttpBackend("b") as live,
        running_proxy([*dead, live.url], options) as (server, router, metrics),
    ):
        client = await Client.open(server.port)
        response = await client.request(GET)
        assert (response.status, response.text) == (200, "hello from b")
        ids = [b.id for b in router.backends]
        assert metrics.retries == ids[:3]
        assert [exclude for _, _, exclude in router.calls] == [frozenset(ids[:n]) for n in range(4)]
        await client.close()


async def test_all_refused_is_502() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    async with running_proxy([dead]) as (server, router, metrics):
        client = await Client.open(server.port)
        response = await client.request(GET)
        assert (response.status, response.text) == (502, "502 Bad Gateway\n")
        assert metrics.done == [(router.backends[0].id, 502)]
        await client.close()


async def test_upstream_timeout_is_504() -> None:
    options = ProxyOptions(response_timeout=0.2)
    async with (
        HttpBackend() as backend,
        running_proxy([backend.url], options) as (
            server,
            router,
            metrics,
        ),
    ):
        client = await Client.open(server.port)
        response = await client.request(b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n")
        assert (response.status, response.text) == (504, "504 Gateway Timeout\n")
        assert metrics.done == [(router.backends[0].id, 504)]
        assert router.backends[0].in_flight == 0
        await client.close()


async def test_a_slow_upload_is_not_an_upstream_timeout() -> None:
    options = ProxyOptions(response_timeout=0.3)
    async with HttpBackend() as backend, running_proxy([backend.url], options) as (server, _, _m):
        client = await Client.open(server.port)
        await client.send(b"POST /sink HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\n\r\n")
        for byte in b"abcdef":
            await asyncio.sleep(0.1)  # the slowness under test, not a synchronisation
            await client.send(bytes([byte]))
        response = await client.read()
        assert (response.status, response.text) == (200, "6")
        await client.close()


async def test_a_stalled_upload_is_408_and_not_the_backends_fault() -> None:
    options = ProxyOptions(response_timeout=0.2)
    async with (
        HttpBackend() as backend,
        running_proxy([backend.url], options) as (
            server,
            router,
            metrics,
        ),
    ):
        client = await Client.open(server.port)
        await client.send(b"POST /sink HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nab")
        assert (await client.read()).status == 408
        assert await client.closed()
        assert metrics.rejections == ["body_timeout"]
        assert router.backends[0].failures_total == 0
        assert router.backends[0].in_flight == 0
        await client.close()


async def test_post_that_reached_a_backend_is_not_retried() -> None:
    async with (
        HttpBackend("a") as first,
        HttpBackend("b") as second,
        running_proxy([first.url, second.url]) as (server, _, metrics),
    ):
        client = await Client.open(server.port)
        response = await client.request(
            b"POST /reset HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi"
        )
        assert response.status == 502
        assert metrics.retries == []
        assert second.seen == []
        response = await client.request(b"GET /reset HTTP/1.1\r\nHost: h\r\n\r\n")
        assert response.status == 502  # idempotent, so retried on b, which resets too
        assert [seen.target for seen in second.seen] == ["/reset"]
        await client.close()


async def test_keep_alive_race_is_retried_on_a_fresh_connection() -> None:
    async with (
        HttpBackend(drop_second=True) as backend,
        running_proxy([backend.url]) as (server, router, metrics),
    ):
        client = await Client.open(server.port)
        assert (await client.request(GET)).status == 200
        assert (await client.request(GET)).status == 200
        assert backend.connections == 2
        assert metrics.retries == [router.backends[0].id]
        assert router.backends[0].failures_total == 0  # a race, not the backend's failure
        await client.close()


async def test_failure_mid_response_closes_the_client_connection() -> None:
    async with HttpBackend() as backend, running_proxy([backend.url]) as (server, _, _m):
        client = await Client.open(server.port)
        await client.send(b"GET /stream/10000000 HTTP/1.1\r\nHost: h\r\n\r\n")
        await client.reader.readuntil(b"\r\n\r\n")
        await backend.__aexit__()  # the backend dies mid-body
        with pytest.raises((EOFError, ConnectionError, asyncio.IncompleteReadError)):
            await client.reader.readexactly(10000000)
        await client.close()


# -- upgrades, shutdown -----------------------------------------------------------------


async def test_websocket_echo_through_the_proxy() -> None:
    async def echo(ws: websockets.asyncio.server.ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)

    async with websockets.asyncio.server.serve(echo, "127.0.0.1", 0) as ws_server:
        port = next(iter(ws_server.sockets)).getsockname()[1]
        async with running_proxy([f"http://127.0.0.1:{port}"]) as (server, _, metrics):
            uri = f"ws://127.0.0.1:{server.port}/ws"
            async with websockets.asyncio.client.connect(uri) as ws:
                for text in ("one", "two", "x" * 200000):
                    await ws.send(text)
                    assert await ws.recv() == text
            assert metrics.done[-1][1] == 101


async def test_shutdown_lets_an_in_flight_request_finish() -> None:
    async with HttpBackend() as backend, running_proxy([backend.url]) as (server, _, _m):
        busy = await Client.open(server.port)
        idle = await Client.open(server.port)
        assert (await idle.request(GET)).status == 200
        await busy.send(b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nab")
        await backend.wait_seen(2)  # the request is in flight
        shutdown = asyncio.create_task(server.shutdown())
        assert await idle.closed()  # an idle keep-alive connection is closed at once
        await busy.send(b"cd")
        response = await busy.read()
        assert (response.status, response.text) == (200, "abcd")
        assert response.header("connection") == "close"
        await shutdown
        await busy.close()
        await idle.close()
