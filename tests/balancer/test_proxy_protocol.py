"""The PROXY protocol (issue 17). The header reader (`datapath._proxy_protocol`),
table-driven: version 1 TCP4, TCP6 and UNKNOWN lines, version 2 TCP4, TCP6, LOCAL and with
TLVs; each valid header fed a byte at a time says "need more" until its last byte;
truncated, malformed and oversized headers are refused, an oversized one before its claimed
length arrives. Then a real balancer process with `--proxy-protocol`: the made-up clients of
v1 and v2 headers are what the backend's X-Forwarded-For, `--sticky ip` and the access log
see; an untrusted peer, a connection without a header and a header that never ends are
closed without an answer. The same with `--tls-cert` (the header, then the handshake:
`control._proxied_tls`), `--workers 2` too; and, in this process, its bound on connections
waiting for their header and its stop."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import signal
import ssl
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from balancer import ProxyOptions, ProxyServer
from balancer.control._proxied_tls import ProxiedTlsListener
from balancer.control._tls import CertificatePair, server_context
from balancer.datapath._proxy_protocol import (
    V1_MAX,
    V2_MAX_TLVS,
    BadProxyHeader,
    ProxyHeader,
    read_header,
)
from tests.balancer.backends import HttpBackend, ListRouter, RecordingMetrics, Seen
from tests.balancer.certs import Authority
from tests.helpers import async_wait_until
from tests.processes import Process, balancer

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def v2(
    source: str = "203.0.113.7",
    port: int = 51000,
    *,
    command: int = 0x21,
    family: int | None = None,
    tlvs: bytes = b"",
    length: int | None = None,
) -> bytes:
    """A version 2 header for `source:port` to 192.0.2.1:443 (or [2001:db8::1]:443)."""
    address = ipaddress.ip_address(source)
    if address.version == 4:
        block = address.packed + ipaddress.IPv4Address("192.0.2.1").packed
        family = 0x11 if family is None else family
    else:
        block = address.packed + ipaddress.IPv6Address("2001:db8::1").packed
        family = 0x21 if family is None else family
    block += struct.pack("!HH", port, 443) + tlvs
    size = len(block) if length is None else length
    return SIGNATURE + bytes([command, family]) + struct.pack("!H", size) + block


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


LONGEST_TCP6 = b"PROXY TCP6 " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n"
# The spec's longest line (107 bytes): UNKNOWN followed by the longest TCP6 fields.
MAX_V1 = LONGEST_TCP6.replace(b"TCP6", b"UNKNOWN")

VALID = [
    ("v1 tcp4", b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 443\r\n", "203.0.113.7", 51000),
    ("v1 tcp6", b"PROXY TCP6 2001:db8::7 2001:db8::1 51000 443\r\n", "2001:db8::7", 51000),
    ("v1 longest tcp6", LONGEST_TCP6, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
    ("v1 unknown", b"PROXY UNKNOWN\r\n", None, 0),
    ("v1 unknown, 107 bytes", MAX_V1, None, 0),
    ("v1 unknown, rest ignored", b"PROXY UNKNOWN ff 1.2.3.4 x y\r\n", None, 0),
    ("v2 tcp4", v2("203.0.113.7", 51000), "203.0.113.7", 51000),
    ("v2 tcp6", v2("2001:db8::7", 51000), "2001:db8::7", 51000),
    ("v2 local", v2(command=0x20), None, 0),
    ("v2 local, no block", SIGNATURE + b"\x20\x00\x00\x00", None, 0),
    (
        "v2 with tlvs (alpn, authority, aws vpce)",
        v2(tlvs=tlv(0x01, b"h2") + tlv(0x02, b"example.test") + tlv(0xEA, b"\x01vpce-0a1b")),
        "203.0.113.7",
        51000,
    ),
    (
        "v2 tlvs at the cap",
        v2(tlvs=tlv(0x04, b"\0" * (V2_MAX_TLVS + 216 - 12 - 3))),
        "203.0.113.7",
        51000,
    ),
    ("v2 udp4: the peer", v2(family=0x12), None, 0),
    ("v2 unspec: the peer", SIGNATURE + b"\x21\x00\x00\x04abcd", None, 0),
]


@pytest.mark.parametrize(
    ("header", "client", "port"), [v[1:] for v in VALID], ids=[v[0] for v in VALID]
)
def test_a_valid_header_names_its_client_and_its_length(
    header: bytes, client: str | None, port: int
) -> None:
    assert len(MAX_V1) == V1_MAX
    assert read_header(header + REQUEST) == ProxyHeader(client, port, len(header))


@pytest.mark.parametrize(
    ("header", "client", "port"), [v[1:] for v in VALID], ids=[v[0] for v in VALID]
)
def test_a_header_split_across_reads_needs_more_until_its_last_byte(
    header: bytes, client: str | None, port: int
) -> None:
    for end in range(len(header)):
        assert read_header(header[:end]) is None, end
    assert read_header(header) == ProxyHeader(client, port, len(header))


INVALID = [
    ("http, no header", REQUEST, "not_proxy_protocol"),
    ("tls client hello", b"\x16\x03\x01\x02\x00\x01", "not_proxy_protocol"),
    ("http starting with P", b"POST / HTTP/1.1\r\n\r\n", "not_proxy_protocol"),
    ("PROPFIND's beginning", b"PRO", None),
    ("v1 lower case", b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not_proxy_protocol"),
    ("v1 no CRLF in 107 bytes", b"PROXY TCP4 " + b"1" * 200, "v1_too_long"),
    ("v1 CRLF at byte 108", MAX_V1[:-2] + b"f\r\n", "v1_too_long"),
    ("v1 LF only", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n" + b"x" * 100, "v1_too_long"),
    ("v1 udp", b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "v1_bad_protocol"),
    ("v1 a field missing", b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "v1_malformed"),
    ("v1 two spaces", b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "v1_malformed"),
    ("v1 tcp4 with v6", b"PROXY TCP4 ::1 ::1 1 2\r\n", "v1_bad_address"),
    ("v1 tcp6 with v4", b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", "v1_bad_address"),
    ("v1 a name", b"PROXY TCP4 evil.test 5.6.7.8 1 2\r\n", "v1_bad_address"),
    ("v1 port too big", b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "v1_bad_port"),
    ("v1 port negative", b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "v1_bad_port"),
    ("v1 port empty", b"PROXY TCP4 1.2.3.4 5.6.7.8  2\r\n", "v1_bad_port"),
    (
        "v2 bad signature",
        b"\r\n\r\n\x00\r\nQUIT!" + b"\x21\x11\x00\x0c" + b"\0" * 12,
        "not_proxy_protocol",
    ),
    ("v2 version 1", v2(command=0x11), "v2_bad_command"),
    ("v2 unassigned command", v2(command=0x22), "v2_bad_command"),
    ("v2 bad command, early", SIGNATURE + b"\x2f", "v2_bad_command"),
    (
        "v2 length over the cap",
        SIGNATURE + b"\x21\x11" + struct.pack("!H", 216 + V2_MAX_TLVS + 1),
        "v2_too_long",
    ),
    ("v2 tcp4, 11 address bytes", v2(length=11)[:-1], "v2_short_addresses"),
    ("v2 tcp6, 35 address bytes", v2("2001:db8::7", length=35)[:-1], "v2_short_addresses"),
    ("v2 tlv longer than the header", v2(tlvs=b"\x01\x00\x05ab"), "v2_bad_tlv"),
    ("v2 tlv of 2 bytes", v2(tlvs=b"\x01\x00"), "v2_bad_tlv"),
]


@pytest.mark.parametrize(("data", "reason"), [v[1:] for v in INVALID], ids=[v[0] for v in INVALID])
def test_an_invalid_header_is_refused_with_its_reason(data: bytes, reason: str | None) -> None:
    if reason is None:
        # A valid beginning is not an error yet: its end decides (WebDAV's PROPFIND).
        assert read_header(data) is None
        with pytest.raises(BadProxyHeader) as info:
            read_header(data + b"PFIND / HTTP/1.1\r\n")
        assert info.value.reason == "not_proxy_protocol"
        return
    with pytest.raises(BadProxyHeader) as info:
        read_header(data)
    assert info.value.reason == reason


def test_a_truncated_header_is_only_ever_need_more() -> None:
    # Truncation is the caller's to time out (--header-timeout): never a false client.
    for header in (v2(), v2("2001:db8::7", tlvs=tlv(1, b"h2")), MAX_V1, LONGEST_TCP6):
        assert all(read_header(header[:end]) is None for end in range(len(header)))
    assert read_header(b"") is None


# -- a real balancer process -------------------------------------------------------------

GET = b"GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n"


def v1(source: str, port: int = 51000) -> bytes:
    family = b"TCP4" if ipaddress.ip_address(source).version == 4 else b"TCP6"
    destination = b"192.0.2.1" if family == b"TCP4" else b"2001:db8::1"
    return b"PROXY %s %s %s %d 443\r\n" % (family, source.encode(), destination, port)


async def _exchange(port: int, *pieces: bytes) -> bytes:
    """Send `pieces` (one write each) on a new connection; all it gets until closed (a
    reset, the balancer closing with our bytes unread, is a close too)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
        async with asyncio.timeout(10):
            return await reader.read()
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


