"""HTTP/2 to clients over TLS (issue 17), against a real balancer process on 127.0.0.1 with
certificates from a private CA (`certs`) and real HTTP/1.1 backends (`backends`): ALPN picks
h2 (http/1.1 still served, and only it with `--http2 off`); many streams on one connection;
stickiness per stream; a body larger than the client's window; an upload; the limits
(concurrent streams, header list, rapid reset) and protocol errors, each ending as RFC 9113
says, with no traceback in the balancer's log. The raw-frame tests drive the h2 library
directly over an ssl connection (`RawClient`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import h2.config
import h2.connection
import h2.events
import h2.settings
import httpx
import pytest
from h2.errors import ErrorCodes

from balancer.datapath._http2 import Http2Options, request_head
from tests.balancer.backends import HttpBackend
from tests.balancer.certs import Authority, Leaf
from tests.helpers import async_wait_for
from tests.processes import Process, balancer

pytestmark = pytest.mark.anyio


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    return Authority.create(tmp_path / "tls")


@pytest.fixture
def leaf(authority: Authority) -> Leaf:
    return authority.issue("a", "a.test")


@pytest.fixture
async def backends() -> AsyncIterator[tuple[HttpBackend, HttpBackend]]:
    async with HttpBackend("a") as a, HttpBackend("b") as b:
        yield a, b


def _tls(leaf: Leaf) -> list[str]:
    return ["--tls-cert", str(leaf.cert), "--tls-key", str(leaf.key)]


def _context(authority: Authority, *alpn: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(authority.cert))
    context.set_alpn_protocols(list(alpn))
    return context


def _stopped(process: Process) -> str:
    """Stop the balancer (SIGTERM) and return all it logged."""
    process.popen.send_signal(signal.SIGTERM)
    process.popen.wait(15)
    return process.output()


async def _exit(process: Process, within: float = 10.0) -> int:
    """Stop the balancer (SIGTERM) while this loop, its backends', runs on; its exit code."""
    process.popen.send_signal(signal.SIGTERM)

    async def exited() -> bool:
        return process.popen.poll() is not None

    await async_wait_for(exited, within, "the balancer to exit")
    return process.popen.returncode


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@dataclass
class Answer:
    """One stream as the client saw it."""

    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    ended: bool = False
    reset: ErrorCodes | int | None = None
    data_frames: int = 0

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)


