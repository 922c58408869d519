"""One log line per event worth knowing (state change, failover, rejection), plain or JSON.

    log_event(BACKEND_STATE, backend="3f2a...", old="up", new="down", reason="timeout")

Every event's name is a constant of `_events` (snake_case, the one list of them).

plain: `2026-11-25T12:00:00.123Z WARNING backend_state backend=3f2a old=up new=down ...`
(logfmt: values with spaces or quotes are JSON-quoted); json: one object per line with
`time`, `level`, `event` and the fields. Everything goes through the `balancer` logger, so
an application embedding the balancer can route it like any other logging.

The access log (`--access-log`, the data path's logger `balancer.access`, event `access`):
in JSON the same object with the request's fields (`ACCESS_FIELDS`); plain, one line made
from a template of named fields (`AccessFormat`, `--access-log-format`, nginx-like:
`$status`, `${request_time}`), `DEFAULT_ACCESS_FORMAT` unless given.
"""

from __future__ import annotations

import json
import logging
import string
import sys
import time
from typing import IO, Any, Final, Literal

from ..datapath._access import ACCESS_FIELDS
from ..datapath._backend import Backend, BackendState
from ._events import BACKEND_STATE

__all__ = [
    "DEFAULT_ACCESS_FORMAT",
    "AccessFormat",
    "JsonFormatter",
    "PlainFormatter",
    "configure_logging",
    "log_event",
    "log_state_change",
]

# The plain access log line unless --access-log-format says otherwise: nginx's order
# (client, request, status, bytes) with what a sticky balancer adds as key=value. A field
# without a value is "-"; times are seconds with 3 decimals.
DEFAULT_ACCESS_FORMAT: Final = (
    '$time $client "$method $path $protocol" $status $bytes_in $bytes_out $request_time'
    " backend=$backend connect=$upstream_connect_time response=$upstream_response_time"
    " pin=$pin reason=$repin_reason id=$request_id"
)
_ACCESS_NAMES: Final = ("time", *ACCESS_FIELDS)

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


def _plain(value: object) -> str:
    """A field's value in a plain access line: "-" for none, seconds to the millisecond,
    text with quotes, backslashes and unprintable characters escaped as nginx does (\\xHH)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    text = str(value)
    if text.isprintable() and '"' not in text and "\\" not in text:
        return text
    return "".join(c if c.isprintable() and c not in '"\\' else f"\\x{ord(c):02X}" for c in text)


class AccessFormat:
    """A plain access log line's template: text with named fields, `$name` or `${name}`
    (`string.Template`; `$$` is a dollar), each of `time` and `ACCESS_FIELDS`. Raises
    ValueError naming an unknown field, or the place of a stray `$`."""

    def __init__(self, template: str) -> None:
        parsed = string.Template(template)
        if not parsed.is_valid():
            try:
                parsed.substitute(dict.fromkeys(parsed.get_identifiers(), ""))
            except ValueError as exc:  # says where the stray $ is
                raise ValueError(f"invalid template: {exc}") from None
        unknown = [name for name in parsed.get_identifiers() if name not in _ACCESS_NAMES]
        if unknown:
            raise ValueError(
                f"unknown field ${unknown[0]}; the fields are {', '.join(_ACCESS_NAMES)}"
            )
        self.template = template
        self._parsed = parsed

    def __repr__(self) -> str:
        return f"AccessFormat({self.template!r})"

    def line(self, stamp: str, fields: dict[str, Any]) -> str:
        """The line for one request's `fields`, logged at `stamp`."""
        values = {name: _plain(value) for name, value in fields.items()}
        values["time"] = stamp
        return self._parsed.substitute(values)


class PlainFormatter(logging.Formatter):
    def __init__(self, access_format: str = DEFAULT_ACCESS_FORMAT) -> None:
        super().__init__()
        self.access_format = AccessFormat(access_format)

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, _EVENT, None) == "access":
            return self.access_format.line(_timestamp(record), _fields(record))
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
    access_format: str = DEFAULT_ACCESS_FORMAT,
) -> logging.Handler:
    """Send the `balancer` logger's lines to `stream` (stderr) in `fmt`; returns the handler.
    Plain access log lines follow the template `access_format` (ValueError: see
    `AccessFormat`).

    Replaces a handler installed by an earlier call, so calling it again is harmless.
    """
    formatter = JsonFormatter() if fmt == "json" else PlainFormatter(access_format)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter)
    handler.set_name("balancer")
    for old in [h for h in _logger.handlers if h.get_name() == "balancer"]:
        _logger.removeHandler(old)
    _logger.addHandler(handler)
    _logger.setLevel(level)
    _logger.propagate = False
    return handler
