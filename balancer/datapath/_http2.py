"""HTTP/2 to clients (RFC 9113) over TLS, when the handshake's ALPN chose h2: one
`Http2Connection` a connection, the h2 library's state machine fed the bytes read and drained
of its events in one place (`data_received`), as h2's asyncio example and hypercorn's h2
protocol do.

Each stream is one request, served by the HTTP/1.1 machinery of `_proxy` as it is: a
`_StreamRequest` (a `_ClientConnection`) over an in-memory `_Stream` transport is fed the
stream's request as an HTTP/1.1 head (with `Connection: close`: one request) and its body, so
the routing, stickiness, forwarding headers, retries, queue, limits and access log of a stream
are those of an HTTP/1.1 request by construction, and backends get HTTP/1.1 through the same
upstream pool. What it writes back is read again (httptools) and sent as HEADERS (names
lower-cased, hop-by-hop fields dropped) and DATA frames.

Flow control, both ways: request DATA is acknowledged (WINDOW_UPDATE) only once passed on,
so a stream whose backend does not read stops its client within a window; response bytes go
out within the client's windows, and past `_SEND_HIGH` bytes waiting for one the stream's
backend connection stops being read (`pause_writing`), until a WINDOW_UPDATE drains them.

Limits (`Http2Options`, docs/balancer.md "HTTP/2"): concurrent streams (a client past the
limit it was told breaks the protocol: GOAWAY), the header list (as HTTP/1.1's), windows, and
the rapid-reset defence of CVE-2023-44487: streams the client resets are counted in a window,
and past `max_resets` the connection gets GOAWAY(ENHANCE_YOUR_CALM) and is closed. A stream
reset in the same read as its request never starts, so a flood of them costs the backends
nothing; one reset later abandons its backend connection (never back to the pool half-read).
The control-frame floods of CVE-2019-9512, -9515 and -9518 (PING, SETTINGS, empty DATA,
PRIORITY: frames that cost the client nothing and each make h2 act or answer) are counted in
the same way against `max_control_frames`; and while the socket's write buffer is over its
high-water mark (`pause_writing`) the client is not read, so the answers h2 writes whatever
the socket's state (PING and SETTINGS acknowledgements) stay bounded by one read's worth.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import httptools
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from ._http import HOP_BY_HOP, chunk
from ._proxy import _LINGER, Http2Factory, ProxyServer, _ClientConnection

__all__ = ["Http2Connection", "Http2Options"]

logger = logging.getLogger("balancer")

_SEND_HIGH: Final = 65536  # bytes of response a stream holds for the client's window, at most
_SEND_LOW: Final = 16384  # ... then its backend is read again once they are down to this
_LAST_CHUNK: Final = b"0\r\n\r\n"
_DEFAULT_WINDOW: Final = 65535  # RFC 9113 section 6.9.2
# A header list is decoded up to this many times SETTINGS_MAX_HEADER_LIST_SIZE (431 past
# that, from the rebuilt head); past it, HPACK gives up and the connection is lost.
_HEADER_LIST_DECODED: Final = 4
# The events of frames that cost a client nothing and the server a turn or an answer (the
# control-frame floods of CVE-2019-9512, -9515, -9518; SETTINGS and empty DATA are counted
# where they are handled).
_CONTROL: Final = (
    h2.events.PingReceived,
    h2.events.PingAckReceived,
    h2.events.SettingsAcknowledged,
    h2.events.PriorityUpdated,
)


# hpack logs every field it encodes or decodes at DEBUG, its value included (cookies,
# authorization): secrets in the log of anyone who turns DEBUG on for the root logger. Its
# logger stops at INFO (a deployment that wants hpack's lines sets the level back itself),
# which also makes its ~27 `Logger.debug` calls a request return at the level check.
logging.getLogger("hpack").setLevel(logging.INFO)


@dataclass(frozen=True, slots=True)
class Http2Options:
    """HTTP/2's own limits (the header list's is HTTP/1.1's: `ProxyOptions.max_header_bytes`,
    advertised as SETTINGS_MAX_HEADER_LIST_SIZE). Raises ValueError naming the field for a
    value out of range."""

    # SETTINGS_MAX_CONCURRENT_STREAMS: requests in flight on one connection (nginx's
    # http2_max_concurrent_streams: 128).
    max_concurrent_streams: int = 128
    # SETTINGS_INITIAL_WINDOW_SIZE: bytes of request body a stream may send before the
    # balancer acknowledges them (passed them on); RFC 9113's default.
    initial_window_size: int = 65535
    # Bytes of request body all streams of a connection may have unacknowledged: a stream
    # whose backend is slow then holds back no other stream's upload.
    connection_window: int = 1 << 20
    # The rapid-reset defence (CVE-2023-44487): more streams reset by the client than this
    # within `reset_window` seconds, and the connection gets GOAWAY(ENHANCE_YOUR_CALM).
    max_resets: int = 200
    reset_window: float = 10.0
    # The control-frame flood defence (CVE-2019-9512, -9515, -9518): more PING, SETTINGS,
    # PRIORITY and empty DATA frames than this within `reset_window` seconds, and the
    # connection gets GOAWAY(ENHANCE_YOUR_CALM). A browser sends a handful a connection.
    max_control_frames: int = 1000

    def __post_init__(self) -> None:
        for name in ("max_concurrent_streams", "max_resets", "max_control_frames"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} must be at least 1, not {value!r}")
        if not 1 <= self.initial_window_size <= 2**31 - 1:
            raise ValueError(
                f"initial_window_size must be 1..2^31-1, not {self.initial_window_size}"
            )
        if not _DEFAULT_WINDOW <= self.connection_window <= 2**31 - 1:
            raise ValueError(
                f"connection_window must be 65535..2^31-1, not {self.connection_window}"
            )
        if not (self.reset_window > 0 and math.isfinite(self.reset_window)):
            raise ValueError(f"reset_window must be seconds > 0, not {self.reset_window!r}")

    def factory(self) -> Http2Factory:
        """What `ProxyServer.http2` takes: makes the protocol of an h2 connection."""
        return partial(Http2Connection, options=self)


class _Budget:
    """Events of one kind from a client, counted in windows of `window` seconds (a window
    starts at the first event after the last one ended): `spend` says whether more than
    `limit` came within the current one. Pure: the caller passes the time."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window  # seconds
        self.count = 0
        self.since = -math.inf  # when the current window began

    def spend(self, now: float, events: int = 1) -> bool:
        if now - self.since > self.window:
            self.since = now
            self.count = 0
        self.count += events
        return self.count > self.limit


