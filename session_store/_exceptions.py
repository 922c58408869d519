"""The exceptions of `session_store`, one hierarchy:

    SessionError
    ├── SessionStoreError ........ the store could not do what was asked
    │   └── StoreUnavailable ..... unreachable, timed out, refused: try again later (503)
    ├── SessionTooLarge .......... the serialized session is over the configured limit
    ├── SessionNotLoaded ......... the session was touched before `await load_session()`
    └── RedisServerError ......... no redis-server could be found or started

Errors of redis-py are translated into these once, in the Redis store; nothing
above the stores sees a redis-py exception.
"""

from __future__ import annotations

__all__ = [
    "RedisServerError",
    "SessionError",
    "SessionNotLoaded",
    "SessionStoreError",
    "SessionTooLarge",
    "StoreUnavailable",
]


class SessionError(Exception):
    """Base of every exception this package raises."""


class SessionStoreError(SessionError):
    """A store could not carry out an operation."""


class StoreUnavailable(SessionStoreError):
    """The store is unreachable or too slow; the operation may succeed later."""


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


class RedisServerError(SessionError, RuntimeError):
    """No Redis server binary could be found, or the server would not start."""
