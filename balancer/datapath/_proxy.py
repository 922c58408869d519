"""The client-facing half of the data path: `ProxyServer` accepts connections, and one
`_ClientConnection` (an asyncio.Protocol driven by httptools callbacks, as uvicorn's
`httptools_impl`) per connection relays each request to the backend the router decides.

Per connection, requests are handled one at a time: pipelined ones are parsed into a queue
while reading is paused. Bodies are streamed both ways as they arrive (re-framed when
chunked), never collected: a side that produces is paused while the other side's transport
buffer is above its high-water mark. Timeouts are deadlines checked by one loop timer per
server, so a request allocates no timer and no Task (only opening a backend connection runs
a Task). The status codes the balancer answers itself are chosen here, except those for a
request head that breaks a rule, which `_http` reads and checks; whether a failed attempt is
tried again is `_retry`'s decision.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Final, Protocol, cast

import httptools

from .._exceptions import (
    NoBackendAvailable,
    PinnedBackendDown,
    UpstreamConnectError,
    UpstreamError,
    UpstreamTimeout,
)
from ._access import pin_outcome
from ._backend import Backend, BackendState
from ._http import (
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
    error_response,
    finish_head,
    forwarded_for,
    forwarding_block,
    new_request_id,
    read_field,
)
from ._pool import Pool
from ._proxy_protocol import BadProxyHeader, read_header
from ._retry import CUT, FAILOVER, IDEMPOTENT, STALE_RETRY, RetryBudget, after_failure
from ._router import Decision
from ._tls_transport import Handshakes, TlsTransport
from ._upstream import UpstreamConnection, UpstreamPool

__all__ = ["ClientSession", "Http2Factory", "ListenerTls", "ProxyOptions", "ProxyServer", "tune_gc"]

logger = logging.getLogger("balancer")
access_logger = logging.getLogger("balancer.access")


# Young objects a gen-0 collection waits for (CPython's default: 700). A request allocates
# a few dozen container objects, nearly all freed by reference counting, so the default
# runs a collection every ~20 requests for nothing.
_GC_GEN0 = 20_000


def tune_gc() -> None:
    """Call once, after start-up: move what start-up allocated (modules, the admin app)
    out of the collector's sight, and collect the young generation less often: cheap
    insurance (docs/architecture.md, "Measured facts")."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(_GC_GEN0, gen1, gen2)


class RequestRouter(Protocol):
    """The routing decision the data path needs (`balancer.Router`)."""

    def decide(
        self,
        client_ip: str,
        cookie_header: bytes | None,
        exclude: frozenset[str] = frozenset(),
        now: float = -1.0,
    ) -> Decision: ...

    def learn(self, head: bytes, backend_id: str) -> None: ...

    def looked_up(self, session: bytes, backend_id: str | None) -> None: ...


# Asks the shared pin store (`--pin-store`) for a session's backend id and calls the second
# argument with it, or with None (none, an error, a timeout): `control._pin_store.PinStore`.
PinLookup = Callable[[bytes, Callable[[str | None], None]], None]


class ClientSession(Protocol):
    """A client connection as `ProxyServer` tracks it: `_ClientConnection` (HTTP/1.1), or
    the HTTP/2 one it hands a connection over to when ALPN chose h2 (`_http2`)."""

    def check_deadline(self, now: float) -> None: ...
    def shutdown(self) -> None: ...
    def abort(self) -> None: ...


# Makes the protocol that serves a connection whose TLS handshake chose HTTP/2 (ALPN h2),
# given the server and the client's address: `_http2.Http2Options.factory`.
Http2Factory = Callable[["ProxyServer", str], asyncio.Protocol]


class ListenerTls(Protocol):
    """A TLS listener's context as the data path reads it: once for each new connection,
    so that one swapped in (a certificate reload: control._tls.TlsListener) serves the next
    handshake."""

    @property
    def context(self) -> ssl.SSLContext: ...