class RawClient:
    """An HTTP/2 client made of the h2 library over an asyncio TLS connection: requests as
    frames, events read into `answers` (DATA acknowledged as read), `terminated` once the
    server's GOAWAY arrives."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, window: int | None
    ) -> None:
        self.reader = reader
        self.writer = writer
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.h2 = h2.connection.H2Connection(config)
        if window is not None:
            self.h2.local_settings = h2.settings.Settings(
                client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window}
            )
        self.h2.initiate_connection()
        self.answers: dict[int, Answer] = {}
        self.ack = True  # acknowledge DATA as it is read (else the windows stay shut)
        self.terminated: h2.events.ConnectionTerminated | None = None
        self.pings = 0  # PING acknowledgements read
        self.closed = False
        self.flush()

    @classmethod
    async def open(cls, port: int, authority: Authority, window: int | None = None) -> RawClient:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=_context(authority, "h2"), server_hostname="a.test"
        )
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        return cls(reader, writer, window)

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    def request(
        self,
        path: str,
        *,
        method: bytes = b"GET",
        headers: list[tuple[bytes, bytes]] | None = None,
        end: bool = True,
    ) -> int:
        stream_id: int = self.h2.get_next_available_stream_id()
        fields = [(b":method", method), (b":path", path.encode()), (b":scheme", b"https")]
        fields += [(b":authority", b"a.test"), *(headers or [])]
        self.h2.send_headers(stream_id, fields, end_stream=end)
        self.answers[stream_id] = Answer()
        self.flush()
        return stream_id

    async def read_until(self, done: Callable[[], bool], within: float = 10.0) -> None:
        """Read and handle events until `done()` holds or the connection ends."""
        async with asyncio.timeout(within):
            while not done() and not self.closed:
                data = await self.reader.read(65536)
                if not data:
                    self.closed = True
                    return
                for event in self.h2.receive_data(data):
                    self._handle(event)
                self.flush()

    def _handle(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            answer = self.answers[event.stream_id]
            answer.headers = list(event.headers or [])
            answer.status = int(dict(answer.headers)[b":status"])
        elif isinstance(event, h2.events.DataReceived):
            assert event.stream_id is not None
            assert event.data is not None
            self.answers[event.stream_id].body += event.data
            self.answers[event.stream_id].data_frames += 1
            if self.ack:
                length = event.flow_controlled_length or 0
                self.h2.acknowledge_received_data(length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            assert event.stream_id is not None
            self.answers[event.stream_id].ended = True
        elif isinstance(event, h2.events.StreamReset):
            assert event.stream_id is not None
            self.answers[event.stream_id].reset = event.error_code
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.terminated = event
        elif isinstance(event, h2.events.PingAckReceived):
            self.pings += 1

    async def answer(self, stream_id: int, within: float = 10.0) -> Answer:
        answer = self.answers[stream_id]
        await self.read_until(lambda: answer.ended or answer.reset is not None, within)
        return answer

    async def goaway(self, within: float = 10.0) -> ErrorCodes | int:
        """The error code of the server's GOAWAY, read within `within` seconds; closes."""
        await self.read_until(lambda: self.terminated is not None, within)
        self.close()
        assert self.terminated is not None, "the connection ended without a GOAWAY"
        code = self.terminated.error_code
        assert code is not None
        return code

    def close(self) -> None:
        self.writer.close()


async def test_alpn_picks_h2_and_a_stream_is_proxied_as_http11(
    authority: Authority, leaf: Leaf, backends: tuple[HttpBackend, HttpBackend]
) -> None:
    a, _ = backends
    with balancer([a.url], *_tls(leaf), "--access-log", admin=False) as (lb, _):
        url = f"https://127.0.0.1:{_port(lb.url)}/hello"
        async with httpx.AsyncClient(http2=True, verify=_context(authority)) as client:
            response = await client.get(url, headers={"cookie": "x=1"})
        assert response.http_version == "HTTP/2"
        assert response.status_code == 200
        assert response.text == "hello from a"
        seen = a.seen[-1]
        assert seen.target == "/hello"
        assert seen.header("host") == "127.0.0.1:" + str(_port(lb.url))
        assert seen.header("x-forwarded-proto") == "https"
        assert seen.header("x-forwarded-for") == "127.0.0.1"
        assert seen.header("cookie") == "x=1"
        assert seen.header("connection") is None  # hop-by-hop: ours, never forwarded
        # A client that offers only http/1.1 is served HTTP/1.1 on the same listener.
        async with httpx.AsyncClient(verify=_context(authority, "http/1.1")) as client:
            response = await client.get(url)
        assert response.http_version == "HTTP/1.1"
        assert response.text == "hello from a"
        log = _stopped(lb)
    assert "HTTP/2.0" in log  # the access log's protocol field
    assert "Traceback" not in log


async def test_many_streams_on_one_connection_and_stickiness_per_stream(
    authority: Authority, leaf: Leaf, backends: tuple[HttpBackend, HttpBackend]
) -> None:
    a, b = backends
    sticky = ["--sticky", "cookie:sid"]
    with balancer([a.url, b.url], *_tls(leaf), *sticky, admin=False) as (lb, _):
        url = f"https://127.0.0.1:{_port(lb.url)}"
        async with httpx.AsyncClient(http2=True, verify=_context(authority)) as client:
            # 100 streams at once on one connection (httpx multiplexes h2).
            first = await client.get(url + "/")
            pin = first.headers["set-cookie"].split(";")[0]  # a new client is pinned
            assert pin.startswith("lb_affinity=")
            responses = await asyncio.gather(
                *(client.get(url + "/wait/200", headers={"cookie": pin}) for _ in range(100))
            )
        assert all(r.http_version == "HTTP/2" and r.status_code == 200 for r in responses)
        # Every stream of the pinned client reached its backend, and at once (not in turn).
        assert {r.text for r in responses} == {"waited on " + first.text[-1]}
        assert max(a.peak, b.peak) > 10


