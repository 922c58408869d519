"""The upstream keep-alive pool's size: `PoolDemand`'s rule as a table (pure, the clock
passed in), and a real proxy holding as many connections as its clients keep busy."""

from __future__ import annotations

import asyncio

import pytest

from balancer import ProxyOptions
from balancer.datapath._upstream import DEMAND_WINDOW, PoolDemand
from tests.balancer.backends import Client, HttpBackend, running_proxy

W = DEMAND_WINDOW


def test_a_pool_keeps_what_was_busy_at_once() -> None:
    demand = PoolDemand(cap=1024, now=0.0)
    for busy in range(1, 65):
        demand.busy(busy)  # 64 clients take a connection each
    assert demand.target == 64
    # The 64 are given back one by one: each is kept (64 open with it at most).
    assert [demand.keeps(live=64, idle=idle) for idle in (0, 31, 32, 63)] == [True] * 4
    assert demand.surplus(live=64, idle=64) == 0


def test_the_cap_bounds_the_idle_ones() -> None:
    demand = PoolDemand(cap=32, now=0.0)
    demand.busy(64)
    assert demand.keeps(live=64, idle=31)
    assert not demand.keeps(live=64, idle=32)  # nginx's `keepalive 32`, as a cap
    assert demand.surplus(live=64, idle=40) == 8


def test_cap_zero_keeps_nothing() -> None:
    demand = PoolDemand(cap=0, now=0.0)
    demand.busy(3)
    assert not demand.keeps(live=1, idle=0)
    assert demand.surplus(live=2, idle=2) == 2


@pytest.mark.parametrize(
    ("events", "target"),
    [
        ([("busy", 64), ("tick", W - 0.1, 0)], 64),  # within the window
        ([("busy", 64), ("tick", W, 0)], 64),  # a window later: the last window's peak
        ([("busy", 64), ("tick", W, 0), ("tick", 2 * W - 0.1, 0)], 64),
        ([("busy", 64), ("tick", W, 0), ("tick", 2 * W, 0)], 1),  # 2 windows quiet: 1
        ([("busy", 64), ("tick", W, 5), ("tick", 2 * W, 3)], 5),  # the 5 busy at W
        ([("busy", 64), ("tick", W, 0), ("busy", 10), ("tick", 2 * W, 2)], 10),
        ([("tick", 3 * W, 0)], 1),  # at least one, for the first request after a pause
    ],
    ids=["within", "next-window", "late-next", "quiet", "busy-at-tick", "new-peak", "floor"],
)
def test_the_target_is_the_peak_of_this_window_and_the_last(
    events: list[tuple[str, float] | tuple[str, float, int]], target: int
) -> None:
    demand = PoolDemand(cap=1024, now=0.0)
    for event in events:
        if event[0] == "busy":
            demand.busy(int(event[1]))
        else:
            _, now, busy = event  # type: ignore[misc]
            demand.tick(now, busy)
    assert demand.target == target


def test_after_a_burst_the_surplus_is_closed() -> None:
    demand = PoolDemand(cap=1024, now=0.0)
    demand.busy(64)
    demand.tick(W, 2)
    demand.tick(2 * W, 2)  # 2 busy since: 62 of the 64 idle are surplus
    assert demand.target == 2
    assert demand.surplus(live=66, idle=64) == 64
    assert demand.surplus(live=64, idle=62) == 62
    assert not demand.keeps(live=3, idle=0)


@pytest.mark.parametrize(
    ("cap", "window", "message"),
    [(-1, W, "cap must be >= 0"), (1, 0.0, "window must be > 0 seconds")],
)
def test_bad_arguments(cap: int, window: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PoolDemand(cap, window)


# -- a real proxy ----------------------------------------------------------------------

CLIENTS = 64


async def _burst(backend: HttpBackend, clients: list[Client]) -> list[int]:
    """One request from each client, all busy on the backend at once: each head reaches the
    backend, which waits for the body, before any client sends its body."""
    seen = len(backend.seen)
    head = b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\n"
    await asyncio.gather(*(client.send(head) for client in clients))
    await backend.wait_seen(seen + len(clients))
    await asyncio.gather(*(client.send(b"x") for client in clients))
    responses = await asyncio.gather(*(client.read() for client in clients))
    return [response.status for response in responses]


@pytest.mark.anyio
async def test_64_clients_on_one_backend_reuse_their_64_connections() -> None:
    # The default pool: issue 17's "defaults that do not fall off a cliff". With the fixed
    # bound of 32 idle, each burst of 64 closed 32 connections and opened 32 again.
    async with HttpBackend() as backend, running_proxy([backend.url]) as (server, _, _m):
        clients = [await Client.open(server.port) for _ in range(CLIENTS)]
        try:
            for _ in range(3):
                assert await _burst(backend, clients) == [200] * CLIENTS
            (pool,) = server.pools.values()
            assert (pool.opened, backend.connections) == (CLIENTS, CLIENTS)
            assert pool.idle == CLIENTS
        finally:
            for client in clients:
                await client.close()


@pytest.mark.anyio
async def test_idle_connections_beyond_recent_demand_are_closed() -> None:
    options = ProxyOptions(queue_timeout=0.0)
    async with HttpBackend() as backend, running_proxy([backend.url], options) as (server, _, _m):
        clients = [await Client.open(server.port) for _ in range(8)]
        try:
            assert await _burst(backend, clients) == [200] * 8
            (pool,) = server.pools.values()
            assert pool.idle == 8
            # The clock the proxy's timer passes: two quiet windows later, one is kept.
            now = server.clock()
            pool.tick(now + W)
            pool.tick(now + 2 * W)
            assert pool.idle == 1
            assert (await clients[0].request(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")).status == 200
            assert pool.opened == 8  # the kept one served it
        finally:
            for client in clients:
                await client.close()
