"""Hybrid mode under load while Redis dies and comes back empty (issue 13, defect 1).

A real demo_app process in hybrid mode, 20 clients with cookie jars of their own POSTing
`/api/counter` every 100 ms, a few of them two requests at a time; Redis is SIGKILLed and
started again, empty, on the same port, while writes made during the outage are still
deferred. Before the fix 14 to 20 of 20 counters fell back to 1 within 0.2 s of Redis
returning: the first save to reach the empty Redis found no session and cleared the cookie.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import httpx
import pytest

from redis_plumbing import RedisServer
from session_store import RedisStore
from tests.helpers import async_wait_for
from tests.processes import demo_app

pytestmark = pytest.mark.anyio

CLIENTS = 20
PAIRED = 4  # of them, this many send two requests at a time (several in flight per session)
TICK = 0.1  # seconds between one client's requests


@dataclass
class Client:
    http: httpx.AsyncClient
    paired: bool
    counts: list[int] = field(default_factory=list)
    cookies: set[str] = field(default_factory=set)
    failures: list[str] = field(default_factory=list)

    async def tick(self, *, first: bool = False) -> None:
        calls = 2 if self.paired and not first else 1  # the first creates the session
        responses = await asyncio.gather(
            *(self.http.post("/api/counter") for _ in range(calls)), return_exceptions=True
        )
        for response in responses:
            if isinstance(response, BaseException):
                self.failures.append(repr(response))
            elif response.status_code != 200:
                self.failures.append(f"{response.status_code} {response.text[:80]}")
            else:
                self.counts.append(response.json()["count"])
        self.cookies.add(self.http.cookies.get("sid") or "(cleared)")

    def reset(self) -> bool:
        """Whether the count ever fell back: below what was already counted, less the
        increments of its own concurrent requests (two that read one count both write it)."""
        highest = 0
        for count in self.counts:
            if count < highest - 1:
                return True
            highest = max(highest, count)
        return False


async def _run(clients: list[Client], until: float) -> None:
    async def loop(client: Client) -> None:
        while time.monotonic() < until:
            started = time.monotonic()
            await client.tick()
            await asyncio.sleep(max(0.0, TICK - (time.monotonic() - started)))

    await asyncio.gather(*(loop(c) for c in clients))


async def test_hybrid_keeps_every_session_when_redis_returns_empty_under_load(
    own_redis: RedisServer,
) -> None:
    with demo_app("h", "hybrid", own_redis.url) as app:
        clients = [
            Client(httpx.AsyncClient(base_url=app.url, timeout=10), paired=i < PAIRED)
            for i in range(CLIENTS)
        ]
        try:
            for client in clients:  # each session exists in Redis before the outage
                await client.tick(first=True)
            await _run(clients, time.monotonic() + 0.5)
            own_redis.kill()
            await _run(clients, time.monotonic() + 1.5)  # served from memory, writes deferred
            own_redis.start()  # same port, empty; the deferred writes are still waiting
            await _run(clients, time.monotonic() + 2.0)
        finally:
            for client in clients:
                await client.http.aclose()

        assert [c.failures for c in clients if c.failures] == []
        lost = [i for i, c in enumerate(clients) if len(c.cookies) > 1 or c.reset()]
        assert lost == [], f"{len(lost)} of {CLIENTS} sessions lost or reset: " + "; ".join(
            f"client {i}: counts {clients[i].counts}" for i in lost[:3]
        )

        # And Redis, which came back empty, holds every session with its last count.
        redis = RedisStore.from_url(own_redis.url)
        try:

            async def every_session_in_redis() -> bool:
                for client in clients:
                    record = await redis.load(next(iter(client.cookies)).split(".")[0])
                    if record is None or int(record.fields["count"]) < max(client.counts):
                        return False
                return True

            await async_wait_for(every_session_in_redis, within=5, what="every session in redis")
        finally:
            await redis.aclose()