def _port(lb: Process) -> int:
    return int(lb.url.rsplit(":", 1)[1])


def _access_records(lb: Process) -> list[dict[str, object]]:
    """The access log records of `lb`, once it has stopped (SIGTERM)."""
    lb.popen.send_signal(signal.SIGTERM)
    lb.popen.wait(15)
    lines = [line for line in lb.output().splitlines() if line.startswith("{")]
    return [r for r in map(json.loads, lines) if r.get("event") == "access"]


def _requests(backend: HttpBackend) -> list[Seen]:
    """What `backend` received but the health checks."""
    return [seen for seen in backend.seen if seen.target != "/healthz"]


@pytest.fixture
async def backends() -> AsyncIterator[tuple[HttpBackend, HttpBackend]]:
    async with HttpBackend("a") as a, HttpBackend("b") as b:
        yield a, b


PROXIED = ["--proxy-protocol", "--sticky", "ip", "--access-log", "--log-format", "json"]


@pytest.mark.anyio
async def test_the_client_behind_an_l4_balancer_is_the_one_seen(
    backends: tuple[HttpBackend, HttpBackend],
) -> None:
    a, b = backends
    urls = [a.url, b.url]
    with balancer(urls, *PROXIED, "--trusted-proxy", "127.0.0.1/32", admin=False) as (lb, _):
        port = _port(lb)
        # 12 made-up clients, v1 and v2, IPv4 and IPv6; each comes twice, the header and
        # the request in one write or in three.
        clients = [f"203.0.113.{i}" for i in range(1, 5)] + [f"2001:db8::{i}" for i in range(1, 5)]
        clients += [f"198.51.100.{i}" for i in range(1, 5)]
        served: dict[str, set[bytes]] = {}
        for i, client in enumerate(clients):
            header = v1(client) if i % 2 else v2(client)
            for pieces in ((header + GET,), (header[:7], header[7:] + GET[:5], GET[5:])):
                before = len(_requests(a)), len(_requests(b))
                response = await _exchange(port, *pieces)
                assert response.startswith(b"HTTP/1.1 200 "), response
                body = response.rsplit(b"\r\n\r\n", 1)[-1]
                served.setdefault(client, set()).add(body)
                after = len(_requests(a)), len(_requests(b))
                assert sum(after) == sum(before) + 1
                seen = _requests(a if after[0] > before[0] else b)[-1]
                assert seen.header("x-forwarded-for") == client
                forwarded = seen.header("forwarded") or ""
                assert (f'for="[{client}]"' if ":" in client else f"for={client}") in forwarded
        # --sticky ip hashes the made-up client: the same one always on the same backend,
        # and not all on one.
        assert all(len(bodies) == 1 for bodies in served.values()), served
        assert {body for bodies in served.values() for body in bodies} == {
            b"hello from a",
            b"hello from b",
        }
        records = _access_records(lb)
    logged = [record["client"] for record in records]
    assert logged == [client for client in clients for _ in range(2)]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("trusted", "pieces", "reason"),
    [
        # The peer (127.0.0.1) is not the L4 balancer: its header is not believed.
        ("10.0.0.0/8", (v1("203.0.113.9") + GET,), "proxy_untrusted"),
        ("10.0.0.0/8", (v2("203.0.113.9") + GET,), "proxy_untrusted"),
        # A trusted peer without a header, or with a broken one: not a client either.
        ("127.0.0.1/32", (GET,), "proxy_not_proxy_protocol"),
        (
            "127.0.0.1/32",
            (b"PROXY TCP4 203.0.113.9 192.0.2.1 99999 443\r\n" + GET,),
            "proxy_v1_bad_port",
        ),
        ("127.0.0.1/32", (v2("203.0.113.9", command=0x22) + GET,), "proxy_v2_bad_command"),
    ],
    ids=["untrusted v1", "untrusted v2", "no header", "bad v1 port", "bad v2 command"],
)
async def test_a_connection_that_is_not_from_the_l4_balancer_is_closed_unanswered(
    backends: tuple[HttpBackend, HttpBackend], trusted: str, pieces: tuple[bytes, ...], reason: str
) -> None:
    a, b = backends
    with balancer([a.url, b.url], *PROXIED, "--trusted-proxy", trusted) as (lb, admin):
        assert admin is not None
        # The readiness probe's connections count too (untrusted ones): the difference.
        before = await _rejected(admin, reason)
        assert await _exchange(_port(lb), *pieces) == b""
        assert await _rejected(admin, reason) == before + 1
    assert _requests(a) == _requests(b) == []


