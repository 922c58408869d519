"""A sticky-session HTTP load balancer: a pure routing core and a thin I/O shell.

Its parts, one folder each: `datapath` (what a request runs through; the compiled part),
`control` (admin API, dashboard, health checks, logs, discovery), `supervisors` (app workers
and balancer processes). `balancer.transport` is public on its own: `BalancedTransport`,
client-side balancing with the same hashing. The service registry is `service_registry`."""

from __future__ import annotations

# First: BALANCER_PLAIN=1 (see `_build`) must act before any other module here is loaded.
from . import _build  # noqa: F401

# isort: split
# Exported: what applications and the project's own tests and benchmarks use. The
# supervisors (driven by the command line), the data path's upstream errors (translated at
# the proxy, never raised to a caller) and type aliases nobody imports stay private.
from ._config import Address, Settings, load_or_exit, load_settings
from ._exceptions import (
    BackendExists,
    BalancerError,
    ConfigError,
    InvalidTransition,
    NoBackendAvailable,
    PinnedBackendDown,
    UnknownBackend,
)
from .control._admin import create_admin_app
from .control._discovery import Discovery
from .control._health import CheckResult, HealthChecker, HealthPolicy, HealthTracker
from .control._log import configure_logging, log_event, log_state_change
from .control._pin_store import PinStore
from .datapath._affinity import AffinityCookie, Sticky, generate_secret
from .datapath._backend import Backend, BackendPolicy, BackendSpec, BackendState, DrainPolicy
from .datapath._maglev import DEFAULT_TABLE_SIZE
from .datapath._metrics import Metrics
from .datapath._pins import PinTable
from .datapath._pool import Pool
from .datapath._proxy import ProxyOptions, ProxyServer
from .datapath._router import Balance, Decision, Router

__all__ = [
    "DEFAULT_TABLE_SIZE",
    "Address",
    "AffinityCookie",
    "Backend",
    "BackendExists",
    "BackendPolicy",
    "BackendSpec",
    "BackendState",
    "Balance",
    "BalancerError",
    "CheckResult",
    "ConfigError",
    "Decision",
    "Discovery",
    "DrainPolicy",
    "HealthChecker",
    "HealthPolicy",
    "HealthTracker",
    "InvalidTransition",
    "Metrics",
    "NoBackendAvailable",
    "PinStore",
    "PinTable",
    "PinnedBackendDown",
    "Pool",
    "ProxyOptions",
    "ProxyServer",
    "Router",
    "Settings",
    "Sticky",
    "UnknownBackend",
    "configure_logging",
    "create_admin_app",
    "generate_secret",
    "load_or_exit",
    "load_settings",
    "log_event",
    "log_state_change",
]