def request_head(headers: Iterable[tuple[bytes, bytes]], *, body: bool) -> bytes:
    """A stream's request as an HTTP/1.1 head, from its (validated, lower-case) fields:
    the pseudo-fields make the request line and Host (RFC 9113 section 8.3.1: `:authority`
    over `host`), the cookie fields are joined into one (section 8.2.3), a body without a
    content-length is sent chunked, and `Connection: close` makes it the only request of
    its `_StreamRequest`. Everything else is checked by `_proxy` as any HTTP/1.1 head is."""
    method = path = authority = host = b""
    cookies: list[bytes] = []
    fields: list[bytes] = []
    length = False
    for name, value in headers:
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            continue  # :scheme: the listener's own is what X-Forwarded-Proto says
        if name == b"cookie":
            cookies.append(value)
            continue
        if name == b"host":
            host = value
            continue
        if name == b"content-length":
            length = True
        fields += (name, b": ", value, b"\r\n")
    authority = authority or host
    head = [method, b" ", path or authority, b" HTTP/1.1\r\n"]
    if authority:
        head += (b"host: ", authority, b"\r\n")
    if cookies:
        head += (b"cookie: ", b"; ".join(cookies), b"\r\n")
    head += fields
    if body and not length:
        head.append(b"transfer-encoding: chunked\r\n")
    head.append(b"connection: close\r\n\r\n")
    return b"".join(head)


