"""The shared pin table: `--pin-store URL`, the pin table's copy in Redis.

Every replica with the same `--pin-store` shares the pins each one learns, and a restarted
balancer finds those it learned before. The URL is any form `redis_plumbing.redis_client`
reads (one server, a unix socket, Sentinel, Cluster; TLS, ACL), as `session_store`'s.

Two ways in, neither on the common path (a valid signed pin, or a hit in the in-memory
table, never reaches this module):

- writes: `attach` makes this the table's `on_learn`, which only puts the pin in a bounded
  queue (`queue_max` sessions; the latest backend of a session wins). One task writes the
  queue in pipelines of at most `batch_max` SETs, each with a TTL. A full queue, or a
  Redis that is down, drops pins (counted, `balancer_pin_store_dropped_total{reason}`, and
  logged once a spell): the in-memory table goes on working without them.
- lookups: the router answers a session cookie it has no pin for with a Decision naming
  it in `lookup`; the data path calls `lookup(session, done)`, which GETs the key within
  `lookup_timeout` seconds and calls `done(backend_id or None)`. An error, a timeout, or a
  Redis marked down counts as None (the hash decides). A failure other than a timeout (a
  refused connection, a reset) marks Redis down: for `retry_after` seconds a lookup costs
  nothing and a pin is dropped at once, then Redis is tried again. A timeout costs only its
  own lookup (at most `lookup_timeout`).

A key is `prefix` + a digest of the session cookie's value, never the value itself (it is a
bearer credential; a key name shows in MONITOR, SCAN and a slow log). The value is the
backend id; the TTL is the affinity cookie's max age (`--affinity-max-age`), or
`SESSION_TTL` when that is 0 (a browser-session cookie has no age to copy).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Iterable

from prometheus_client.metrics_core import CounterMetricFamily, Metric
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from redis_plumbing import UNAVAILABLE_ERRORS, RedisClient, cancellable, redact_url

from ..datapath._pins import PinTable
from ._events import PIN_STORE, PIN_STORE_AVAILABLE, PIN_STORE_DROPPING, PIN_STORE_UNAVAILABLE
from ._log import log_event

__all__ = [
    "DEFAULT_BATCH_MAX",
    "DEFAULT_LOOKUP_TIMEOUT",
    "DEFAULT_QUEUE_MAX",
    "DEFAULT_RETRY_AFTER",
    "KEY_PREFIX",
    "SESSION_TTL",
    "PinStore",
    "pin_key",
]

KEY_PREFIX = "balancer:pin:"
SESSION_TTL = 86400  # seconds a pin lives when the affinity cookie is a browser-session one
DEFAULT_LOOKUP_TIMEOUT = 0.1  # seconds a lookup waits for Redis before the hash decides
DEFAULT_QUEUE_MAX = 10000  # sessions waiting to be written; more are dropped
DEFAULT_BATCH_MAX = 256  # SETs in one pipeline
DEFAULT_RETRY_AFTER = 1.0  # seconds after a failure before Redis is tried again
_CLIENT_TIMEOUT = 1.0  # seconds: the client's connect and read timeout (the writer's bound)
_CLOSE_FLUSH = 1.0  # seconds a shutdown gives the queue to be written
# Every failure of a call counts as "Redis is not there now": UNAVAILABLE_ERRORS (a timeout
# among them), and any other redis-py error.
_ERRORS: tuple[type[BaseException], ...] = (
    *UNAVAILABLE_ERRORS,
    RedisError,
    RedisClusterException,
    TimeoutError,
)

_TIMEOUTS = (TimeoutError, RedisTimeoutError)

logger = logging.getLogger("balancer")

Done = Callable[[str | None], None]


def pin_key(session: bytes, prefix: str = KEY_PREFIX) -> str:
    """The Redis key of `session`'s pin: `prefix` and 32 hex digits of a digest."""
    return prefix + hashlib.sha256(b"balancer.pin\0" + session).hexdigest()[:32]


