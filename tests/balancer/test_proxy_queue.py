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