class _StreamRequest(_ClientConnection):
    """One stream's request: `_ClientConnection` as it is, over a `_Stream`. It is not
    registered with the server (its `Http2Connection` is, and passes the deadlines on)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = cast(_Stream, transport)
        self.transport = stream
        self._http2 = True
        self._local_host = stream.connection.local_host
        self._set_peer(stream.connection.client)


class _Stream(asyncio.Transport):
    """The transport of one stream's `_StreamRequest`: what it writes (an HTTP/1.1
    response) is read with httptools and sent as frames; what the client sends is passed
    to it. Its response is complete once the parser says so; closed before that (a backend
    that failed mid-response), the stream is reset, so the client cannot take a cut body
    for a whole one."""

    def __init__(self, connection: Http2Connection, stream_id: int, *, head: bool) -> None:
        super().__init__()
        self.connection = connection
        self.id = stream_id
        self.request = _StreamRequest(connection.server)
        self._parser = httptools.HttpResponseParser(self)
        self._head_request = head  # a HEAD request's response has no body
        self._headers: list[tuple[bytes, bytes]] = []
        self._final = False  # the response's final head (not a 1xx) was read
        self._out: deque[bytes] = deque()  # response body waiting for the client's window
        self._out_bytes = 0
        self._out_at = 0  # bytes of _out[0] sent
        self._ended = False  # the response was read in full
        self._end_sent = False
        self._upstream_paused = False
        self._reading_paused = False
        self._held: list[tuple[bytes, int]] = []  # DATA (and its window bytes) while paused
        self.chunked = False  # the request body goes to `request` chunked
        self.client_done = False  # the client ended its side (END_STREAM)
        self._closed = False
        self._gone = False  # reset (by either side): nothing more goes out on it
        self._lost = False  # `request.connection_lost` was called

    # -- the client's side -----------------------------------------------------------------

    def start(self, head: bytes, *, chunked: bool) -> None:
        self.chunked = chunked
        self.request.connection_made(self)
        self.request.data_received(head)

    def received(self, data: bytes, window: int) -> None:
        """A DATA frame's bytes, and what they count against the windows (`window`)."""
        if self._closed:
            self.connection.acknowledge(self.id, window)
        elif self._reading_paused:
            self._held.append((data, window))
        else:
            self._pass_on(data)
            self.connection.acknowledge(self.id, window)

    def ended(self) -> None:
        """The client's END_STREAM: the request body is complete."""
        self.client_done = True
        if self._reading_paused:
            self._held.append((b"", -1))
        elif self.chunked and not self._closed:
            self.request.data_received(_LAST_CHUNK)

    def _pass_on(self, data: bytes) -> None:
        if self.chunked:
            self.request.data_received(b"".join(chunk(data)))
        else:
            self.request.data_received(data)

    def cancel(self) -> None:
        """The stream is gone (reset by the client, or its connection closed): its request
        is dropped where it is; a backend connection it held is abandoned, not pooled."""
        self._closed = self._gone = True
        self._out.clear()
        self._out_bytes = 0
        self._held = []
        self._lose()

    # -- asyncio.Transport, for `request` --------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return default  # the handshake was the connection's; ALPN is not asked again
        transport = self.connection.transport
        return default if transport is None else transport.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._closed

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        pass

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self) -> None:
        self._reading_paused = False
        held = self._held
        while held and not self._reading_paused and not self._closed:
            data, window = held.pop(0)
            if window < 0:
                if self.chunked:
                    self.request.data_received(_LAST_CHUNK)
                continue
            self._pass_on(data)
            self.connection.acknowledge(self.id, window)
        self.connection.flush()

    def is_reading(self) -> bool:
        return not self._reading_paused

    def get_write_buffer_size(self) -> int:
        return self._out_bytes

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            return
        try:
            self._parser.feed_data(bytes(data))
        except httptools.HttpParserError as exc:  # not from our own writer: a bug, said so
            logger.error("http2: stream %d: unreadable response: %s", self.id, exc)
            self.abort()
        # What this piece made goes out as one: its body, then END_STREAM on the last DATA
        # frame when the response ended in it (not an empty frame of its own), in one write
        # to the socket.
        if not self._gone:
            self.send()
        self.connection.flush()

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self.write(b"".join(list_of_data))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._ended:
            # Cut mid-response (or before one): the client must not take it for whole.
            self._gone = True
            self.connection.reset(self.id, ErrorCodes.INTERNAL_ERROR)
            self._out.clear()
            self._out_bytes = 0
        else:
            self.send()
            self.connection.flush()
        asyncio.get_running_loop().call_soon(self._lose)
        self.connection.finished(self)

    def abort(self) -> None:
        if self._gone:
            return
        self._closed = self._gone = True
        self._out.clear()
        self._out_bytes = 0
        self.connection.reset(self.id, ErrorCodes.CANCEL)
        self._lose()
        self.connection.finished(self)

    def _lose(self) -> None:
        if not self._lost:
            self._lost = True
            self.request.connection_lost(None)

    # -- httptools callbacks: the response --------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        # RFC 9113 section 8.2.2: an HTTP/2 message must not carry HTTP/1.1's hop-by-hop fields.
        if name not in HOP_BY_HOP and not name.startswith(b"proxy-"):
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        headers = [(b":status", b"%d" % status), *self._headers]
        self._headers = []
        if status < 200:
            if status != 101:  # 101 cannot happen: h2 refuses the fields of an upgrade
                self.connection.send_headers(self.id, headers, end=False)
            return
        self._final = True
        end = self._head_request or status in (204, 304)
        self.connection.send_headers(self.id, headers, end=end)
        if end:
            self._ended = self._end_sent = True

    def on_body(self, body: bytes) -> None:
        if self._end_sent:
            return
        self._out.append(body)
        self._out_bytes += len(body)  # sent by `write`, once the piece is parsed

    def on_message_complete(self) -> None:
        if self._final and not self._ended:
            self._ended = True

    # -- sending ----------------------------------------------------------------------------

    def send(self) -> None:
        """Queue what the client's windows take now (the caller flushes); pause or resume
        the backend."""
        connection = self.connection
        out = self._out
        # While the socket's buffer is full nothing is sent, but what waits is still
        # counted below: past _SEND_HIGH the backend is not read.
        while out and connection.writable():
            window = connection.window(self.id)
            if window <= 0:
                break
            piece = out[0]
            at = self._out_at
            size = min(window, len(piece) - at)
            if at == 0 and size == len(piece):
                out.popleft()
            else:
                piece = piece[at : at + size]
                self._out_at = at = at + size
                if at == len(out[0]):
                    out.popleft()
                    self._out_at = 0
            self._out_bytes -= size
            # The body's last piece carries END_STREAM: one frame less a response.
            end = self._ended and not out
            if end:
                self._end_sent = True
            connection.send_data(self.id, piece, end=end)
            if end and not self.client_done:
                connection.reset(self.id, ErrorCodes.NO_ERROR)  # as below
        if self._ended and not out and not self._end_sent and connection.writable():
            self._end_sent = True
            connection.end_stream(self.id)
            if not self.client_done:
                # The answer is whole and the client still sends: tell it to stop
                # (RFC 9113 section 8.1).
                connection.reset(self.id, ErrorCodes.NO_ERROR)
        if self._out_bytes > _SEND_HIGH and not self._upstream_paused:
            self._upstream_paused = True
            self.request.pause_writing()
        elif self._upstream_paused and self._out_bytes <= _SEND_LOW:
            self._upstream_paused = False
            self.request.resume_writing()
        if self._closed and self._end_sent:
            connection.finished(self)

    @property
    def done(self) -> bool:
        """Nothing more will be sent on this stream."""
        return self._gone or (self._closed and self._end_sent)


