"""The data path's pure parts: options, trusted proxies, header helpers, how a request head is
read, checked and rebuilt to forward, the status a parser error earns, and how a backend
connection relays a response head (its head cache included). The retry decision and budget:
test_retry.py."""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Callable
from typing import cast

import httptools
import pytest

from balancer import ConfigError, Metrics, Pool, ProxyOptions, ProxyServer, Router, Sticky
from balancer.datapath._http import (
    BODY_CHUNKED,
    BODY_LENGTH,
    BODY_NONE,
    BODY_UNTIL_CLOSE,
    Rejected,
    RequestHead,
    TrustedProxies,
    add_upgrade,
    check_version,
    chunk,
    classify,
    connection_tokens,
    drop_named,
    error_response,
    finish_head,
    forwarded_for,
    forwarding_block,
    new_request_id,
    read_field,
)
from balancer.datapath._upstream import _HEADS, ResponseHandler, UpstreamConnection, UpstreamPool


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


def _read(*fields: tuple[bytes, bytes], limit: int = 32768) -> RequestHead:
    req = RequestHead()
    req.head[2] = b"/"
    for name, value in fields:
        read_field(req, name, value, limit)
    return req


def _forwarded(req: RequestHead) -> bytes:
    """The fields `req` forwards, as they will be on the wire."""
    return b"".join(req.head[4:])


@pytest.mark.parametrize(
    ("fields", "forwarded", "read"),
    [
        ([(b"X-App", b"1")], b"X-App: 1\r\n", {}),
        (
            [(b"Cookie", b"a=1"), (b"cookie", b"b=2")],
            b"Cookie: a=1\r\ncookie: b=2\r\n",
            {"cookie": b"a=1; b=2"},
        ),
        ([(b"Host", b"example.com")], b"Host: example.com\r\n", {"host": b"example.com"}),
        ([(b"Content-Length", b"5")], b"Content-Length: 5\r\n", {"body_kind": BODY_LENGTH}),
        # Transfer-Encoding is re-derived by finish_head; Upgrade put back by add_upgrade.
        ([(b"Transfer-Encoding", b"chunked")], b"", {"transfer_encoding": b"chunked"}),
        ([(b"Upgrade", b"websocket")], b"", {"upgrade_value": b"websocket"}),
        (
            [(b"Connection", b"keep-alive, X-Secret, Upgrade"), (b"Connection", b"close, x-b")],
            b"",
            {"options": [b"x-secret", b"x-b"]},
        ),
        ([(b"Expect", b"100-Continue ")], b"", {"expect_continue": True}),
        # Hop-by-hop: dropped, any Proxy-* too.
        ([(b"Keep-Alive", b"5"), (b"TE", b"trailers"), (b"Trailer", b"x")], b"", {}),
        ([(b"Proxy-Authorization", b"x"), (b"proxy-connection", b"y")], b"", {}),
        # Forwarding: read, not forwarded as sent (forwarding_block writes them).
        (
            [(b"X-Forwarded-For", b"1.1.1.1"), (b"x-forwarded-for", b"2.2.2.2")],
            b"",
            {"xff": b"1.1.1.1, 2.2.2.2"},
        ),
        (
            [(b"X-Forwarded-Proto", b"https"), (b"X-Forwarded-Host", b"a.example")],
            b"",
            {"xfp": b"https", "xfh": b"a.example"},
        ),
        (
            [(b"Forwarded", b"for=1.1.1.1"), (b"Forwarded", b"for=2.2.2.2")],
            b"",
            {"forwarded": b"for=1.1.1.1, for=2.2.2.2"},
        ),
        ([(b"X-Request-Id", b"abc")], b"X-Request-Id: abc\r\n", {"request_id": b"abc"}),
    ],
    ids=[
        "end-to-end",
        "cookies",
        "host",
        "content-length",
        "transfer-encoding",
        "upgrade",
        "connection",
        "expect",
        "hop-by-hop",
        "proxy-star",
        "xff",
        "xfp-xfh",
        "forwarded",
        "request-id",
    ],
)
def test_read_field_forwards_drops_or_reads_each_field(
    fields: list[tuple[bytes, bytes]], forwarded: bytes, read: dict[str, object]
) -> None:
    req = _read(*fields)
    assert _forwarded(req) == forwarded
    untouched = RequestHead()
    for name in (
        "cookie",
        "host",
        "body_kind",
        "transfer_encoding",
        "upgrade_value",
        "options",
        "expect_continue",
        "xff",
        "xfp",
        "xfh",
        "forwarded",
        "request_id",
    ):
        assert getattr(req, name) == read.get(name, getattr(untouched, name)), name


