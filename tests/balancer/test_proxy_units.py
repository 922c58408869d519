"""The data path's pure parts: options, the retry budget, trusted proxies, header helpers,
and how a backend connection relays a response head (its head cache included)."""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Callable
from typing import cast

import pytest

from balancer import ConfigError, Pool, Router, Sticky
from balancer.datapath._http import (
    BODY_CHUNKED,
    BODY_LENGTH,
    BODY_UNTIL_CLOSE,
    TrustedProxies,
    chunk,
    connection_tokens,
    error_response,
    forwarded_for,
    new_request_id,
)
from balancer.datapath._metrics import Metrics
from balancer.datapath._proxy import ProxyOptions, ProxyServer, _RetryBudget
from balancer.datapath._upstream import _HEADS, ResponseHandler, UpstreamConnection, UpstreamPool
from tests.helpers import FakeClock


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ProxyOptions(header_timeout=0), "header_timeout must be a number of seconds > 0"),
        (lambda: ProxyOptions(response_timeout=math.inf), "response_timeout must be"),
        (lambda: ProxyOptions(max_request_line=0), "max_request_line must be at least 1, not 0"),
        (lambda: ProxyOptions(queue_timeout=-1), "queue_timeout must be a number of seconds >= 0"),
        (lambda: ProxyOptions(keepalive_per_backend=-1), "keepalive_per_backend must be >= 0"),
        (lambda: ProxyOptions(retry_floor=-1), "retry_floor must be >= 0, not -1"),
        (lambda: ProxyOptions(retry_ratio=-0.1), "retry_ratio must be >= 0"),
        (lambda: ProxyOptions(trusted_proxies=("10.0.0.0/8", "nope")), "trusted_proxies: 'nope'"),
        (lambda: Router(Pool([]), sticky=Sticky("none"), table_size=100), "table_size must be"),
        (
            lambda: Router(Pool([]), sticky=Sticky("none"), hash_balance_factor=-1),
            "hash_balance_factor must be",
        ),
        (lambda: Router(Pool([]), sticky=Sticky("cookie", "sid")), "affinity: "),
    ],
)
def test_library_options_out_of_range_name_the_parameter(
    make: Callable[[], object], message: str
) -> None:
    # Library classes speak of their parameters; only balancer._config speaks of flags.
    with pytest.raises(ValueError, match=f"^{re.escape(message)}") as info:
        make()
    assert not isinstance(info.value, ConfigError)


def test_retry_budget_allows_a_share_of_requests_plus_a_floor() -> None:
    clock = FakeClock()
    budget = _RetryBudget(ratio=0.2, floor=2.0, clock=clock)
    assert [budget.withdraw() for _ in range(3)] == [True, True, False]  # the floor's start
    budget.requests += 10  # ten requests earn two retries
    assert [budget.withdraw() for _ in range(3)] == [True, True, False]
    clock.advance(1.0)  # a second earns the floor
    assert [budget.withdraw() for _ in range(3)] == [True, True, False]
    clock.advance(3600)  # capped: ten seconds of the floor at most
    assert sum(budget.withdraw() for _ in range(100)) == 20


def test_trusted_proxies() -> None:
    trusted = TrustedProxies(["10.0.0.0/8", "::1"])
    assert "10.1.2.3" in trusted
    assert "::1" in trusted
    assert "11.0.0.1" not in trusted
    assert "not an ip" not in trusted
    assert not TrustedProxies([])
    # From the right: skip trusted hops; what a client wrote further left is not believed.
    assert trusted.client_ip("10.0.0.1", b"1.1.1.1, 2.2.2.2, 10.0.0.2") == "2.2.2.2"
    assert trusted.client_ip("10.0.0.1", b"10.0.0.3, 10.0.0.2") == "10.0.0.3"
    assert trusted.client_ip("10.0.0.1", None) == "10.0.0.1"


def test_header_helpers() -> None:
    assert connection_tokens(b"Keep-Alive, X-Foo ,,") == [b"keep-alive", b"x-foo"]
    assert forwarded_for("192.0.2.1") == b"192.0.2.1"
    assert forwarded_for("2001:db8::1") == b'"[2001:db8::1]"'
    assert b"".join(chunk(b"hello")) == b"5\r\nhello\r\n"
    assert len(new_request_id()) == 16
    assert new_request_id() != new_request_id()
    response = error_response(503, keep_alive=False)
    assert response.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert response.endswith(b"Connection: close\r\n\r\n503 Service Unavailable\n")


class _FakeTransport:
    def __init__(self) -> None:
        self.closed = False

    def is_closing(self) -> bool:
        return self.closed

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