class Http2Connection(asyncio.Protocol):
    """One HTTP/2 client connection; see the module docstring. `client` is its client's
    address (the peer's, or what a PROXY header named), as `_ClientConnection`'s."""

    def __init__(
        self, server: ProxyServer, client: str, options: Http2Options | None = None
    ) -> None:
        self.server = server
        self.client = client
        self.local_host = b"localhost"
        self._options = options if options is not None else Http2Options()
        self._clock: Callable[[], float] = server.clock
        # Inbound fields are validated (RFC 9113 section 8.2); outbound ones are ours, made
        # valid by `_Stream` (lower-case, no hop-by-hop, httptools-read): not checked again.
        # Inbound normalizing is only joining the cookie fields, which `request_head` does.
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            normalize_inbound_headers=False,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self._h2 = h2.connection.H2Connection(config)
        self._streams: dict[int, _Stream] = {}
        self.transport: asyncio.Transport | None = None
        self._write_paused = False
        self._closed = False
        self._going_away = False  # shutting down: no new stream; GOAWAY once idle
        self._resets = _Budget(self._options.max_resets, self._options.reset_window)
        self._control = _Budget(self._options.max_control_frames, self._options.reset_window)
        self._idle_since = self._clock()
        self._served = False  # a stream was opened: idle_timeout from then on
        self._flush_pending = False  # `_write_out` is scheduled
        self._linger_until = math.inf  # closed: when the half-closed connection is closed

    def __repr__(self) -> str:
        return f"<Http2Connection [client: {self.client}, streams: {len(self._streams)}]>"

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        local = transport.get_extra_info("sockname")
        if isinstance(local, tuple) and len(local) >= 2:
            host = f"[{local[0]}]" if ":" in str(local[0]) else str(local[0])
            self.local_host = f"{host}:{local[1]}".encode("ascii")
        options = self._options
        header_list = self.server.options.max_header_bytes
        h2c = self._h2
        settings = {
            SettingCodes.MAX_CONCURRENT_STREAMS: options.max_concurrent_streams,
            SettingCodes.MAX_HEADER_LIST_SIZE: header_list,
            SettingCodes.INITIAL_WINDOW_SIZE: options.initial_window_size,
        }
        # Our SETTINGS as the connection's first frame. HPACK's decoder gives up past its
        # own bound mid-block, its state then lost (GOAWAY): that bound is set well above
        # the advertised one, so a list a little over it is decoded whole, the connection's
        # state intact, and that stream alone answered 431 by `_proxy`'s check of the
        # rebuilt head, as over HTTP/1.1. The bound still stops an HPACK bomb (a small block
        # expanding to a huge list, CVE-2016-6581).
        h2c.local_settings = h2.settings.Settings(client=False, initial_values=settings)
        h2c.decoder.max_header_list_size = header_list * _HEADER_LIST_DECODED
        h2c.initiate_connection()
        # Past the stream limit, h2 would end the whole connection; RFC 9113 section 5.1.2
        # wants that stream refused alone (as nginx does). Once the SETTINGS frame is
        # written, h2 is given no limit of its own (nothing else reads it), and `_request`
        # refuses the streams past ours.
        settings[SettingCodes.MAX_CONCURRENT_STREAMS] = 2**31 - 1
        h2c.local_settings = h2.settings.Settings(client=False, initial_values=settings)
        if options.connection_window > _DEFAULT_WINDOW:
            h2c.increment_flow_control_window(options.connection_window - _DEFAULT_WINDOW)
        self.server.connection_made(self)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.server.connection_lost(self)
        streams = list(self._streams.values())
        self._streams.clear()
        for stream in streams:
            stream.cancel()

    def pause_writing(self) -> None:
        self._write_paused = True  # the socket's buffer is full: streams hold their bytes
        # ... and the client is not read until it drains: h2 answers PING and SETTINGS
        # whatever the socket's state, so a client that sends them and reads nothing would
        # have them pile up here one for one (CVE-2019-9512, -9515), as nginx and Envoy stop.
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()
        for stream in list(self._streams.values()):
            stream.send()
        self.flush()

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            # h2 has queued the GOAWAY with the error's code (PROTOCOL_ERROR, ...).
            self._fail(exc)
            return
        # A stream reset in the same read as its request never starts (CVE-2023-44487:
        # opened and reset at once, it must cost the backends nothing).
        reset = {e.stream_id for e in events if isinstance(e, h2.events.StreamReset)}
        control = 0  # frames of the control-frame floods (CVE-2019-9512, -9515, -9518)
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                self._data(event)
            elif isinstance(event, h2.events.RequestReceived):
                self._request(event, cancelled=event.stream_id in reset)
            elif isinstance(event, h2.events.StreamEnded):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream.ended()
            elif isinstance(event, h2.events.StreamReset):
                self._client_reset(event)
            elif isinstance(event, h2.events.WindowUpdated):
                self._window_opened(event.stream_id)
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                control += 1
                if SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                    self._window_opened(0)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self._going_away = True  # the client's GOAWAY: finish what is open
            elif isinstance(event, _CONTROL):
                control += 1
            if self._closed:
                return
        if control and self._control.spend(self._clock(), control):
            self._flood()
            return
        self.flush()
        if self._going_away and not self._streams:
            self._close()

    def eof_received(self) -> bool | None:
        return None  # the client closed its side: close ours (in-flight streams are lost)

    # -- events -----------------------------------------------------------------------------

    def _request(self, event: h2.events.RequestReceived, *, cancelled: bool) -> None:
        stream_id = event.stream_id
        if cancelled:
            return  # its StreamReset comes next, and is counted
        if self._going_away:
            self.reset(stream_id, ErrorCodes.REFUSED_STREAM)  # safe to retry elsewhere
            return
        if len(self._streams) >= self._options.max_concurrent_streams:
            # Past the limit the client was told: refused, and counted as a reset (a client
            # that keeps opening streams past it is flooding as one that resets them).
            self.server.metrics.rejected("http2_refused_stream")
            self.reset(stream_id, ErrorCodes.REFUSED_STREAM)
            self._count_reset()
            return
        self._served = True
        headers = cast("list[tuple[bytes, bytes]]", event.headers or [])
        body = event.stream_ended is None
        method = next((value for name, value in headers if name == b":method"), b"")
        stream = _Stream(self, stream_id, head=method == b"HEAD")
        self._streams[stream_id] = stream
        length = any(name == b"content-length" for name, _ in headers)
        stream.start(request_head(headers, body=body), chunked=body and not length)

    def _data(self, event: h2.events.DataReceived) -> None:
        window = event.flow_controlled_length or 0
        # An empty DATA frame that does not end its stream is a no-op that still costs a
        # turn (CVE-2019-9518): a control frame.
        empty = not event.data and event.stream_ended is None
        if empty and self._control.spend(self._clock()):
            self._flood()
            return
        stream = self._streams.get(event.stream_id)
        if stream is None:
            self.acknowledge(event.stream_id, window)
        else:
            stream.received(event.data or b"", window)

    def _client_reset(self, event: h2.events.StreamReset) -> None:
        stream = self._streams.pop(event.stream_id, None)
        if stream is not None:
            stream.cancel()
        if event.remote_reset:
            self._count_reset()

    def _count_reset(self) -> None:
        """One more stream reset by the client or refused: past `max_resets` within
        `reset_window`, GOAWAY(ENHANCE_YOUR_CALM)."""
        if self._resets.spend(self._clock()):
            self._calm()

    def _window_opened(self, stream_id: int) -> None:
        if stream_id == 0:
            for each in list(self._streams.values()):
                each.send()
        else:
            stream = self._streams.get(stream_id)
            if stream is not None:
                stream.send()

    def _calm(self) -> None:
        """Too many resets: GOAWAY(ENHANCE_YOUR_CALM) and close (CVE-2023-44487)."""
        options = self._options
        logger.warning(
            "http2: client %s reset more than %d streams within %.0fs: GOAWAY ENHANCE_YOUR_CALM",
            self.client,
            options.max_resets,
            options.reset_window,
        )
        self.server.metrics.rejected("http2_rapid_reset")
        self._goaway(ErrorCodes.ENHANCE_YOUR_CALM)

    def _flood(self) -> None:
        """Too many control frames: GOAWAY(ENHANCE_YOUR_CALM) and close (CVE-2019-9512,
        -9515, -9518)."""
        options = self._options
        logger.warning(
            "http2: client %s sent more than %d control frames within %.0fs:"
            " GOAWAY ENHANCE_YOUR_CALM",
            self.client,
            options.max_control_frames,
            options.reset_window,
        )
        self.server.metrics.rejected("http2_control_flood")
        # What h2 answered to the flood is not sent: one read can hold a few thousand
        # PINGs (asyncio's TLS transport hands over all it has decrypted, up to 256 KiB).
        # Whole frames only, and the connection ends with the GOAWAY: nothing else lost.
        self._h2.data_to_send()
        self._goaway(ErrorCodes.ENHANCE_YOUR_CALM)

    def _fail(self, exc: h2.exceptions.ProtocolError) -> None:
        """The client broke the protocol: h2 queued GOAWAY with the error's code; send it
        and close (one log line, no traceback)."""
        logger.info("http2: client %s: %s: %s", self.client, type(exc).__name__, exc)
        self.server.metrics.rejected("http2_protocol_error")
        self._write_out()
        self._close()

    def _goaway(self, code: ErrorCodes) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):  # already closed
            self._h2.close_connection(code)
        self._write_out()
        self._close()

    def _close(self) -> None:
        self._closed = True
        streams = list(self._streams.values())
        self._streams.clear()
        for stream in streams:
            stream.cancel()
        transport = self.transport
        if transport is None:
            return
        if transport.can_write_eof():
            # The client may still be sending (frames in flight, a flood): a close with
            # unread input makes the kernel reset the connection, which can destroy the
            # GOAWAY. So half-close, then close when the client does (`eof_received`) or
            # `_LINGER` seconds later (`check_deadline`), as `_ClientConnection` lingers.
            transport.write_eof()
            self._linger_until = self._clock() + _LINGER
        else:
            transport.close()

    # -- for the streams ------------------------------------------------------------------

    def writable(self) -> bool:
        return not self._write_paused and not self._closed

    def window(self, stream_id: int) -> int:
        """Bytes the client takes on `stream_id` now (a frame at most); 0 when closed."""
        h2c = self._h2
        try:
            return min(h2c.local_flow_control_window(stream_id), h2c.max_outbound_frame_size)
        except h2.exceptions.ProtocolError:  # StreamClosedError included
            return 0

    def send_headers(
        self, stream_id: int, headers: list[tuple[bytes, bytes]], *, end: bool
    ) -> None:
        try:
            self._h2.send_headers(stream_id, headers, end_stream=end)
        except h2.exceptions.ProtocolError as exc:
            logger.info("http2: stream %d: headers not sent: %s", stream_id, exc)
            self.reset(stream_id, ErrorCodes.INTERNAL_ERROR)

    def send_data(self, stream_id: int, data: bytes, *, end: bool = False) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):  # the stream is gone meanwhile
            self._h2.send_data(stream_id, data, end_stream=end)

    def end_stream(self, stream_id: int) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._h2.end_stream(stream_id)

    def reset(self, stream_id: int, code: ErrorCodes) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):  # closed already
            self._h2.reset_stream(stream_id, code)
        self.flush()

    def acknowledge(self, stream_id: int, window: int) -> None:
        if window <= 0 or self._closed:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._h2.acknowledge_received_data(window, stream_id)

    def flush(self) -> None:
        """Write what h2 has to send at the end of this turn of the event loop: the frames
        of all the streams answered in one turn go out in one TLS write (one record, one
        system call), not one each."""
        if not self._flush_pending:
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self._write_out)

    def _write_out(self) -> None:
        self._flush_pending = False
        data = self._h2.data_to_send()
        transport = self.transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)

    def finished(self, stream: _Stream) -> None:
        """`stream` may be done: forget it once nothing more goes out on it."""
        if stream.done and self._streams.get(stream.id) is stream:
            del self._streams[stream.id]
            self._idle_since = self._clock()
            if self._going_away and not self._streams and not self._closed:
                self._goaway(ErrorCodes.NO_ERROR)

    # -- the server's timer and shutdown (`ClientSession`) --------------------------------

    def check_deadline(self, now: float) -> None:
        if self._closed:
            if now >= self._linger_until and self.transport is not None:
                self.transport.close()
            return
        for stream in list(self._streams.values()):
            stream.request.check_deadline(now)
        options = self.server.options
        # As on HTTP/1.1: the first request must begin within header_timeout, a later one
        # within idle_timeout.
        idle = options.idle_timeout if self._served else options.header_timeout
        if not self._streams and not self._closed and now - self._idle_since > idle:
            self._goaway(ErrorCodes.NO_ERROR)

    def shutdown(self) -> None:
        """Refuse new streams, finish the open ones, then GOAWAY and close."""
        self._going_away = True
        if not self._streams and not self._closed:
            self._goaway(ErrorCodes.NO_ERROR)

    def abort(self) -> None:
        for stream in list(self._streams.values()):
            stream.cancel()
        self._streams.clear()
        if self.transport is not None:
            self.transport.abort()
