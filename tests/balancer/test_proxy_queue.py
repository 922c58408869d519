"""The queue: a request that no backend can take waits up to `queue_timeout` for one
(HAProxy's `timeout queue`), so a restarting worker is a delay rather than a 503."""

from __future__ import annotations

import asyncio
import time

import pytest

from balancer import Pool, ProxyOptions, ProxyServer, Router, Sticky
from tests.balancer.backends import Client, HttpBackend, RecordingMetrics, silent_port
from tests.helpers import async_wait_until

pytestmark = pytest.mark.anyio

GET = b"GET /hello HTTP/1.1\r\nHost: example.test\r\n\r\n"


async def started(pool: Pool, queue_timeout: float, connect_timeout: float = 3.0) -> ProxyServer:
    router = Router(pool, sticky=Sticky("none"))
    options = ProxyOptions(queue_timeout=queue_timeout, connect_timeout=connect_timeout)
    server = ProxyServer(router, RecordingMetrics(), options, backends=pool)
    await server.start("127.0.0.1", 0)
    return server


async def test_a_queued_request_goes_out_when_a_backend_comes_up() -> None:
    async with HttpBackend() as backend:
        pool = Pool([backend.url])
        (only,) = pool
        only.mark_down("test: not ready yet", time.monotonic())
        server = await started(pool, queue_timeout=10)
        try:
            client = await Client.open(server.port)
            answer = asyncio.ensure_future(client.request(GET))
            await async_wait_until(lambda: server.queued > 0, 5, "the request to queue")
            assert backend.connections == 0
            only.mark_up(time.monotonic())
            response = await asyncio.wait_for(answer, 5)
            assert response.status == 200
            assert server.queued == 0
            await client.close()
        finally:
            await server.shutdown()


@pytest.mark.parametrize("queue_timeout", [0.0, 0.3])
async def test_no_backend_within_the_queue_timeout_is_503(queue_timeout: float) -> None:
    async with HttpBackend() as backend:
        pool = Pool([backend.url])
        (only,) = pool
        only.mark_down("test: down", time.monotonic())
        server = await started(pool, queue_timeout=queue_timeout)
        try:
            client = await Client.open(server.port)
            began = time.monotonic()
            response = await asyncio.wait_for(client.request(GET), 5)
            waited = time.monotonic() - began
            assert response.status == 503
            assert waited >= queue_timeout
            assert waited < queue_timeout + 2
            assert backend.connections == 0
            await client.close()
        finally:
            await server.shutdown()


async def test_a_request_whose_backend_leaves_while_connecting_is_still_answered() -> None:
    # A crashed worker leaves the pool while a request is connecting to it: its pool closes.
    # The connect must still call back (here, time out) so the request goes elsewhere; it
    # once was cancelled without a word, and the request hung until the client gave up.
    with silent_port() as port:
        async with HttpBackend() as backend:
            pool = Pool([f"http://127.0.0.1:{port}", backend.url])
            silent, other = pool
            other.mark_down("test: not ready yet", time.monotonic())
            server = await started(pool, queue_timeout=10, connect_timeout=0.5)
            try:
                client = await Client.open(server.port)
                answer = asyncio.ensure_future(client.request(GET))
                await async_wait_until(lambda: silent.id in server.pools, 5, "the connect")
                pool.remove(silent.id)
                other.mark_up(time.monotonic())
                await async_wait_until(lambda: silent.id not in server.pools, 5, "its pool closed")
                response = await asyncio.wait_for(answer, 5)
                assert response.status == 200
                assert response.text == "hello from a"
                await client.close()
            finally:
                await server.shutdown()


# -- max-conns: a backend's cap on requests in flight (`--backend "URL max-conns=N"`) -------


def wait_get(ms: int) -> bytes:
    return b"GET /wait/%d HTTP/1.1\r\nHost: example.test\r\n\r\n" % ms


async def capped(
    urls: list[tuple[str, int]], sticky: str, queue_timeout: float
) -> tuple[Pool, ProxyServer]:
    """A proxy over `(url, max_conns)` backends."""
    pool = Pool()
    for url, max_conns in urls:
        pool.add(url, max_conns=max_conns)
    router = Router(pool, sticky=Sticky(sticky))  # type: ignore[arg-type]
    server = ProxyServer(
        router, RecordingMetrics(), ProxyOptions(queue_timeout=queue_timeout), backends=pool
    )
    await server.start("127.0.0.1", 0)
    return pool, server


async def concurrently(port: int, requests: list[bytes]) -> list[int]:
    """Each request on a connection of its own, all at once; their statuses, in order."""
    clients = [await Client.open(port) for _ in requests]
    try:
        answers = await asyncio.wait_for(
            asyncio.gather(*(c.request(r) for c, r in zip(clients, requests, strict=True))), 20
        )
        return [a.status for a in answers]
    finally:
        for client in clients:
            await client.close()


@pytest.mark.parametrize("sticky", ["none", "ip"])
async def test_a_capped_backend_never_has_more_than_max_conns_in_flight(sticky: str) -> None:
    # One backend, max-conns 2, 8 requests at once: 2 go out, 6 wait in the queue and go out
    # as places free (in mode ip each is pinned there by the hash: it waits, never elsewhere).
    async with HttpBackend() as backend:
        _, server = await capped([(backend.url, 2)], sticky, queue_timeout=10)
        try:
            statuses = await concurrently(server.port, [wait_get(100)] * 8)
            assert statuses == [200] * 8
            assert backend.peak == 2
            assert server.queued == 0
        finally:
            await server.shutdown()


async def test_an_unpinned_request_goes_to_another_backend_when_one_is_at_its_cap() -> None:
    async with HttpBackend("a") as a, HttpBackend("b") as b:
        _, server = await capped([(a.url, 1), (b.url, 0)], "none", queue_timeout=10)
        try:
            statuses = await concurrently(server.port, [wait_get(300)] * 5)
            assert statuses == [200] * 5
            assert a.peak == 1
            assert len(a.seen) == 1  # the others went to b at once, not to a's queue
            assert len(b.seen) == 4
        finally:
            await server.shutdown()


async def test_a_pinned_request_waits_for_its_capped_backend_then_is_503() -> None:
    # Mode ip pins every request from 127.0.0.1 to one backend: the second waits the queue
    # timeout for the first's place, then 503; the other backend never sees it.
    async with HttpBackend("a") as a, HttpBackend("b") as b:
        _, server = await capped([(a.url, 1), (b.url, 1)], "ip", queue_timeout=0.3)
        try:
            first_client = await Client.open(server.port)
            first = asyncio.ensure_future(first_client.request(wait_get(1000)))
            await async_wait_until(lambda: a.in_progress + b.in_progress == 1, 5, "the first")
            pinned = a if a.in_progress else b
            second_client = await Client.open(server.port)
            began = time.monotonic()
            response = await asyncio.wait_for(second_client.request(wait_get(0)), 5)
            waited = time.monotonic() - began
            assert response.status == 503
            assert 0.3 <= waited < 2.0
            assert len(a.seen) + len(b.seen) == 1
            assert pinned.peak == 1
            first.cancel()
            await first_client.close()
            await second_client.close()
        finally:
            await server.shutdown()