async def test_a_body_larger_than_the_window_arrives_whole(
    authority: Authority, leaf: Leaf, backends: tuple[HttpBackend, HttpBackend]
) -> None:
    a, _ = backends
    with balancer([a.url], *_tls(leaf), admin=False) as (lb, _):
        # A 16 KiB window: 5 MB is over 300 windows, each sent after the client's update.
        client = await RawClient.open(_port(lb.url), authority, window=16384)
        try:
            length = client.request("/stream/5000000")
            chunked = client.request("/stream/3000000?chunked")
            head = client.request("/stream/1000", method=b"HEAD")
            client.flush()
            whole = await client.answer(length, within=30)
            assert (whole.status, len(whole.body)) == (200, 5_000_000)
            assert whole.header(b"content-length") == b"5000000"
            again = await client.answer(chunked, within=30)
            assert (again.status, len(again.body), again.reset) == (200, 3_000_000, None)
            assert again.header(b"transfer-encoding") is None
            head_answer = await client.answer(head)
            assert (head_answer.status, bytes(head_answer.body)) == (200, b"")
        finally:
            client.close()


async def test_request_bodies_are_streamed_to_the_backend(
    authority: Authority, leaf: Leaf, backends: tuple[HttpBackend, HttpBackend]
) -> None:
    a, _ = backends
    with balancer([a.url], *_tls(leaf), admin=False) as (lb, _):
        url = f"https://127.0.0.1:{_port(lb.url)}"
        body = bytes(range(256)) * 8192  # 2 MiB: 32 windows of the balancer's 64 KiB

        async def pieces() -> AsyncIterator[bytes]:
            for at in range(0, len(body), 100_000):
                yield body[at : at + 100_000]

        async with httpx.AsyncClient(http2=True, verify=_context(authority)) as client:
            sized = await client.post(url + "/sink", content=body)  # content-length
            streamed = await client.post(url + "/sink", content=pieces())  # none: chunked
            echoed = await client.post(url + "/echo", content=b"ping")
        assert (sized.http_version, sized.text) == ("HTTP/2", str(len(body)))
        assert streamed.text == str(len(body))
        assert echoed.content == b"ping"
        sinks = [seen for seen in a.seen if seen.target == "/sink"]
        assert [seen.header("content-length") for seen in sinks] == [str(len(body)), None]
        assert sinks[1].header("transfer-encoding") == "chunked"