class _Heads:
    """A ResponseHandler that records the heads a connection relays."""

    def __init__(self) -> None:
        self.heads: list[tuple[int, bytes, int]] = []
        self.completed = 0

    def upstream_head(self, status: int, head: bytes, body: int) -> None:
        self.heads.append((status, head, body))

    def upstream_body(self, data: bytes) -> None:
        pass

    def upstream_flush(self) -> None:
        pass

    def upstream_complete(self, conn: UpstreamConnection) -> None:
        self.completed += 1

    def upstream_response(
        self, conn: UpstreamConnection, status: int, head: bytes, body: bytes
    ) -> None:
        self.upstream_head(status, head, BODY_LENGTH)
        self.upstream_complete(conn)


def _exchange(response: bytes) -> tuple[tuple[int, bytes, int], bool]:
    """Feed `response` to a fresh connection: (the relayed head, reusable afterwards)."""
    pool = UpstreamPool("b", "127.0.0.1", 1, max_idle=1, connect_timeout=1.0, clock=lambda: 0.0)
    conn = UpstreamConnection(pool)
    conn.connection_made(cast(asyncio.BaseTransport, _FakeTransport()))
    handler = _Heads()
    conn.start(cast(ResponseHandler, handler), 0.0, head_request=False)
    conn.data_received(response)
    assert len(handler.heads) == 1
    return handler.heads[0], handler.completed == 1 and conn.reusable


@pytest.mark.parametrize(
    ("response", "relayed", "framing", "reusable"),
    [
        (
            b"HTTP/1.1 200 OK\r\nServer: x\r\nContent-Length: 2\r\nConnection: keep-alive\r\n"
            b"Keep-Alive: timeout=5\r\nProxy-Foo: 1\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\nServer: x\r\nContent-Length: 2\r\n",
            BODY_LENGTH,
            True,
        ),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nTE: x\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n",
            BODY_CHUNKED,
            True,
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n",
            BODY_LENGTH,
            False,
        ),
        (
            b"HTTP/1.0 200 OK\r\nX-A: 1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX-A: 1\r\n",
            BODY_UNTIL_CLOSE,
            False,
        ),
    ],
    ids=["length", "chunked", "close", "until-close"],
)
def test_relayed_head_is_the_same_from_the_head_cache(
    response: bytes, relayed: bytes, framing: int, reusable: bool
) -> None:
    _HEADS.clear()
    first = _exchange(response)
    assert len(_HEADS) == 1  # the second exchange takes the cached head
    second = _exchange(response)
    assert first == second == ((200, relayed, framing), reusable)


def test_head_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("balancer.datapath._upstream._HEADS_MAX", 4)
    _HEADS.clear()
    for i in range(20):
        response = b"HTTP/1.1 200 OK\r\nX-N: %d\r\nContent-Length: 0\r\n\r\n" % i
        (_, head, _), _ = _exchange(response)
        assert head == b"HTTP/1.1 200 OK\r\nX-N: %d\r\nContent-Length: 0\r\n" % i
        assert len(_HEADS) <= 4
    long_head = b"HTTP/1.1 200 OK\r\nX-Long: " + b"x" * 2000 + b"\r\nContent-Length: 0\r\n\r\n"
    _exchange(long_head)
    assert long_head[:-4] not in _HEADS


@pytest.mark.parametrize(
    ("tail", "whole"),
    [
        (b"ok", True),  # exactly Content-Length bytes: relayed without the parser
        (b"o", False),  # a partial body: the parser waits for the rest
        (b"okHTTP/1.1 200 OK\r\n", False),  # bytes past the body: the parser judges them
    ],
)
def test_whole_response_in_one_read_skips_the_parser_only_when_exact(
    tail: bytes, whole: bool
) -> None:
    head = b"HTTP/1.1 200 OK\r\nX-Whole: 1\r\nContent-Length: 2\r\n\r\n"
    _HEADS.clear()
    _exchange(head + b"ok")  # the parser sees the head once and caches its meaning
    pool = UpstreamPool("b", "127.0.0.1", 1, max_idle=1, connect_timeout=1.0, clock=lambda: 0.0)
    conn = UpstreamConnection(pool)
    conn.connection_made(cast(asyncio.BaseTransport, _FakeTransport()))
    handler = _Heads()
    responses: list[bytes] = []
    handler.upstream_response = (  # type: ignore[method-assign]
        lambda conn, status, head, body: responses.append(body)
    )
    conn.start(cast(ResponseHandler, handler), 0.0, head_request=False)
    conn.data_received(head + tail)
    assert responses == ([b"ok"] if whole else [])
    assert len(handler.heads) == (0 if whole else 1)


def test_pools_of_removed_backends_are_closed() -> None:
    backends = Pool(["http://127.0.0.1:9001", "http://127.0.0.1:9002"])
    server = ProxyServer(Router(backends, sticky=Sticky("none")), Metrics(), backends=backends)
    first, second = list(backends)
    pools = [server.pool(first), server.pool(second)]
    server._prune_pools()
    assert set(server.pools) == {first.id, second.id}
    backends.remove(first.id)
    server._prune_pools()
    assert set(server.pools) == {second.id}
    assert [p._closed for p in pools] == [True, False]