async def _rejected(admin: str, reason: str) -> float:
    """The balancer's count of connections refused for `reason` (its /metrics)."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{admin}/metrics")).text
    prefix = f'balancer_rejected_requests_total{{reason="{reason}"}} '
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    return float(lines[0].removeprefix(prefix)) if lines else 0.0


@pytest.mark.anyio
async def test_a_header_that_never_ends_is_closed_at_the_header_timeout(
    backends: tuple[HttpBackend, HttpBackend],
) -> None:
    a, _ = backends
    flags = ("--trusted-proxy", "127.0.0.1/32", "--header-timeout", "0.5")
    with balancer([a.url], *PROXIED, *flags, admin=False) as (lb, _):
        loop = asyncio.get_running_loop()
        started = loop.time()
        # Read until closed: `_exchange` fails the test after 10 s.
        assert await _exchange(_port(lb), v2("203.0.113.9")[:20]) == b""
        assert 0.4 < loop.time() - started < 5
    assert _requests(a) == []


# -- with TLS on the listener: PROXY header, then the TLS handshake ----------------------


@pytest.fixture
def leaf(tmp_path: Path) -> tuple[Authority, list[str]]:
    """A private CA and the --tls-cert/--tls-key flags of its certificate for app.test."""
    authority = Authority.create(tmp_path / "tls")
    cert = authority.issue("app", "app.test")
    return authority, ["--tls-cert", str(cert.cert), "--tls-key", str(cert.key)]


def _tls_context(authority: Authority) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(authority.cert))
    context.set_alpn_protocols(["http/1.1"])
    return context


async def _tls_exchange(port: int, header: bytes, context: ssl.SSLContext) -> bytes:
    """An L4 balancer's connection: `header` in clear, then TLS (verified, app.test) and GET;
    the response, read until closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(header)
        await writer.drain()
        async with asyncio.timeout(10):
            await writer.start_tls(context, server_hostname="app.test")
            writer.write(GET)
            return await reader.read()
    finally:
        writer.close()