async def test_a_stream_past_the_limit_is_refused_and_bad_headers_end_the_connection(
    authority: Authority, leaf: Leaf, backends: tuple[HttpBackend, HttpBackend]
) -> None:
    a, _ = backends
    with balancer([a.url], *_tls(leaf), admin=False) as (lb, _):
        port = _port(lb.url)
        # 129 streams at once: one more than SETTINGS_MAX_CONCURRENT_STREAMS (sent before
        # the client read the server's SETTINGS, so its own h2 did not stop it): that one
        # is refused alone (RFC 9113 section 5.1.2), the others answered, the connection kept.
        client = await RawClient.open(port, authority)
        streams = [client.request("/wait/300") for _ in range(129)]
        answers = [await client.answer(stream_id) for stream_id in streams]
        assert [answer.status for answer in answers[:128]] == [200] * 128
        assert answers[128].reset == ErrorCodes.REFUSED_STREAM
        one = await client.answer(client.request("/"))
        assert (one.status, bytes(one.body)) == (200, b"hello from a")
        assert one.data_frames == 1  # END_STREAM on the body's one DATA frame, not a second
        assert client.terminated is None
        client.close()
        # A header list over the limit (32 KiB, as HTTP/1.1's) but decoded whole (HPACK's
        # state intact): that stream alone is answered 431, as over HTTP/1.1.
        client = await RawClient.open(port, authority)
        big = await client.answer(client.request("/", headers=[(b"x-big", b"x" * 40_000)]))
        assert big.status == 431
        assert (await client.answer(client.request("/"))).status == 200
        assert client.terminated is None
        client.close()
        # Past what the balancer decodes at all (4 x the limit): HPACK cannot go on.
        client = await RawClient.open(port, authority)
        client.request("/", headers=[(b"x-big", b"x" * 140_000)])
        assert await client.goaway() == ErrorCodes.ENHANCE_YOUR_CALM
        assert not any(seen.header("x-big") for seen in a.seen)
        # A connection-specific field and an upper-case name: malformed (RFC 9113 8.2).
        for bad in ((b"connection", b"keep-alive"), (b"X-Upper", b"1")):
            client = await RawClient.open(port, authority)
            client.request("/", headers=[bad])
            assert await client.goaway() == ErrorCodes.PROTOCOL_ERROR
        # The balancer serves on.
        client = await RawClient.open(port, authority)
        assert (await client.answer(client.request("/"))).status == 200
        client.close()
        log = _stopped(lb)
    assert "Traceback" not in log


async def test_a_rapid_reset_flood_gets_goaway_and_costs_the_backends_little(
    authority: Authority, leaf: Leaf, backends: tuple[HttpBackend, HttpBackend]
) -> None:
    a, _ = backends
    with balancer([a.url], *_tls(leaf), admin=False) as (lb, _):
        client = await RawClient.open(_port(lb.url), authority)
        # Idle keep-alive connections to the backend first: a request routed to one is
        # written at once (with none, the connect would outlast the reset).
        warm = [client.request("/wait/100") for _ in range(20)]
        for stream_id in warm:
            assert (await client.answer(stream_id)).status == 200
        # 5,000 streams opened and reset at once (CVE-2023-44487), 50 a write.
        with contextlib.suppress(ConnectionError):
            for _ in range(100):
                for _ in range(50):
                    stream_id = client.request("/wait/1000")
                    client.h2.reset_stream(stream_id, ErrorCodes.CANCEL)
                client.flush()
                await client.writer.drain()
        assert await client.goaway() == ErrorCodes.ENHANCE_YOUR_CALM
        assert client.terminated is not None
        flood = [seen for seen in a.seen if seen.target == "/wait/1000"]
        print(f"GOAWAY after stream {client.terminated.last_stream_id}; backend saw {len(flood)}")
        assert len(flood) <= 200  # each reset stream cost the backend a request at most


async def test_a_reset_stream_abandons_its_backend_connection(
    authority: Authority, leaf: Leaf, backends: tuple[HttpBackend, HttpBackend]
) -> None:
    a, _ = backends
    with balancer([a.url], *_tls(leaf), admin=False) as (lb, _):
        client = await RawClient.open(_port(lb.url), authority, window=16384)
        big = client.request("/stream/20000000")
        client.flush()
        await client.read_until(lambda: len(client.answers[big].body) > 0)
        before = a.connections
        client.h2.reset_stream(big, ErrorCodes.CANCEL)
        client.flush()
        after = await client.answer(client.request("/"))
        assert after.status == 200
        # The half-read connection was not pooled: the next request opened another.
        assert a.connections == before + 1
        client.close()


async def test_http2_off_negotiates_http11(
    authority: Authority, leaf: Leaf, backends: tuple[HttpBackend, HttpBackend]
) -> None:
    a, _ = backends
    with balancer([a.url], *_tls(leaf), "--http2", "off", admin=False) as (lb, _):
        _, writer = await asyncio.open_connection(
            "127.0.0.1",
            _port(lb.url),
            ssl=_context(authority, "h2", "http/1.1"),
            server_hostname="a.test",
        )
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
        writer.close()
        async with httpx.AsyncClient(http2=True, verify=_context(authority)) as client:
            response = await client.get(f"https://127.0.0.1:{_port(lb.url)}/")
        assert (response.http_version, response.text) == ("HTTP/1.1", "hello from a")


