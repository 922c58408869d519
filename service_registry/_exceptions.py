"""The exceptions of `service_registry`, one hierarchy:

    RegistryError ............ the registry refused an operation or holds bad data
    └── RegistryUnavailable .. Redis is down, too slow or read-only: try again later

redis-py's errors become these in one place, `Registry._call` (through
`redis_plumbing.call`); a bad Redis URL is `redis_plumbing.RedisURLError`.
"""

from __future__ import annotations

__all__ = ["RegistryError", "RegistryUnavailable"]


class RegistryError(Exception):
    """The service registry refused an operation, or an argument or a record is invalid."""


class RegistryUnavailable(RegistryError):
    """Redis, behind the registry, did not answer in time or is not accepting writes."""