@pytest.mark.parametrize(
    ("fields", "limit", "status", "reason"),
    [
        ([(b"Host", b"a"), (b"Host", b"b")], 32768, 400, "bad_request"),
        ([(b"Expect", b"something")], 32768, 417, "expectation"),
        ([(b"X-A", b"x" * 10)], 14, 431, "headers_too_large"),  # 3 + 10 + 4 bytes
    ],
    ids=["second-host", "expect", "too-large"],
)
def test_read_field_rejects(
    fields: list[tuple[bytes, bytes]], limit: int, status: int, reason: str
) -> None:
    with pytest.raises(Rejected) as info:
        _read(*fields, limit=limit)
    assert (info.value.status, info.value.reason) == (status, reason)


def test_read_field_counts_the_limit_exactly_and_drops_trailers() -> None:
    req = _read((b"X-A", b"x" * 10), limit=17)  # 17 bytes exactly: allowed
    assert req.header_size == 17
    req.headers_done = True
    read_field(req, b"X-Trailer", b"1", 17)  # after the head: a trailer, dropped, not counted
    assert (_forwarded(req), req.header_size) == (b"X-A: xxxxxxxxxx\r\n", 17)


def test_check_version() -> None:
    assert check_version("1.0") is True
    assert check_version("1.1") is False
    with pytest.raises(Rejected) as info:
        check_version("2.0")
    assert (info.value.status, info.value.reason) == (505, "version")


