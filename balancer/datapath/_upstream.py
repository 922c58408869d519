"""The backend-facing half of the data path: one HTTP/1.1 connection to a backend
(`UpstreamConnection`, an asyncio.Protocol with an httptools response parser) and a bounded
keep-alive pool of them per backend (`UpstreamPool`).

A connection serves one exchange at a time for a `ResponseHandler` (the client side): the
handler writes the request through `write`, the connection parses the response and calls the
handler back with its head, body pieces and end, or with an `UpstreamError`. It never
buffers a body: flow control is the handler's `pause_reading` / `resume_reading` on this
side and `upstream_pause_writing` / `upstream_resume_writing` on the other.

Foreign errors (OSError, httptools' parser errors, TimeoutError) are translated here into
`UpstreamConnectError`, `UpstreamTimeout` and `UpstreamProtocolError`, once.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections import deque
from collections.abc import Callable
from typing import Final, Protocol, cast

import httptools

from .._exceptions import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from ._http import BODY_CHUNKED, BODY_LENGTH, BODY_NONE, BODY_UNTIL_CLOSE, hop_by_hop_fields

__all__ = ["DEMAND_WINDOW", "PoolDemand", "ResponseHandler", "UpstreamConnection", "UpstreamPool"]

logger = logging.getLogger("balancer")

ConnectCallback = Callable[["UpstreamConnection | None", "UpstreamError | None"], None]


class ResponseHandler(Protocol):
    """What a connection calls back during an exchange (the client-facing protocol).

    Exactly one of `upstream_complete`, `upstream_upgraded` or `upstream_failed` ends an
    exchange; after it the connection has forgotten the handler (except that after
    `upstream_upgraded` it keeps calling `upstream_data` and finally `upstream_closed`).
    """

    def upstream_head(self, status: int, head: bytes, body: int) -> None:
        """The final response's head: `head` is the status line (HTTP/1.1) and the
        end-to-end fields, each line ending with CRLF (the handler adds its own fields and
        the blank line); `body` is one of the `BODY_*` framings."""

    def upstream_interim(self, status: int, head: bytes) -> None:
        """A 1xx response other than 101 (same `head` shape); the final one follows."""

    def upstream_body(self, data: bytes) -> None:
        """A piece of the response body, de-chunked."""

    def upstream_flush(self) -> None:
        """The bytes read so far are delivered: the handler may have held the head back,
        to write it with the first piece of the body, and must write it now."""

    def upstream_complete(self, conn: UpstreamConnection) -> None:
        """The response ended; `conn.reusable` says whether it may go back to the pool."""

    def upstream_response(
        self, conn: UpstreamConnection, status: int, head: bytes, body: bytes
    ) -> None:
        """A whole final response with a Content-Length `body`, read at once: what
        `upstream_head(status, head, BODY_LENGTH)`, `upstream_body(body)` (if any) and
        `upstream_complete(conn)` would say, in one call; the exchange has ended."""

    def upstream_upgraded(self, conn: UpstreamConnection, leftover: bytes) -> None:
        """After a 101 head: the connection is now a raw pipe; `leftover` came with it."""

    def upstream_data(self, data: bytes) -> None:
        """Raw bytes from an upgraded connection."""

    def upstream_closed(self) -> None:
        """An upgraded connection was closed by the backend."""

    def upstream_failed(self, error: UpstreamError, *, response_started: bool, stale: bool) -> None:
        """The exchange broke. `stale`: the connection had served earlier requests and
        nothing at all came back on it, the signature of a backend closing an idle
        keep-alive connection as we reused it."""

    def upstream_pause_writing(self) -> None:
        """The connection's write buffer is full: stop producing the request body."""

    def upstream_resume_writing(self) -> None:
        """The connection's write buffer drained."""


