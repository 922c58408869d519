"""Test backends and helpers for the proxy's socket tests.

- `Backend`: a small raw HTTP/1.1 server on a free port of 127.0.0.1 that records what it
  saw and counts its connections; its routes misbehave on purpose (`/slow`, `/reset`, ...).
- `ListRouter`, `RecordingMetrics`: stand-ins for the core's Router and Metrics that make
  routing predictable (the first backend not excluded) and record every call.
- `Client`: a raw HTTP/1.1 client over one connection, parsing with httptools.
- `running_proxy`: a ProxyServer in the test's own event loop.
- Run as a script (`python tests/balancer/backends.py URL...`), it serves a ProxyServer on
  uvloop in its own process and prints its port: the memory test watches that process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import httptools

from balancer import Backend, Decision, NoBackendAvailable, ProxyOptions, ProxyServer

__all__ = [
    "Client",
    "HttpBackend",
    "ListRouter",
    "RecordingMetrics",
    "Response",
    "Seen",
    "running_proxy",
    "silent_port",
]

_CHUNK = 65536


@contextlib.contextmanager
def silent_port() -> Iterator[int]:
    """A port whose connects stay in flight: it listens, but its accept queue (backlog 0,
    room for one) is full and never drained, so Linux drops every further SYN."""
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port: int = listener.getsockname()[1]
        filler.connect(("127.0.0.1", port))
        yield port


# -- the stand-ins for the core --------------------------------------------------------


class ListRouter:
    """Routes every request to the first backend that is not excluded."""

    def __init__(self, urls: Sequence[str], *, set_cookie: bytes | None = None) -> None:
        self.backends = [Backend(url) for url in urls]
        self.set_cookie = set_cookie
        self.calls: list[tuple[str, bytes | None, frozenset[str]]] = []

    def decide(
        self,
        client_ip: str,
        cookie_header: bytes | None,
        exclude: frozenset[str] = frozenset(),
        now: float = -1.0,
    ) -> Decision:
        self.calls.append((client_ip, cookie_header, exclude))
        for backend in self.backends:
            if backend.id not in exclude:
                return Decision(backend, self.set_cookie)
        raise NoBackendAvailable("every backend is excluded")

    def learn(self, head: bytes, backend_id: str) -> None:
        raise AssertionError("no Decision of a ListRouter asks to learn")

    def looked_up(self, session: bytes, backend_id: str | None) -> None:
        raise AssertionError("no Decision of a ListRouter asks to look a session up")


@dataclass
class RecordingMetrics:
    done: list[tuple[str, int]] = field(default_factory=list)
    retries: list[str] = field(default_factory=list)
    failovers: int = 0
    repins: list[str] = field(default_factory=list)
    rejections: list[str] = field(default_factory=list)
    opened: int = 0
    closed: int = 0

    def request_done(self, backend_id: str, status: int, seconds: float) -> None:
        assert seconds >= 0
        self.done.append((backend_id, status))

    def retried(self, backend_id: str) -> None:
        self.retries.append(backend_id)

    def failover(self) -> None:
        self.failovers += 1

    def repinned(self, reason: str) -> None:
        self.repins.append(reason)

    def rejected(self, reason: str) -> None:
        self.rejections.append(reason)

    def connection_opened(self) -> None:
        self.opened += 1

    def connection_closed(self) -> None:
        self.closed += 1


@contextlib.asynccontextmanager
async def running_proxy(
    urls: Sequence[str],
    options: ProxyOptions | None = None,
    *,
    router: ListRouter | None = None,
) -> AsyncIterator[tuple[ProxyServer, ListRouter, RecordingMetrics]]:
    """A ProxyServer on a free port in this event loop, shut down on exit.

    Without `options`, a request no backend can take is answered 503 at once
    (`queue_timeout=0`, not the 3 s wait): the queue's tests pass their own options.
    """
    router = router if router is not None else ListRouter(urls)
    metrics = RecordingMetrics()
    server = ProxyServer(router, metrics, options or ProxyOptions(queue_timeout=0.0))
    await server.start("127.0.0.1", 0)
    try:
        yield server, router, metrics
    finally:
        await server.shutdown()


# -- the backend -----------------------------------------------------------------------


@dataclass
class Seen:
    """A request as a backend received it (the body only for routes that keep it)."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes = b""

    def header(self, name: str) -> str | None:
        values = [value for key, value in self.headers if key == name]
        return ", ".join(values) if values else None


