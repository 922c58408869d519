"""A sticky-session HTTP load balancer: a pure routing core and a thin I/O shell."""

from __future__ import annotations

# First: BALANCER_PLAIN=1 (see `_build`) must act before any other module here is loaded.
from . import _build  # noqa: F401

# isort: split
from ._admin import create_admin_app
from ._affinity import DEFAULT_AFFINITY_COOKIE, AffinityCookie, Sticky, StickyMode, generate_secret
from ._backend import Backend, BackendPolicy, BackendState
from ._client import BalancedSyncTransport, BalancedTransport, StaticInstances
from ._config import Address, LogFormat, Settings, load_or_exit, load_settings
from ._discovery import Discovery
from ._exceptions import (
    BackendExists,
    BalancerError,
    ConfigError,
    InvalidTransition,
    NoBackendAvailable,
    UnknownBackend,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from ._health import CheckResult, HealthChecker, HealthPolicy, HealthTracker
from ._log import configure_logging, log_event, log_state_change
from ._maglev import DEFAULT_TABLE_SIZE
from ._metrics import Metrics
from ._pool import Pool, StateListener
from ._router import Balance, Decision, Router
from ._supervisor import Supervisor, SupervisorOptions
from ._workers import RestartPolicy, Worker, WorkerState

__all__ = [
    "DEFAULT_AFFINITY_COOKIE",
    "DEFAULT_TABLE_SIZE",
    "Address",
    "AffinityCookie",
    "Backend",
    "BackendExists",
    "BackendPolicy",
    "BackendState",
    "Balance",
    "BalancedSyncTransport",
    "BalancedTransport",
    "BalancerError",
    "CheckResult",
    "ConfigError",
    "Decision",
    "Discovery",
    "HealthChecker",
    "HealthPolicy",
    "HealthTracker",
    "InvalidTransition",
    "LogFormat",
    "Metrics",
    "NoBackendAvailable",
    "Pool",
    "RestartPolicy",
    "Router",
    "Settings",
    "StateListener",
    "StaticInstances",
    "Sticky",
    "StickyMode",
    "Supervisor",
    "SupervisorOptions",
    "UnknownBackend",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamTimeout",
    "Worker",
    "WorkerState",
    "configure_logging",
    "create_admin_app",
    "generate_secret",
    "load_or_exit",
    "load_settings",
    "log_event",
    "log_state_change",
]
