"""Redis server-assisted client tracking: which cached sessions were written elsewhere.

A `Tracker` holds one dedicated RESP2 connection to the Redis server, on which it runs
``CLIENT TRACKING ON REDIRECT <its own id> BCAST PREFIX <prefix>`` and then ``SUBSCRIBE
__redis__:invalidate``: from then on Redis sends it the name of every key under the
prefix that any client writes (or that expires, or is evicted), and ``None`` for a
FLUSHDB or FLUSHALL. Redis queues a write's invalidation before the write's own reply
(issue 16 measured 104 us at p50 from another process's write to its arrival here).

What a cache may rely on, and what it may not:

- `Tracker.current` says whether a cached copy may be served without asking Redis: only
  while the connection is subscribed and has answered (an invalidation, or the PONG of the
  PING it sends every ``ping_interval``) within the last ``lease`` seconds. A connection
  that Redis stops answering (a stall, a partition, a paused server) stops cached reads
  after ``lease``, and is dropped and made again after ``silence_limit``.
- `Tracker.epoch` changes each time tracking starts (the first time, and after every lost
  connection): invalidations sent while no connection was subscribed are lost, so a copy
  trusted under an older epoch must be checked with Redis again.
- Every invalidation, and every flush, goes to ``on_invalidate`` in the order Redis sent
  them, before `current` can say yes again after them.

One server only (``redis://``, ``unix://``): a Sentinel's primary moves and a Cluster needs
one tracking connection per primary; `tracker_for` returns None for those, and the
`HybridStore` then checks every read with Redis, as it did before tracking existed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio
import redis.exceptions
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.sentinel import SentinelConnectionPool

from redis_plumbing import RedisClient

__all__ = ["INVALIDATE_CHANNEL", "Tracker", "tracker_for"]

logger = logging.getLogger("session_store")

INVALIDATE_CHANNEL = "__redis__:invalidate"

OnInvalidate = Callable[[Sequence[str] | None], None]  # key names, or None: everything


class _Silent(Exception):
    """The tracking connection did not answer a PING within ``silence_limit``."""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Tracker:
    """One tracking connection and the state a cache reads from it (see the module doc).

    ``connect`` makes a new, unconnected redis-py `Connection` speaking RESP2 with no
    socket timeout (the PING lease bounds silence instead). `start` runs the connection
    in a background task, made again ``retry_interval`` seconds after any loss; `aclose`
    ends it.
    """

    def __init__(
        self,
        connect: Callable[[], AbstractConnection],
        prefix: str,
        on_invalidate: OnInvalidate,
        *,
        ping_interval: float = 0.1,  # seconds
        lease: float = 0.3,  # seconds without any reply before cached reads stop
        silence_limit: float = 1.0,  # seconds without any reply before reconnecting
        retry_interval: float = 0.05,  # seconds between connection attempts
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < ping_interval < lease <= silence_limit:
            raise ValueError("tracking needs 0 < ping_interval < lease <= silence_limit")
        self._connect = connect
        self.prefix = prefix
        self._on_invalidate = on_invalidate
        self.ping_interval = ping_interval
        self.lease = lease
        self.silence_limit = silence_limit
        self.retry_interval = retry_interval
        self._clock = clock
        self.epoch = 0
        self.client_id: int | None = None  # of the tracking connection, once subscribed
        self._subscribed = False
        self._last_reply = 0.0  # clock() when the connection last said anything
        self._task: asyncio.Task[None] | None = None
        self.subscribed_event = asyncio.Event()  # set while subscribed (tests wait on it)

    @property
    def current(self) -> bool:
        """Whether a copy trusted under `epoch` may be served without asking Redis now."""
        return self._subscribed and self._clock() - self._last_reply < self.lease

    def start(self) -> None:
        """Run the tracking connection in the background, if it is not running yet."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._lost()

    def _lost(self) -> None:
        if self._subscribed:
            self._subscribed = False
            self.subscribed_event.clear()
            self.epoch += 1  # invalidations may be missed from now on

    async def _run(self) -> None:
        while True:
            try:
                await self._track()
            except* (redis.exceptions.RedisError, OSError, _Silent) as group:
                # Once per loss, not once per attempt while Redis stays away.
                log = logger.warning if self._subscribed else logger.debug
                log("session cache: no tracking, reads ask Redis: %s", group.exceptions[0])
            finally:
                self._lost()
            await asyncio.sleep(self.retry_interval)

    async def _track(self) -> None:
        connection = self._connect()
        try:
            async with asyncio.timeout(self.silence_limit):
                await connection.connect()  # type: ignore[no-untyped-call]  # redis-py
                await connection.send_command("CLIENT", "ID")
                client_id = int(await connection.read_response())
                await connection.send_command(
                    "CLIENT", "TRACKING", "ON", "REDIRECT", client_id, "BCAST",
                    "PREFIX", self.prefix,
                )  # fmt: skip
                await connection.read_response()
                await connection.send_command("SUBSCRIBE", INVALIDATE_CHANNEL)
                await connection.read_response()
            self.client_id = client_id
            self._last_reply = self._clock()
            self.epoch += 1  # a new epoch: nothing trusted before it counts
            self._subscribed = True
            self.subscribed_event.set()
            async with asyncio.TaskGroup() as group:
                group.create_task(self._read(connection))
                group.create_task(self._ping(connection))
        finally:
            await connection.disconnect(nowait=True)

    async def _read(self, connection: AbstractConnection) -> None:
        while True:
            message = await connection.read_response()
            self._last_reply = self._clock()
            if not isinstance(message, list) or len(message) < 3:
                continue  # a PONG: ["pong", ""]
            if _text(message[0]) != "message" or _text(message[1]) != INVALIDATE_CHANNEL:
                continue
            keys = message[2]
            # None: FLUSHDB or FLUSHALL, every key at once.
            self._on_invalidate(None if keys is None else [_text(key) for key in keys])

    async def _ping(self, connection: AbstractConnection) -> None:
        while True:
            await asyncio.sleep(self.ping_interval)
            if self._clock() - self._last_reply > self.silence_limit:
                raise _Silent(f"no reply for {self.silence_limit} s")
            await connection.send_command("PING")


def tracker_for(client: RedisClient, prefix: str, on_invalidate: OnInvalidate) -> Tracker | None:
    """A `Tracker` for the one server behind ``client``, or None where one connection
    cannot see every write (a Sentinel's moving primary, a Cluster's several)."""
    if not isinstance(client, redis.asyncio.Redis):
        return None  # a RedisCluster
    pool = client.connection_pool
    if isinstance(pool, SentinelConnectionPool):
        return None
    kwargs = {**pool.connection_kwargs, "protocol": 2, "socket_timeout": None}
    connection_class = pool.connection_class

    def connect() -> AbstractConnection:
        return connection_class(**kwargs)

    return Tracker(connect, prefix, on_invalidate)