@pytest.mark.anyio
@pytest.mark.parametrize("workers", [1, 2])
async def test_the_client_behind_an_l4_balancer_is_seen_over_tls(
    backends: tuple[HttpBackend, HttpBackend], leaf: tuple[Authority, list[str]], workers: int
) -> None:
    a, b = backends
    authority, tls = leaf
    flags = [*PROXIED, *tls, "--trusted-proxy", "127.0.0.1/32", "--workers", str(workers)]
    with balancer([a.url, b.url], *flags, admin=False) as (lb, _):
        context = _tls_context(authority)
        # 8 made-up clients, v1 and v2, IPv4 and IPv6, each twice.
        clients = [f"203.0.113.{i}" for i in range(1, 5)] + [f"2001:db8::{i}" for i in range(1, 5)]
        served: dict[str, set[bytes]] = {}
        for i, client in enumerate(clients):
            for _ in range(2):
                before = len(_requests(a)), len(_requests(b))
                header = v1(client) if i % 2 else v2(client)
                response = await _tls_exchange(_port(lb), header, context)
                assert response.startswith(b"HTTP/1.1 200 "), response
                served.setdefault(client, set()).add(response.rsplit(b"\r\n\r\n", 1)[-1])
                after = len(_requests(a)), len(_requests(b))
                assert sum(after) == sum(before) + 1
                seen = _requests(a if after[0] > before[0] else b)[-1]
                assert seen.header("x-forwarded-for") == client
                assert seen.header("x-forwarded-proto") == "https"
        # --sticky ip hashes the header's client: always the same backend, not all on one.
        assert all(len(bodies) == 1 for bodies in served.values()), served
        assert {body for bodies in served.values() for body in bodies} == {
            b"hello from a",
            b"hello from b",
        }


