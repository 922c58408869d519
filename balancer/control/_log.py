"""One log line per event worth knowing (state change, failover, rejection), plain or JSON.

    log_event(BACKEND_STATE, backend="3f2a...", old="up", new="down", reason="timeout")

Every event's name is a constant of `_events` (snake_case, the one list of them).

plain: `2026-11-25T12:00:00.123Z WARNING backend_state backend=3f2a old=up new=down ...`
(logfmt: values with spaces or quotes are JSON-quoted); json: one object per line with
`time`, `level`, `event` and the fields. Everything goes through the `balancer` logger, so
an application embedding the balancer can route it like any other logging.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any, Literal

from ..datapath._backend import Backend, BackendState
from ._events import BACKEND_STATE

__all__ = ["JsonFormatter", "PlainFormatter", "configure_logging", "log_event", "log_state_change"]

_logger = logging.getLogger("balancer")
_EVENT = "balancer_event"
_FIELDS = "balancer_fields"


def log_event(name: str, /, *, level: int = logging.INFO, **fields: object) -> None:
    """Log event `name` with its fields (keep values small: ids, numbers, short text)."""
    if _logger.isEnabledFor(level):
        _logger.log(level, name, extra={_EVENT: name, _FIELDS: fields})


def log_state_change(backend: Backend, old: BackendState) -> None:
    """A pool's `on_change` listener: one line per backend state change."""
    new = backend.state
    level = logging.WARNING if new is BackendState.DOWN else logging.INFO
    fields: dict[str, object] = {"backend": backend.id, "url": backend.url}
    fields |= {"old": old.value, "new": new.value}
    if new is BackendState.DOWN:
        fields["reason"] = backend.down_reason or (
            "ejected" if backend.ejected_until is not None else None
        )
    log_event(BACKEND_STATE, level=level, **fields)


def _timestamp(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = getattr(record, _FIELDS, {})
    return fields


class PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record), record.levelname, record.getMessage()]
        for key, value in _fields(record).items():
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            if not text or any(c in text for c in ' "=\\') or not text.isprintable():
                text = json.dumps(text)
            parts.append(f"{key}={text}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {"time": _timestamp(record), "level": record.levelname}
        data["event"] = getattr(record, _EVENT, None) or record.getMessage()
        data |= _fields(record)
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def configure_logging(
    fmt: Literal["plain", "json"] = "plain",
    *,
    stream: IO[str] | None = None,
    level: int = logging.INFO,
) -> logging.Handler:
    """Send the `balancer` logger's lines to `stream` (stderr) in `fmt`; returns the handler.

    Replaces a handler installed by an earlier call, so calling it again is harmless.
    """
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter())
    handler.set_name("balancer")
    for old in [h for h in _logger.handlers if h.get_name() == "balancer"]:
        _logger.removeHandler(old)
    _logger.addHandler(handler)
    _logger.setLevel(level)
    _logger.propagate = False
    return handler
