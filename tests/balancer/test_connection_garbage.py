"""A closed client connection is freed by reference counting, not left to the cyclic
garbage collector.

A connection whose objects form a reference cycle (the protocol and its HTTP parser, which
holds the protocol's bound methods) keeps everything hanging off it alive until the next
gen-0 collection: under TLS that is the OpenSSL connection and its buffers too. With the
data path's raised collection threshold that was ~800 dead connections at a time, ~22 objects
each, and their memory came back cold: a new handshake cost ~10% more CPU than with the
memory reused at once (docs/architecture.md, "Measured facts"). These tests run on uvloop, the
loop the balancer runs on, and count what a collection would have to free.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import ssl
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from balancer import ProxyOptions, ProxyServer
from balancer.control._tls import CertificatePair, server_context
from tests.balancer.backends import HttpBackend, ListRouter, RecordingMetrics
from tests.balancer.certs import Authority
from tests.helpers import async_wait_until

# The modules whose objects make up a connection on the balancer's side.
_OURS = ("balancer.", "httptools.", "uvloop.", "_ssl", "ssl")
_CONNECTIONS = 20

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, bool]]:
    return ("asyncio", {"use_uvloop": True})


@pytest.fixture
def collector_paused() -> Iterator[None]:
    """The collector off, and what a collection finds unreachable kept in gc.garbage."""
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def _fetch(port: int, context: ssl.SSLContext | None) -> bytes:
    """One request with `Connection: close` on a blocking socket (no objects of an event
    loop on the client's side), the response read to the server's close."""
    with contextlib.ExitStack() as stack:
        sock = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
        if context is not None:
            sock = stack.enter_context(context.wrap_socket(sock, server_hostname="localhost"))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def _unreachable() -> Counter[str]:
    """The connection objects a full collection finds unreachable, by type."""
    gc.garbage.clear()
    gc.collect()
    found = Counter(
        f"{type(item).__module__}.{type(item).__qualname__}"
        for item in gc.garbage
        if type(item).__module__.startswith(_OURS)
    )
    gc.garbage.clear()
    return found


@pytest.mark.usefixtures("collector_paused")
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_a_closed_connection_leaves_nothing_for_the_collector(
    tmp_path: Path, tls: bool
) -> None:
    context = None
    client = None
    if tls:
        authority = Authority.create(tmp_path / "tls")
        leaf = authority.issue("proxy", "localhost")
        context = server_context(CertificatePair(leaf.cert, leaf.key), ["http/1.1"])
        client = ssl.create_default_context(cafile=str(authority.cert))
    async with HttpBackend("a") as backend:
        metrics = RecordingMetrics()
        server = ProxyServer(ListRouter([backend.url]), metrics, ProxyOptions())
        await server.start("127.0.0.1", 0, tls=context)
        try:
            port = server.port
            # The first connection opens the pooled backend connection, which stays.
            assert (await asyncio.to_thread(_fetch, port, client)).endswith(b"hello from a")
            await async_wait_until(lambda: metrics.closed == 1, 10, "the first close")
            before = _unreachable()
            for _ in range(_CONNECTIONS):
                answer = await asyncio.to_thread(_fetch, port, client)
                assert answer.startswith(b"HTTP/1.1 200 ")
            closed = 1 + _CONNECTIONS
            await async_wait_until(lambda: metrics.closed == closed, 10, "every close")
            assert _unreachable() - before == Counter()
        finally:
            await server.shutdown()