@pytest.mark.parametrize(
    ("fields", "http10", "method", "wire", "body_kind"),
    [
        ([(b"Host", b"h")], False, b"GET", b"GET / HTTP/1.1\r\nHost: h\r\n", BODY_NONE),
        (
            [(b"Host", b"h"), (b"Transfer-Encoding", b" Chunked"), (b"X-A", b"1")],
            False,
            b"POST",
            b"POST / HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nTransfer-Encoding: chunked\r\n",
            BODY_CHUNKED,
        ),
        # The fields Connection names are dropped, whatever their case.
        (
            [(b"Connection", b"X-Secret"), (b"Host", b"h"), (b"x-secret", b"1"), (b"X-B", b"2")],
            False,
            b"GET",
            b"GET / HTTP/1.1\r\nHost: h\r\nX-B: 2\r\n",
            BODY_NONE,
        ),
        # HTTP/1.0 without Host: the address the client reached.
        ([], True, b"GET", b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n", BODY_NONE),
    ],
    ids=["get", "chunked", "connection-named", "http10-no-host"],
)
def test_finish_head(
    fields: list[tuple[bytes, bytes]], http10: bool, method: bytes, wire: bytes, body_kind: int
) -> None:
    req = _read(*fields)
    req.http10 = http10
    finish_head(req, method, b"127.0.0.1:8080")
    assert (b"".join(req.head), req.method, req.body_kind) == (wire, method, body_kind)


@pytest.mark.parametrize(
    ("fields", "method", "status", "reason"),
    [
        ([(b"Host", b"h")], b"CONNECT", 501, "method"),
        (
            [(b"Host", b"h"), (b"Transfer-Encoding", b"gzip, chunked")],
            b"POST",
            501,
            "transfer_encoding",
        ),
        ([], b"GET", 400, "bad_request"),  # HTTP/1.1 without Host
    ],
    ids=["connect", "other-coding", "no-host"],
)
def test_finish_head_rejects(
    fields: list[tuple[bytes, bytes]], method: bytes, status: int, reason: str
) -> None:
    with pytest.raises(Rejected) as info:
        finish_head(_read(*fields), method, b"127.0.0.1:8080")
    assert (info.value.status, info.value.reason) == (status, reason)


def test_add_upgrade_puts_upgrade_back_and_ends_keep_alive() -> None:
    req = _read((b"Host", b"h"), (b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"))
    finish_head(req, b"GET", b"")
    add_upgrade(req)
    assert req.keep_alive is False
    assert b"".join(req.head).endswith(b"Host: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n")


def test_drop_named() -> None:
    head = [
        b"GET",
        b" ",
        b"/",
        b" HTTP/1.1\r\n",
        b"A",
        b": ",
        b"1",
        b"\r\n",
        b"b",
        b": ",
        b"2",
        b"\r\n",
    ]
    assert drop_named(head, [b"a"]) == [*head[:4], *head[8:]]
    assert drop_named(head, [b"c"]) == head


@pytest.mark.parametrize(
    ("kwargs", "block"),
    [
        # An untrusted peer: what it sent is not passed, the block is the balancer's own.
        (
            {},
            b"X-Forwarded-For: 10.0.0.9\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: h:80\r\n"
            b'Forwarded: for=10.0.0.9;proto=http;host="h:80"\r\n',
        ),
        # A trusted one: appended to what it sent.
        (
            {"xff": b"1.1.1.1", "xfp": b"https", "xfh": b"a.example", "forwarded": b"for=1.1.1.1"},
            b"X-Forwarded-For: 1.1.1.1, 10.0.0.9\r\nX-Forwarded-Proto: https\r\n"
            b"X-Forwarded-Host: a.example\r\n"
            b'Forwarded: for=1.1.1.1, for=10.0.0.9;proto=http;host="h:80"\r\n',
        ),
    ],
    ids=["untrusted", "trusted"],
)
def test_forwarding_block(kwargs: dict[str, bytes], block: bytes) -> None:
    assert forwarding_block(b"10.0.0.9", b"for=10.0.0.9;proto=http", b"h:80", **kwargs) == block


def test_forwarding_block_without_host_or_with_a_quote_in_it() -> None:
    assert forwarding_block(b"::1", b'for="[::1]";proto=http', None) == (
        b'X-Forwarded-For: ::1\r\nX-Forwarded-Proto: http\r\nForwarded: for="[::1]";proto=http\r\n'
    )
    # A Host that would break out of the quoted string is not copied into Forwarded.
    assert forwarding_block(b"p", b"for=p", b'a"b').endswith(b"Forwarded: for=p\r\n")


class _NoCallbacks:
    pass


@pytest.mark.parametrize(
    ("data", "status", "reason"),
    [
        (b"FOO / HTTP/1.1\r\nHost: a\r\n\r\n", 501, "method"),  # well-formed, unknown
        (b"get / HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request"),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            400,
            "bad_chunk",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            400,
            "smuggling",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            400,
            "smuggling",
        ),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505, "version"),
        (b"GET / HTTP/1.1\r\nHost a\r\n\r\n", 400, "bad_request"),
    ],
    ids=[
        "unknown-method",
        "bad-method",
        "bad-chunk",
        "cl-and-te",
        "two-cl",
        "h2-preface",
        "bad-field",
    ],
)
def test_classify_parser_errors(data: bytes, status: int, reason: str) -> None:
    parser = httptools.HttpRequestParser(_NoCallbacks())
    with pytest.raises(httptools.HttpParserError) as info:
        parser.feed_data(data)
    assert classify(info.value, data) == (status, reason)


def test_classify_unknown_method_needs_the_message_start() -> None:
    # Without the bytes the message began with, a method cannot be judged well-formed.
    parser = httptools.HttpRequestParser(_NoCallbacks())
    with pytest.raises(httptools.HttpParserInvalidMethodError) as info:
        parser.feed_data(b"FOO / HTTP/1.1\r\n\r\n")
    assert classify(info.value, b"") == (400, "bad_request")


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
