"""The live dashboard: one page, and the server-sent events stream that keeps it current.

    GET /                    the page (HTML, CSS and plain JavaScript; no build step)
    GET /dashboard/stream    text/event-stream: a "hello" message, then a "tick" a second

Once a second `Dashboard.tick()` reads numbers the balancer keeps anyway (the metrics'
per-backend totals, the pool, the supervisor's workers, the event feed) and turns their
deltas into rates: requests/s over the last second, error rate and p50/p99 over the last
`WINDOW` seconds, from the latency buckets (as Prometheus' histogram_quantile does). It
adds nothing to the data path. The tick is encoded once and queued for every subscriber.

Each subscriber has a bounded queue: one that falls `max_queue` ticks behind (a stalled tab,
a slow link) is dropped, and a send blocked longer than `SEND_TIMEOUT` ends its response, so
a reader never holds anything up. A closed tab is noticed by the `http.disconnect` it sends.
`close()` ends every stream at once: uvicorn's graceful shutdown waits for open responses,
and an event stream never ends by itself.

"Sessions" per backend is what the router's decision cache shows: the distinct session
cookies (`--sticky cookie:NAME`) it has placed on each backend, each remembered until
`SESSION_TTL` seconds after it left the cache. The balancer never sees a session itself;
this counts the clients that carried one. The cache holds only requests with a valid signed
pin (the balancer's affinity cookie): a made-up session cookie alone is never counted. One
riding on a pin copied from a real response cannot be told from a real session (the balancer
does not hold the app's key), so at most `SESSIONS_MAX` are remembered, the one the router
decided on longest ago forgotten first: forged cookies cost a bounded map, not a growing one.
A session seen on another backend than before was re-pinned: each tick reports those moves as
a `sessions_moved` event (from, to, how many).

"Pinned" per backend is the router's pin table (`Router.sessions`): the sessions seen on it
in the last `PINNED_WINDOW` seconds, as `balancer_pinned_sessions` and the admin API's
GET /backends/{id}/sessions count them; the page shows it in the sessions column. A DRAINING
row also has `active`, those seen in the last `--drain-idle` seconds: a drain that keeps its
sessions ends when that falls to 0 (and nothing is in flight), so the operator watches it
fall; a DRAINED row has `drained_reason`, why its drain ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import operator
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from typing import Any, Protocol, TypedDict

import redis.asyncio
import redis.exceptions
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from redis_plumbing import RedisClient, cancellable, redact_url, redis_client

from ..datapath._affinity import Sticky, cookie_value
from ..datapath._backend import Backend, BackendState
from ..datapath._metrics import BUCKETS, BackendCounts, Metrics
from ..datapath._pool import Pool
from ..datapath._router import Decision
from ._drains import PINNED_WINDOW
from ._events import DASHBOARD_SUBSCRIBER_DROPPED, FAILOVER, SESSIONS_MOVED, Event, EventFeed
from ._log import log_event

__all__ = [
    "DASHBOARD_ROUTES",
    "HISTORY",
    "SESSIONS_MAX",
    "SESSION_TTL",
    "WINDOW",
    "BackendRow",
    "Dashboard",
    "Hello",
    "OtherNumbers",
    "RedisStatus",
    "Snapshot",
    "Totals",
    "add_counts",
    "quantile",
]

logger = logging.getLogger("balancer")

WINDOW = 5  # ticks over which the error rate and the latency percentiles are computed
HISTORY = 180  # ticks of requests/s kept per backend for the chart (3 minutes at 1 Hz)
SESSION_TTL = 300.0  # seconds a session is remembered after it left the router's cache
# Sessions remembered at most (~200 bytes each, ~2 MB in all): a stream of forged session
# cookies on a copied pin must not grow the map for SESSION_TTL (issue 13: 11,617 of them).
SESSIONS_MAX = 10_000
SEND_TIMEOUT = 10.0  # seconds one write to a subscriber may block before it is dropped
_HELLO_EVENTS = 200  # events a new page gets from before it opened
_TICK_EVENTS = 500  # events one tick carries at most (the feed's ring holds 500)
_MAX_SUBSCRIBERS = 32  # pages open at once; the next gets 503

# The page's own policy: scripts and styles from this origin only, so even a value that
# escaped the page's escaping could not run; no framing (clickjacking of the buttons).
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_ASSETS = {
    "/": ("dashboard.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
# The paths that need no token: the page and its assets hold no data, and the page must
# load before it can ask for the token. The stream and every action need it.
OPEN_PATHS = frozenset(_ASSETS)


class BackendRow(TypedDict):
    """One backend's row of the page's table."""

    id: str
    url: str
    state: str  # BackendState's value
    reason: str | None  # why it is down: a check's reason, "ejected", or None
    since: float  # wall-clock seconds (epoch) it has been in `state` since, to a tick
    in_flight: int
    rps: float  # requests/s over the last tick
    error_rate: float | None  # errors / requests over the last WINDOW ticks; None: idle
    p50_ms: float | None  # latency quantiles over the last WINDOW ticks; None: idle
    p99_ms: float | None
    requests_total: int
    sessions: int | None  # sessions placed on it (module docstring); None: not counted
    pinned: int | None  # pin table: seen in the last PINNED_WINDOW s; None: not counted
    active: int | None  # DRAINING: pinned sessions seen in the last --drain-idle s
    drain_for: float | None  # seconds since its drain began (DRAINING, DRAINED)
    drain_sessions: str | None  # DRAINING: "keep" (pinned clients stay) or "move"
    drained_reason: str | None  # DRAINED: why its drain ended (idle, empty, deadline, now)
    worker: dict[str, Any] | None  # the supervisor's worker at that URL, as /workers shows it


class Totals(TypedDict):
    rps: float
    failovers: int
    repins: int
    connections: int
    sessions: int | None  # None: not counted (no session cookie to count by)


class Snapshot(TypedDict):
    """What each tick sends (`event: tick`): the page's view of everything."""

    time: float  # wall-clock seconds (epoch)
    uptime: float  # seconds
    info: dict[str, object]  # shown as is: mode, listen address, ...
    pool: str  # the pool's repr
    redis: dict[str, object] | None  # RedisStatus.state; None without --dashboard-redis
    totals: Totals
    backends: list[BackendRow]
    workers: dict[str, object] | None  # as /workers shows them; None without a supervisor
    subscribers: int
    rps: dict[str, float]  # by backend id
    events: list[dict[str, object]]  # Event.as_json of those since the last tick