class PinStore:
    """The pin table's copy in `client` (see the module docstring).

    `start()` begins the writer task; `aclose()` writes what is queued (within 1 s), stops
    it, and closes the client, which is this object's from the constructor on. `clock` is
    injectable for tests.
    """

    def __init__(
        self,
        client: RedisClient,
        *,
        ttl: int,
        url: str = "",
        prefix: str = KEY_PREFIX,
        lookup_timeout: float = DEFAULT_LOOKUP_TIMEOUT,
        queue_max: int = DEFAULT_QUEUE_MAX,
        batch_max: int = DEFAULT_BATCH_MAX,
        retry_after: float = DEFAULT_RETRY_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl < 1:
            raise ValueError(f"ttl must be at least 1 second, not {ttl!r}")
        if not lookup_timeout > 0:
            raise ValueError(f"lookup_timeout must be > 0, not {lookup_timeout!r}")
        if queue_max < 1 or batch_max < 1:
            raise ValueError(f"queue_max and batch_max must be at least 1, not {queue_max!r}")
        self.client = client
        self.ttl = ttl
        self.url = redact_url(url) if url else ""
        self.prefix = prefix
        self.lookup_timeout = lookup_timeout
        self.queue_max = queue_max
        self.batch_max = batch_max
        self.retry_after = retry_after
        self._clock = clock
        self._queue: dict[bytes, str] = {}  # session -> backend id, oldest first
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._lookups: dict[bytes, list[Done]] = {}  # in flight, by session
        self._tasks: set[asyncio.Task[None]] = set()
        self._down_until = -1.0  # clock time before which Redis is not tried
        self._down = False  # logged as unavailable, not yet as available again
        self._dropping = False  # logged as dropping since the last write that went through
        # Counters, read by `collector()`.
        self.written = 0
        self.dropped: dict[str, int] = {"full": 0, "unavailable": 0}
        # hit, miss; error: a failed or timed-out GET; unavailable: not tried (Redis down).
        self.lookups: dict[str, int] = {"hit": 0, "miss": 0, "error": 0, "unavailable": 0}

    def __repr__(self) -> str:
        state = "down" if self._down else "up"
        return f"<PinStore [{state}, queued: {len(self._queue)}, written: {self.written}]>"

    # -- the seams ---------------------------------------------------------------------------

    def attach(self, pins: PinTable) -> None:
        """Share `pins`: its learned pins are written here, its misses looked up here."""
        pins.on_learn = self.put
        pins.remote = True

    def put(self, session: bytes, backend_id: str) -> None:
        """Queue `session -> backend_id` for writing; never waits (the table's `on_learn`)."""
        queue = self._queue
        if session in queue:
            del queue[session]  # the newest backend goes to the young end
        elif self._clock() < self._down_until:
            self._drop("unavailable", 1)
            return
        elif len(queue) >= self.queue_max:
            self._drop("full", 1)
            return
        queue[session] = backend_id
        self._wake.set()

    def lookup(self, session: bytes, done: Done) -> None:
        """Call `done` with the backend id stored for `session`, or None (none, an error,
        a timeout, Redis marked down); at once in the last case, else from a task."""
        if self._clock() < self._down_until:
            self.lookups["unavailable"] += 1
            done(None)
            return
        waiting = self._lookups.get(session)
        if waiting is not None:
            waiting.append(done)  # one GET a session however many requests wait on it
            return
        self._lookups[session] = [done]
        task = asyncio.get_running_loop().create_task(self._lookup(session))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the tasks ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer task (from a running loop)."""
        log_event(PIN_STORE, url=self.url, ttl=self.ttl)
        self._writer = asyncio.get_running_loop().create_task(self._write(), name="pin-store")

    async def aclose(self) -> None:
        """Write what is queued (at most `_CLOSE_FLUSH` seconds), stop, close the client."""
        writer, self._writer = self._writer, None
        if writer is not None:
            if self._queue and self._clock() >= self._down_until:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_CLOSE_FLUSH):
                        while self._queue and not writer.done():
                            await self._flush()
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.client.aclose()

    async def _write(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                wait = self._down_until - self._clock()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self._flush()

    async def _flush(self) -> None:
        """Write one batch of the queue; on failure, drop it and mark Redis down."""
        queue = self._queue
        batch: list[tuple[bytes, str]] = []
        for item in queue.items():
            batch.append(item)
            if len(batch) >= self.batch_max:
                break
        for session, _ in batch:
            del queue[session]
        pipe = self.client.pipeline(transaction=False)
        for session, backend_id in batch:
            pipe.set(pin_key(session, self.prefix), backend_id, ex=self.ttl)
        try:
            await cancellable(pipe.execute())
        except _ERRORS as exc:
            self._failed(exc)
            self._drop("unavailable", len(batch))
            return
        self.written += len(batch)
        self._dropping = False
        self._recovered()

    async def _lookup(self, session: bytes) -> None:
        backend_id: str | None = None
        try:
            async with asyncio.timeout(self.lookup_timeout):
                value = await cancellable(self.client.get(pin_key(session, self.prefix)))
        except _ERRORS as exc:
            self.lookups["error"] += 1
            if not isinstance(exc, _TIMEOUTS):
                # A slow answer only costs this lookup: a burst of new sessions (each
                # lookup its own connection at first) on a busy core may take longer than
                # lookup_timeout, and the next ones should still be asked. A refusal or a
                # reset says Redis is not there: do not ask again for a while.
                self._failed(exc)
        else:
            if isinstance(value, bytes) and value:
                backend_id = value.decode("utf-8", "replace")
                self.lookups["hit"] += 1
            else:
                self.lookups["miss"] += 1
            self._recovered()
        for done in self._lookups.pop(session, ()):
            try:
                done(backend_id)
            except Exception:
                # One waiting request's failure must not starve the others of their answer.
                logger.exception("a pin lookup's callback failed")

    # -- state -----------------------------------------------------------------------------

    def _failed(self, exc: BaseException) -> None:
        self._down_until = self._clock() + self.retry_after
        if not self._down:
            self._down = True
            reason = str(exc) or type(exc).__name__
            log_event(PIN_STORE_UNAVAILABLE, level=logging.WARNING, url=self.url, error=reason)

    def _recovered(self) -> None:
        if self._down:
            self._down = False
            log_event(PIN_STORE_AVAILABLE, url=self.url)

    def _drop(self, reason: str, count: int) -> None:
        self.dropped[reason] += count
        if not self._dropping:
            self._dropping = True  # once until a write goes through again
            log_event(
                PIN_STORE_DROPPING,
                level=logging.WARNING,
                reason=reason,
                queued=len(self._queue),
                dropped=sum(self.dropped.values()),
            )

    # -- metrics ---------------------------------------------------------------------------

    def collector(self) -> _Collector:
        """A prometheus_client collector of this store's counters (register it on the
        balancer's registry)."""
        return _Collector(self)


class _Collector:
    def __init__(self, store: PinStore) -> None:
        self._store = store

    def collect(self) -> Iterable[Metric]:
        store = self._store
        written = CounterMetricFamily(
            "balancer_pin_store_writes", "Pins written to the shared pin store (--pin-store)."
        )
        written.add_metric([], store.written)
        dropped = CounterMetricFamily(
            "balancer_pin_store_dropped",
            "Pins not written: the queue was full, or Redis was unavailable.",
            labels=["reason"],
        )
        for reason, count in store.dropped.items():
            dropped.add_metric([reason], count)
        lookups = CounterMetricFamily(
            "balancer_pin_store_lookups",
            "Sessions without a pin looked up in the shared pin store, by result.",
            labels=["result"],
        )
        for result, count in store.lookups.items():
            lookups.add_metric([result], count)
        return [written, dropped, lookups]