class ProxyMetrics(Protocol):
    """The counters the data path reports to (`balancer.datapath._metrics.Metrics`)."""

    def request_done(self, backend_id: str, status: int, seconds: float) -> None: ...
    def retried(self, backend_id: str) -> None: ...
    def failover(self) -> None: ...
    def rejected(self, reason: str) -> None: ...
    def connection_opened(self) -> None: ...
    def connection_closed(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ProxyOptions:
    """Limits and timeouts of the data path; these defaults are the balancer's (its
    `Settings` take them from here). Raises ValueError naming the field for a value out of
    range (`balancer._config` checks every flag first and names the flag)."""

    max_request_line: int = 8192  # bytes of the request target (414 above)
    max_header_bytes: int = 32768  # bytes of all header fields together (431 above)
    header_timeout: float = 10.0  # seconds from a request's first byte to its head's end (408)
    idle_timeout: float = 75.0  # seconds a keep-alive client connection may wait (nginx: 75)
    connect_timeout: float = 3.0  # seconds to open a connection to a backend
    # Seconds a backend may stay silent with a request, then 504 (Envoy's route default:
    # 15; nginx: 60, which kept interactive clients on a hung backend past their own).
    response_timeout: float = 15.0
    # Idle keep-alive connections per backend at most: a pool keeps as many as were busy
    # at once in the last 5-10 s (`_upstream.PoolDemand`), this cap only past 1,024
    # requests in flight on one backend, slow ones then (at ~20,000 req/s a worker, ~50 ms
    # each), for which a connect's ~50 us is little. nginx's fixed `keepalive 32` cost 0.51x
    # its own req/s with 64 clients on one backend (docs/balancer.md, "Upstream keep-alive").
    keepalive_per_backend: int = 1024
    retry_ratio: float = 0.2  # retries the budget earns per request (Finagle's RetryBudget)
    retry_floor: float = 10.0  # retries per second the budget earns regardless of traffic
    # Attempts per request, the first included, each on another backend; a refused connect
    # is not one (the backend never saw the request).
    max_attempts: int = 3
    trusted_proxies: tuple[str, ...] = ()  # networks (CIDR) allowed to send X-Forwarded-*
    # Every connection starts with a PROXY protocol header (v1 or v2) naming its client, and
    # comes from `trusted_proxies` (the L4 balancers): the header is read first, within
    # header_timeout, else the connection is closed unanswered (`_ClientConnection`'s
    # `_read_proxy_header`).
    proxy_protocol: bool = False
    shutdown_deadline: float = 30.0  # seconds in-flight requests get to finish at shutdown
    # One INFO record per request on the logger "balancer.access", its fields (`ACCESS_FIELDS`)
    # in the record's `balancer_fields` (control._log formats them: --log-format,
    # --access-log-format).
    access_log: bool = False
    # Seconds a request waits when no backend can take it, re-routed every _QUEUE_TICK
    # (HAProxy's `timeout queue`): a worker restarting is then a delay, not a 503.
    # 0 = 503 at once.
    queue_timeout: float = 3.0
    # A response header naming why its client was re-pinned (`Decision.reason`), added to
    # re-pinned responses only; None: no header (--repin-header).
    repin_header: str | None = None

    def __post_init__(self) -> None:
        for name in ("max_request_line", "max_header_bytes", "max_attempts"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} must be at least 1, not {value!r}")
        for name in ("header_timeout", "idle_timeout", "connect_timeout", "response_timeout"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a number of seconds > 0, not {value!r}")
        for name in ("shutdown_deadline", "queue_timeout"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a number of seconds >= 0, not {value!r}")
        for name in ("keepalive_per_backend", "retry_ratio", "retry_floor"):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"{name} must be >= 0, not {value!r}")
        TrustedProxies(self.trusted_proxies)  # raises ValueError naming trusted_proxies
        if self.proxy_protocol and not self.trusted_proxies:
            raise ValueError("proxy_protocol needs trusted_proxies: the L4 balancers' networks")


# Why reading from a client is paused; reading resumes when no reason is left.
_PAUSE_UPSTREAM: Final = 1  # the backend connection's write buffer is full
_PAUSE_BUFFER: Final = 2  # the body held while no backend connection is ready is full
_PAUSE_PIPELINE: Final = 4  # a pipelined request waits for the one before it
_PAUSE_STOPPED: Final = 8  # the connection is being closed: nothing more is read

# What the connection's deadline is for.
_DEADLINE_NONE: Final = 0
_DEADLINE_HEADER: Final = 1  # the request's headers must be complete (408)
_DEADLINE_IDLE: Final = 2  # a keep-alive connection waits for its next request
_DEADLINE_LINGER: Final = 3  # closing: the client gets time to read our answer
_DEADLINE_PROXY: Final = 4  # the PROXY header must be complete (closed unanswered)

_NO_EXCLUSION: Final[frozenset[str]] = frozenset()
_LINGER: Final = 2.0  # seconds: how long a closing connection reads and discards
_UP: Final = BackendState.UP
_QUEUE_TICK: Final = 0.05  # seconds between routing attempts of queued requests
_HELD_LIMIT: Final = 65536  # bytes of request body held before a backend takes it; replay limit
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_LAST_CHUNK: Final = b"0\r\n\r\n"
_ERRORS: Final = {
    (status, keep_alive): error_response(status, keep_alive=keep_alive)
    for status in (400, 408, 414, 417, 431, 501, 502, 503, 504, 505)
    for keep_alive in (True, False)
}

# The answer to plain HTTP sent to a TLS listener (`_tls_transport`), as nginx gives one.
_PLAIN_HTTP_TO_TLS: Final = error_response(
    400, keep_alive=False, reason="This port speaks HTTPS: the request came as plain HTTP."
)


class _Request(RequestHead):
    """One request on a client connection, from its first byte to its answer: its head
    (`RequestHead`, read by `_http`) and its relaying.

    Defaults are class attributes, so that a request costs only the fields it changes."""

    wire = b""  # the joined head, once complete
    complete = False  # the whole request (body included) was read
    continue_sent = False
    # Body bytes as framed on the wire: held until a backend connection is ready, and
    # kept for a replay while they total at most _HELD_LIMIT; None once that is passed.
    body: list[bytes] | None
    body_size = 0
    client_ip = ""
    started = 0.0  # clock time of the first byte
    decision: Decision | None = None
    backend: Backend | None = None  # the backend of the attempt in progress
    last_backend = ""
    last_error: UpstreamError | None = None
    excluded: frozenset[str]  # backends a retry must avoid
    attempts = 0
    stale_retried = False
    sent = False  # the head was written to a backend connection
    status = 0
    response_started = False
    answered = False  # the response was written in full
    # For the access log only (set while it is on): the clock when the last attempt began,
    # and when its request was written to a backend connection; body bytes read.
    upstream_start = -1.0
    upstream_sent = -1.0
    body_in = 0

    def __init__(self, started: float) -> None:
        super().__init__()
        self.body = []
        self.started = started
        # Set here, not as a class default: mypyc (scripts/build-fast) takes only literal
        # defaults.
        self.excluded = _NO_EXCLUSION


class _ClientConnection(asyncio.Protocol):
    """One client connection; see the module docstring. The ResponseHandler of
    `_upstream` for the backend connection of its current request."""

    def __init__(self, server: ProxyServer) -> None:
        self._server = server
        self._options = server.options
        self._router = server.router
        self._metrics = server.metrics
        self._clock = server.clock
        self._budget = server.budget
        # The parser holds bound methods of this protocol, a reference cycle: it is broken
        # (None) when the connection ends, so the connection, its transport and under TLS
        # its OpenSSL state are freed then, not by a later collection (docs/architecture.md,
        # "Measured facts").
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self._peer = "unknown"
        self._trusted = False
        self._local_host = b""  # the address the client reached: `_reached`, when needed
        self._peer_b = b"unknown"  # the peer's address, as bytes
        self._for_node = b""  # `for=...;proto=http` of Forwarded
        self._block_host: bytes | None = None  # the Host that `_block` was built for
        self._block = b""  # the forwarding header lines for an untrusted peer
        self._parsing: _Request | None = None
        self._active: _Request | None = None
        self._pending: deque[_Request] = deque()
        self._upstream: UpstreamConnection | None = None
        self._paused = 0
        self._write_paused = False
        self._write_paused_at = 0.0  # clock time the client stopped reading, if it did
        self._deadline = math.inf
        self._deadline_kind = _DEADLINE_NONE
        self._closing = False  # close after the current response
        self._stopped = False  # answered for good: nothing more is parsed
        # Raw bytes, not HTTP: upgraded, both ways with `_upstream`; or, without an
        # `_upstream`, the PROXY header is being read (`_read_proxy_header`). One flag, so
        # that the header costs a request nothing: data_received tests it anyway.
        self._piped = False
        self._proxy_header = b""  # the PROXY header's bytes read so far
        # The PROXY header was read before this protocol began (`ProxyServer.proxied`: with
        # TLS, before the handshake), and the client it names, if any.
        self._header_read = False
        self._header_client: str | None = None
        self._held: list[bytes] | None = None  # client bytes after an upgrade request's head
        self._chunked_out = False
        self._head_out: bytes | None = None  # a response head held for the body's first piece
        self._head_bytes = 0
        self._begun = 0  # messages begun during the current feed
        self._http11_hint = False  # see data_received
        self._reject_after = 0  # the status to answer once the requests before are answered
        self._starting = False  # `_next` is starting a queued request
        self._log = self._options.access_log
        self._out = 0  # bytes written to the client while the access log is on (bytes_out)
        self._out_mark = 0  # `_out` when the last request was logged
        self._http2 = False  # one HTTP/2 stream's request (`_http2`): the access log says so

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self._peer = str(peer[0])
        if self._header_client is not None:
            self._peer = self._header_client  # the PROXY header's, read before the handshake
        http2 = self._server.http2
        if http2 is not None and _chose_h2(transport):
            # The handshake chose HTTP/2: its protocol serves the connection from now on.
            # Here, not in how the listener is made, so any listener gets it; an HTTP/1.1
            # connection pays a test a connection, nothing a request.
            protocol = http2(self._server, self._peer)
            self._parser = None  # this object is done with: nothing to keep alive
            transport.set_protocol(protocol)
            protocol.connection_made(transport)
            return
        self._set_peer(self._peer)
        self._server.connection_made(self)
        self._set_deadline(_DEADLINE_HEADER, self._options.header_timeout)
        if self._options.proxy_protocol and not self._header_read:
            if self._trusted:
                self._piped = True  # until the header is read
                self._deadline_kind = _DEADLINE_PROXY
            else:
                self._refuse_proxy("proxy_untrusted")

    def connection_lost(self, exc: Exception | None) -> None:
        self._parser = None
        self._server.connection_lost(self)
        self._deadline = math.inf
        conn = self._upstream
        self._upstream = None
        if conn is not None:
            if self._piped:
                conn.close()  # a pipe: the backend still gets what we already sent it
            else:
                conn.abandon()  # mid-exchange: the connection cannot be reused
        req = self._active
        self._active = None
        if req is not None and req.backend is not None:
            # The client left mid-exchange (HTTP 499 in nginx's terms): not the backend's fault.
            now = self._clock()
            self._end_attempt(req, now, failed=False)
            req.status = req.status or 499
            self._record(req, now)

    def eof_received(self) -> bool | None:
        if self._piped and self._upstream is not None:
            return None  # the pipe ends when either side closes
        if self._active is not None and self._active.complete and not self._piped:
            # A client may half-close after its request (`Connection: close` and shutdown):
            # keep the connection to send the response; it is closed after that.
            self._closing = True
            return True
        return None

    def pause_writing(self) -> None:
        # The client reads slower than the backend sends: stop reading the backend.
        self._write_paused = True
        self._write_paused_at = self._clock()
        if self._upstream is not None:
            self._upstream.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._upstream is not None:
            self._upstream.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._piped:
            upstream = self._upstream
            if upstream is None:
                self._read_proxy_header(data)
            else:
                upstream.write(data)
            return
        if self._stopped:
            return  # lingering before close: discard
        held = self._held
        if held is not None:
            # After an upgrade request: the new protocol's bytes wait for the 101.
            held.append(data)
            self._pause(_PAUSE_BUFFER)
            return
        req = self._parsing
        if req is not None and not req.headers_done:
            # httptools buffers a header name or value until it ends: bound that memory.
            self._head_bytes += len(data)
            limit = self._options.max_request_line + self._options.max_header_bytes
            if self._head_bytes > limit + 262144:
                self._reject(431, "headers_too_large")
                return
        if req is None:
            self._begun = 0  # 1 once the feed began a message: that one began at its start
            # Whether the chunk's first line ends in " HTTP/1.1": if llhttp accepts that
            # line as a request line, the request is HTTP/1.1, and on_headers_complete
            # need not ask the parser (whose get_http_version() formats a string, ~0.7 us).
            eol = data.find(b"\r\n")
            self._http11_hint = eol > 9 and data.startswith(b" HTTP/1.1", eol - 9)
        else:
            self._begun = 2
        parser = self._parser
        if parser is None:
            return  # the connection ended: what the loop still delivers goes nowhere
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgrade_requested(data[exc.args[0] :])
        except httptools.HttpParserCallbackError as exc:
            rejected = exc.__context__
            if not isinstance(rejected, Rejected):
                raise
            self._reject(rejected.status, rejected.reason)
        except httptools.HttpParserError as exc:
            # Only a message that began at the chunk's start can be matched against it.
            self._reject(*classify(exc, data if self._begun == 1 else b""))

    # -- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        now = self._clock()
        req = _Request(now)
        self._parsing = req
        self._begun += 1
        self._head_bytes = 0
        if self._active is not None:
            # Pipelining: parse what was read, but read no more until this one's turn.
            self._pause(_PAUSE_PIPELINE)
        self._deadline_kind = _DEADLINE_HEADER
        self._deadline = now + self._options.header_timeout

    def on_url(self, url: bytes) -> None:
        req = self._parsing
        assert req is not None
        req.head[2] += url
        if len(req.head[2]) > self._options.max_request_line:
            raise Rejected(414, "uri_too_long")

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self._parsing
        assert req is not None
        read_field(req, name, value, self._options.max_header_bytes)

    def on_headers_complete(self) -> None:
        req = self._parsing
        assert req is not None
        req.headers_done = True
        parser = self._parser
        assert parser is not None  # called by it
        if self._begun != 1 or not self._http11_hint:
            req.http10 = check_version(parser.get_http_version())
        if req.host is None and req.http10 and not self._local_host:
            self._local_host = self._reached()  # the only request that needs it
        finish_head(req, parser.get_method(), self._local_host)
        req.keep_alive = parser.should_keep_alive()
        # llhttp sees an upgrade only in a request with an Upgrade field (CONNECT is
        # refused by finish_head): without one, the call is not needed.
        if req.upgrade_value is not None and parser.should_upgrade():
            add_upgrade(req)
        self._add_forwarding(req)
        req.wire = b"".join(req.head)
        self._deadline = math.inf
        if self._active is None:
            self._begin(req, req.started)
        else:
            self._pending.append(req)

    def on_body(self, body: bytes) -> None:
        req = self._parsing
        assert req is not None
        req.body_in += len(body)
        if req.answered:
            return  # the response is out already: the rest of the body is discarded
        data: tuple[bytes, ...] = chunk(body) if req.body_kind == BODY_CHUNKED else (body,)
        self._send_body(req, data, len(body))

    def on_message_complete(self) -> None:
        req = self._parsing
        assert req is not None
        self._parsing = None
        req.complete = True
        if req.body_kind == BODY_CHUNKED and not req.answered:
            self._send_body(req, (_LAST_CHUNK,), 0)
        if req.answered and req is self._active:
            self._next(req, self._clock())

    # -- the exchange ---------------------------------------------------------------------

    def _begin(self, req: _Request, now: float) -> None:
        """Start relaying `req`; `now` is the clock's time, or about."""
        self._active = req
        self._budget.requests += 1
        if self._paused and not self._pending and self._parsing in (None, req):
            self._resume(_PAUSE_PIPELINE)
        self._route(req, now)

    def _route(self, req: _Request, now: float) -> None:
        try:
            decision = self._router.decide(req.client_ip, req.cookie, req.excluded)
        except NoBackendAvailable as exc:
            if now - req.started < self._options.queue_timeout and not self._server.shutting_down:
                # None can take it now; one may in a moment (a worker restarting, a
                # backend coming back): wait in the queue rather than fail.
                self._server.park(self, req)
                return
            error = req.last_error
            if isinstance(exc, PinnedBackendDown):
                # --on-pinned-down strict: the session's backend is down (or failed this
                # request, `error`); come back later.
                self._edge_error(req, 503, exc.backend_id, str(exc), exc.retry_after)
            elif error is not None:
                self._edge_error(req, _status_for(error), error.backend_id, str(error))
            else:
                self._edge_error(req, 503, "", "no backend available")
            return
        lookup = decision.lookup
        if lookup is not None:
            # A session cookie the pin table does not know: ask the shared store, then
            # route again (`ProxyServer.look_up`); the request waits as a queued one does.
            self._server.look_up(self, req, lookup)
            return
        backend = decision.backend
        if backend.max_conns and backend.in_flight >= backend.max_conns:
            # At its --backend max-conns, and the router could not choose another: the
            # client is pinned or hashed to it (its session is there). It waits in the
            # queue, woken when a request there ends (`ProxyServer.wake`), up to
            # --queue-timeout, then 503: another backend would not have its session.
            if now - req.started < self._options.queue_timeout and not self._server.shutting_down:
                self._server.park(self, req)
                return
            message = f"at its max-conns ({backend.max_conns}) for the queue timeout"
            self._edge_error(req, 503, backend.id, message)
            return
        if req.last_error is not None:
            logger.info(
                "retrying %s on backend %s after: %s",
                req.method.decode("latin-1"),
                decision.backend.id,
                req.last_error,
            )
        req.decision = decision
        if req.expect_continue and not req.complete and not req.continue_sent:
            # We answer Expect ourselves (it is not forwarded) once a backend is chosen.
            req.continue_sent = True
            if not req.http10:
                self._write(_CONTINUE)
        self._attempt(req, decision.backend, now, fresh=False)

    def unpark(self, req: _Request, now: float) -> None:
        """Route a queued request again, unless it or its client is gone meanwhile."""
        transport = self.transport
        if self._active is req and not req.answered and transport and not transport.is_closing():
            self._route(req, now)

    def _attempt(self, req: _Request, backend: Backend, now: float, *, fresh: bool) -> None:
        if self._log:
            # `now` may be the request's first byte: the connect time starts here.
            now = self._clock()
            req.upstream_start = now
        req.backend = backend
        req.last_backend = backend.id
        req.attempts += 1
        backend.request_started()
        pool = self._server.pool(backend)
        conn = None if fresh else pool.acquire()
        if conn is not None:
            self._send(req, conn, now)
        else:
            pool.connect(partial(self._connected, req))

    def _connected(
        self, req: _Request, conn: UpstreamConnection | None, error: UpstreamError | None
    ) -> None:
        if self._active is not req or req.backend is None:
            # The client left, or the request was answered, while connecting.
            if conn is not None:
                conn.release()
            return
        if error is not None or conn is None:
            assert error is not None
            self._attempt_failed(req, error, sent=False, stale=False, response_started=False)
            return
        self._send(req, conn, self._clock())

    def _send(self, req: _Request, conn: UpstreamConnection, now: float) -> None:
        if self._log:
            req.upstream_sent = now
        self._upstream = conn
        conn.start(self, now, head_request=req.method == b"HEAD")
        if self._write_paused:
            conn.pause_reading()
        transport = conn.transport
        assert transport is not None
        body = req.body
        if body:
            transport.writelines([req.wire, *body])
        else:
            transport.write(req.wire)
        req.sent = True
        if req.body_size > _HELD_LIMIT:
            req.body = None  # too big to replay: this attempt is the only one
        if self._paused:
            self._resume(_PAUSE_BUFFER)

    def _send_body(self, req: _Request, data: tuple[bytes, ...], size: int) -> None:
        conn = self._upstream
        if req is self._active and conn is not None and req.sent:
            if len(data) == 1:
                conn.write(data[0])
            else:
                conn.writelines(data)
            # The backend's silence is timed from the last byte either way: a long upload
            # must not make a 504.
            conn.last_activity = self._clock()
            body = req.body
            if body is not None:
                req.body_size += size
                if req.body_size > _HELD_LIMIT:
                    req.body = None
                else:
                    body.extend(data)
            return
        # No backend connection yet (connecting, or a pipelined request): hold the bytes.
        body = req.body
        assert body is not None
        body.extend(data)
        req.body_size += size
        if req.body_size > _HELD_LIMIT:
            self._pause(_PAUSE_BUFFER)

    def _end_attempt(self, req: _Request, now: float, *, failed: bool) -> None:
        backend = req.backend
        if backend is not None:
            req.backend = None
            backend.request_finished(failed=failed, now=now)
            if backend.max_conns:
                self._server.wake()

    def _record(self, req: _Request, now: float) -> None:
        self._metrics.request_done(req.last_backend, req.status, now - req.started)
        if self._log:
            self._log_access(req, now)

    def _log_access(self, req: _Request, now: float) -> None:
        """The access log's record of `req`, answered at clock time `now`: its message is
        `client method path status`, its fields `ACCESS_FIELDS` (docs/balancer.md,
        "Access log")."""
        start = req.upstream_start
        sent = req.upstream_sent
        exchanged = start >= 0.0 and sent >= start  # the last attempt reached a backend
        request_id = req.request_id
        if request_id is None:
            # Made by `_add_forwarding`: the value before the head's last CRLF CRLF.
            request_id = req.head[-2]
        pin, reason = pin_outcome(req.decision)
        head = req.head
        # Responses are written one at a time, each before its record: all since the last.
        bytes_out = self._out - self._out_mark
        self._out_mark = self._out
        fields: dict[str, object] = {
            "client": req.client_ip or self._peer,
            "method": req.method.decode("latin-1"),
            "path": head[2].decode("latin-1"),
            "protocol": "HTTP/2.0" if self._http2 else "HTTP/1.0" if req.http10 else "HTTP/1.1",
            "status": req.status,
            # The request line, the fields (as counted against --max-header-bytes), the
            # blank line and the body (de-chunked).
            "bytes_in": len(head[0]) + len(head[2]) + 12 + req.header_size + 2 + req.body_in,
            "bytes_out": bytes_out,
            "backend": req.last_backend or None,
            "upstream_connect_time": round(sent - start, 6) if exchanged else None,
            "upstream_response_time": round(now - sent, 6) if exchanged else None,
            "request_time": round(now - req.started, 6),
            "request_id": request_id.decode("latin-1"),
            "pin": pin,
            "repin_reason": reason,
        }
        access_logger.info(
            "%s %s %s %d",
            fields["client"],
            fields["method"],
            fields["path"],
            req.status,
            extra={"balancer_event": "access", "balancer_fields": fields},
        )

    def _attempt_failed(
        self,
        req: _Request,
        error: UpstreamError,
        *,
        sent: bool,
        stale: bool,
        response_started: bool,
    ) -> None:
        backend = req.backend
        assert backend is not None
        self._upstream = None
        now = self._clock()
        transport = self.transport
        action, backend_failed, req.attempts = after_failure(
            idempotent=req.method in IDEMPOTENT,
            replayable=req.body is not None,
            sent=sent,
            stale=stale,
            stale_retried=req.stale_retried,
            refused=isinstance(error, UpstreamConnectError),
            timed_out=isinstance(error, UpstreamTimeout),
            too_late=response_started or transport is None or transport.is_closing(),
            attempts=req.attempts,
            max_attempts=self._options.max_attempts,
        )
        self._end_attempt(req, now, failed=backend_failed)
        req.last_error = error
        if action == CUT:
            # Too late for another answer: cutting the connection is the only honest signal.
            logger.warning("backend %s failed mid-response: %s", backend.id, error)
            req.status = req.status or 502
            self._record(req, now)
            self._close()
            return
        if action == STALE_RETRY:
            req.stale_retried = True
            self._metrics.retried(backend.id)
            self._attempt(req, backend, now, fresh=True)
            return
        if action == FAILOVER and self._server.budget.withdraw():
            req.excluded = req.excluded | {backend.id}
            req.sent = False
            self._metrics.retried(backend.id)
            self._metrics.failover()
            self._route(req, now)
            return
        self._edge_error(req, _status_for(error), backend.id, str(error))

    def _edge_error(
        self, req: _Request, status: int, backend_id: str, message: str, retry_after: int = 0
    ) -> None:
        """Answer a request the balancer could not get answered, with a plain-text body
        (and `Retry-After: retry_after` when that is not 0)."""
        logger.warning(
            "%d for %s %s: backend %s: %s",
            status,
            req.method.decode("latin-1"),
            req.head[2][:200].decode("latin-1"),
            backend_id or "-",
            message,
        )
        req.status = status
        req.last_backend = backend_id
        if req.expect_continue and not req.continue_sent:
            req.keep_alive = False  # the client may be holding its body back: do not wait
        keep_alive = req.keep_alive and not self._closing and not self._server.shutting_down
        req.keep_alive = keep_alive
        if retry_after:
            self._write(error_response(status, keep_alive=keep_alive, retry_after=retry_after))
        else:
            self._write(_ERRORS[status, keep_alive])
        now = self._clock()
        self._record(req, now)
        self._answered(req, now)

    def _answered(self, req: _Request, now: float) -> None:
        req.answered = True
        if req.complete:
            self._next(req, now)
            return
        if not req.keep_alive:
            self._linger()
            return
        # The rest of the body is still coming: read and discard it, then go on.
        self._resume(_PAUSE_UPSTREAM | _PAUSE_BUFFER)
        self._deadline_kind = _DEADLINE_IDLE
        self._deadline = now + self._options.idle_timeout

    def _next(self, req: _Request, now: float) -> None:
        """The request and its response are both complete: go on to the next one."""
        # Typed wide, so that mypy does not narrow `_active` to None below (where `_begin`
        # sets it): the mypyc build (scripts/build-fast) checks narrowed types at runtime.
        self._active = cast("_Request | None", None)
        if self._starting:
            return  # called back from `_begin` below, which answered at once: the loop goes on
        while True:
            if not req.keep_alive or self._closing:
                self._close()
                return
            if not self._pending:
                break
            # A loop, not a recursion: queued requests answered at once (say, 503 without
            # backends) must not grow the stack with the length of a pipeline.
            req = self._pending.popleft()
            self._starting = True
            try:
                self._begin(req, now)
            finally:
                self._starting = False
            if self._active is not None:
                return  # in flight: its end calls `_next` again
        if self._reject_after:
            self._write(_ERRORS[self._reject_after, False])
            self._linger()
            return
        if self._paused:
            self._resume(_PAUSE_PIPELINE)
        if self._parsing is None:
            self._deadline_kind = _DEADLINE_IDLE
            self._deadline = now + self._options.idle_timeout

    def _upgrade_requested(self, leftover: bytes) -> None:
        # The request was routed in on_headers_complete; hold what follows its head.
        self._held = [leftover] if leftover else []

    # -- ResponseHandler (called by the backend connection) -------------------------------

    def upstream_interim(self, status: int, head: bytes) -> None:
        req = self._active
        if req is None or req.http10 or (status == 100 and req.continue_sent):
            return  # HTTP/1.0 has no 1xx; a second 100 Continue would confuse the client
        self._write(head + b"\r\n")

    def upstream_head(self, status: int, head: bytes, body: int) -> None:
        req = self._active
        assert req is not None
        assert req.decision is not None
        if req.decision.learn:
            self._learn(req, head)
        req.status = status
        req.response_started = True
        keep_alive = req.keep_alive and not self._closing and not self._server.shutting_down
        set_cookie = req.decision.set_cookie
        if (
            keep_alive
            and set_cookie is None
            and body in (BODY_LENGTH, BODY_NONE)
            and not req.http10
            and status != 101
        ):
            # The common case: nothing to add but the blank line.
            self._chunked_out = False
            self._head_out = head + b"\r\n"
            return
        parts = [head]
        if body in (BODY_CHUNKED, BODY_UNTIL_CLOSE):
            if req.http10:
                keep_alive = False  # no chunked in HTTP/1.0: the close ends the body
                self._chunked_out = False
            else:
                parts.append(b"Transfer-Encoding: chunked\r\n")
                self._chunked_out = True
        else:
            self._chunked_out = False
        if set_cookie is not None:
            parts += (b"Set-Cookie: ", set_cookie, b"\r\n", self._repin_line(req.decision))
        if status != 101:
            if not keep_alive:
                parts.append(b"Connection: close\r\n")
            elif req.http10:
                parts.append(b"Connection: keep-alive\r\n")
        req.keep_alive = keep_alive
        parts.append(b"\r\n")
        # Held back to go out with the body's first piece: one write (one system call)
        # for a short response instead of two; upstream_flush writes it otherwise.
        self._head_out = b"".join(parts)

    def _repin_line(self, decision: Decision) -> bytes:
        """The --repin-header line for a response that re-pins its client, else b""."""
        prefix = self._server.repin_prefix
        reason = decision.reason
        if not prefix or reason is None:
            return b""
        return prefix + reason.encode() + b"\r\n"

    def _learn(self, req: _Request, head: bytes) -> None:
        """A request without a session cookie: the router remembers who sets one."""
        backend = req.backend
        if backend is not None:
            self._router.learn(head, backend.id)

    def upstream_flush(self) -> None:
        head = self._head_out
        if head is not None:
            self._head_out = None
            self._write(head)

    def upstream_body(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        head = self._head_out
        if self._log:
            size = len(data)
            if self._chunked_out:
                size += len(b"%x" % size) + 4  # the chunk's size line and CRLF
            self._out += size if head is None else size + len(head)
        if head is not None:
            self._head_out = None
            if self._chunked_out:
                transport.writelines((head, b"%x\r\n" % len(data), data, b"\r\n"))
            elif len(data) <= 16384:
                # A short body joined to its head: one buffer costs uvloop ~0.35 us less
                # CPU than a writelines of two (measured on a socket pair).
                transport.write(head + data)
            else:
                transport.writelines((head, data))
        elif self._chunked_out:
            transport.writelines(chunk(data))
        else:
            transport.write(data)

    def upstream_response(
        self, conn: UpstreamConnection, status: int, head: bytes, body: bytes
    ) -> None:
        req = self._active
        assert req is not None
        assert req.decision is not None
        if (
            req.keep_alive
            and not req.http10
            and not self._closing
            and not self._server.shutting_down
            and len(body) <= 16384
        ):
            # The common case in one write (see `upstream_body`): nothing to add but the
            # affinity cookie, if any, and the blank line.
            req.status = status
            req.response_started = True
            if req.decision.learn:
                self._learn(req, head)
            set_cookie = req.decision.set_cookie
            if set_cookie is None:
                self._write(b"".join((head, b"\r\n", body)))
            elif not self._server.repin_prefix:
                self._write(b"".join((head, b"Set-Cookie: ", set_cookie, b"\r\n\r\n", body)))
            else:
                extra = self._repin_line(req.decision)
                self._write(
                    b"".join((head, b"Set-Cookie: ", set_cookie, b"\r\n", extra, b"\r\n", body))
                )
        else:
            self.upstream_head(status, head, BODY_LENGTH)
            if body:
                self.upstream_body(body)
        self.upstream_complete(conn)

    def upstream_complete(self, conn: UpstreamConnection) -> None:
        req = self._active
        assert req is not None
        self._upstream = None
        head = self._head_out
        if head is not None:
            self._head_out = None
            self._write(head + _LAST_CHUNK if self._chunked_out else head)
        elif self._chunked_out:
            self._write(_LAST_CHUNK)
        self._chunked_out = False
        backend = req.backend
        if req.complete and (backend is None or backend.state is _UP or backend.keep_pinned):
            conn.release()
        else:
            # The backend answered early (the request's rest was never sent), or it is
            # down, drained, or draining without its pinned clients: a kept connection
            # would only hold its drain back.
            conn.close()
        now = self._clock()
        if backend is not None:
            req.backend = None
            backend.request_finished(failed=False, now=now)
            if backend.max_conns:
                self._server.wake()  # a queued request may take its place
        self._record(req, now)
        if req.complete:
            req.answered = True
            self._next(req, now)
        else:
            self._answered(req, now)

    def upstream_upgraded(self, conn: UpstreamConnection, leftover: bytes) -> None:
        req = self._active
        assert req is not None
        self.upstream_flush()
        now = self._clock()
        self._end_attempt(req, now, failed=False)
        self._record(req, now)
        self._piped = True
        self._upstream = conn
        if leftover:
            self._write(leftover)
        held = self._held or []
        self._held = None
        if held:
            conn.writelines(held)
        self._resume(_PAUSE_BUFFER | _PAUSE_PIPELINE)

    def upstream_data(self, data: bytes) -> None:
        self._write(data)

    def upstream_closed(self) -> None:
        self._upstream = None
        self._close()

    def upstream_failed(self, error: UpstreamError, *, response_started: bool, stale: bool) -> None:
        req = self._active
        assert req is not None
        self._attempt_failed(req, error, sent=True, stale=stale, response_started=response_started)

    def upstream_pause_writing(self) -> None:
        self._pause(_PAUSE_UPSTREAM)

    def upstream_resume_writing(self) -> None:
        self._resume(_PAUSE_UPSTREAM)

    # -- the server's timer and shutdown --------------------------------------------------

    def check_deadline(self, now: float) -> None:
        """Called by the server's timer: enforce this connection's timeouts."""
        conn = self._upstream
        req = self._active
        timeout = self._options.response_timeout
        if conn is not None and req is not None and conn.timed_out(now, timeout):
            if req.complete:
                conn.abandon()
                error = UpstreamTimeout(req.last_backend, f"no response within {timeout}s")
                self._attempt_failed(
                    req, error, sent=True, stale=False, response_started=req.response_started
                )
            else:
                # The backend waits for a body the client stopped sending: the client's
                # fault, not the backend's (which must not be ejected for it).
                self._reject(408, "body_timeout")
        if self._write_paused and now - self._write_paused_at > timeout:
            # A client that stopped reading its response holds a backend connection too.
            self.abort()
            return
        if now < self._deadline:
            return
        kind = self._deadline_kind
        self._deadline = math.inf
        self._deadline_kind = _DEADLINE_NONE
        if kind == _DEADLINE_HEADER:
            self._reject(408, "header_timeout")
        elif kind == _DEADLINE_PROXY:
            self._refuse_proxy("proxy_header_timeout")
        else:
            self._close()

    def shutdown(self) -> None:
        """Finish the current request, if any, then close; close now if idle."""
        self._closing = True
        if self._active is None and self._parsing is None and not self._pending:
            self._close()

    def abort(self) -> None:
        if self._upstream is not None:
            self._upstream.abandon()
        if self.transport is not None:
            self.transport.abort()

    # -- internals ------------------------------------------------------------------------

    def _add_forwarding(self, req: _Request) -> None:
        """X-Forwarded-*, Forwarded and X-Request-Id, and the blank line that ends the head;
        the client IP the router hashes."""
        head = req.head
        host = req.host
        if self._trusted:
            req.client_ip = self._server.trusted.client_ip(self._peer, req.xff)
            block = forwarding_block(
                self._peer_b,
                self._for_node,
                host,
                xff=req.xff,
                xfp=req.xfp,
                xfh=req.xfh,
                forwarded=req.forwarded,
                proto=self._server.proto,
            )
            head.append(block)
        else:
            req.client_ip = self._peer
            # The same for every request with this Host on this connection: built once.
            if host != self._block_host or not self._block:
                self._block_host = host
                self._block = forwarding_block(
                    self._peer_b, self._for_node, host, proto=self._server.proto
                )
            head.append(self._block)
        if req.request_id is None:
            head += (b"X-Request-Id: ", new_request_id(), b"\r\n\r\n")
        else:
            head.append(b"\r\n")

    def _set_peer(self, peer: str) -> None:
        """The client's address as the connection knows it: its peer's, or the one a PROXY
        header names (`_read_proxy_header`, or `ProxyServer.proxied`'s)."""
        self._peer = peer
        self._trusted = peer in self._server.trusted
        self._peer_b = peer.encode("ascii", "replace")
        self._for_node = b"for=" + forwarded_for(peer) + b";proto=" + self._server.proto

    def _read_proxy_header(self, data: bytes) -> None:
        """With `proxy_protocol`: the PROXY header first (`_proxy_protocol.read_header`); its
        client is the connection's from then on (X-Forwarded-For, `--sticky ip`, the access
        log), the bytes after it are HTTP. A header that is not valid closes the connection
        unanswered: the peer is not a client, and an HTTP answer would go to whatever it is."""
        header = self._proxy_header + data
        try:
            found = read_header(header)
        except BadProxyHeader as exc:
            self._refuse_proxy("proxy_" + exc.reason)
            return
        if found is None:
            self._proxy_header = header  # bounded: read_header refuses one past its limit
            return
        self._proxy_header = b""
        self._piped = False
        self._deadline_kind = _DEADLINE_HEADER  # the same deadline, now for the request's head
        if found.client is not None:
            self._set_peer(found.client)
        rest = header[found.consumed :]
        if rest:
            self.data_received(rest)

    def _refuse_proxy(self, reason: str) -> None:
        """Close a connection whose PROXY header is not believed, without an answer."""
        self._metrics.rejected(reason)
        self._proxy_header = b""
        self._deadline = math.inf
        self._close()

    def _reject(self, status: int, reason: str) -> None:
        """Answer bad input with `status` (after any request before it), count it, close."""
        self._metrics.rejected(reason)
        self._deadline = math.inf
        req = self._parsing
        self._parsing = None
        self._stopped = True
        active = self._active
        if active is not None and active is not req:
            # Earlier requests on this connection are answered first.
            self._reject_after = status
            if req is not None and req in self._pending:
                self._pending.remove(req)
            return
        if active is not None:
            # The request being relayed went bad mid-body (say, an invalid chunk size).
            self._active = None
            conn = self._upstream
            self._upstream = None
            if conn is not None:
                conn.abandon()
            now = self._clock()
            self._end_attempt(active, now, failed=False)
            if not active.response_started:
                active.status = status
            self._record(active, now)
            if active.response_started:
                self._close()
                return
        self._write(_ERRORS[status, False])
        self._linger()

    def _linger(self) -> None:
        """Close after the client had a chance to read our answer: half-close now, and
        discard what it still sends for a moment (closing a socket with unread input
        makes the kernel send a reset, which can destroy the answer in flight)."""
        self._stopped = True
        self._closing = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self._resume(0xFF)
        if transport.can_write_eof():
            transport.write_eof()
            self._set_deadline(_DEADLINE_LINGER, _LINGER)
        else:
            transport.close()

    def _reached(self) -> bytes:
        """The address the client reached, `host:port`, for an HTTP/1.0 request without
        Host: formatted then, not for every connection."""
        transport = self.transport
        local = None if transport is None else transport.get_extra_info("sockname")
        if not isinstance(local, tuple) or len(local) < 2:
            return b"localhost"
        host = f"[{local[0]}]" if ":" in str(local[0]) else str(local[0])
        return f"{host}:{local[1]}".encode("ascii")

    def _close(self) -> None:
        self._stopped = True
        if self.transport is not None:
            self.transport.close()

    def _write(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        if self._log:
            self._out += len(data)
        transport.write(data)

    def _set_deadline(self, kind: int, seconds: float) -> None:
        self._deadline_kind = kind
        self._deadline = self._clock() + seconds

    def _pause(self, reason: int) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused |= reason

    def _resume(self, reasons: int) -> None:
        if self._paused and not self._paused & ~reasons:
            self._paused = 0
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()
        else:
            self._paused &= ~reasons


def _chose_h2(transport: asyncio.BaseTransport) -> bool:
    """Whether `transport`'s TLS handshake chose HTTP/2 (ALPN h2); False without TLS."""
    ssl_object = transport.get_extra_info("ssl_object")
    return ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2"


def _status_for(error: UpstreamError) -> int:
    return 504 if isinstance(error, UpstreamTimeout) else 502


class Listener(Protocol):
    """What `ProxyServer` needs of a listener started elsewhere (`ProxyServer.adopt`): the
    part of asyncio.Server it uses, and a `sockets` attribute."""

    def close(self) -> None: ...
    async def wait_closed(self) -> None: ...


class ProxyServer:
    """The balancer's HTTP/1.1 listener: routes each request with `router`, reports to
    `metrics`, applies `options`. `clock` (seconds, monotonic) is injectable for tests.

    `backends` is the pool the router chooses from: the keep-alive connections to a backend
    that leaves it are closed within a tick (its busy ones when their exchange ends).
    `pin_lookup` answers a Decision's `lookup` (the shared pin store, `--pin-store`); without
    one, such a session is routed as one the store does not know."""

    def __init__(
        self,
        router: RequestRouter,
        metrics: ProxyMetrics,
        options: ProxyOptions | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        backends: Pool | None = None,
        pin_lookup: PinLookup | None = None,
    ) -> None:
        self.router = router
        self.pin_lookup = pin_lookup
        self.backends = backends
        self._backends_generation = -1  # of `backends`, when `_pools` was last pruned
        self.metrics = metrics
        self.options = options if options is not None else ProxyOptions()
        self.clock = clock
        self.trusted = TrustedProxies(self.options.trusted_proxies)
        header = self.options.repin_header
        self.repin_prefix = b"" if header is None else header.encode("ascii") + b": "
        self.budget = RetryBudget(self.options.retry_ratio, self.options.retry_floor, clock)
        self.shutting_down = False
        self.proto = b"http"  # what clients come over: https once started with TLS
        # The client context of https:// backends (control._tls.backend_context: verified
        # against --backend-ca or the system's CAs); None: the system's, made on first use.
        self.backend_tls: ssl.SSLContext | None = None
        self._pools: dict[str, UpstreamPool] = {}
        self._connections: set[ClientSession] = set()
        # Serves the connections whose handshake chose h2 (`_http2`); None: HTTP/1.1 only.
        self.http2: Http2Factory | None = None
        self._parked: list[tuple[_ClientConnection, _Request]] = []  # waiting for a backend
        self._waking = False  # `_unpark` is scheduled (`wake`)
        self._server: Listener | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._all_closed: asyncio.Event | None = None
        opts = self.options
        shortest = min(opts.header_timeout, opts.idle_timeout, opts.response_timeout)
        self._tick = min(0.5, max(0.005, shortest / 4))  # seconds between deadline checks
        # The TLS handshakes in progress, ended past header_timeout by those checks.
        self._handshakes = Handshakes(opts.header_timeout, clock)

    def __repr__(self) -> str:
        return (
            f"<ProxyServer [connections: {len(self._connections)}, backends: {len(self._pools)}]>"
        )

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        if self._server is None:
            return ()
        # uvloop gives a list where typeshed says a tuple; read untyped, or the mypyc
        # build (scripts/build-fast) would check it for a tuple.
        sockets: Iterable[socket.socket] = getattr(self._server, "sockets", ())
        return tuple(sockets)

    @property
    def port(self) -> int:
        """The port of the first listening socket; raises RuntimeError before `start`."""
        if not self.sockets:
            raise RuntimeError("the proxy server is not started")
        port: int = self.sockets[0].getsockname()[1]
        return port

    @property
    def connections(self) -> int:
        return len(self._connections)

    @property
    def pools(self) -> Mapping[str, UpstreamPool]:
        """The upstream pools by backend id (read-only view, for tests and the admin app)."""
        return self._pools

    async def start(
        self,
        host: str,
        port: int,
        *,
        sock: socket.socket | None = None,
        reuse_port: bool = False,
        tls: ssl.SSLContext | ListenerTls | None = None,
    ) -> None:
        """Listen on `host:port` (or on `sock`, already bound); returns once listening.

        With `tls` (a context, or what gives one for each connection: control._tls builds
        them), clients speak TLS: the handshake must end within `header_timeout`, and the
        backends are told X-Forwarded-Proto https.
        """
        loop = asyncio.get_running_loop()
        if tls is not None and self.options.proxy_protocol:
            # The header comes before the handshake: a listener of its own reads it.
            raise ValueError(
                "proxy_protocol with tls: the header is read before the handshake by a "
                "listener of its own (control._proxied_tls), given to `adopt`"
            )
        factory: Callable[[], asyncio.Protocol] = self._protocol
        if tls is not None:
            self.proto = b"https"
            factory = partial(self.tls_protocol, tls)
        if sock is not None:
            self._server = await loop.create_server(factory, sock=sock, backlog=2048)
        else:
            self._server = await loop.create_server(
                factory, host, port, reuse_port=reuse_port, backlog=2048
            )
        self._timer = loop.call_later(self._tick, self._check_deadlines)

    def adopt(self, listener: Listener, *, tls: bool) -> None:
        """Serve the connections of a listener started elsewhere, instead of `start`: it
        makes their protocols with `proxied` (control._proxied_tls: the PROXY header, then
        TLS). `shutdown` closes it as its own."""
        if tls:
            self.proto = b"https"
        self._server = listener
        self._timer = asyncio.get_running_loop().call_later(self._tick, self._check_deadlines)

    def tls_protocol(
        self,
        tls: ssl.SSLContext | ListenerTls,
        client: str | None = None,
        *,
        proxied: bool = False,
    ) -> asyncio.Protocol:
        """The protocol of a TLS client connection (`_tls_transport`, the data path's TLS):
        its handshake with `tls` (its context now) must end within `header_timeout`, then
        the connection is served as any (HTTP/1.1, or what ALPN chooses). `proxied`: its
        PROXY header was read already, naming `client`, as `proxied`."""
        app = self.proxied(client) if proxied else _ClientConnection(self)
        return TlsTransport(
            tls if isinstance(tls, ssl.SSLContext) else tls.context,
            app,
            self._handshakes,
            _LINGER,
            plain_answer=_PLAIN_HTTP_TO_TLS,
            refused=self.metrics.rejected,
        )

    def proxied(self, client: str | None) -> asyncio.Protocol:
        """A client connection's protocol whose PROXY header was read already, naming
        `client` (None: LOCAL or UNKNOWN, the peer is the client); it reads no header."""
        protocol = _ClientConnection(self)
        protocol._header_read = True
        protocol._header_client = client
        return protocol

    async def shutdown(self) -> None:
        """Stop accepting; let in-flight requests finish within `shutdown_deadline`
        seconds (idle keep-alive connections are closed at once), then close the rest
        and the backend connections."""
        self.shutting_down = True
        if self._server is not None:
            self._server.close()
        for client in list(self._connections):
            client.shutdown()
        if self._connections:
            self._all_closed = asyncio.Event()
            try:
                async with asyncio.timeout(self.options.shutdown_deadline):
                    await self._all_closed.wait()
            except TimeoutError:
                logger.warning(
                    "shutdown: closing %d connections still busy after %.1fs",
                    len(self._connections),
                    self.options.shutdown_deadline,
                )
            for client in list(self._connections):
                client.abort()
        for pool in self._pools.values():
            pool.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._server is not None:
            await self._server.wait_closed()

    def pool(self, backend: Backend) -> UpstreamPool:
        """The keep-alive pool of `backend`, created on first use."""
        pool = self._pools.get(backend.id)
        if pool is None:
            pool = UpstreamPool(
                backend.id,
                backend.host,
                backend.port,
                max_idle=self.options.keepalive_per_backend,
                connect_timeout=self.options.connect_timeout,
                clock=self.clock,
                tls=self._backend_tls() if backend.url.startswith("https:") else None,
            )
            self._pools[backend.id] = pool
        return pool

    def _backend_tls(self) -> ssl.SSLContext:
        context = self.backend_tls
        if context is None:
            context = self.backend_tls = ssl.create_default_context()
        return context

    def connection_made(self, client: ClientSession) -> None:
        self._connections.add(client)
        self.metrics.connection_opened()
        if self.shutting_down:
            client.shutdown()

    def connection_lost(self, client: ClientSession) -> None:
        if client in self._connections:
            self._connections.remove(client)
            self.metrics.connection_closed()
        if not self._connections and self._all_closed is not None:
            self._all_closed.set()

    def _protocol(self) -> _ClientConnection:
        return _ClientConnection(self)

    @property
    def queued(self) -> int:
        """Requests waiting for a backend (see `ProxyOptions.queue_timeout`)."""
        return len(self._parked)

    def park(self, client: _ClientConnection, req: _Request) -> None:
        """Queue `req` until a backend can take it or its queue timeout passes."""
        self._parked.append((client, req))
        if self._timer is not None and self._tick > _QUEUE_TICK:
            self._timer.cancel()
            self._timer = asyncio.get_running_loop().call_later(_QUEUE_TICK, self._check_deadlines)

    def wake(self) -> None:
        """A backend with a max_conns has a free place: route the queued requests again
        soon (in order, so the longest waiting takes it), not at the next queue tick. Soon,
        not now: the caller is in the middle of ending an exchange."""
        if self._parked and not self._waking:
            self._waking = True
            asyncio.get_running_loop().call_soon(self._unpark)

    def _unpark(self) -> None:
        self._waking = False
        now = self.clock()
        parked, self._parked = self._parked, []
        for client, req in parked:
            client.unpark(req, now)

    def look_up(self, client: _ClientConnection, req: _Request, session: bytes) -> None:
        """Ask `pin_lookup` for `session`'s backend; tell the router the answer and route
        `req` again (at once without a `pin_lookup`: the store has nothing)."""
        lookup = self.pin_lookup
        if lookup is None:
            self._looked_up(client, req, session, None)
        else:
            lookup(session, partial(self._looked_up, client, req, session))

    def _looked_up(
        self, client: _ClientConnection, req: _Request, session: bytes, backend_id: str | None
    ) -> None:
        self.router.looked_up(session, backend_id)
        client.unpark(req, self.clock())

    def _prune_pools(self) -> None:
        """Close the upstream pools of backends no longer in `backends`."""
        backends = self.backends
        if backends is None or backends.generation == self._backends_generation:
            return
        self._backends_generation = backends.generation
        for backend_id in [b for b in self._pools if b not in backends]:
            self._pools.pop(backend_id).close()

    def _check_deadlines(self) -> None:
        self._prune_pools()
        now = self.clock()
        for pool in self._pools.values():
            pool.tick(now)  # closes the idle connections beyond recent demand
        if self._parked:
            self._unpark()
        for client in list(self._connections):
            client.check_deadline(now)
        self._handshakes.expire(now)
        loop = asyncio.get_running_loop()
        tick = min(self._tick, _QUEUE_TICK) if self._parked else self._tick
        self._timer = loop.call_later(tick, self._check_deadlines)
