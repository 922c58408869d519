"""The event feed: the last events of the `balancer` logger, kept for the dashboard.

Every event worth knowing already goes through `log_event` (backend state changes, drains,
discovery, worker crashes and restarts, each rolling-restart step). `EventFeed` is a
`logging.Handler` on that logger that keeps the newest `capacity` of them in a ring, each
with a sequence number, so a reader asks for "everything after n" and never blocks a writer:

    feed = EventFeed(capacity=500)
    feed.attach()            # to the `balancer` logger; detach() takes it off
    events = feed.after(0)   # oldest first

Only `log_event` records are kept (they carry a name and fields); free-text lines such as
a per-request retry warning are not events and would let one busy second push the rest out.
It sees what the logger lets through: `configure_logging` (the command line) passes INFO.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

__all__ = [
    "ADMIN_LISTENING",
    "ADMIN_LOG_REPLAYED",
    "ADMIN_LOG_UNAVAILABLE",
    "ADMIN_PROCESS_UNANSWERED",
    "AUTOSCALE_AT_MAX",
    "AUTOSCALE_DOWN",
    "AUTOSCALE_UP",
    "BACKEND_ADDED",
    "BACKEND_DISCOVERED",
    "BACKEND_DRAINED",
    "BACKEND_DRAINING",
    "BACKEND_ENABLED",
    "BACKEND_REMOVED",
    "BACKEND_STATE",
    "BACKEND_UNDISCOVERED",
    "BACKEND_WEIGHT",
    "BALANCER_PROCESSES_GONE",
    "BALANCER_PROCESSES_STARTED",
    "BALANCER_PROCESSES_STOPPING",
    "BALANCER_PROCESS_CRASHED",
    "BALANCER_PROCESS_EXITED",
    "BALANCER_PROCESS_FORK_FAILED",
    "BALANCER_PROCESS_HELD",
    "BALANCER_PROCESS_KILLED",
    "BALANCER_PROCESS_RESTARTED",
    "CONFIG_NEEDS_RESTART",
    "CONFIG_RELOADED",
    "CONFIG_RELOAD_FAILED",
    "DASHBOARD_SUBSCRIBER_DROPPED",
    "DISCOVERING",
    "DRAIN_DEADLINE",
    "FAILOVER",
    "LISTENING",
    "NO_AFFINITY_SECRET",
    "PIN_STORE",
    "PIN_STORE_AVAILABLE",
    "PIN_STORE_DROPPING",
    "PIN_STORE_UNAVAILABLE",
    "REGISTRY_BAD_ADDRESS",
    "REGISTRY_ERROR",
    "REGISTRY_RECOVERED",
    "REGISTRY_UNREACHABLE",
    "ROLLING_RESTART_ABORTED",
    "ROLLING_RESTART_DONE",
    "ROLLING_RESTART_REQUESTED",
    "ROLLING_RESTART_STARTED",
    "ROUTING_TABLE",
    "SCALE_REFUSED",
    "SESSIONS_MOVED",
    "SESSION_FORGOTTEN",
    "SESSION_MOVED",
    "SHUTTING_DOWN",
    "STOPPED",
    "TLS_RELOADED",
    "TLS_RELOAD_FAILED",
    "WORKERS_KILLED",
    "WORKERS_SCALED",
    "WORKERS_STOPPED",
    "WORKERS_STOPPING",
    "WORKER_ADDED",
    "WORKER_CRASHED",
    "WORKER_DRAINING",
    "WORKER_EXITED",
    "WORKER_HELD",
    "WORKER_HUNG",
    "WORKER_KILLED",
    "WORKER_NOT_READY",
    "WORKER_READY",
    "WORKER_REMOVING",
    "WORKER_REPLACING",
    "WORKER_RESTARTED",
    "WORKER_SPAWN_FAILED",
    "Event",
    "EventFeed",
]

_EVENT = "balancer_event"  # the record attributes `_log.log_event` sets
_FIELDS = "balancer_fields"
_MAX_TEXT = 300  # characters of one field's value: events are one line, not a dump

# -- The event names: every `log_event` and `EventFeed.add` names one of these (snake_case;
# the dashboard's page and log searches match them). ------------------------------------

# The balancer process (`_balancer`, `__main__`).
LISTENING: Final = "listening"
ADMIN_LISTENING: Final = "admin_listening"
DISCOVERING: Final = "discovering"
ROUTING_TABLE: Final = "routing_table"
NO_AFFINITY_SECRET: Final = "no_affinity_secret"
SHUTTING_DOWN: Final = "shutting_down"

# One admin address for `--workers N` (`_cluster`).
ADMIN_PROCESS_UNANSWERED: Final = "admin_process_unanswered"
ADMIN_LOG_REPLAYED: Final = "admin_log_replayed"
ADMIN_LOG_UNAVAILABLE: Final = "admin_log_unavailable"
STOPPED: Final = "stopped"
# The listener's certificates read again (SIGUSR1, POST /tls/reload); failed: nothing changed.
TLS_RELOADED: Final = "tls_reloaded"
TLS_RELOAD_FAILED: Final = "tls_reload_failed"
# The --config file read again (SIGHUP, POST /config/reload, `_reload`): applied, or
# failed (nothing changed); settings changed in it that apply only at a start.
CONFIG_RELOADED: Final = "config_reloaded"
CONFIG_RELOAD_FAILED: Final = "config_reload_failed"
CONFIG_NEEDS_RESTART: Final = "config_needs_restart"

# Backends: state changes (`_log.log_state_change`), the admin API, discovery.
BACKEND_STATE: Final = "backend_state"
BACKEND_ADDED: Final = "backend_added"
BACKEND_DRAINING: Final = "backend_draining"  # a drain began
BACKEND_DRAINED: Final = "backend_drained"  # a drain ended: why, and the sessions still pinned
BACKEND_ENABLED: Final = "backend_enabled"
BACKEND_REMOVED: Final = "backend_removed"
BACKEND_WEIGHT: Final = "backend_weight"  # an operator changed a backend's weight
BACKEND_DISCOVERED: Final = "backend_discovered"
BACKEND_UNDISCOVERED: Final = "backend_undiscovered"

# One session, by an operator (the admin API's /sessions routes): its handle, never its value.
SESSION_MOVED: Final = "session_moved"
SESSION_FORGOTTEN: Final = "session_forgotten"

# The shared pin table (`--pin-store`, `_pin_store`).
PIN_STORE: Final = "pin_store"  # its URL (no password) and TTL, at start
PIN_STORE_UNAVAILABLE: Final = "pin_store_unavailable"
PIN_STORE_AVAILABLE: Final = "pin_store_available"
PIN_STORE_DROPPING: Final = "pin_store_dropping"  # pins not written: queue full, or Redis down

# The service registry, as discovery reads it.
REGISTRY_UNREACHABLE: Final = "registry_unreachable"
REGISTRY_ERROR: Final = "registry_error"
REGISTRY_RECOVERED: Final = "registry_recovered"
REGISTRY_BAD_ADDRESS: Final = "registry_bad_address"

# The dashboard's own (`EventFeed.add`: not log lines).
FAILOVER: Final = "failover"
SESSIONS_MOVED: Final = "sessions_moved"
DASHBOARD_SUBSCRIBER_DROPPED: Final = "dashboard_subscriber_dropped"

# App workers (`--spawn`, `supervisors._supervisor`).
WORKER_ADDED: Final = "worker_added"
WORKER_READY: Final = "worker_ready"
WORKER_NOT_READY: Final = "worker_not_ready"
WORKER_HUNG: Final = "worker_hung"
WORKER_EXITED: Final = "worker_exited"
WORKER_CRASHED: Final = "worker_crashed"
WORKER_HELD: Final = "worker_held"
WORKER_RESTARTED: Final = "worker_restarted"
WORKER_SPAWN_FAILED: Final = "worker_spawn_failed"
WORKER_DRAINING: Final = "worker_draining"
WORKER_REMOVING: Final = "worker_removing"
WORKER_KILLED: Final = "worker_killed"
WORKER_REPLACING: Final = "worker_replacing"
WORKERS_SCALED: Final = "workers_scaled"
SCALE_REFUSED: Final = "scale_refused"
WORKERS_STOPPING: Final = "workers_stopping"
WORKERS_KILLED: Final = "workers_killed"
WORKERS_STOPPED: Final = "workers_stopped"
DRAIN_DEADLINE: Final = "drain_deadline"
ROLLING_RESTART_REQUESTED: Final = "rolling_restart_requested"
ROLLING_RESTART_STARTED: Final = "rolling_restart_started"
ROLLING_RESTART_ABORTED: Final = "rolling_restart_aborted"
ROLLING_RESTART_DONE: Final = "rolling_restart_done"
# Autoscaling (`--spawn MIN:MAX`, `supervisors._autoscale`): each with the load, the target,
# the window and the reason.
AUTOSCALE_UP: Final = "autoscale_up"
AUTOSCALE_DOWN: Final = "autoscale_down"
AUTOSCALE_AT_MAX: Final = "autoscale_at_max"

# Balancer processes (`--workers`, `supervisors._processes`).
BALANCER_PROCESSES_STARTED: Final = "balancer_processes_started"
BALANCER_PROCESS_EXITED: Final = "balancer_process_exited"
BALANCER_PROCESS_CRASHED: Final = "balancer_process_crashed"
BALANCER_PROCESS_HELD: Final = "balancer_process_held"
BALANCER_PROCESS_RESTARTED: Final = "balancer_process_restarted"
BALANCER_PROCESS_FORK_FAILED: Final = "balancer_process_fork_failed"
BALANCER_PROCESS_KILLED: Final = "balancer_process_killed"
BALANCER_PROCESSES_STOPPING: Final = "balancer_processes_stopping"
BALANCER_PROCESSES_GONE: Final = "balancer_processes_gone"


@dataclass(frozen=True, slots=True)
class Event:
    """One event: `seq` grows by one per event; `time` is wall-clock seconds (epoch)."""

    seq: int
    time: float
    level: str  # "INFO", "WARNING", "ERROR"
    name: str  # backend_state, worker_crashed, ...
    fields: dict[str, object]  # JSON-safe: str, int, float, bool, None, lists of them

    def as_json(self) -> dict[str, object]:
        return {
            "seq": self.seq,
            "time": self.time,
            "level": self.level,
            "name": self.name,
            "fields": self.fields,
        }


def _plain(value: object) -> object:
    """A JSON-safe copy of a field's value (an exception or a path becomes its text)."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(item) for item in list(value)[:50]]
    return str(value)[:_MAX_TEXT]


