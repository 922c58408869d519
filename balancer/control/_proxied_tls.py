"""The listener of `--proxy-protocol` with `--tls-cert`: each connection's PROXY header is
read in clear, then its TLS handshake begins (issue 17; an AWS NLB, HAProxy `send-proxy` or
nginx `stream` in front of a TLS listener).

asyncio's TLS server (`loop.create_server(ssl=...)`) reads a connection's first bytes as
TLS, and `loop.start_tls` cannot be given bytes read past the header. So this listener
accepts the sockets itself (`listening_sockets`: what `create_server` would bind, with the
same backlog, SO_REUSEPORT for `--workers N` and IPV6_V6ONLY), and for each one:

1. a peer outside `--trusted-proxy` is closed at once (nothing is read);
2. the header is read without taking a byte past it: what the socket holds is peeked
   (MSG_PEEK) and `datapath._proxy_protocol.read_header` says how long the header is; bytes
   it needs more after are all header, so they are taken, and only the header's last ones
   once it is complete. Within `header_timeout` seconds, else closed;
3. `loop.connect_accepted_socket` with the protocol that `ProxyServer.tls_protocol` makes
   with the listener's SSL context: the data path's TLS, then its own connection
   (HTTP/1.1, or what ALPN chooses), told the header's client, reading no header of its
   own. The handshake gets `header_timeout` seconds too, as on any TLS listener.

A refused connection (1, a bad header, or the timeout in 2) is closed unanswered, counted
as the plain listener counts it (`proxy_untrusted`, `proxy_<reason>`,
`proxy_header_timeout`) and logged. At most `MAX_PENDING_HEADERS` connections wait for
their header at once: past that, accepting pauses until one is done (the rest wait in the
kernel's backlog), so that peers that never finish a header cannot hold every fd.

Here, not in the compiled data path: this is per-connection orchestration (a Task each,
waits and cancellation), which the data path keeps out of (its module docstring: a request
runs no Task); the decisions are the data path's (`read_header`, `TrustedProxies`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from functools import partial
from typing import Final

from ..datapath._proxy import ListenerTls, ProxyServer
from ..datapath._proxy_protocol import V2_MAX, BadProxyHeader, ProxyHeader, read_header

__all__ = ["BACKLOG", "MAX_PENDING_HEADERS", "ProxiedTlsListener", "listening_sockets"]

logger = logging.getLogger("balancer")

BACKLOG: Final = 2048  # the listen() backlog, ProxyServer.start's
MAX_PENDING_HEADERS: Final = 1024  # connections waiting for their PROXY header, at most
_ACCEPT_RETRY: Final = 1.0  # seconds before accepting again after EMFILE & co (asyncio's)


async def listening_sockets(
    host: str, port: int, *, reuse_port: bool = False, backlog: int = BACKLOG
) -> list[socket.socket]:
    """Listening, non-blocking sockets on every address of `host` ("" or "0.0.0.0"-like:
    as `loop.create_server` binds them): SO_REUSEADDR, SO_REUSEPORT with `reuse_port`,
    IPV6_V6ONLY on IPv6. Raises OSError (none is left open then)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _close(sock: socket.socket, _: object) -> None:
    sock.close()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def _readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()
    loop.add_reader(fd, _wake, waiter)
    try:
        await waiter
    finally:
        loop.remove_reader(fd)


def _take(sock: socket.socket, size: int) -> bytes:
    """`size` bytes that a peek has shown are there."""
    data = sock.recv(size)
    if len(data) != size:
        raise ConnectionError(f"peeked {size} bytes, read {len(data)}")
    return data


async def read_proxy_header(sock: socket.socket) -> ProxyHeader:
    """The PROXY header at the start of non-blocking `sock`, leaving every byte after it in
    the socket. Raises BadProxyHeader (its reason), EOFError (closed before it ended) or
    OSError; the caller bounds the time."""
    taken = b""
    while True:
        await _readable(sock)
        try:
            peeked = sock.recv(V2_MAX - len(taken), socket.MSG_PEEK)
        except BlockingIOError:
            continue
        if not peeked:
            raise EOFError("closed before the PROXY header ended")
        found = read_header(taken + peeked)
        if found is None:
            # read_header needs more only while every byte so far can be the header's.
            taken += _take(sock, len(peeked))
            continue
        _take(sock, found.consumed - len(taken))
        return found