async def test_a_connection_that_sends_no_request_is_closed_after_the_header_timeout(
    authority: Authority, leaf: Leaf, backends: tuple[HttpBackend, HttpBackend]
) -> None:
    a, _ = backends
    timeout = ["--header-timeout", "0.5"]
    with balancer([a.url], *_tls(leaf), *timeout, admin=False) as (lb, _):
        client = await RawClient.open(_port(lb.url), authority)  # the preface, no stream
        started = asyncio.get_running_loop().time()
        assert await client.goaway(within=5) == ErrorCodes.NO_ERROR
        waited = asyncio.get_running_loop().time() - started
        # As an HTTP/1.1 connection's first request must begin within --header-timeout.
        assert waited < 3, f"closed after {waited:.1f} s"


def _preface_then_hold(port: int, authority: Authority) -> ssl.SSLSocket:
    """An HTTP/2 connection that sends its preface and no stream, reads until the server's
    end (GOAWAY, then close_notify), and is returned open: nothing here closes it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    tls = _context(authority, "h2").wrap_socket(sock, server_hostname="a.test")
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    tls.sendall(client.data_to_send())
    while tls.recv(65536):
        pass
    return tls


async def test_after_goaway_a_client_that_never_closes_is_closed_when_the_linger_ends(
    authority: Authority, leaf: Leaf, backends: tuple[HttpBackend, HttpBackend]
) -> None:
    a, _ = backends
    timeout = ["--header-timeout", "0.5"]
    with balancer([a.url], *_tls(leaf), *timeout) as (lb, admin):
        assert admin is not None

        async def open_now(count: int) -> bool:
            async with httpx.AsyncClient() as http:
                metrics = (await http.get(admin + "/metrics")).text
            return f"\nbalancer_connections_active {count}.0\n" in metrics

        # The server's GOAWAY at the header timeout, then its half-close: it lingers for
        # what the client still sends. This client neither sends nor closes: the server
        # closes all the same, 2 s later (and a deadline check's tick), not never.
        held = await asyncio.to_thread(_preface_then_hold, _port(lb.url), authority)
        try:
            assert await open_now(1), "the lingering connection is counted"
            await async_wait_for(lambda: open_now(0), 5, "the end of the lingering connection")
        finally:
            held.close()


def test_a_stream_becomes_an_http11_head() -> None:
    pseudo = [(b":method", b"POST"), (b":scheme", b"https"), (b":path", b"/cart?x=1")]
    fields = [(b"cookie", b"sid=1"), (b"host", b"other"), (b"cookie", b"lb=2"), (b"a", b"b")]
    head = request_head([*pseudo, (b":authority", b"shop.test"), *fields], body=True)
    assert head == (
        b"POST /cart?x=1 HTTP/1.1\r\nhost: shop.test\r\ncookie: sid=1; lb=2\r\na: b\r\n"
        b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    )
    sized = request_head([*pseudo, (b"content-length", b"3"), (b"host", b"h")], body=True)
    assert sized == (
        b"POST /cart?x=1 HTTP/1.1\r\nhost: h\r\ncontent-length: 3\r\nconnection: close\r\n\r\n"
    )
    bare = request_head([(b":method", b"GET"), (b":path", b"/")], body=False)
    assert bare == b"GET / HTTP/1.1\r\nconnection: close\r\n\r\n"  # no Host: 400, as HTTP/1.1


def test_hpack_writes_no_debug_lines(caplog: pytest.LogCaptureFixture) -> None:
    # hpack logged each field (its value too) at DEBUG: ~27 calls a request, and a cookie
    # in the log wherever DEBUG was on. `_http2` (imported above) stops its logger at INFO.
    import hpack  # noqa: PLC0415 - h2's HPACK library, no use elsewhere here

    caplog.set_level(logging.DEBUG)
    fields = [(b":status", b"200"), (b"set-cookie", b"sid=secret")]
    assert hpack.Decoder().decode(hpack.Encoder().encode(fields), raw=True) == fields
    assert [r.getMessage() for r in caplog.records if r.name.startswith("hpack")] == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_concurrent_streams", 0),
        ("max_resets", 0),
        ("max_control_frames", 0),
        ("initial_window_size", 0),
        ("initial_window_size", 2**31),
        ("connection_window", 1000),
        ("reset_window", 0.0),
        ("reset_window", float("inf")),
    ],
)
def test_options_out_of_range_name_the_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        Http2Options(**cast(dict[str, Any], {field: value}))


async def test_a_cut_response_is_reset_and_a_shut_window_times_out(
    authority: Authority, leaf: Leaf, backends: tuple[HttpBackend, HttpBackend]
) -> None:
    a, _ = backends
    timeout = ["--upstream-response-timeout", "1"]
    with balancer([a.url], *_tls(leaf), *timeout, "--max-attempts", "1", admin=False) as (lb, _):
        client = await RawClient.open(_port(lb.url), authority, window=16384)
        # The backend fails mid-body: the stream is reset, never ended as if whole.
        cut = await client.answer(client.request("/cut"))
        assert (cut.status, cut.ended, cut.reset) == (200, False, ErrorCodes.INTERNAL_ERROR)
        assert len(cut.body) < 1000
        # A client that never opens its window again: the stream is reset after the
        # response timeout (1 s here), its backend connection dropped, the connection kept.
        client.ack = False
        started = asyncio.get_running_loop().time()
        stalled = await client.answer(client.request("/stream/5000000"), within=10)
        waited = asyncio.get_running_loop().time() - started
        assert stalled.reset == ErrorCodes.CANCEL
        assert len(stalled.body) == 16384  # one window, no more
        assert 1 <= waited < 5
        client.ack = True
        assert (await client.answer(client.request("/"))).status == 200
        client.close()


async def test_at_shutdown_open_streams_finish_and_new_ones_are_refused(
    authority: Authority, leaf: Leaf, backends: tuple[HttpBackend, HttpBackend]
) -> None:
    a, _ = backends
    with balancer([a.url], *_tls(leaf), admin=False) as (lb, _):
        client = await RawClient.open(_port(lb.url), authority)
        slow = client.request("/wait/1500")

        async def arrived() -> bool:
            return any(seen.target == "/wait/1500" for seen in a.seen)

        await async_wait_for(arrived, 5, "the slow request at the backend")
        lb.popen.send_signal(signal.SIGTERM)
        # New streams are refused once the balancer is shutting down (safe to retry
        # elsewhere: REFUSED_STREAM); the ones before are answered.
        refused = None
        for _ in range(200):
            answer = await client.answer(client.request("/"))
            if answer.reset is not None:
                refused = answer.reset
                break
            assert answer.status == 200
        assert refused == ErrorCodes.REFUSED_STREAM
        finished = await client.answer(slow)
        assert (finished.status, bytes(finished.body)) == (200, b"waited on a")
        assert await client.goaway() == ErrorCodes.NO_ERROR
        assert lb.popen.wait(10) == 0


def _rss(pid: int) -> int:
    """The resident memory of process `pid`, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_a_client_that_stops_reading_the_socket_holds_no_whole_body(
    authority: Authority, leaf: Leaf, backends: tuple[HttpBackend, HttpBackend]
) -> None:
    a, _ = backends
    with balancer([a.url], *_tls(leaf), admin=False) as (lb, _):
        # Windows as large as HTTP/2 allows, so that only the socket holds the body back.
        client = await RawClient.open(_port(lb.url), authority, window=2**31 - 1)
        client.h2.increment_flow_control_window(2**31 - 1 - 65535)
        before = _rss(lb.popen.pid)
        client.request("/stream/400000000")  # 400 MB, and the client reads no byte more
        loop = asyncio.get_running_loop()
        grown, deadline = 0, loop.time() + 3
        while loop.time() < deadline:  # what the balancer holds, watched for 3 s
            grown = max(grown, _rss(lb.popen.pid) - before)
            await asyncio.sleep(0.05)
        client.writer.transport.abort()  # a close would wait to send TLS's close_notify
        # The socket's buffers and a window's worth a stream at most, not the body.
        assert grown < 64 << 20, f"the balancer grew by {grown >> 20} MiB"
        assert await _exit(lb) == 0


