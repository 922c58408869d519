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

__all__ = ["Event", "EventFeed"]

_EVENT = "balancer_event"  # the record attributes `_log.log_event` sets
_FIELDS = "balancer_fields"
_MAX_TEXT = 300  # characters of one field's value: events are one line, not a dump


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
