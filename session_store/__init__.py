"""Server-side sessions for Starlette and FastAPI apps, in memory, Redis, or both."""

from __future__ import annotations

from ._connection import (
    UNAVAILABLE_ERRORS,
    RedisClient,
    RedisURL,
    cancellable,
    parse_redis_url,
    redact_url,
    redis_client,
)
from ._exceptions import (
    RedisServerError,
    RedisURLError,
    SessionError,
    SessionNotLoaded,
    SessionStoreError,
    SessionTooLarge,
    StoreUnavailable,
    WriteNotAcknowledged,
)
from ._hybrid import HybridStore
from ._memory import MemoryStore
from ._middleware import SessionMiddleware, load_session
from ._parent_death import die_with_parent, parent_death_hook
from ._redis import RedisStore
from ._server import RedisServer, find_server_binary, free_port, running_redis
from ._session import Session
from ._signing import SessionIdSigner, new_session_id
from ._store import Changes, SessionRecord, SessionStore

__all__ = [
    "UNAVAILABLE_ERRORS",
    "Changes",
    "HybridStore",
    "MemoryStore",
    "RedisClient",
    "RedisServer",
    "RedisServerError",
    "RedisStore",
    "RedisURL",
    "RedisURLError",
    "Session",
    "SessionError",
    "SessionIdSigner",
    "SessionMiddleware",
    "SessionNotLoaded",
    "SessionRecord",
    "SessionStore",
    "SessionStoreError",
    "SessionTooLarge",
    "StoreUnavailable",
    "WriteNotAcknowledged",
    "cancellable",
    "die_with_parent",
    "find_server_binary",
    "free_port",
    "load_session",
    "new_session_id",
    "parent_death_hook",
    "parse_redis_url",
    "redact_url",
    "redis_client",
    "running_redis",
]
