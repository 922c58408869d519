"""The exceptions of `session_store`, one hierarchy:

    SessionError
    ├── SessionStoreError ........ the store could not do what was asked
    │   └── StoreUnavailable ..... unreachable, timed out, refused: try again later (503)
    │       └── WriteNotAcknowledged  fewer replicas than required confirmed a write (503)
    ├── SessionTooLarge .......... the serialized session is over the configured limit
    └── SessionNotLoaded ......... the session was touched before `await load_session()`

A bad Redis URL raises `redis_plumbing.RedisURLError` (re-exported here), which is not a
SessionError: the URL is read by the plumbing that every package of the project shares.

Errors of redis-py are translated into these once, in the Redis store; nothing
above the stores sees a redis-py exception.
"""

from __future__ import annotations

__all__ = [
    "SessionError",
    "SessionNotLoaded",
    "SessionStoreError",
    "SessionTooLarge",
    "StoreUnavailable",
    "WriteNotAcknowledged",
]


class SessionError(Exception):
    """Base of every exception this package raises."""


class SessionStoreError(SessionError):
    """A store could not carry out an operation."""


class StoreUnavailable(SessionStoreError):
    """The store is unreachable or too slow; the operation may succeed later."""


class WriteNotAcknowledged(StoreUnavailable):
    """Fewer replicas than ``min_replicas_ack`` confirmed a write within ``ack_timeout_ms``.

    The write reached the primary and may survive, or may be lost if the primary dies
    before a replica has it: the caller must not report it as done. Like any
    `StoreUnavailable`, the middleware answers it with 503 and ``Retry-After``.
    """

    def __init__(self, acknowledged: int, required: int, timeout_ms: int) -> None:
        super().__init__(
            f"{acknowledged} of {required} required replicas acknowledged the write "
            f"within {timeout_ms} ms (min_replicas_ack); it is not safe from a failover"
        )
        self.acknowledged = acknowledged
        self.required = required
        self.timeout_ms = timeout_ms


class SessionTooLarge(SessionError, ValueError):
    """The serialized session is larger than the configured limit."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"session is {size} bytes serialized, over the limit of {limit} bytes (max_size)"
        )
        self.size = size
        self.limit = limit


class SessionNotLoaded(SessionError, RuntimeError):
    """The session was used before it was loaded (autoload is off for this request)."""
