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

Where the connection goes, by topology (`tracker_for`):

- One server (``redis://``, ``unix://``): one `Tracker` on it.
- Sentinel (``redis+sentinel://``): one `Tracker` on the primary the sentinels name, which
  checks with ``ROLE`` before it subscribes that the server is a primary (a replica's
  tracking would not see the writes made on the primary), and asks the sentinels every
  ``check_interval`` whether they still name it. A failover ends the connection either way:
  the sentinels kill the clients of a primary they demote (``CLIENT KILL TYPE pubsub``), a
  crashed primary closes it, and the check catches a primary that is cut off from the
  sentinels but not from us. The next connection goes to the new primary, under a new
  epoch: copies trusted under the old primary are checked with the new one, which is the
  truth (a write the old primary acknowledged but never replicated is lost in a failover,
  and no cached copy of it outlives the failover either). A check the sentinels cannot
  answer keeps tracking as it is: without a quorum of sentinels no failover can happen.
- Cluster (``redis+cluster://``): a `ClusterTracker`, one `Tracker` per primary (each node's
  BCAST covers the keys of the slots it owns, and a key's invalidation comes from the node
  that owns it). It reads the primaries (``CLUSTER SLOTS``) every ``check_interval`` and
  re-tracks when the set changes (a node failed over, a primary added or removed), under a
  new epoch. Slots that move between tracked primaries need nothing: the keys' deletion on
  the old owner and their writes on the new one are both invalidated. A copy is served
  only while every primary's connection is current ("all current", not per key): one lost
  node stops cached reads for a moment everywhere, which costs a version check a read
  while it reconnects (~50 ms), where a per-key rule would cost a slot hash on every read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import redis.asyncio
import redis.exceptions
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.sentinel import SentinelConnectionPool

from redis_plumbing import RedisClient

__all__ = ["INVALIDATE_CHANNEL", "ClusterTracker", "Tracker", "Tracking", "tracker_for"]

logger = logging.getLogger("session_store")

INVALIDATE_CHANNEL = "__redis__:invalidate"

OnInvalidate = Callable[[Sequence[str] | None], None]  # key names, or None: everything
Address = tuple[str, int]  # (host, port)


class Tracking(Protocol):
    """What a cache reads from tracking, whatever the topology (`Tracker`, `ClusterTracker`)."""

    @property
    def epoch(self) -> int:
        """Changes whenever invalidations may have been missed; never goes back."""

    @property
    def current(self) -> bool:
        """Whether a copy trusted under `epoch` may be served without asking Redis now."""

    @property
    def subscribed_event(self) -> asyncio.Event:
        """Set while every tracking connection is subscribed (tests wait on it)."""

    def start(self) -> None: ...

    async def aclose(self) -> None: ...


class _Silent(Exception):
    """The tracking connection did not answer a PING within ``silence_limit``."""


class _Moved(Exception):
    """The server tracked is not (or no longer) where tracking belongs: a replica, or a
    primary the sentinels no longer name."""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Tracker:
    """One tracking connection and the state a cache reads from it (see the module doc).

    ``connect`` makes a new, unconnected redis-py `Connection` speaking RESP2 with no
    socket timeout (the PING lease bounds silence instead). `start` runs the connection
    in a background task, made again ``retry_interval`` seconds after any loss; `aclose`
    ends it. With ``primary_only``, a server whose ``ROLE`` is not master is refused
    before tracking starts (and tried again after ``retry_interval``). ``check``, when
    given, is awaited every ``check_interval`` seconds with the connection: False ends
    it (the sentinels name another primary). ``on_change`` is called each time the
    connection is subscribed or lost.
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
        primary_only: bool = False,
        check: Callable[[AbstractConnection], Awaitable[bool]] | None = None,
        check_interval: float = 1.0,  # seconds between two ``check`` calls
        on_change: Callable[[], None] | None = None,
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
        self.primary_only = primary_only
        self._check = check
        self.check_interval = check_interval
        self._on_change = on_change
        self._clock = clock
        self.epoch = 0
        self.client_id: int | None = None  # of the tracking connection, once subscribed
        self.address: Address | None = None  # of the server tracked, once subscribed
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
            if self._on_change is not None:
                self._on_change()

    async def _run(self) -> None:
        while True:
            try:
                await self._track()
            except* (redis.exceptions.RedisError, OSError, _Silent, _Moved) as group:
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
                if self.primary_only:
                    await self._refuse_a_replica(connection)
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
            host, port = getattr(connection, "host", None), getattr(connection, "port", None)
            self.address = (str(host), int(port)) if host is not None and port else None
            self._last_reply = self._clock()
            self.epoch += 1  # a new epoch: nothing trusted before it counts
            self._subscribed = True
            self.subscribed_event.set()
            if self._on_change is not None:
                self._on_change()
            async with asyncio.TaskGroup() as group:
                group.create_task(self._read(connection))
                group.create_task(self._ping(connection))
                if self._check is not None:
                    group.create_task(self._watch(connection, self._check))
        finally:
            await connection.disconnect(nowait=True)

    async def _refuse_a_replica(self, connection: AbstractConnection) -> None:
        await connection.send_command("ROLE")
        try:
            role = await connection.read_response()
        except redis.exceptions.ResponseError:
            return  # ROLE not allowed to this user (it is @admin): the sentinels' word stands
        if not isinstance(role, list) or not role or _text(role[0]) != "master":
            raise _Moved(
                f"{connection!r} is not a primary (ROLE: {_text(role[0]) if role else role})"
            )

    async def _watch(
        self, connection: AbstractConnection, check: Callable[[AbstractConnection], Awaitable[bool]]
    ) -> None:
        while True:
            await asyncio.sleep(self.check_interval)
            if not await check(connection):
                raise _Moved(f"{connection!r} is no longer the primary")

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


class ClusterTracker:
    """One `Tracker` per primary of a Redis Cluster, read as one (see the module doc).

    ``primaries`` reads the cluster's primaries now; ``make`` makes the (not yet started)
    `Tracker` of one. `start` runs a background task that reads the primaries at once and
    then every ``check_interval`` seconds, and re-tracks when the set changed; `aclose`
    ends it and every connection.
    """

    def __init__(
        self,
        primaries: Callable[[], Awaitable[list[Address]]],
        make: Callable[[Address, Callable[[], None]], Tracker],
        *,
        check_interval: float = 1.0,  # seconds between two reads of the primaries
    ) -> None:
        self._primaries = primaries
        self._make = make
        self.check_interval = check_interval
        self.trackers: dict[Address, Tracker] = {}
        # Added to the trackers' epochs: raised when the set changes, so that the sum
        # never goes back when a tracker (and its epoch) is replaced by a new one.
        self._base = 0
        self._task: asyncio.Task[None] | None = None
        self._subscribed_event = asyncio.Event()

    @property
    def epoch(self) -> int:
        return self._base + sum(tracker.epoch for tracker in self.trackers.values())

    @property
    def current(self) -> bool:
        trackers = self.trackers
        return bool(trackers) and all(tracker.current for tracker in trackers.values())

    @property
    def subscribed_event(self) -> asyncio.Event:
        return self._subscribed_event

    def _changed(self) -> None:
        """A tracker was subscribed or lost: set the event while all are subscribed."""
        trackers = self.trackers.values()
        if trackers and all(tracker.subscribed_event.is_set() for tracker in trackers):
            self._subscribed_event.set()
        else:
            self._subscribed_event.clear()

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._base = self.epoch + 1  # never back, with no tracker left to add
        trackers, self.trackers = list(self.trackers.values()), {}
        self._changed()
        for tracker in trackers:
            await tracker.aclose()

    async def _run(self) -> None:
        while True:
            try:
                await self._retrack(set(await self._primaries()))
            except (
                redis.exceptions.RedisError,
                redis.exceptions.RedisClusterException,
                OSError,
            ) as exc:
                # The trackers go on as they are; their leases guard them meanwhile.
                logger.debug("session cache: cannot read the cluster's primaries: %s", exc)
            await asyncio.sleep(self.check_interval)

    async def _retrack(self, addresses: set[Address]) -> None:
        if not addresses or addresses == self.trackers.keys():
            return
        epoch = self.epoch
        gone = [self.trackers.pop(address) for address in self.trackers.keys() - addresses]
        for address in addresses - self.trackers.keys():
            self.trackers[address] = self._make(address, self._changed)
        # One step: the new epoch is above every earlier one, and not current until every
        # new tracker is subscribed.
        self._base = epoch + 1 - sum(tracker.epoch for tracker in self.trackers.values())
        self._changed()
        if gone:
            logger.info("session cache: tracking the cluster's primaries %s", sorted(addresses))
        for tracker in self.trackers.values():
            tracker.start()
        for tracker in gone:
            await tracker.aclose()


async def _cluster_primaries(client: redis.asyncio.RedisCluster) -> list[Address]:
    """The primaries that own slots now, as one node's ``CLUSTER SLOTS`` says (redis-py
    reads it into ``{(first, last): {"primary": (host, port), ...}}``)."""
    ranges: Any = await client.cluster_slots()  # typed as a list by redis-py: it is not
    return [(_text(entry["primary"][0]), int(entry["primary"][1])) for entry in ranges.values()]


def tracker_for(client: RedisClient, prefix: str, on_invalidate: OnInvalidate) -> Tracking:
    """The tracking of every write under ``prefix`` behind ``client``: a `Tracker` for one
    server or a Sentinel's primary, a `ClusterTracker` for a Cluster (see the module doc)."""
    if isinstance(client, redis.asyncio.RedisCluster):
        cluster = client

        def make(address: Address, on_change: Callable[[], None]) -> Tracker:
            node = ClusterNode(address[0], address[1], **cluster.connection_kwargs)
            kwargs = {**node.connection_kwargs, "protocol": 2, "socket_timeout": None}
            connection_class = node.connection_class

            def connect() -> AbstractConnection:
                return connection_class(**kwargs)

            return Tracker(connect, prefix, on_invalidate, primary_only=True, on_change=on_change)

        return ClusterTracker(lambda: _cluster_primaries(cluster), make)
    pool = client.connection_pool
    kwargs = {**pool.connection_kwargs, "protocol": 2, "socket_timeout": None}
    connection_class = pool.connection_class

    def connect() -> AbstractConnection:
        return connection_class(**kwargs)

    if not isinstance(pool, SentinelConnectionPool):
        return Tracker(connect, prefix, on_invalidate)
    # The pool's connection class asks the sentinels for the primary on each connect.
    sentinels, service = pool.sentinel_manager, pool.service_name

    async def still_the_primary(connection: AbstractConnection) -> bool:
        try:
            host, port = await sentinels.discover_master(service)
        except redis.exceptions.RedisError:
            return True  # see the module doc: no sentinel quorum, no failover
        return (str(host), int(port)) == (
            getattr(connection, "host", None),
            getattr(connection, "port", None),
        )

    return Tracker(connect, prefix, on_invalidate, primary_only=True, check=still_the_primary)
