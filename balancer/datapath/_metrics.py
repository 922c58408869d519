"""Prometheus metrics of one balancer process, on its own registry (no globals).

The per-request methods run on the data path, so they only add to plain ints in dicts
(~0.3 us a request); prometheus_client's own metric objects take a lock and cost about ten
times that. A collector turns the numbers into metric families when /metrics is scraped.
Single writer: the event loop of the data path; a scrape only reads.

With `--workers N` each process has its own numbers; a scrape of one worker's admin app
sees that worker's only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ._backend import BackendState
from ._pool import Pool

# Why a client was re-pinned; `_router.REPIN_REASONS` (imported from there would make the
# metrics depend on the router; test_metrics checks they are equal).
REPIN_REASONS: Final = ("down", "drain", "failed", "removed", "lost_pin", "admin")

__all__ = ["BUCKETS", "BackendCounts", "Metrics"]

# Upper bounds in seconds; finer at the low end than prometheus_client's default, since a
# request proxied to a healthy local backend takes about a millisecond.
# Final, and of no fixed length: the compiled build (scripts/build-fast) then keeps one
# tuple object instead of looking a global up and unboxing 14 floats on every request.
_BUCKETS: Final[tuple[float, ...]] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BUCKETS = _BUCKETS  # the latency buckets' upper bounds, for readers of `BackendCounts`


@dataclass(frozen=True, slots=True)
class BackendCounts:
    """One backend's totals since the process started, as `Metrics.counts()` reads them."""

    requests: int  # responses relayed or answered for it
    errors: int  # of which 5xx
    buckets: tuple[int, ...]  # latency, non-cumulative, one per BUCKETS bound then +Inf


class _Backend:
    """One backend's numbers: responses by status, and latency in non-cumulative buckets."""

    __slots__ = ("buckets", "by_status", "seconds")

    def __init__(self) -> None:
        self.by_status: dict[int, int] = {}
        self.buckets = [0] * (len(_BUCKETS) + 1)  # the last one is +Inf
        self.seconds = 0.0


