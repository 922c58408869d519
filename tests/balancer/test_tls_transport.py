"""The data path's own TLS layer (`balancer.datapath._tls_transport.TlsTransport`), in the
process, on uvloop (the balancer's loop) and asyncio's, against blocking TLS clients on
127.0.0.1 in a thread: what it gives its application and what a client sees.

The application here answers each line with its upper-case copy, ``quit`` with ``bye`` and
a close, ``close`` with a close alone, ``linger`` with ``bye`` and a half-close
(`write_eof`). Clients use `suppress_ragged_eofs=False`, so that an end without
close_notify raises instead of reading as an end. Last, the data path itself on this
layer: a WebSocket through `ProxyServer` with TLS."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import websockets.asyncio.client
import websockets.asyncio.server

from balancer import ProxyOptions, ProxyServer
from balancer.control._tls import ALPN, CertificatePair, server_context
from balancer.datapath._tls_transport import Handshakes, TlsTransport
from tests.balancer.backends import ListRouter, RecordingMetrics
from tests.balancer.certs import Authority
from tests.helpers import async_wait_until, wait_for

pytestmark = pytest.mark.anyio

_LINGER = 10.0  # seconds: longer than any test waits, so that lingering ends by the client


@pytest.fixture(params=[True, False], ids=["uvloop", "asyncio"])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    return ("asyncio", {"use_uvloop": request.param})


class _Lines(asyncio.Protocol):
    """The application: upper-cases each line; ``quit`` is answered ``bye``, then closed;
    ``close`` is closed unanswered;
    ``linger`` is answered ``bye``, then half-closed (and closed when the client ends);
    ``big`` is answered with `BIG` bytes at once. Records what the transport told it."""

    BIG = 32 * 1024 * 1024  # more than any kernel's socket buffers take at once

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.paused = 0
        self.resumed = 0
        self.ended = False
        self.lost = False
        self.shut = False  # write_eof() was called
        self.late = 0  # data_received calls after write_eof()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.shut:
            self.late += 1
            return
        self.buffer += data
        while b"\n" in self.buffer:
            line, _, self.buffer = self.buffer.partition(b"\n")
            if line == b"quit":
                self.transport.write(b"bye\n")
                self.transport.close()
                return
            if line == b"close":
                self.transport.close()  # nothing written: the tickets go with close_notify
                return
            if line == b"linger":
                self.transport.write(b"bye\n")
                self.transport.write_eof()
                self.shut = True
                return
            if line == b"big":
                self.transport.write(b"x" * self.BIG)
            else:
                self.transport.write(line.upper() + b"\n")

    def pause_writing(self) -> None:
        self.paused += 1

    def resume_writing(self) -> None:
        self.resumed += 1

    def eof_received(self) -> bool | None:
        self.ended = True
        return None  # closed: the client is done, and so are we

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


@dataclass
class _Server:
    port: int
    client: ssl.SSLContext
    handshakes: Handshakes
    apps: list[_Lines] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # what `refused` was told


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[_Server]:
    authority = Authority.create(tmp_path / "tls")
    leaf = authority.issue("server", "localhost")
    context = server_context(CertificatePair(leaf.cert, leaf.key), ALPN)
    client = ssl.create_default_context(cafile=str(authority.cert))
    apps: list[_Lines] = []
    refused: list[str] = []
    handshakes = Handshakes(0.5, time.monotonic)

    def protocol() -> TlsTransport:
        apps.append(_Lines())
        plain = b"HTTP/1.1 400 plain\r\n\r\n"
        return TlsTransport(
            context, apps[-1], handshakes, _LINGER, plain_answer=plain, refused=refused.append
        )

    async def tick() -> None:  # as the data path's periodic deadline checks
        while True:
            handshakes.expire(time.monotonic())
            await asyncio.sleep(0.05)

    ticking = asyncio.create_task(tick())
    listener = await asyncio.get_running_loop().create_server(protocol, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        yield _Server(port, client, handshakes, apps, refused)
    finally:
        ticking.cancel()
        listener.close()
        for app in apps:
            if app.transport is not None:
                app.transport.abort()


@contextlib.contextmanager
def _connect(server: _Server) -> Iterator[ssl.SSLSocket]:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with server.client.wrap_socket(
        sock, server_hostname="localhost", suppress_ragged_eofs=False
    ) as tls:
        yield tls


def _read_to_end(tls: ssl.SSLSocket) -> bytes:
    """Everything until close_notify (SSLEOFError if the server ended without one)."""
    received = b""
    while chunk := tls.recv(65536):
        received += chunk
    return received


def _read_count(tls: ssl.SSLSocket, size: int) -> int:
    """Read `size` bytes; how many came before the end, if it came first."""
    buffer = bytearray(65536)
    count = 0
    while count < size:
        got = tls.recv_into(buffer, min(size - count, len(buffer)))
        if not got:
            break
        count += got
    return count


def _lines_in_pieces(server: _Server) -> bytes:
    with _connect(server) as tls:
        for byte in b"one\n":  # a TLS record, and with TCP_NODELAY a segment, a byte
            tls.sendall(bytes([byte]))
        tls.sendall(b"two\nthree\nquit\n")  # several lines in one record
        return _read_to_end(tls)


async def test_lines_sent_in_pieces_and_together_are_answered_then_closed_with_close_notify(
    server: _Server,
) -> None:
    answer = await asyncio.to_thread(_lines_in_pieces, server)
    # Ends with close_notify: without it the client's read raises SSLEOFError.
    assert answer == b"ONE\nTWO\nTHREE\nbye\n"
    assert server.refused == []
    await async_wait_until(lambda: server.apps[0].lost, 10, "the connection's end")


def _quit_and_hold(server: _Server) -> bytes:
    with _connect(server) as tls:
        tls.sendall(b"quit\n")
        answer = _read_to_end(tls)  # then close_notify
        # The client still holds its socket open: the server side is gone all the same
        # (it does not linger, as nginx does not after a complete exchange).
        wait_for(lambda: server.apps[0].lost, 5, "the end without the client's")
        return answer


async def test_a_close_after_the_answer_ends_the_connection_without_waiting_for_the_client(
    server: _Server,
) -> None:
    assert await asyncio.to_thread(_quit_and_hold, server) == b"bye\n"
    assert not server.apps[0].ended


def _linger_and_keep_sending(server: _Server) -> tuple[bytes, int]:
    with _connect(server) as tls:
        tls.sendall(b"linger\n")
        sent = 0
        # Sent after the server's end: unread input makes a closing socket send a reset,
        # which would destroy "bye" before the client reads it; a lingering one drops it.
        for _ in range(64):
            tls.sendall(b"z" * 16384)
            sent += 16384
        return _read_to_end(tls), sent


async def test_a_client_still_sending_when_the_server_half_closes_reads_its_last_answer(
    server: _Server,
) -> None:
    answer, sent = await asyncio.to_thread(_linger_and_keep_sending, server)
    assert (answer, sent) == (b"bye\n", 64 * 16384)
    # What the client sent after the server's end never reached the application; its
    # close did, and the lingering server side ended then, not at _LINGER.
    app = server.apps[0]
    await async_wait_until(lambda: app.lost, 5, "the end after the client's")
    assert app.ended
    assert app.late == 0


def _resumes(server: _Server, line: bytes) -> tuple[bytes, bool]:
    """(the answer to `line`, whether a second connection resumed the first's session)."""
    with _connect(server) as tls:
        tls.sendall(line)
        answer = _read_to_end(tls)
        session = tls.session
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    with server.client.wrap_socket(sock, server_hostname="localhost", session=session) as tls:
        tls.sendall(b"quit\n")
        _read_to_end(tls)
        return answer, bool(tls.session_reused)


@pytest.mark.parametrize("line", [b"quit\n", b"close\n"], ids=["answer", "close"])
async def test_session_tickets_held_for_the_answer_reach_the_client(
    server: _Server, line: bytes
) -> None:
    # TLS 1.3's tickets wait for the application's first write, or its close.
    answer, resumed = await asyncio.to_thread(_resumes, server, line)
    assert answer == (b"bye\n" if line == b"quit\n" else b"")
    assert resumed


def _big(server: _Server) -> int:
    with _connect(server) as tls:
        tls.sendall(b"big\n")
        return _read_count(tls, _Lines.BIG)


async def test_a_large_answer_pauses_the_application_until_the_client_reads_it(
    server: _Server,
) -> None:
    assert await asyncio.to_thread(_big, server) == _Lines.BIG
    app = server.apps[0]
    await async_wait_until(lambda: app.resumed == 1, 10, "resume_writing")
    assert app.paused == 1


def _silent(server: _Server) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        try:
            return sock.recv(100)
        except ConnectionResetError:
            return b"reset"


def _send_plain(server: _Server, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(data)
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(100):
                received += chunk
        return received


async def test_a_handshake_not_made_in_time_is_aborted_unseen_by_the_application(
    server: _Server,
) -> None:
    # Ended by the 0.5 s handshake timeout: the client's read returns within its own 10 s.
    assert await asyncio.to_thread(_silent, server) in (b"", b"reset")
    assert server.apps[0].transport is None
    assert server.refused == ["tls_handshake_timeout"]


def _after_the_handshake_deadline(server: _Server) -> bytes:
    with _connect(server) as tls:
        # The deadline checks have passed this connection's deadline (its handshake done).
        wait_for(lambda: len(server.handshakes) == 0, 5, "the handshake's deadline")
        tls.sendall(b"late\nquit\n")
        return _read_to_end(tls)


async def test_a_done_handshake_is_not_ended_at_its_deadline(server: _Server) -> None:
    assert await asyncio.to_thread(_after_the_handshake_deadline, server) == b"LATE\nbye\n"
    assert server.refused == []


async def test_a_failed_handshake_gets_an_alert_and_never_reaches_the_application(
    server: _Server,
) -> None:
    # A TLS record of type 22 (handshake) that is no ClientHello.
    answer = await asyncio.to_thread(_send_plain, server, b"\x16\x03\x01\x00\x04\x02\x00\x00\x00")
    assert answer[:1] == b"\x15"  # a TLS alert record, then the end
    assert server.apps[0].transport is None
    assert server.refused == ["tls_handshake_failed"]


async def test_plain_http_gets_the_plain_answer_and_never_reaches_the_application(
    server: _Server,
) -> None:
    request = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n"
    answer = await asyncio.to_thread(_send_plain, server, request)
    assert answer == b"HTTP/1.1 400 plain\r\n\r\n"
    assert server.apps[0].transport is None
    assert server.refused == ["tls_plain_http"]


async def _exchange(
    tls: TlsTransport,
    client: ssl.SSLObject,
    bios: tuple[ssl.MemoryBIO, ssl.MemoryBIO],
    sock: socket.socket,
) -> None:
    """Move the client's bytes to `tls` (as its TCP reads) and the server's from `sock`
    (the other end of its TCP transport) to the client."""
    incoming, outgoing = bios
    if outgoing.pending:
        tls.data_received(outgoing.read())
    loop = asyncio.get_running_loop()
    incoming.write(await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 5))


async def test_a_record_split_across_reads_reaches_the_application_whole(
    tmp_path: Path,
) -> None:
    authority = Authority.create(tmp_path / "tls")
    leaf = authority.issue("server", "localhost")
    app = _Lines()
    context = server_context(CertificatePair(leaf.cert, leaf.key), ALPN)
    tls = TlsTransport(context, app, Handshakes(5, time.monotonic), 5)
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.connect_accepted_socket(lambda: tls, ours)
    try:
        bios = (ssl.MemoryBIO(), ssl.MemoryBIO())
        client = ssl.create_default_context(cafile=str(authority.cert)).wrap_bio(
            *bios, server_hostname="localhost"
        )
        for _ in range(5):
            try:
                client.do_handshake()
                break
            except ssl.SSLWantReadError:
                await _exchange(tls, client, bios, theirs)
        line = b"x" * 16000 + b"\n"
        client.write(line)
        record = bios[1].read()  # one record: its plaintext is longer than its last bytes
        # Its TCP reads, given as the loop would: most of it, then the last 20 bytes.
        tls.data_received(record[:-20])
        tls.data_received(record[-20:])
        assert app.buffer == b""  # the whole line came, and was answered
        answer = b""
        while len(answer) < len(line):
            await _exchange(tls, client, bios, theirs)
            with contextlib.suppress(ssl.SSLWantReadError):
                while True:
                    answer += client.read(65536)
        assert answer == line.upper()
    finally:
        tls.abort()
        theirs.close()


async def test_a_websocket_over_tls_is_piped_both_ways_through_the_proxy(tmp_path: Path) -> None:
    """The data path on this layer: an upgrade's raw bytes, both ways, large ones too."""
    authority = Authority.create(tmp_path / "tls")
    leaf = authority.issue("proxy", "localhost")
    context = server_context(CertificatePair(leaf.cert, leaf.key), ALPN)
    client = ssl.create_default_context(cafile=str(authority.cert))

    async def echo(ws: websockets.asyncio.server.ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)

    async with websockets.asyncio.server.serve(echo, "127.0.0.1", 0) as ws_server:
        port = next(iter(ws_server.sockets)).getsockname()[1]
        metrics = RecordingMetrics()
        proxy = ProxyServer(ListRouter([f"http://127.0.0.1:{port}"]), metrics, ProxyOptions())
        await proxy.start("127.0.0.1", 0, tls=context)
        try:
            uri = f"wss://localhost:{proxy.port}/ws"
            async with websockets.asyncio.client.connect(uri, ssl=client) as ws:
                for text in ("one", "two", "x" * 200000):
                    await ws.send(text)
                    assert await ws.recv() == text
            assert metrics.done[-1][1] == 101
        finally:
            await proxy.shutdown()