class ProxiedTlsListener:
    """Accepts for `proxy` (which `adopt`s it): the PROXY header, then TLS with `tls`; see
    the module docstring. `sockets`, `close` and `wait_closed` as asyncio.Server's."""

    def __init__(
        self,
        proxy: ProxyServer,
        tls: ssl.SSLContext | ListenerTls,
        *,
        max_pending: int = MAX_PENDING_HEADERS,
    ) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, not {max_pending!r}")
        self._proxy = proxy
        self._tls = tls
        self._timeout = proxy.options.header_timeout  # seconds: the header, the handshake
        self._slots = asyncio.Semaphore(max_pending)
        self.sockets: list[socket.socket] = []
        self._accepting: list[asyncio.Task[None]] = []
        # The connections waiting for their header, by task; each holds a slot.
        self._reading: dict[asyncio.Task[None], socket.socket] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # every connection's, until it is handed on
        self._closed = False

    def __repr__(self) -> str:
        return f"<ProxiedTlsListener [sockets: {len(self.sockets)}, pending: {self.pending}]>"

    @property
    def pending(self) -> int:
        """Connections waiting for their PROXY header now."""
        return len(self._reading)

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        """Listen on `host:port` and accept from then on; raises OSError."""
        self.sockets = await listening_sockets(host, port, reuse_port=reuse_port)
        loop = asyncio.get_running_loop()
        self._accepting = [
            loop.create_task(self._accept(sock), name=f"accept {sock.getsockname()!r}")
            for sock in self.sockets
        ]

    def close(self) -> None:
        """Stop accepting and close the listening sockets; a connection still waiting for
        its header is closed, one in its handshake finishes it (within `header_timeout`)."""
        self._closed = True
        for task in self._reading:
            task.cancel()
        for task, sock in zip(self._accepting, self.sockets, strict=True):
            # Closed once its accept loop has let go of it: the fd is not reused under a
            # sock_accept still registered (the cancellation lands at the next iteration).
            task.add_done_callback(partial(_close, sock))
            task.cancel()

    async def wait_closed(self) -> None:
        """Returns once the accept loops and every connection's task have ended."""
        await asyncio.gather(*self._accepting, *self._tasks, return_exceptions=True)

    async def _accept(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        trusted = self._proxy.trusted
        while not self._closed:
            await self._slots.acquire()
            try:
                sock, address = await loop.sock_accept(listening)
            except OSError as exc:
                self._slots.release()
                # Out of fds or memory, say: asyncio's servers retry after a second.
                logger.warning("accept failed on %s: %s", listening.getsockname(), exc)
                await asyncio.sleep(_ACCEPT_RETRY)
                continue
            except BaseException:
                self._slots.release()
                raise
            sock.setblocking(False)
            peer = str(address[0]) if isinstance(address, tuple) else ""
            if peer not in trusted:
                self._slots.release()
                self._refuse(sock, peer, "proxy_untrusted")
                continue
            task = loop.create_task(self._connection(sock, peer))
            self._reading[task] = sock
            self._tasks.add(task)
            task.add_done_callback(self._ended)

    def _header_done(self, task: asyncio.Task[None]) -> None:
        if self._reading.pop(task, None) is not None:
            self._slots.release()

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        sock = self._reading.get(task)
        self._header_done(task)
        if sock is not None:
            sock.close()  # cancelled (the listener closed), maybe before it ever ran

    async def _connection(self, sock: socket.socket, peer: str) -> None:
        task = asyncio.current_task()
        assert task is not None
        try:
            async with asyncio.timeout(self._timeout):
                header = await read_proxy_header(sock)
        except TimeoutError:
            self._refuse(sock, peer, "proxy_header_timeout")
            return
        except BadProxyHeader as exc:
            self._refuse(sock, peer, "proxy_" + exc.reason)
            return
        except (EOFError, OSError):
            sock.close()  # the peer left: as on the plain listener, not counted
            return
        except asyncio.CancelledError:
            sock.close()  # the listener closed
            raise
        finally:
            self._header_done(task)
        try:
            # The handshake is the data path's (`ProxyServer.tls_protocol`), within the
            # same `header_timeout`; a failed one is the client's affair, as on any TLS
            # listener.
            await asyncio.get_running_loop().connect_accepted_socket(
                partial(self._proxy.tls_protocol, self._tls, header.client, proxied=True),
                sock,
            )
        except OSError as exc:
            sock.close()
            logger.debug("connection from %s (via %s) lost: %r", header.client, peer, exc)

    def _refuse(self, sock: socket.socket, peer: str, reason: str) -> None:
        """Close `sock` unanswered: its PROXY header is not believed."""
        self._proxy.metrics.rejected(reason)
        logger.info("PROXY header refused from %s: %s", peer, reason)
        sock.close()