class History(TypedDict):
    times: list[float]  # wall-clock seconds (epoch) of the ticks
    rps: dict[str, list[float]]  # by backend id, one a tick


class Hello(Snapshot):
    """What a new page gets first (`event: hello`): a snapshot with the recent events, the
    chart's history, and the tick's interval."""

    history: History
    interval: float  # seconds


class WorkerView(Protocol):
    """What the dashboard reads of the supervisor (`Supervisor.describe`)."""

    def describe(self) -> dict[str, object]:
        """The workers, as the admin API shows them."""


class OtherNumbers(Protocol):
    """With `--workers N`, the other balancer processes' numbers, summed
    (`_cluster.OtherProcesses`): process 0's dashboard adds them to its own."""

    counts: dict[str, BackendCounts]
    in_flight: dict[str, int]
    requests_total: dict[str, int]
    failovers: int
    repins: int
    connections: int

    async def sample(self) -> None:
        """Fetch them again (once a tick); never raises."""


class DecisionCache(Protocol):
    """The router, as far as the sessions count reads it (see `Dashboard._scan_sessions`)."""

    @property
    def sticky(self) -> Sticky: ...

    @property
    def decisions(self) -> Mapping[bytes, Decision]: ...

    def sessions(self, since: float) -> dict[str, int]:
        """Per backend id, its pinned sessions seen at `since` or later."""


def quantile(q: float, buckets: Sequence[int], bounds: Sequence[float] = BUCKETS) -> float | None:
    """The `q` quantile (0-1) of a non-cumulative histogram, in seconds; None if empty.

    Linear within the bucket it falls in, from the bucket's lower bound (0 for the first),
    as Prometheus' histogram_quantile; in the +Inf bucket, the last finite bound.
    """
    total = sum(buckets)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(buckets):
        if count and seen + count >= rank:
            if index >= len(bounds):
                return bounds[-1]
            lower = bounds[index - 1] if index else 0.0
            return lower + (bounds[index] - lower) * (rank - seen) / count
        seen += count
    return bounds[-1]


