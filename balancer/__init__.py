"""A sticky-session HTTP load balancer: a pure routing core and a thin I/O shell.

Its parts, one folder each: `datapath` (what a request runs through; the compiled part),
`control` (admin API, dashboard, health checks, logs, discovery), `supervisors` (app workers
and balancer processes). `balancer.transport` is public on its own: `BalancedTransport`,
client-side balancing with the same hashing. The service registry is `service_registry`."""

from __future__ import annotations

# First: BALANCER_PLAIN=1 (see `_build`) must act before any other module here is loaded.
from . import _build  # noqa: F401

# isort: split
from ._config import Address, LogFormat, Settings, load_or_exit, load_settings
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
from .control._admin import create_admin_app
from .control._discovery import Discovery
from .control._health import CheckResult, HealthChecker, HealthPolicy, HealthTracker
from .control._log import configure_logging, log_event, log_state_change
from .datapath._affinity import (
    DEFAULT_AFFINITY_COOKIE,
    AffinityCookie,
    Sticky,
    StickyMode,
    generate_secret,
)
from .datapath._backend import Backend, BackendPolicy, BackendState
from .datapath._maglev import DEFAULT_TABLE_SIZE
from .datapath._metrics import Metrics
from .datapath._pool import Pool, StateListener
from .datapath._router import Balance, Decision, Router
from .supervisors._supervisor import Supervisor, SupervisorOptions
from .supervisors._workers import RestartPolicy, Worker, WorkerState

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
