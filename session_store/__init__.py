"""Server-side sessions for Starlette and FastAPI apps, in memory, Redis, or both."""

from __future__ import annotations

from ._exceptions import (
    RedisServerError,
    SessionError,
    SessionNotLoaded,
    SessionStoreError,
    SessionTooLarge,
    StoreUnavailable,
)
from ._hybrid import HybridStore
from ._memory import MemoryStore
from ._middleware import SessionMiddleware, load_session
from ._redis import RedisStore
from ._server import RedisServer, find_server_binary, running_redis
from ._session import Session
from ._signing import SessionIdSigner, new_session_id
from ._store import Changes, SessionRecord, SessionStore

__all__ = [
    "Changes",
    "HybridStore",
    "MemoryStore",
    "RedisServer",
    "RedisServerError",
    "RedisStore",
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
    "find_server_binary",
    "load_session",
    "new_session_id",
    "running_redis",
]