def add_counts(one: BackendCounts, other: BackendCounts) -> BackendCounts:
    """Two balancer processes' totals for one backend, as one."""
    return BackendCounts(
        one.requests + other.requests,
        one.errors + other.errors,
        tuple(map(operator.add, one.buckets, other.buckets)),
    )


def _drain_sessions(backend: Backend) -> str | None:
    """A DRAINING backend's pinned clients: "keep" (they stay) or "move"; else None."""
    if backend.state is not BackendState.DRAINING:
        return None
    return "keep" if backend.keep_pinned else "move"


def _minus(new: BackendCounts, old: BackendCounts | None) -> BackendCounts:
    if old is None:
        return new
    return BackendCounts(
        new.requests - old.requests,
        new.errors - old.errors,
        tuple(map(operator.sub, new.buckets, old.buckets)),  # same length: one histogram
    )


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


class RedisStatus:
    """Whether a Redis answers, and its commands/s (from INFO's total_commands_processed;
    on a cluster, the sum over its primaries).

    `sample()` is called once a tick while a page is open; it never raises. The client is
    created on first use, by the project's one factory (so any URL form `--dashboard-redis`
    accepts works), and closed by `aclose()`.
    """

    def __init__(self, url: str, *, timeout: float = 0.5) -> None:
        self.url = url
        self._timeout = timeout
        self._client: RedisClient | None = None
        self._last: tuple[float, int] | None = None
        self.state: dict[str, object] = {"url": redact_url(url), "reachable": None, "ops": None}

    async def sample(self, now: float) -> dict[str, object]:
        try:
            async with asyncio.timeout(self._timeout * 2):
                counts = await cancellable(self._counts())
        except (
            OSError,
            redis.exceptions.RedisError,
            redis.exceptions.RedisClusterException,
        ) as exc:
            self._last = None
            self.state = {"url": redact_url(self.url), "reachable": False, "ops": None}
            self.state["error"] = str(exc)[:200]
            return self.state
        total = sum(counts)
        ops = None
        if self._last is not None and now > self._last[0]:
            # Minus our own INFO on each node, so an idle Redis shows 0.
            ops = max(0.0, (total - self._last[1] - len(counts)) / (now - self._last[0]))
        self._last = (now, total)
        self.state = {"url": redact_url(self.url), "reachable": True, "ops": ops}
        return self.state

    async def _counts(self) -> list[int]:
        """total_commands_processed of the server, or of each of the cluster's primaries."""
        if self._client is None:
            self._client = redis_client(self.url, timeout=self._timeout)
        client = self._client
        if isinstance(client, redis.asyncio.RedisCluster):
            # Without a target the cluster client asks one node, not the cluster.
            replies = await client.info("stats", target_nodes=client.PRIMARIES)
            return [int(node["total_commands_processed"]) for node in replies.values()]
        return [int((await client.info("stats"))["total_commands_processed"])]

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


class _Subscriber:
    """One open stream: its queue of encoded messages, and why it ends."""

    __slots__ = ("closed", "messages", "wake")

    def __init__(self) -> None:
        self.messages: deque[bytes] = deque()
        self.wake = asyncio.Event()
        self.closed: str | None = None  # why: "dropped", "shutdown", "disconnected"

    def end(self, why: str) -> None:
        if self.closed is None:
            self.closed = why
        self.wake.set()


def _sse(kind: str, data: Mapping[str, Any]) -> bytes:
    body = json.dumps(data, separators=(",", ":"), default=str)
    return f"event: {kind}\ndata: {body}\n\n".encode()


