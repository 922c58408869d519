"""A service registry in Redis: app instances register themselves with a heartbeat
(`Registry.register`), and whoever routes to them (the balancer's `--discover`, the
client-side `balancer.transport.BalancedTransport`) reads and watches the live ones.

It is what the apps import, not the balancer: it builds on `redis_plumbing` only
(docs/registry.md is the protocol; docs/architecture.md, "Layout")."""

from __future__ import annotations

from ._exceptions import RegistryError, RegistryUnavailable
from ._registry import (
    DEFAULT_PREFIX,
    DEFAULT_REGISTRY_TTL,
    Changes,
    Instance,
    Membership,
    Notice,
    Registry,
    RegistryTarget,
    Snapshot,
    live_instances,
    parse_registry_url,
)

__all__ = [
    "DEFAULT_PREFIX",
    "DEFAULT_REGISTRY_TTL",
    "Changes",
    "Instance",
    "Membership",
    "Notice",
    "Registry",
    "RegistryError",
    "RegistryTarget",
    "RegistryUnavailable",
    "Snapshot",
    "live_instances",
    "parse_registry_url",
]