# RFC 9110 section 7.6.1: the fields of one connection only. Transfer-Encoding is
# re-derived from the framing we write; a 101 keeps Connection and Upgrade, which say what
# the connection becomes.
_HOP_BY_HOP_FIELD = hop_by_hop_fields()
_HOP_BY_HOP_BUT_UPGRADE = hop_by_hop_fields(keep=(b"connection", b"upgrade"))
_MAX_HEAD: Final = 1 << 20  # bytes: a response head longer than this is refused (502)
_TRANSFER_ENCODING = re.compile(rb"\r\ntransfer-encoding[ \t]*:", re.IGNORECASE)
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length[ \t]*:", re.IGNORECASE)


# The value of Content-Length in a head llhttp accepted (so one field, one valid number),
# the head without its blank line (so the field may end the string).
_CONTENT_LENGTH_VALUE = re.compile(
    rb"\r\ncontent-length[ \t]*:[ \t]*([0-9]{1,18})[ \t]*(?:\r|\Z)", re.IGNORECASE
)


class _Head:
    """What a final response head (as bytes) means, worked out once: see `_HEADS`."""

    __slots__ = ("body", "head", "keep_alive", "length", "status")

    def __init__(self, status: int, body: int, head: bytes, length: int, keep_alive: bool) -> None:
        self.status = status
        self.body = body  # the framing, one of BODY_*
        self.head = head  # as relayed (see `_relayed_head`)
        self.length = length  # the Content-Length value, or -1
        self.keep_alive = keep_alive  # llhttp's should_keep_alive() for it


# Final heads already relayed: head bytes -> _Head; see `on_headers_complete`. Bounded in
# entries and key length (~0.5 MiB at worst).
_HEADS: Final[dict[bytes, _Head]] = {}
_HEADS_MAX = 256
_HEAD_KEY_MAX = 1024


def _relayed_head(status: int, core: bytes, body: int | None) -> tuple[int, bytes]:
    """The body framing of a final response head (`body` if given, else read from its
    fields) and the head as relayed: without hop-by-hop fields, in HTTP/1.1, ending in
    CRLF. `core` is the status line and the fields, without the blank line."""
    if body is None:
        if _TRANSFER_ENCODING.search(core) is not None:
            body = BODY_CHUNKED  # llhttp accepted it: chunked is the final coding
        elif _CONTENT_LENGTH.search(core) is not None:
            body = BODY_LENGTH
        else:
            body = BODY_UNTIL_CLOSE
    if status == 101:
        core = _HOP_BY_HOP_BUT_UPGRADE.sub(b"", core)
    else:
        core = _HOP_BY_HOP_FIELD.sub(b"", core)
    if not core.startswith(b"HTTP/1.1 "):
        core = b"HTTP/1.1 " + core[9:]  # we speak HTTP/1.1 to the client
    return body, core + b"\r\n"