class Dashboard:
    """The dashboard's state: rates per backend, their history, the subscribers.

    `info` is shown as is (mode, listen address, ...). `router` is read for the sessions
    count (None: not shown). `run()` ticks every `interval` seconds until cancelled;
    `close()` ends every stream (call it before stopping the admin server).
    """

    def __init__(
        self,
        *,
        pool: Pool,
        metrics: Metrics,
        feed: EventFeed,
        info: Mapping[str, object],
        router: DecisionCache | None = None,
        workers: WorkerView | None = None,
        redis: RedisStatus | None = None,
        interval: float = 1.0,
        max_queue: int = 10,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.pool = pool
        self.metrics = metrics
        self.feed = feed
        self.info = dict(info)
        self.router = router
        self.workers = workers
        self.redis = redis
        self.interval = interval
        self.max_queue = max_queue
        self._clock = clock
        self._wall = wall
        self._began = clock()
        self._closed = False
        self._subscribers: set[_Subscriber] = set()
        self._window: deque[tuple[float, dict[str, BackendCounts]]] = deque(maxlen=WINDOW + 1)
        self._history: dict[str, deque[float]] = {}
        self._times: deque[float] = deque(maxlen=HISTORY)
        self._states: dict[str, tuple[str, float]] = {}  # id -> (state, since: wall time)
        # Sessions: key -> [backend id, last seen], in the order they were last read from
        # the router's cache (the first is forgotten at SESSIONS_MAX); how many per backend;
        # the keys in the router's cache now; and how far that cache has been read (see
        # _scan_sessions).
        self._sessions: dict[bytes, list[Any]] = {}
        self._per_backend: dict[str, int] = {}
        self._live: set[bytes] = set()
        self._cache: Mapping[bytes, Decision] | None = None
        self._cache_first: bytes | None = None
        self._scanned = 0
        self._expired_at = 0.0
        self._last_seq = feed.last_seq
        self._failovers = metrics.failovers
        self._repins = metrics.repins
        self._rps: dict[str, float] = {}
        self.ticks = 0
        # With --workers N, set on process 0's: every tick adds the other processes' numbers.
        self.others: OtherNumbers | None = None
        self._track_states(wall())

    def __repr__(self) -> str:
        return f"<Dashboard [subscribers: {len(self._subscribers)}, ticks: {self.ticks}]>"

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    # -- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        """Tick every `interval` seconds until cancelled (on one schedule: no drift)."""
        next_at = self._clock()
        while True:
            try:
                if self.redis is not None and self._subscribers:
                    await self.redis.sample(self._clock())
                if self.others is not None:
                    await self.others.sample()
                self.tick()
            except Exception:
                # A page that stops updating is a bug to report, not a reason to stop
                # the balancer, nor the next tick.
                logger.exception("the dashboard's tick failed")
            next_at += self.interval
            now = self._clock()
            if next_at < now:  # a long pause (a suspended laptop): do not catch up
                next_at = now + self.interval
            await asyncio.sleep(next_at - now)  # the tick's schedule

    def tick(self) -> Snapshot | None:
        """Sample; with subscribers, queue the snapshot for each of them and return it."""
        now = self._clock()
        self.ticks += 1
        counts = self.metrics.counts()
        if self.others is not None:
            for backend_id, theirs in self.others.counts.items():
                ours = counts.get(backend_id)
                counts[backend_id] = theirs if ours is None else add_counts(ours, theirs)
        self._window.append((now, counts))
        self._rps = rps = self._rates(now, counts)
        wall = self._wall()
        self._times.append(wall)
        for backend_id in list(self._history):
            if backend_id not in self.pool and not any(self._history[backend_id]):
                del self._history[backend_id]  # gone, and idle for the whole chart
        for backend_id in set(rps) | set(self._history):
            series = self._history.get(backend_id)
            if series is None:  # new: zeros back to the chart's start
                series = deque([0.0] * (len(self._times) - 1), maxlen=HISTORY)
                self._history[backend_id] = series
            series.append(rps.get(backend_id, 0.0))
        self._track_states(wall)
        if not self._subscribers:
            self._last_seq = self.feed.last_seq  # a new page gets them in its hello
            return None
        self._announce(self._scan_sessions(now))
        events = self.feed.after(self._last_seq, limit=_TICK_EVENTS)
        if events:
            self._last_seq = events[-1].seq
        snapshot = self._snapshot(now, events)
        message = _sse("tick", snapshot)
        for subscriber in list(self._subscribers):
            if len(subscriber.messages) >= self.max_queue:
                self._drop(subscriber, "dropped")
                log_event(
                    DASHBOARD_SUBSCRIBER_DROPPED, level=logging.WARNING, behind=self.max_queue
                )
                continue
            subscriber.messages.append(message)
            subscriber.wake.set()
        return snapshot

    def _track_states(self, wall: float) -> None:
        """Since when each backend is in its state (to a tick; the pool keeps no time)."""
        states = self._states
        live = set()
        for backend in self.pool:
            live.add(backend.id)
            known = states.get(backend.id)
            if known is None or known[0] != backend.state.value:
                states[backend.id] = (backend.state.value, wall)
        for backend_id in [k for k in states if k not in live]:
            del states[backend_id]

    def _rates(self, now: float, counts: dict[str, BackendCounts]) -> dict[str, float]:
        """Requests/s per backend over the last tick."""
        if len(self._window) < 2:
            return dict.fromkeys(counts, 0.0)
        then, before = self._window[-2]
        elapsed = max(now - then, 1e-9)
        return {
            backend_id: max(0.0, (c.requests - (before[backend_id].requests
                                                if backend_id in before else 0)) / elapsed)
            for backend_id, c in counts.items()
        }  # fmt: skip

    # -- sessions -----------------------------------------------------------------------

    def _scan_sessions(self, now: float) -> dict[tuple[str, str], int]:
        """Read what is new in the router's decision cache; returns the sessions moved, by
        (from, to) backend id.

        The cache (`Router.decisions`) maps a whole Cookie header to the decision made
        for it. It only grows, in order, until the pool changes (a new mapping) or it is
        full (emptied): so each tick reads only the entries added since the last, and a
        few thousand clients cost microseconds, not milliseconds, of the loop.
        """
        router = self.router
        if router is None or not router.sticky.cookie:
            return {}
        decided = router.decisions
        cookie = router.sticky.cookie
        sessions, per_backend = self._sessions, self._per_backend
        first = next(iter(decided), None)
        if decided is not self._cache or len(decided) < self._scanned or first != self._cache_first:
            # A new cache (the pool changed) or an emptied one: what was in the old one
            # was seen until now.
            for old in self._live:
                entry = sessions.get(old)
                if entry is not None:
                    entry[1] = now  # not moved in the order: that is of the last read
            self._live = set()
            self._cache, self._cache_first, self._scanned = decided, first, 0
        name = cookie.encode()
        moved: dict[tuple[str, str], int] = {}
        live = self._live
        # No await in here: the router (same loop) cannot change the cache meanwhile.
        for header, decision in itertools.islice(decided.items(), self._scanned, None):
            key = cookie_value(header, name)
            if key is None:
                continue
            backend_id = decision.backend.id
            live.add(key)
            entry = sessions.pop(key, None)
            if entry is None:
                if len(sessions) >= SESSIONS_MAX:
                    self._forget(next(iter(sessions)))  # the one seen longest ago
                entry = [backend_id, now]
                per_backend[backend_id] = per_backend.get(backend_id, 0) + 1
            elif entry[0] != backend_id:
                pair = (entry[0], backend_id)
                moved[pair] = moved.get(pair, 0) + 1
                per_backend[entry[0]] -= 1
                per_backend[backend_id] = per_backend.get(backend_id, 0) + 1
                entry[0] = backend_id
            entry[1] = now
            sessions[key] = entry  # to the end: read now
        self._scanned = len(decided)
        if now - self._expired_at >= SESSION_TTL / 10:
            self._expired_at = now
            for key, (_, seen) in list(sessions.items()):
                if key not in live and now - seen > SESSION_TTL:
                    self._forget(key)
        return moved

    def _forget(self, key: bytes) -> None:
        backend_id = self._sessions.pop(key)[0]
        self._per_backend[backend_id] -= 1

    def _totals(self) -> tuple[int, int, int]:
        """Failovers, re-pins and open connections, of every balancer process."""
        metrics, others = self.metrics, self.others
        failovers, repins = metrics.failovers, metrics.repins
        connections = metrics.connections_active
        if others is not None:
            failovers, repins = failovers + others.failovers, repins + others.repins
            connections += others.connections
        return failovers, repins, connections

    def _announce(self, moved: dict[tuple[str, str], int]) -> None:
        failovers, repins, _ = self._totals()
        new_failovers, new_repins = failovers - self._failovers, repins - self._repins
        self._failovers, self._repins = failovers, repins
        if new_failovers or new_repins:
            self.feed.add(FAILOVER, {"requests": new_failovers, "repinned": new_repins}, "WARNING")
        by_source: dict[str, dict[str, int]] = {}
        for (source, target), count in moved.items():
            by_source.setdefault(source, {})[self._label(target)] = count
        for source, targets in by_source.items():
            self.feed.add(
                SESSIONS_MOVED,
                {"from": self._label(source), "sessions": sum(targets.values()), "to": targets},
            )

    def _label(self, backend_id: str) -> str:
        backend = self.pool.get(backend_id)
        return backend.url if backend is not None else backend_id

    # -- the snapshot ----------------------------------------------------------------------

    def _snapshot(self, now: float, events: list[Event]) -> Snapshot:
        """The page's view of everything, from the last tick's numbers."""
        wall = self._wall()
        counts = self._window[-1][1] if self._window else {}
        rps = self._rps
        oldest = self._window[0][1] if len(self._window) > 1 else {}
        workers = self.workers.describe() if self.workers is not None else None
        by_url: dict[str, dict[str, Any]] = {}
        if workers is not None:
            for worker in workers.get("workers", []):  # type: ignore[attr-defined]
                by_url[worker["url"]] = worker
        per_backend = self._per_backend
        sessions_on = self.router is not None and bool(self.router.sticky.cookie)
        others = self.others
        in_flight = {} if others is None else others.in_flight
        requests_total = {} if others is None else others.requests_total
        failovers, repins, connections = self._totals()
        pinned: dict[str, int] = {}
        active: dict[float, dict[str, int]] = {}  # by --drain-idle: one scan for each
        if sessions_on and self.router is not None:
            pinned = self.router.sessions(now - PINNED_WINDOW)
        rows: list[BackendRow] = []
        for backend in self.pool:
            state = backend.state.value
            known = self._states.get(backend.id)
            if known is None or known[0] != state:
                known = self._states[backend.id] = (state, wall)
            window = (
                _minus(counts[backend.id], oldest.get(backend.id)) if backend.id in counts else None
            )
            if window is not None and window.requests == 0:
                window = None  # idle over the window: nothing to compute
            rows.append(
                {
                    "id": backend.id,
                    "url": backend.url,
                    "state": state,
                    "reason": backend.down_reason
                    or ("ejected" if backend.ejected_until is not None else None),
                    "since": known[1],
                    "in_flight": backend.in_flight + in_flight.get(backend.id, 0),
                    "rps": round(rps.get(backend.id, 0.0), 2),
                    "error_rate": None
                    if window is None or window.requests == 0
                    else round(window.errors / window.requests, 4),
                    "p50_ms": None if window is None else _ms(quantile(0.5, window.buckets)),
                    "p99_ms": None if window is None else _ms(quantile(0.99, window.buckets)),
                    "requests_total": backend.requests_total + requests_total.get(backend.id, 0),
                    "sessions": per_backend.get(backend.id, 0) if sessions_on else None,
                    "pinned": pinned.get(backend.id, 0) if sessions_on else None,
                    "active": self._active(backend, now, active) if sessions_on else None,
                    "drain_for": round(now - backend.drain_since, 3) if backend.draining else None,
                    "drain_sessions": _drain_sessions(backend),
                    "drained_reason": backend.drained_reason,
                    "worker": by_url.get(backend.url),
                }
            )
        return {
            "time": wall,
            "uptime": now - self._began,
            "info": self.info,
            "pool": repr(self.pool),
            "redis": None if self.redis is None else self.redis.state,
            "totals": {
                "rps": round(sum(rps.values()), 2),
                "failovers": failovers,
                "repins": repins,
                "connections": connections,
                "sessions": len(self._sessions) if sessions_on else None,
            },
            "backends": rows,
            "workers": workers,
            "subscribers": len(self._subscribers),
            "rps": {backend_id: round(value, 2) for backend_id, value in rps.items()},
            "events": [event.as_json() for event in events],
        }

    def _active(
        self, backend: Backend, now: float, seen: dict[float, dict[str, int]]
    ) -> int | None:
        """A DRAINING backend's pinned sessions seen in the last --drain-idle seconds."""
        if backend.state is not BackendState.DRAINING or self.router is None:
            return None
        idle = backend.policy.drain.idle
        counts = seen.get(idle)
        if counts is None:
            counts = seen[idle] = self.router.sessions(now - idle)
        return counts.get(backend.id, 0)

    def hello(self) -> Hello:
        """What a new page gets first: the last snapshot, the chart's history, recent events."""
        snapshot = self._snapshot(self._clock(), self.feed.after(0, limit=_HELLO_EVENTS))
        history: History = {
            "times": list(self._times),
            "rps": {k: [round(v, 2) for v in series] for k, series in self._history.items()},
        }
        return Hello(**snapshot, history=history, interval=self.interval)

    # -- subscribers -----------------------------------------------------------------------

    def subscribe(self) -> _Subscriber | None:
        """A new stream, with its hello queued; None when closed or full."""
        if self._closed or len(self._subscribers) >= _MAX_SUBSCRIBERS:
            return None
        subscriber = _Subscriber()
        self._announce(self._scan_sessions(self._clock()))
        subscriber.messages.append(_sse("hello", self.hello()))
        self._subscribers.add(subscriber)
        return subscriber

    def _drop(self, subscriber: _Subscriber, why: str) -> None:
        self._subscribers.discard(subscriber)
        subscriber.end(why)

    def close(self) -> None:
        """End every stream now, and refuse new ones (shutdown)."""
        self._closed = True
        for subscriber in list(self._subscribers):
            self._drop(subscriber, "shutdown")

    async def stream(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI app of /dashboard/stream (pure ASGI: it must notice a disconnect while
        it waits for the next tick, and bound each write)."""
        subscriber = self.subscribe()
        if subscriber is None:
            reason = "shutting down" if self._closed else "too many dashboards are open"
            response = Response(
                json.dumps({"error": reason, "reason": "unavailable"}),
                status_code=503,
                media_type="application/json",
            )
            await response(scope, receive, send)
            return

        async def watch_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            subscriber.end("disconnected")

        watcher = asyncio.create_task(watch_disconnect(), name="dashboard-disconnect")
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-store"),
                        (b"x-accel-buffering", b"no"),  # proxies in front: do not buffer
                        (b"x-content-type-options", b"nosniff"),
                    ],
                }
            )
            while True:
                await subscriber.wake.wait()
                subscriber.wake.clear()
                if subscriber.closed is not None:
                    break
                chunk = b"".join(subscriber.messages)
                subscriber.messages.clear()
                try:
                    async with asyncio.timeout(SEND_TIMEOUT):
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                except TimeoutError:
                    # A reader that stopped reading: give up on it (uvicorn closes the
                    # connection, as for any response the app did not complete).
                    subscriber.end("dropped")
                    return
            if subscriber.closed != "disconnected":
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self._subscribers.discard(subscriber)
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


@functools.cache
def _asset(name: str) -> bytes:
    return resources.files("balancer.control").joinpath(name).read_bytes()


def _dashboard(app: Starlette) -> Dashboard:
    dashboard: Dashboard = app.state.dashboard  # set by `create_admin_app`
    return dashboard


async def asset(request: Request) -> Response:
    name, media = _ASSETS[request.url.path]
    return Response(_asset(name), media_type=media, headers=_PAGE_HEADERS)


class _Stream:
    """The ASGI app of /dashboard/stream: the app's `Dashboard.stream` (pure ASGI, so a
    class: Starlette treats a plain function as a request endpoint)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _dashboard(scope["app"]).stream(scope, receive, send)


# The page, its assets and the stream, for the admin app (with a dashboard).
DASHBOARD_ROUTES: list[BaseRoute] = [
    *(Route(path, asset, methods=["GET"]) for path in _ASSETS),
    Route("/dashboard/stream", _Stream(), methods=["GET"]),
]
