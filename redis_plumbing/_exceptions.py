"""The exceptions of `redis_plumbing`, one hierarchy:

    RedisPlumbingError
    ├── RedisURLError ....... a Redis URL that no client can be built from (a ValueError)
    └── RedisServerError .... no redis-server could be found or started

Errors of redis-py itself are not wrapped here: each user translates them into its own
exceptions with `call`, naming its own types for "unavailable" and "refused".
"""

from __future__ import annotations

__all__ = ["RedisPlumbingError", "RedisServerError", "RedisURLError"]


class RedisPlumbingError(Exception):
    """Base of every exception this package raises."""


class RedisServerError(RedisPlumbingError, RuntimeError):
    """No Redis server binary could be found, or the server would not start."""


class RedisURLError(RedisPlumbingError, ValueError):
    """A Redis URL that is not one of the forms `redis_client` reads; says what is wrong."""
