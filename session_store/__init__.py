"""Server-side sessions for Starlette and FastAPI apps, in memory, Redis, or both.

The Redis connection names a `RedisStore` user needs (`redis_client`, `parse_redis_url`,
`redact_url`, `RedisURLError`, `cancellable`, ...) are re-exported from `redis_plumbing`,
where they live; the Redis server launcher (`RedisServer`, `running_redis`) is there only,
a development and test helper rather than session API."""

from __future__ import annotations

from redis_plumbing import (
    UNAVAILABLE_ERRORS,
    RedisClient,
    RedisURL,
    RedisURLError,
    cancellable,
    parse_redis_url,
    redact_url,
    redis_client,
)

from ._encryption import EncryptedStore
from ._exceptions import (
    SessionError,
    SessionNotLoaded,
    SessionStoreError,
    SessionTooLarge,
    StoreUnavailable,
    WriteNotAcknowledged,
)
from ._flash import FLASHES_KEY, flash, get_flashed_messages
from ._hybrid import HybridStore
from ._memory import MemoryStore
from ._middleware import SessionMiddleware, load_session, save_session
from ._redis import RedisStore
from ._session import Session
from ._signing import SessionIdSigner, new_session_id
from ._store import Changes, SessionRecord, SessionStore
from ._url import store_from_env, store_from_url
from ._users import UserIndex, bind_user, logout_everywhere, user_sessions

__all__ = [
    "FLASHES_KEY",
    "UNAVAILABLE_ERRORS",
    "Changes",
    "EncryptedStore",
    "HybridStore",
    "MemoryStore",
    "RedisClient",
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
    "UserIndex",
    "WriteNotAcknowledged",
    "bind_user",
    "cancellable",
    "flash",
    "get_flashed_messages",
    "load_session",
    "logout_everywhere",
    "new_session_id",
    "parse_redis_url",
    "redact_url",
    "redis_client",
    "save_session",
    "store_from_env",
    "store_from_url",
    "user_sessions",
]
