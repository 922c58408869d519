"""The TLS layer of a client connection, run by the data path itself: `TlsTransport` is the
protocol of the TCP connection and the transport its application protocol (the data path's
`_ClientConnection`, or the HTTP/2 one ALPN chose) sees, with an `ssl.SSLObject` on two
memory BIOs in between, as asyncio's `sslproto` is built.

Why not asyncio's ``create_server(ssl=...)``: under uvloop that layer costs ~40-45 us of CPU
more a new connection than this one does, and new handshakes are where the balancer is
furthest from nginx (docs/architecture.md, "Measured facts"). It is also simpler than
asyncio's, which serves client and server sides, unwrapping, STARTTLS and an app that pauses
a read mid-record; here:

- the handshake must end within its `Handshakes`' timeout, else the TCP connection is
  aborted (at the owner's next `Handshakes.expire`: a periodic check of all of them, not a
  loop timer each, which costs uvloop ~2 us to start and cancel); a failed one sends
  OpenSSL's alert and closes. Each is told to `refused` (``tls_handshake_timeout``,
  ``tls_handshake_failed``). Neither reaches the application,
  whose `connection_made` comes once the handshake is done (as with asyncio's). A client
  that sends plain HTTP instead (its first byte a capital letter, a TLS one's is 22) is
  answered `plain_answer` in clear, then closed after `linger` seconds at most (read
  and dropped until the client closes: see below) (``tls_plain_http``);
- what one TCP read decrypts is given to the application as one `data_received`; a
  close_notify from the client is its `eof_received`, as is a TCP EOF without one (HTTP
  frames its own messages, so a truncation is seen there);
- writes are encrypted at once into the TCP transport, whose buffer is the only one:
  its flow control (`pause_writing`, `get_write_buffer_size`) is the application's. What
  OpenSSL writes on its own after the handshake (TLS 1.3's session tickets, the answer to
  a KeyUpdate) goes out with the application's next write, or with the close: the client
  needs tickets only for a later connection, and RFC 8446 section 4.6.3 wants the KeyUpdate
  only before our next data; so a new connection's answer and its tickets are one TCP
  segment, not two;
- the application chooses how the connection ends, as over TCP: `close` sends close_notify
  and closes the TCP connection (after a complete exchange: nginx does the same), and
  `write_eof` sends close_notify and half-closes it (to linger: the client may still be
  sending, and closing a socket with unread input makes the kernel send a reset, which can
  destroy the answer in flight). After `write_eof` what the client sends is dropped
  unread (RFC 8446 section 6.1 allows a half-closed TLS connection, but nothing here reads
  after its own end), and its TCP end is the application's `eof_received`. The client's
  close_notify is never waited for (RFC 8446 allows it; nginx does not wait either);
- when the connection ends the application is dropped, so that neither object keeps the
  other (and its OpenSSL state) alive for the garbage collector.

Only the server side: ``https://`` backends are asyncio's (`_upstream`).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any, Final, Protocol, cast

__all__ = ["Handshakes", "TlsTransport"]


class _Records(Protocol):
    """What a connection calls for each handshake step, read and write: `ssl.SSLObject`'s
    methods of these names, which are one-line Python wrappers of its C object's."""

    def do_handshake(self) -> None: ...
    def read(self, size: int) -> bytes: ...
    def write(self, data: bytes | bytearray | memoryview) -> int: ...
    def version(self) -> str | None: ...


# The most plaintext asked of OpenSSL at once: a read returns at most one TLS record, whose
# plaintext is at most 16 KiB (RFC 8446 section 5.1), and the bytes are shrunk to what came.
_READ_SIZE: Final = 16384


class _Deadline:
    """When a connection's handshake must be done by; `transport` None once it is (or the
    connection is gone), so that a finished connection is not kept alive by the queue."""

    def __init__(self, at: float, transport: TlsTransport) -> None:
        self.at = at
        self.transport: TlsTransport | None = transport


class Handshakes:
    """The handshakes in progress of a listener's connections, each to end within `timeout`
    seconds of its TCP connection: the owner calls `expire(now)` now and then (the data
    path: at each tick of its deadline checks), which aborts those past their time.

    One timeout for all keeps the deadlines in the order they were set: a queue, whose
    expired head is all there is to look at."""

    def __init__(self, timeout: float, clock: Callable[[], float]) -> None:
        self.timeout = timeout
        self._clock = clock
        self._queue: deque[_Deadline] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def watch(self, transport: TlsTransport) -> _Deadline:
        deadline = _Deadline(self._clock() + self.timeout, transport)
        self._queue.append(deadline)
        return deadline

    def expire(self, now: float) -> None:
        """End the handshakes still in progress whose time has passed."""
        queue = self._queue
        while queue and queue[0].at <= now:
            transport = queue.popleft().transport
            if transport is not None:
                transport.handshake_expired()