async def _tls_refused(port: int, header: bytes, context: ssl.SSLContext) -> bool:
    """Whether a connection that sends `header` (maybe none) and then a ClientHello is
    closed with no TLS session and no byte of HTTP."""
    try:
        response = await _tls_exchange(port, header, context)
    except (ssl.SSLError, ConnectionError):
        return True  # closed mid-handshake: EOF, reset, or an alert
    return response == b""


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("trusted", "header", "reason"),
    [
        ("10.0.0.0/8", v1("203.0.113.9"), "proxy_untrusted"),
        ("10.0.0.0/8", v2("203.0.113.9"), "proxy_untrusted"),
        # A plain TLS client: its ClientHello is not a PROXY header.
        ("127.0.0.1/32", b"", "proxy_not_proxy_protocol"),
        ("127.0.0.1/32", b"PROXY TCP4 203.0.113.9 192.0.2.1 99999 443\r\n", "proxy_v1_bad_port"),
        ("127.0.0.1/32", v2("203.0.113.9", command=0x22), "proxy_v2_bad_command"),
    ],
    ids=["untrusted v1", "untrusted v2", "plain TLS", "bad v1 port", "bad v2 command"],
)
async def test_over_tls_a_connection_not_from_the_l4_balancer_is_closed_unanswered(
    backends: tuple[HttpBackend, HttpBackend],
    leaf: tuple[Authority, list[str]],
    trusted: str,
    header: bytes,
    reason: str,
) -> None:
    a, _ = backends
    authority, tls = leaf
    with balancer([a.url], *PROXIED, *tls, "--trusted-proxy", trusted) as (lb, admin):
        assert admin is not None
        before = await _rejected(admin, reason)
        assert await _tls_refused(_port(lb), header, _tls_context(authority))
        assert await _rejected(admin, reason) == before + 1
        lb.popen.send_signal(signal.SIGTERM)
        lb.popen.wait(15)
        assert f"PROXY header refused from 127.0.0.1: {reason}" in lb.output()  # and logged
    assert _requests(a) == []


@pytest.mark.anyio
async def test_over_tls_a_header_that_never_ends_is_closed_at_the_header_timeout(
    backends: tuple[HttpBackend, HttpBackend], leaf: tuple[Authority, list[str]]
) -> None:
    a, _ = backends
    _, tls = leaf
    flags = ("--trusted-proxy", "127.0.0.1/32", "--header-timeout", "0.5")
    with balancer([a.url], *PROXIED, *tls, *flags, admin=False) as (lb, _):
        loop = asyncio.get_running_loop()
        for partial in (b"", v1("203.0.113.9")[:10], v2("203.0.113.9")[:20]):
            started = loop.time()
            assert await _exchange(_port(lb), partial) == b""
            assert 0.4 < loop.time() - started < 5
        # A stop with a header pending: a clean exit, no task left behind.
        reader, writer = await asyncio.open_connection("127.0.0.1", _port(lb))
        writer.write(v1("203.0.113.9")[:10])
        await writer.drain()
        lb.popen.send_signal(signal.SIGTERM)
        with contextlib.suppress(ConnectionResetError):  # a reset is a close too
            async with asyncio.timeout(10):
                assert await reader.read() == b""
        writer.close()
        assert lb.popen.wait(15) == 0
        output = lb.output()
    assert _requests(a) == []
    assert "Task was destroyed" not in output
    assert "Traceback" not in output


@pytest.mark.anyio
async def test_at_most_max_pending_connections_wait_for_their_header_and_a_stop_closes_them(
    leaf: tuple[Authority, list[str]],
) -> None:
    authority, tls = leaf
    pair = CertificatePair(Path(tls[1]), Path(tls[3]))
    options = ProxyOptions(
        proxy_protocol=True, trusted_proxies=("127.0.0.1/32",), header_timeout=10.0
    )
    async with HttpBackend("a") as backend:
        metrics = RecordingMetrics()
        server = ProxyServer(ListRouter([backend.url]), metrics, options)
        listener = ProxiedTlsListener(server, server_context(pair), max_pending=2)
        await listener.start("127.0.0.1", 0)
        server.adopt(listener, tls=True)
        port = server.port
        silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        await async_wait_until(lambda: listener.pending == 2, 5, "2 connections waiting")
        # A third waits in the kernel's backlog, not for its header: unread until a slot
        # is free.
        third = asyncio.ensure_future(
            _tls_exchange(port, v1("203.0.113.5"), _tls_context(authority))
        )
        done, _ = await asyncio.wait([third], timeout=0.5)
        assert not done
        assert listener.pending == 2
        silent[0][1].close()  # a slot frees: the third is read, answered
        async with asyncio.timeout(10):
            assert (await third).startswith(b"HTTP/1.1 200 ")
        assert backend.seen[-1].header("x-forwarded-for") == "203.0.113.5"
        # A stop closes the one still waiting, unanswered, and ends every task it ran.
        await server.shutdown()
        assert listener.pending == 0
        async with asyncio.timeout(5):
            assert await silent[1][0].read() == b""
        silent[1][1].close()
        assert metrics.rejections == []
        with pytest.raises(ConnectionRefusedError):  # and stops listening
            await asyncio.open_connection("127.0.0.1", port)