class EventFeed(logging.Handler):
    """A ring of the newest `capacity` events; `after(seq)` reads it. Thread-safe: a
    handler may be called from any thread, and `emit` only appends under a lock."""

    def __init__(
        self,
        capacity: int = 500,
        *,
        clock: Callable[[], float] = time.time,
        logger: logging.Logger | None = None,
    ) -> None:
        super().__init__(level=logging.INFO)
        self._events: deque[Event] = deque(maxlen=capacity)
        self._seq = 0
        self._clock = clock
        self._lock_events = threading.Lock()
        self._logger = logger if logger is not None else logging.getLogger("balancer")

    def __repr__(self) -> str:
        return f"<EventFeed [events: {len(self._events)}, last: {self._seq}]>"

    @property
    def last_seq(self) -> int:
        """The sequence number of the newest event (0 before the first)."""
        return self._seq

    def attach(self) -> None:
        """Start receiving the `balancer` logger's events."""
        self._logger.addHandler(self)

    def detach(self) -> None:
        self._logger.removeHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        name = getattr(record, _EVENT, None)
        if not isinstance(name, str):
            return
        fields: dict[str, object] = getattr(record, _FIELDS, {})
        self.add(name, {k: _plain(v) for k, v in fields.items()}, record.levelname)

    def add(self, name: str, fields: dict[str, object], level: str = "INFO") -> Event:
        """Record an event that is not a log line (the dashboard's own: sessions moved)."""
        with self._lock_events:
            self._seq += 1
            event = Event(self._seq, self._clock(), level, name, fields)
            self._events.append(event)
        return event

    def after(self, seq: int, limit: int | None = None) -> list[Event]:
        """The events newer than `seq`, oldest first; with `limit`, only the newest that many."""
        with self._lock_events:
            if seq >= self._seq:
                return []
            missing = self._seq - seq
            events = list(self._events)
        events = events[-missing:] if missing < len(events) else events
        if limit is not None and len(events) > limit:
            events = events[-limit:]
        return events