async def test_a_ping_flood_from_a_client_that_reads_nothing_is_bounded_and_cut(
    authority: Authority, leaf: Leaf, backends: tuple[HttpBackend, HttpBackend]
) -> None:
    a, _ = backends
    with balancer([a.url], *_tls(leaf), admin=False) as (lb, _):
        client = await RawClient.open(_port(lb.url), authority)
        assert (await client.answer(client.request("/"))).status == 200
        before = _rss(lb.popen.pid)
        # 1,000,000 PINGs (CVE-2019-9512), 17 bytes each, written as raw frames, and not a
        # byte read meanwhile: each asks the balancer for a 17-byte acknowledgement (17 MB,
        # more than the kernel's socket buffers take).
        ping = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"pingpong"
        grown, sent = 0, 0
        with contextlib.suppress(ConnectionError, TimeoutError):
            async with asyncio.timeout(5):  # a balancer that stops reading stops the writes
                for _ in range(1000):
                    client.writer.write(ping * 1000)
                    await client.writer.drain()
                    sent += 1000
                    grown = max(grown, _rss(lb.popen.pid) - before)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 3
        while loop.time() < deadline:  # what the balancer holds, watched for 3 s
            grown = max(grown, _rss(lb.popen.pid) - before)
            await asyncio.sleep(0.05)
        print(f"sent {sent} PINGs unread: the balancer grew {grown / 2**20:.1f} MiB")
        code = await client.goaway(within=10)
        print(f"{client.pings} acknowledged before the GOAWAY")
        assert code == ErrorCodes.ENHANCE_YOUR_CALM
        assert client.pings <= 1000  # the limit (1,000 in 10 s): the rest are not answered
        assert grown < 8 << 20, f"the balancer grew by {grown >> 20} MiB"
        log = _stopped(lb)
    assert "Traceback" not in log