class HttpBackend:
    """A raw HTTP/1.1 server; see the module docstring. Routes (by path prefix):

    `/echo` the body back; `/chunked` a chunked answer; `/sink` counts the body, answers its
    size; `/stream/N` N bytes (`?chunked` for chunked); `/slow` never answers; `/reset`
    resets the connection; `/cut` half a body, then a reset; `/wait/MS` answers after MS
    milliseconds (a slow backend: `in_progress` and its `peak` count such requests at once);
    `/until-close` a body ended by closing; `/http10` an HTTP/1.0 answer, then a close;
    `/interim` a 103 then the answer; `/early` a 413 before reading the body; anything else
    `hello from NAME`. With `drop_second`, the second request on each connection is met by a
    close, as a backend closing an idle keep-alive connection would.
    """

    def __init__(self, name: str = "a", *, drop_second: bool = False) -> None:
        self.name = name
        self.drop_second = drop_second
        self.seen: list[Seen] = []
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._arrived = asyncio.Condition()
        self._writers: set[asyncio.StreamWriter] = set()
        self.in_progress = 0  # /wait requests being answered
        self.peak = 0  # the most of them at once

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> HttpBackend:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()

    async def wait_seen(self, count: int, within: float = 10.0) -> None:
        """Return once `count` requests have arrived (their heads, at least)."""
        async with asyncio.timeout(within), self._arrived:
            await self._arrived.wait_for(lambda: len(self.seen) >= count)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                served += 1
                if self.drop_second and served == 2:
                    writer.close()
                    return
                seen = _parse_head(head)
                self.seen.append(seen)
                async with self._arrived:
                    self._arrived.notify_all()
                if not await self._respond(seen, reader, writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            return
        except RuntimeError:
            return  # uvloop: a write after `__aexit__` aborted the transport
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _respond(
        self, seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer one request; returns whether the connection goes on."""
        path = seen.target
        if path.startswith("/sink"):
            size = 0
            async for piece in _body(reader, seen):
                size += len(piece)
            await _answer(writer, 200, str(size).encode())
            return True
        if path.startswith("/early"):
            await _answer(writer, 413, b"too big", close=True)
            return False
        body = b"".join([piece async for piece in _body(reader, seen)])
        seen.body = body
        if path.startswith("/echo"):
            await _answer(writer, 200, body)
        elif path.startswith("/chunked"):
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for piece in (b"hello ", b"chunked ", b"world"):
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            writer.write(b"0\r\nX-Trailer: yes\r\n\r\n")
        elif path.startswith("/stream/"):
            await _stream(writer, int(path[8:].split("?")[0]), chunked="?chunked" in path)
        elif path.startswith("/slow"):
            await reader.read()  # until the proxy gives up and closes
            return False
        elif path.startswith("/wait/"):
            self.in_progress += 1
            self.peak = max(self.peak, self.in_progress)
            try:
                await asyncio.sleep(int(path[6:].split("?")[0]) / 1000)  # the work it does
                await _answer(writer, 200, f"waited on {self.name}".encode())
            finally:
                self.in_progress -= 1
        elif path.startswith("/reset"):
            writer.transport.abort()
            return False
        elif path.startswith("/cut"):
            # Half of a 1,000-byte body, then a reset: a backend that fails mid-response.
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 500)
            await writer.drain()
            writer.transport.abort()
            return False
        elif path.startswith("/until-close"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it")
            await writer.drain()
            writer.close()
            return False
        elif path.startswith("/http10"):
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 6\r\nKeep-Alive: 5\r\n\r\nold ok")
            await writer.drain()
            writer.close()
            return False
        elif path.startswith("/interim"):
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n")
            await _answer(writer, 200, b"after hints")
        else:
            await _answer(writer, 200, f"hello from {self.name}".encode())
        await writer.drain()
        return seen.header("connection") != "close"


def _parse_head(head: bytes) -> Seen:
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.append((name.strip().lower(), value.strip()))
    return Seen(method, target, headers)


async def _body(reader: asyncio.StreamReader, seen: Seen) -> AsyncIterator[bytes]:
    length = seen.header("content-length")
    if length is not None:
        left = int(length)
        while left:
            piece = await reader.read(min(left, _CHUNK))
            if not piece:
                raise asyncio.IncompleteReadError(b"", left)
            left -= len(piece)
            yield piece
    elif seen.header("transfer-encoding") == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailers
                return
            left = size
            while left:
                piece = await reader.read(min(left, _CHUNK))
                if not piece:
                    raise asyncio.IncompleteReadError(b"", left)
                left -= len(piece)
                yield piece
            await reader.readexactly(2)


async def _answer(
    writer: asyncio.StreamWriter, status: int, body: bytes, *, close: bool = False
) -> None:
    extra = b"Connection: close\r\n" if close else b""
    writer.write(
        b"HTTP/1.1 %d X\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n%s"
        % (status, len(body), extra, body)
    )
    await writer.drain()


async def _stream(writer: asyncio.StreamWriter, size: int, *, chunked: bool) -> None:
    if chunked:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    else:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
    piece = b"x" * _CHUNK
    left = size
    while left:
        n = min(left, _CHUNK)
        data = piece if n == _CHUNK else piece[:n]
        writer.write(b"%x\r\n%s\r\n" % (n, data) if chunked else data)
        left -= n
        await writer.drain()
    if chunked:
        writer.write(b"0\r\n\r\n")


# -- the client ------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    body_size: int

    def header(self, name: str) -> str | None:
        key = name.lower().encode()
        values = [value.decode("latin-1") for k, value in self.headers if k == key]
        return ", ".join(values) if values else None

    @property
    def text(self) -> str:
        return self.body.decode()


class _Parsed:
    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self.done: list[Response] = []
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.size = 0
        self.in_body = False  # a body that may end with the connection
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self.headers, self.body, self.size = [], [], 0
        self.in_body = False

    def on_headers_complete(self) -> None:
        self.in_body = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.keep:
            self.body.append(body)

    def on_message_complete(self) -> None:
        self.in_body = False
        status = self.parser.get_status_code()
        self.done.append(Response(status, self.headers, b"".join(self.body), self.size))


class Client:
    """One raw connection to `port`: `send` bytes, `read` whole responses in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._parsed = _Parsed(keep=True)

    @classmethod
    async def open(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**20)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read(self, *, keep_body: bool = True, within: float = 10.0) -> Response:
        """The next response (1xx included); raises EOFError if the connection ends first."""
        self._parsed.keep = keep_body
        async with asyncio.timeout(within):
            while not self._parsed.done:
                data = await self.reader.read(_CHUNK)
                if not data and self._parsed.in_body:
                    self._parsed.on_message_complete()  # a body ended by the close
                elif not data:
                    raise EOFError("connection closed before a complete response")
                else:
                    self._parsed.parser.feed_data(data)
        return self._parsed.done.pop(0)

    async def read_head(self, within: float = 10.0) -> bytes:
        """The raw bytes of a response head (for a HEAD request, whose head has no body)."""
        async with asyncio.timeout(within):
            return await self.reader.readuntil(b"\r\n\r\n")

    async def closed(self, within: float = 10.0) -> bool:
        """Whether the peer closes (EOF or reset) within `within` seconds, reading nothing."""
        try:
            async with asyncio.timeout(within):
                data = await self.reader.read(_CHUNK)
        except ConnectionError:
            return True
        return data == b""

    async def request(self, data: bytes, *, keep_body: bool = True) -> Response:
        await self.send(data)
        return await self.read(keep_body=keep_body)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


# -- the proxy in a process of its own -------------------------------------------------


async def _serve_proxy(urls: list[str]) -> None:
    server = ProxyServer(ListRouter(urls), RecordingMetrics(), ProxyOptions())
    await server.start("127.0.0.1", 0)
    print(server.port, flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.shutdown()


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(_serve_proxy(sys.argv[1:]))
    else:
        uvloop.run(_serve_proxy(sys.argv[1:]))
    os._exit(0)