class TlsTransport(asyncio.Protocol):
    """A server-side TLS connection for `app`, with `context`'s settings (certificates, ALPN,
    SNI callback). Give it to ``create_server`` or ``connect_accepted_socket`` as the
    protocol (``ssl=None``); `app` gets this object as its transport once the handshake is
    done. The handshake must end within `handshakes`' timeout; a client that spoke plain
    HTTP is closed `linger` seconds after its answer at most (see the module docstring)."""

    def __init__(
        self,
        context: ssl.SSLContext,
        app: asyncio.Protocol,
        handshakes: Handshakes,
        linger: float,
        *,
        plain_answer: bytes = b"",
        refused: Callable[[str], None] | None = None,
    ) -> None:
        self._context = context
        self._app: asyncio.Protocol | None = app
        self._handshakes = handshakes
        self._deadline: _Deadline | None = None  # the handshake's, until it ends
        self._linger = linger
        self._plain_answer = plain_answer
        self._refused = refused
        self._started = False  # a byte came
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        # Its C object (`_sslobj`, the same methods) where there is one: called directly,
        # a read or a write costs no interpreted frame (~0.5-0.9 us of a keep-alive
        # request's ~20, measured; and each handshake step). The public object otherwise.
        self._records: _Records = getattr(self._tls, "_sslobj", self._tls)
        self._tcp: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None  # after a plain HTTP answer: the end
        self._established = False  # the handshake is done: `app` is connected
        self._closing = False  # close() or abort() was called, or the handshake failed
        self._shut = False  # write_eof() was called: close_notify sent, reads dropped
        self._eof = False  # the application was told of the client's end

    def __repr__(self) -> str:
        state = "established" if self._established else "handshake"
        if self._closing:
            state += ", closing"
        elif self._shut:
            state += ", shut"
        return f"<TlsTransport [{state}]>"

    # -- asyncio.Protocol, for the TCP transport --------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._tcp = cast(asyncio.Transport, transport)
        self._deadline = self._handshakes.watch(self)

    def data_received(self, data: bytes) -> None:
        if self._closing or self._shut:
            return  # after close() or write_eof(): dropped
        if not self._started:
            self._started = True
            # A TLS connection begins with a handshake record (22); an HTTP request with
            # its method's first letter: a client that forgot https:// gets an answer it
            # can read, as from nginx, not a TLS alert.
            if self._plain_answer and data[0] != 22 and 65 <= data[0] <= 90:
                self._refuse("tls_plain_http")
                if self._tcp is not None:
                    self._tcp.write(self._plain_answer)
                self._closing = True
                self._linger_close()
                return
        self._incoming.write(data)
        if not self._established and not self._handshake():
            return
        self._read()

    def eof_received(self) -> bool | None:
        if not self._established or self._closing:
            return None  # the TCP transport closes itself
        return self._end()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._tcp = None
        self._unwatch()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        app = self._app
        self._app = None
        if app is not None and self._established:
            app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._app is not None and self._established:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._app is not None and self._established:
            self._app.resume_writing()

    # -- the TLS work -------------------------------------------------------------------

    def _handshake(self) -> bool:
        """Go on with the handshake; True once it is done and `app` is connected."""
        try:
            self._records.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return False
        except ssl.SSLError:
            # The client's affair (no common protocol, a bad record, our certificate
            # refused...): OpenSSL's alert, then the end, as any TLS server does; the
            # application never knew of it.
            self._refuse("tls_handshake_failed")
            self._flush()
            self.close()  # not established: the TCP connection's close, nothing else
            return False
        if self._records.version() != "TLSv1.3":
            # TLS 1.2's last flight holds the server's Finished, which the client waits
            # for; TLS 1.3's is only session tickets, sent with the first answer.
            self._flush()
        self._established = True
        self._unwatch()
        if self._app is not None:
            # Not a subclass of asyncio.Transport (a protocol already), as uvloop's are not.
            self._app.connection_made(cast(asyncio.Transport, self))
        return not self._closing

    def handshake_expired(self) -> None:
        """The handshake's time is up (`Handshakes.expire`): if it is still in progress,
        the connection is aborted."""
        self._deadline = None
        if not self._established and not self._closing:
            self._refuse("tls_handshake_timeout")
            self.abort()

    def _unwatch(self) -> None:
        deadline = self._deadline
        if deadline is not None:
            deadline.transport = None
            self._deadline = None

    def _refuse(self, reason: str) -> None:
        if self._refused is not None:
            self._refused(reason)

    def _read(self) -> None:
        """Decrypt what the client sent and give it to the application in one piece."""
        read = self._records.read
        incoming = self._incoming
        chunks: list[bytes] = []
        ended = False
        try:
            # Read while records are left (OpenSSL reads no further ahead than the record
            # it decrypts): ending on SSLWantReadError instead would cost an exception
            # object with its message (~1-2 us) a request.
            while incoming.pending:
                chunk = read(_READ_SIZE)
                if not chunk:
                    ended = True
                    break
                chunks.append(chunk)  # a whole record: OpenSSL holds none of it back
        except ssl.SSLWantReadError:
            pass  # a record's rest is still to come
        except ssl.SSLZeroReturnError:
            ended = True  # close_notify
        except ssl.SSLError:
            self.abort()  # a record that does not decrypt: nothing after it can be trusted
            return
        app = self._app
        if chunks and app is not None and not self._closing:
            app.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if ended and not self._closing and not self._end():
            self.close()

    def _end(self) -> bool | None:
        """Tell the application the client is done sending (once); its answer, as
        `eof_received`'s: True keeps the connection open for what it still writes."""
        if self._eof:
            return True
        self._eof = True
        app = self._app
        return None if app is None else app.eof_received()

    def _flush(self) -> None:
        data = self._outgoing.read()  # one call, not `pending` first: b"" when empty
        if data and self._tcp is not None:
            self._tcp.write(data)

    # -- asyncio.Transport, for the application -------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._shut or not data:
            return  # as asyncio's: writing after close() (or write_eof()) sends nothing
        try:
            self._records.write(data)
        except ssl.SSLError:
            self.abort()
            return
        self._flush()

    def writelines(self, list_of_data: Any) -> None:
        # One TLS record for what is written together, not one each.
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """close_notify, then the TCP half-close; what the client still sends is dropped,
        its TCP end is `eof_received` (see the module docstring). The application closes
        the transport when it has waited long enough."""
        if self._closing or self._shut:
            return
        self._shut = True
        tcp = self._tcp
        if tcp is None:
            return
        self._close_notify()
        tcp.write_eof()

    def close(self) -> None:
        """close_notify (unless `write_eof` sent it), then the TCP connection's close once
        its buffer is written."""
        if self._closing:
            return
        self._closing = True
        tcp = self._tcp
        if tcp is None:
            return
        if not self._shut:
            self._close_notify()
        tcp.close()

    def _close_notify(self) -> None:
        """Write what is still held (session tickets) and close_notify, if the handshake
        is done; a failed one's alert was written already."""
        if self._established:
            # Not contextlib.suppress: compiled, that is three calls into interpreted code
            # a connection.
            try:  # noqa: SIM105
                self._tls.unwrap()
            except ssl.SSLError:
                pass  # SSLWantReadError: the client's close_notify, which is not waited for
        self._flush()

    def _linger_close(self) -> None:
        """After the answer to plain HTTP, which no application wrote: half-close, and
        drop what the client still sends until it closes, for `linger` seconds at most (a
        close with unread input would reset the connection, and could destroy the answer)."""
        tcp = self._tcp
        if tcp is None:
            return
        self._unwatch()
        tcp.write_eof()
        self._timer = asyncio.get_running_loop().call_later(self._linger, tcp.abort)

    def abort(self) -> None:
        self._closing = True
        if self._tcp is not None:
            self._tcp.abort()

    def is_closing(self) -> bool:
        return self._closing or self._tcp is None or self._tcp.is_closing()

    def pause_reading(self) -> None:
        if self._tcp is not None and not self._closing:
            self._tcp.pause_reading()

    def resume_reading(self) -> None:
        if self._tcp is not None and not self._closing:
            self._tcp.resume_reading()

    def is_reading(self) -> bool:
        return self._tcp is not None and not self._closing and self._tcp.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._tcp is not None:
            self._tcp.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return 0 if self._tcp is None else self._tcp.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (0, 0) if self._tcp is None else self._tcp.get_write_buffer_limits()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._app = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol | None:
        return self._app

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._tls
        if name == "sslcontext":
            return self._context
        if name == "peercert":
            return self._tls.getpeercert() if self._established else default
        if name == "cipher":
            return self._tls.cipher() if self._established else default
        if name == "compression":
            return self._tls.compression()
        return default if self._tcp is None else self._tcp.get_extra_info(name, default)