async def test_a_client_whose_answers_pile_up_is_not_read_until_they_drain(
    authority: Authority, leaf: Leaf, backends: tuple[HttpBackend, HttpBackend]
) -> None:
    a, _ = backends
    with balancer([a.url], *_tls(leaf), admin=False) as (lb, _):
        # Windows wide open and a large body asked, not a byte of it read: the balancer's
        # write buffer goes over its high-water mark.
        client = await RawClient.open(_port(lb.url), authority, window=2**31 - 1)
        client.h2.increment_flow_control_window(2**31 - 1 - 65535)
        client.request("/stream/400000000")

        async def stopped_reading() -> bool:  # the client's own buffer full: it reads no more
            return not cast(asyncio.Transport, client.writer.transport).is_reading()

        await async_wait_for(stopped_reading, 5, "the client's buffer to fill")
        # Then 40 MB of frames of an unknown type (h2 reads and ignores them: no answer, no
        # limit counts them), as fast as the balancer takes them.
        frame = b"\x00\x40\x00\x20\x00\x00\x00\x00\x00" + b"u" * 16384
        sent = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(3):
                while sent < 40_000_000:
                    client.writer.write(frame * 16)
                    await client.writer.drain()
                    sent += len(frame) * 16
        client.writer.transport.abort()
        print(f"{sent / 1e6:.1f} MB of the client's taken in 3 s")
        # Stopped once the kernel's buffers are full, not read on (its answers would pile up).
        assert sent < 20_000_000
        assert await _exit(lb) == 0