class _StopParsing(Exception):
    """Raised from a parser callback to stop after a HEAD response's head (httptools
    cannot be told that a response has no body; llhttp would wait for Content-Length
    bytes that never come)."""


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to a backend; see the module docstring."""

    __slots__ = (
        "_awaiting_head",
        "_body",
        "_head_request",
        "_head_start",
        "_keep_alive",
        "_parser",
        "_paused",
        "_pool",
        "_raw",
        "_received",
        "_status",
        "_stopped",
        "_upgraded",
        "counted",
        "handler",
        "last_activity",
        "requests",
        "transport",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        # Holds bound methods of this object, a reference cycle broken (None) when the
        # connection ends, as `_proxy._ClientConnection` does with its parser.
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.handler: ResponseHandler | None = None
        self.requests = 0  # exchanges started on this connection
        self.last_activity = 0.0  # clock time of the last byte read or written
        self._received = False  # any byte of the current exchange's response arrived
        self._status = 0  # the final response's status, once its head is parsed
        self._body = BODY_NONE
        # The response head is taken from the bytes, not field by field from the parser
        # (one Python call per field costs more than the regular expressions below):
        self._awaiting_head = False
        self._raw = b""  # bytes of this exchange until its final head is complete
        self._head_start = 0  # where in _raw the current head begins (after any 1xx)
        self._keep_alive = True
        self._head_request = False
        self._stopped = False
        self._upgraded = False
        self._paused = False
        self.counted = False  # among its pool's `live` connections (see `UpstreamPool`)

    def __repr__(self) -> str:
        state = "busy" if self.handler is not None else "idle"
        return f"<UpstreamConnection {self._pool.backend_id} [{state}, requests: {self.requests}]>"

    # -- used by the pool and the handler ---------------------------------------------------

    @property
    def reusable(self) -> bool:
        """Whether this connection may serve another exchange."""
        transport = self.transport
        return (
            self._keep_alive
            and not self._upgraded
            and self.handler is None
            and transport is not None
            and not transport.is_closing()
        )

    def start(self, handler: ResponseHandler, now: float, *, head_request: bool) -> None:
        """Begin an exchange for `handler` at clock time `now`; the caller writes the
        request next."""
        self.handler = handler
        self.requests += 1
        self.last_activity = now
        self._received = False
        self._head_request = head_request
        self._keep_alive = True
        self._status = 0
        self._awaiting_head = True
        self._raw = b""
        self._head_start = 0

    def release(self) -> None:
        """Hand the connection back to its pool after an exchange (kept or closed)."""
        self._pool.release(self)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def writelines(self, data: list[bytes] | tuple[bytes, ...]) -> None:
        assert self.transport is not None
        self.transport.writelines(data)

    def pause_reading(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def timed_out(self, now: float, timeout: float) -> bool:
        """Whether the current exchange has waited more than `timeout` seconds on the
        backend. Time spent paused by the client's back-pressure does not count."""
        if self.handler is None or self._upgraded:
            return False
        if self._paused:
            self.last_activity = now
            return False
        return now - self.last_activity > timeout

    def abandon(self) -> None:
        """Forget the handler and close: the exchange is given up (client gone, timeout)."""
        self.handler = None
        self._keep_alive = False
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        self.handler = None
        self._keep_alive = False
        if self.transport is not None:
            self.transport.close()

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self._pool.made(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._parser = None
        self._pool.discard(self)
        handler = self.handler
        if handler is None:
            return
        self.handler = None
        self._keep_alive = False
        if self._upgraded:
            handler.upstream_closed()
        elif self._body == BODY_UNTIL_CLOSE and self._status:
            # RFC 9112 section 6.3 (8): such a body ends when the server closes.
            handler.upstream_complete(self)
        else:
            reason = f": {exc}" if exc is not None else ""
            error = UpstreamProtocolError(
                self._pool.backend_id, f"connection closed before the response ended{reason}"
            )
            handler.upstream_failed(
                error,
                response_started=self._status != 0,
                stale=self.requests > 1 and not self._received,
            )

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost reports the rest

    def pause_writing(self) -> None:
        if self.handler is not None:
            self.handler.upstream_pause_writing()

    def resume_writing(self) -> None:
        if self.handler is not None:
            self.handler.upstream_resume_writing()

    def data_received(self, data: bytes) -> None:
        handler = self.handler
        if handler is None:
            # Bytes on an idle connection: the backend broke the protocol; never reuse it.
            self.close()
            return
        self._received = True
        if self._upgraded:
            handler.upstream_data(data)
            return
        if self._awaiting_head and not self._raw and not self._head_request:
            # The common case: a whole response in one read, with a head byte-identical to
            # one llhttp parsed and accepted before (`_HEADS`: the backend sends the same
            # head again and again, its Date changing once a second) and exactly
            # Content-Length bytes after it. Its meaning is known, and nothing follows it
            # to parse: relayed without the parser and its four Python callbacks (82,000 ->
            # 71,000 instructions a request, callgrind). Anything else (another head, a
            # partial or longer read) goes through llhttp below, still "before a message".
            end = data.find(b"\r\n\r\n")
            if end > 0:
                known = _HEADS.get(data[:end])
                if known is not None and known.length == len(data) - end - 4:
                    self._awaiting_head = False
                    if not known.keep_alive:
                        self._keep_alive = False
                    self.handler = None
                    handler.upstream_response(self, known.status, known.head, data[end + 4 :])
                    return
        self.last_activity = self._pool.clock()
        if self._awaiting_head:
            raw = self._raw + data if self._raw else data
            if len(raw) > _MAX_HEAD:
                self._fail(f"response head over {_MAX_HEAD} bytes")
                return
            self._raw = raw
        parser = self._parser
        if parser is None:
            return  # the connection ended
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgrade(handler, data[exc.args[0] :])
            return
        except httptools.HttpParserCallbackError:
            if not self._stopped:
                raise  # a bug in a handler: let asyncio log it, do not disguise it
            self._stopped = False
            self._parser = httptools.HttpResponseParser(self)
            self._finish()
        except httptools.HttpParserError as exc:
            self._fail(f"invalid response: {exc}")
            return
        if self._status >= 200 and self.handler is handler:
            handler.upstream_flush()  # a response head with its body still to come

    # -- httptools callbacks --------------------------------------------------------------

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None  # called by it
        status = parser.get_status_code()
        raw = self._raw
        start = self._head_start
        end = raw.find(b"\r\n\r\n", start)
        core = raw[start:end]  # the status line and the fields, without the blank line
        handler = self.handler
        assert handler is not None
        if 100 <= status < 200 and status != 101:
            self._head_start = end + 4
            handler.upstream_interim(status, _HOP_BY_HOP_FIELD.sub(b"", core) + b"\r\n")
            return
        self._awaiting_head = False
        self._raw = b""
        keep_alive = parser.should_keep_alive()
        if not keep_alive:
            self._keep_alive = False
        if self._head_request or status in (204, 304, 101):
            body, head = _relayed_head(status, core, BODY_NONE)
        else:
            # The framing and the relayed head are a function of the head's bytes, and a
            # backend sends the same head again and again (the Date changes once a
            # second): a dict lookup instead of two regex searches and a substitution
            # (~3.5 us a response); `data_received` relays a whole such response at once.
            known = _HEADS.get(core)
            if known is None:
                body, head = _relayed_head(status, core, None)
                length = -1
                if body == BODY_LENGTH:
                    found = _CONTENT_LENGTH_VALUE.search(core)
                    if found is not None:
                        length = int(found.group(1))
                known = _Head(status, body, head, length, keep_alive)
                if len(core) <= _HEAD_KEY_MAX:
                    if len(_HEADS) >= _HEADS_MAX:
                        _HEADS.clear()
                    _HEADS[core] = known
            body = known.body
            head = known.head
            if body == BODY_UNTIL_CLOSE:
                self._keep_alive = False
        self._status = status
        self._body = body
        handler.upstream_head(status, head, body)
        if self._head_request and self.handler is handler:
            self._stopped = True
            raise _StopParsing

    def on_body(self, body: bytes) -> None:
        if self.handler is not None:
            self.handler.upstream_body(body)

    def on_message_complete(self) -> None:
        if self._status < 200 or self._status == 101 or self._head_request:
            return  # an interim response (the final one follows), or handled elsewhere
        self._finish()

    # -- internals ------------------------------------------------------------------------

    def _finish(self) -> None:
        handler = self.handler
        self._status = 0
        self._body = BODY_NONE
        if handler is not None:
            self.handler = None
            handler.upstream_complete(self)

    def _upgrade(self, handler: ResponseHandler, leftover: bytes) -> None:
        if self._status != 101:
            self._fail("unexpected upgrade")
            return
        self._upgraded = True
        self._keep_alive = False
        handler.upstream_upgraded(self, leftover)

    def _fail(self, message: str) -> None:
        handler = self.handler
        started = self._status != 0
        self.abandon()
        if handler is not None:
            error = UpstreamProtocolError(self._pool.backend_id, message)
            handler.upstream_failed(error, response_started=started, stale=False)


DEMAND_WINDOW: Final = 5.0  # seconds: a pool remembers its peak of busy connections 5-10 s


class PoolDemand:
    """How many connections a backend's pool holds: as many as were busy at once recently,
    and at most `cap` of them idle. Pure (`now` is passed in); `UpstreamPool` does the I/O.

    The peak of busy connections is kept per window of `window` seconds, and the target is
    the larger of this window's peak and the last one's: a connection that was needed within
    the last `window` to 2 x `window` seconds is kept for the next burst, one that was not
    is closed. HAProxy's `http-reuse` pools estimate their need the same way, from the
    peak of used connections over the last `pool-purge-delay` (5 s). A fixed bound (nginx's
    `keepalive 32`) closes connections whenever more clients than the bound are busy at
    once, and opens them again on the next request: 0.51x nginx's requests/s with 64
    clients on one backend and a bound of 32 (docs/balancer.md, "Upstream keep-alive").
    The target is at least 1, so that a backend's first request after a quiet spell finds
    a connection (while the backend keeps it open).
    """

    __slots__ = ("_last", "_peak", "_since", "cap", "window")

    def __init__(self, cap: int, window: float = DEMAND_WINDOW, now: float = 0.0) -> None:
        if cap < 0:
            raise ValueError(f"cap must be >= 0, not {cap!r}")
        if not window > 0:
            raise ValueError(f"window must be > 0 seconds, not {window!r}")
        self.cap = cap  # idle connections at most (--upstream-keepalive)
        self.window = window  # seconds
        self._peak = 0  # the most busy at once in this window
        self._last = 0  # the same in the window before
        self._since = now  # clock time this window began

    def __repr__(self) -> str:
        return f"<PoolDemand [target: {self.target}, cap: {self.cap}]>"

    @property
    def target(self) -> int:
        """Connections (busy and idle together) worth holding now."""
        # Compares, not max(): mypyc calls the builtin (~100 instructions a request here).
        peak = self._peak if self._peak > self._last else self._last
        return peak if peak > 1 else 1

    def busy(self, count: int) -> None:
        """`count` connections are busy now (one was just taken)."""
        if count > self._peak:  # noqa: PLR1730 (per request: a compare, not a call of max)
            self._peak = count

    def tick(self, now: float, busy: int) -> None:
        """The clock, every fraction of a second: start a new window when this one is
        over (its first peak: the `busy` connections now)."""
        if now - self._since >= self.window:
            self._last = self._peak
            self._peak = busy
            self._since = now

    def keeps(self, live: int, idle: int) -> bool:
        """Whether a connection given back now is kept idle: `live` connections are open,
        itself included, and `idle` are idle already."""
        return idle < self.cap and live <= self.target

    def surplus(self, live: int, idle: int) -> int:
        """How many of the `idle` connections to close now, `live` being open."""
        over = max(live - self.target, idle - self.cap)
        return min(max(over, 0), idle)


class UpstreamPool:
    """Keep-alive connections to one backend, as many as `PoolDemand` says: the recent peak
    of busy ones, at most `max_idle` idle.

    `acquire` is synchronous (an idle connection or None); `connect` opens a new one and
    calls back `callback(conn, None)` or `callback(None, error)` with an
    `UpstreamConnectError` or `UpstreamTimeout`. Idle connections are reused last-in
    first-out, so those beyond the demand stay idle at the back, and `tick` closes them.
    """

    def __init__(
        self,
        backend_id: str,
        host: str,
        port: int,
        *,
        max_idle: int,
        connect_timeout: float,  # seconds
        clock: Callable[[], float],
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.backend_id = backend_id
        self.host = host
        self.port = port
        # An https:// backend's: the handshake is part of the connect (and its timeout),
        # with SNI and the certificate checked against `host`.
        self._tls = tls
        self.clock = clock
        self.opened = 0  # connections opened since the start, for tests and metrics
        self.demand = PoolDemand(max_idle, now=clock())
        self.live = 0  # connections open (busy, idle, or closing), not closed by us
        self._connect_timeout = connect_timeout
        self._idle: deque[UpstreamConnection] = deque()
        self._connecting: set[asyncio.Task[None]] = set()
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"<UpstreamPool {self.backend_id} {self.host}:{self.port} "
            f"[live: {self.live}, idle: {len(self._idle)}, connecting: {len(self._connecting)}, "
            f"target: {self.demand.target}]>"
        )

    @property
    def idle(self) -> int:
        return len(self._idle)

    def acquire(self) -> UpstreamConnection | None:
        """An idle connection that still looks open, or None."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            # An idle connection is keep-alive and free by construction (see `release`):
            # only the backend may have closed it since.
            transport = conn.transport
            if transport is not None and not transport.is_closing():
                self.demand.busy(self.live - len(idle))
                return conn
            self._close(conn)
        return None

    def release(self, conn: UpstreamConnection) -> None:
        """Give back a connection after its exchange: kept if reusable and the demand
        (`PoolDemand.keeps`) wants it."""
        if not self._closed and conn.reusable and self.demand.keeps(self.live, len(self._idle)):
            if conn._paused:
                # An idle connection must read, or it would not notice the backend closing it.
                conn.resume_reading()
            self._idle.append(conn)
        else:
            self._close(conn)

    def tick(self, now: float) -> None:
        """The clock, every fraction of a second (the proxy's timer): close the idle
        connections beyond the demand, the least recently used first."""
        idle = self._idle
        demand = self.demand
        demand.tick(now, self.live - len(idle))
        for _ in range(demand.surplus(self.live, len(idle))):
            self._close(idle.popleft())

    def made(self, conn: UpstreamConnection) -> None:
        """A connection was made (called from its `connection_made`)."""
        if not conn.counted:
            conn.counted = True
            self.live += 1

    def discard(self, conn: UpstreamConnection) -> None:
        """Forget a connection the backend closed (called from its `connection_lost`)."""
        if conn.counted:
            conn.counted = False
            self.live -= 1
        if conn in self._idle:
            self._idle.remove(conn)

    def _close(self, conn: UpstreamConnection) -> None:
        """Close a connection of the pool's own accord: no longer live from now on."""
        if conn.counted:
            conn.counted = False
            self.live -= 1
        conn.close()

    def connect(self, callback: ConnectCallback) -> None:
        """Open a new connection in the background; see the class docstring."""
        task = asyncio.get_running_loop().create_task(self._open(callback))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    def close(self) -> None:
        """Close the idle connections; busy ones finish, and are closed when released.

        Connects in flight are left to end (within the connect timeout) and call back as
        usual. Cancelling them would drop their callbacks, and with them the requests
        waiting: a task cancelled before its first step never runs its body."""
        self._closed = True
        while self._idle:
            self._close(self._idle.pop())

    async def _open(self, callback: ConnectCallback) -> None:
        loop = asyncio.get_running_loop()
        conn: UpstreamConnection | None = None
        error: UpstreamError | None = None
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    self._protocol,
                    self.host,
                    self.port,
                    ssl=self._tls,
                    server_hostname=None if self._tls is None else self.host,
                )
        except TimeoutError:
            error = UpstreamTimeout(
                self.backend_id,
                f"connect to {self.host}:{self.port} timed out after {self._connect_timeout}s",
            )
        except OSError as exc:
            error = UpstreamConnectError(
                self.backend_id, f"connect to {self.host}:{self.port} failed: {exc}"
            )
        else:
            self.opened += 1
            self.demand.busy(self.live - len(self._idle))
        try:
            callback(conn, error)
        except Exception:
            # A callback is data-path code: a bug there must be loud, and must not leak.
            logger.exception("connect callback for backend %s failed", self.backend_id)
            if conn is not None:
                conn.abandon()

    def _protocol(self) -> UpstreamConnection:
        return UpstreamConnection(self)