class Metrics:
    """Counters, a latency histogram and gauges; `render()` is the /metrics body.

    With a `pool`, each scrape also reports every backend's state and in-flight count; with
    `sessions` (per backend id, its sessions seen recently: `Router.sessions`, the window
    bound in), its pinned sessions.
    """

    def __init__(
        self, pool: Pool | None = None, sessions: Callable[[], dict[str, int]] | None = None
    ) -> None:
        self._backends: dict[str, _Backend] = {}
        self._retries: dict[str, int] = {}
        self._rejected: dict[str, int] = {}
        self._failovers = 0
        self._repins: dict[str, int] = {}  # by reason
        self.sessions = sessions
        self._connections = 0
        self._active = 0
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_Collector(self, pool))

    def request_done(self, backend_id: str, status: int, seconds: float) -> None:
        """A response was relayed (or an error answered) for a request sent to a backend."""
        numbers = self._backends.get(backend_id)
        if numbers is None:
            numbers = self._backends[backend_id] = _Backend()
        by_status = numbers.by_status
        by_status[status] = by_status.get(status, 0) + 1
        # bisect_left(_BUCKETS, seconds), as a loop: most requests end in the first few
        # buckets, and the compiled build (scripts/build-fast) runs it without a call.
        i = 0
        for bound in _BUCKETS:
            if seconds <= bound:
                break
            i += 1
        numbers.buckets[i] += 1
        numbers.seconds += seconds

    def retried(self, backend_id: str) -> None:
        """A request that failed on `backend_id` is tried on another backend."""
        self._retries[backend_id] = self._retries.get(backend_id, 0) + 1

    def failover(self) -> None:
        """A request went to another backend than its key's, because that one failed."""
        self._failovers += 1

    def repinned(self, reason: str) -> None:
        """A client was re-pinned, for `reason` (`Router.on_repin`)."""
        self._repins[reason] = self._repins.get(reason, 0) + 1

    def rejected(self, reason: str) -> None:
        """Bad client input was refused: "smuggling", "header_too_large", "timeout", ..."""
        self._rejected[reason] = self._rejected.get(reason, 0) + 1

    def connection_opened(self) -> None:
        self._connections += 1
        self._active += 1

    def connection_closed(self) -> None:
        self._active -= 1

    # -- the read side: the dashboard samples these once a second ---------------------------

    def counts(self) -> dict[str, BackendCounts]:
        """Every backend's totals now, by backend id (a copy: the caller may keep it)."""
        counts = {}
        for backend_id, numbers in list(self._backends.items()):
            requests = errors = 0
            for status, count in list(numbers.by_status.items()):
                requests += count
                if status >= 500:
                    errors += count
            counts[backend_id] = BackendCounts(requests, errors, tuple(numbers.buckets))
        return counts

    @property
    def failovers(self) -> int:
        """Requests sent elsewhere because their backend failed, so far."""
        return self._failovers

    @property
    def repins(self) -> int:
        """Clients re-pinned, so far, whatever the reason."""
        return sum(self._repins.values())

    def repins_by_reason(self) -> dict[str, int]:
        """Clients re-pinned so far, by reason (a copy)."""
        return dict(self._repins)

    @property
    def connections_active(self) -> int:
        """Client connections open now."""
        return self._active

    def render(self) -> tuple[bytes, str]:
        """The body and content type of a /metrics response."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def collect(self, pool: Pool | None) -> list[Metric]:
        """The metric families, read now (what a scrape sees)."""
        requests = CounterMetricFamily(
            "balancer_requests", "Requests answered, by backend and status.",
            labels=["backend", "status"],
        )  # fmt: skip
        latency = HistogramMetricFamily(
            "balancer_request_duration_seconds",
            "Time from the request head to the end of the response, by backend.",
            labels=["backend"],
        )
        for backend_id, numbers in list(self._backends.items()):
            for status, count in sorted(numbers.by_status.items()):
                requests.add_metric([backend_id, str(status)], count)
            cumulative, total = [], 0
            for bound, count in zip((*_BUCKETS, float("inf")), numbers.buckets, strict=True):
                total += count
                cumulative.append((_bound(bound), float(total)))
            latency.add_metric([backend_id], cumulative, numbers.seconds)
        retries = CounterMetricFamily(
            "balancer_retries", "Requests retried on another backend, by the failed one.",
            labels=["backend"],
        )  # fmt: skip
        for backend_id, count in list(self._retries.items()):
            retries.add_metric([backend_id], count)
        rejected = CounterMetricFamily(
            "balancer_rejected_requests", "Bad client input refused, by reason.",
            labels=["reason"],
        )  # fmt: skip
        for reason, count in list(self._rejected.items()):
            rejected.add_metric([reason], count)
        repins = CounterMetricFamily(
            "balancer_repins", "Clients re-pinned to another backend, by reason.",
            labels=["reason"],
        )  # fmt: skip
        for reason in REPIN_REASONS:
            repins.add_metric([reason], self._repins.get(reason, 0))
        families: list[Metric] = [requests, latency, retries, rejected, repins]
        families += [
            CounterMetricFamily(
                "balancer_failovers",
                "Requests sent elsewhere because their backend failed.",
                value=self._failovers,
            ),
            CounterMetricFamily(
                "balancer_connections", "Client connections accepted.", value=self._connections
            ),
            GaugeMetricFamily(
                "balancer_connections_active", "Client connections open now.", value=self._active
            ),
        ]
        if pool is not None:
            families += _pool_families(pool)
        if self.sessions is not None:
            pinned = GaugeMetricFamily(
                "balancer_pinned_sessions",
                "Sessions pinned to each backend and seen in the last 300 seconds.",
                labels=["backend"],
            )
            counts = self.sessions()
            ids = [b.id for b in pool] if pool is not None else sorted(counts)
            for backend_id in ids:
                pinned.add_metric([backend_id], float(counts.get(backend_id, 0)))
            families.append(pinned)
        return families


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def _pool_families(pool: Pool) -> list[Metric]:
    state = GaugeMetricFamily(
        "balancer_backend_state",
        "1 for the state each backend is in, 0 for the others.",
        labels=["backend", "url", "state"],
    )
    in_flight = GaugeMetricFamily(
        "balancer_backend_in_flight", "Requests in flight per backend.", labels=["backend"]
    )
    for backend in pool:
        for s in BackendState:
            state.add_metric([backend.id, backend.url, s.value], float(backend.state is s))
        in_flight.add_metric([backend.id], float(backend.in_flight))
    return [state, in_flight]


class _Collector(Collector):
    def __init__(self, metrics: Metrics, pool: Pool | None) -> None:
        self._metrics = metrics
        self._pool = pool

    def collect(self) -> Iterable[Metric]:
        return self._metrics.collect(self._pool)
