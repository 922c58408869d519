"""The project's Redis plumbing, the lowest layer of its packages (it imports none of them):
one Redis URL into one redis-py client whatever the topology, the one translation of
redis-py's errors (`call`), a Redis server launcher for development and tests
(`RedisServer`, `running_redis`, `free_port`), and the set-up that makes a child process
die with its parent. `session_store`, `service_registry`, the balancer and the demo app
all build on it (docs/architecture.md, "Layout")."""

from __future__ import annotations

from ._connection import (
    UNAVAILABLE_ERRORS,
    RedisClient,
    RedisURL,
    call,
    cancellable,
    parse_redis_url,
    redact_url,
    redis_client,
)
from ._exceptions import RedisPlumbingError, RedisServerError, RedisURLError
from ._parent_death import die_with_parent, parent_death_hook
from ._server import RedisServer, find_server_binary, free_port, running_redis

__all__ = [
    "UNAVAILABLE_ERRORS",
    "RedisClient",
    "RedisPlumbingError",
    "RedisServer",
    "RedisServerError",
    "RedisURL",
    "RedisURLError",
    "call",
    "cancellable",
    "die_with_parent",
    "find_server_binary",
    "free_port",
    "parent_death_hook",
    "parse_redis_url",
    "redact_url",
    "redis_client",
    "running_redis",
]
