"""Settings: every option from the command line, the environment and a TOML file, validated once.

Precedence: command line > environment > TOML file > default. Each option has one name per
source, derived from its field:

| field            | command line                  | environment                | TOML key         |
|------------------|-------------------------------|----------------------------|------------------|
| listen           | --listen HOST:PORT            | BALANCER_LISTEN            | listen           |
| backends         | --backend [NAME=]URL (rep.)   | BALANCER_BACKENDS (a,b,c)  | backends (list)  |
| trusted_proxies  | --trusted-proxy CIDR (rep.)   | BALANCER_TRUSTED_PROXIES   | trusted_proxies  |
| affinity_secrets | --affinity-secret S (rep.)    | BALANCER_AFFINITY_SECRETS  | affinity_secrets |
| worker_cmd       | --worker-cmd TEMPLATE         | BALANCER_WORKER_CMD        | worker_cmd       |
| any other x_y    | --x-y VALUE                   | BALANCER_X_Y               | x_y (or x-y)     |

The file comes from `--config PATH` or `BALANCER_CONFIG`. Lists in the environment are
comma-separated; booleans there are 1/0, true/false, yes/no, on/off. Every value, whatever its
source, goes through the same parser, and every problem is a ConfigError naming the option
as a flag (`--backend: ...`), with its source when that was not the command line. The
library classes it feeds (ProxyOptions, Backend, ...) raise ValueError naming their own
parameter; only this module speaks of flags. A default such a class also takes is read
from it (see `_PROXY` below), never restated.

Secrets (`affinity_secrets`) are newest first, as `SessionMiddleware`'s `secret_keys`: the
first signs, every one verifies. Every balancer replica must be given the same ones; with
none, `load_or_exit` generates one per process (set it before forking workers, so that they
agree).
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import re
import shlex
import sys
import tomllib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, NoReturn, cast

from redis_plumbing import RedisURLError, parse_redis_url
from service_registry import RegistryError, RegistryTarget, parse_registry_url

from ._build import version_line
from ._exceptions import ConfigError, TlsError
from .control._discovery import DEFAULT_DISCOVER_INTERVAL
from .control._health import HealthPolicy
from .control._log import DEFAULT_ACCESS_FORMAT, AccessFormat
from .control._tls import CertificatePair, TlsListener, backend_context
from .datapath._affinity import (
    DEFAULT_AFFINITY_COOKIE,
    DEFAULT_COOKIE_PATH,
    DEFAULT_SAME_SITE,
    AffinityCookie,
    SameSite,
    Sticky,
    generate_secret,
    is_cookie_name,
)
from .datapath._backend import (
    BackendPolicy,
    BackendSpec,
    DrainPolicy,
    DrainSessions,
    backend_id,
)
from .datapath._maglev import DEFAULT_TABLE_SIZE, is_prime
from .datapath._proxy import ProxyOptions
from .datapath._router import (
    DEFAULT_BALANCE,
    DEFAULT_HASH_BALANCE_FACTOR,
    DEFAULT_ON_PINNED_DOWN,
    DEFAULT_STRICT_WINDOW,
    Balance,
    OnPinnedDown,
)
from .supervisors._autoscale import MAX_WINDOW, AutoscalePolicy
from .supervisors._supervisor import SupervisorOptions

__all__ = ["Address", "LogFormat", "Network", "Settings", "load_or_exit", "load_settings"]

LogFormat = Literal["plain", "json"]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_ENV_PREFIX = "BALANCER_"
# Starlette's SessionMiddleware names its cookie "session".
_DEFAULT_STICKY = Sticky("cookie", "session")


@dataclass(frozen=True, slots=True)
class Address:
    """A host and a port to bind to; port 0 picks a free one."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


# Every default that a library class also takes is that class's (one place, issue 14);
# Settings states only its own (where to listen, what to balance, the supervisor's switch).
_PROXY = ProxyOptions()
_HEALTH = HealthPolicy()
_BACKEND = BackendPolicy()
_DRAIN = _BACKEND.drain
_SUPERVISOR = SupervisorOptions(command=(), count=1)
_RESTART = _SUPERVISOR.restart
_AUTOSCALE = AutoscalePolicy(minimum=1, maximum=2)


@dataclass(frozen=True, slots=True)
class Settings:
    """Every option of the balancer, validated. Build it with `load_settings`.

    Units and meanings of the options a library class also takes are on that class's field
    (`ProxyOptions`, `HealthPolicy`, `BackendPolicy`, `SupervisorOptions`, `RestartPolicy`,
    `Router`), with the default.
    """

    listen: Address = Address("127.0.0.1", 8080)
    # Normalized `BackendSpec` texts: [NAME=]http://host:port [weight=N] [backup] [max-conns=N]
    backends: tuple[str, ...] = ()
    sticky: Sticky = _DEFAULT_STICKY
    admin: Address | None = None  # the admin app is off without it
    # Bearer token; required when admin is not loopback. Kept out of repr, hence logs.
    admin_token: str | None = field(default=None, repr=False)
    config: Path | None = None  # the TOML file the settings were read from
    workers: int = 1  # processes sharing the listening port (SO_REUSEPORT)
    log_format: LogFormat = "plain"
    access_log: bool = _PROXY.access_log
    access_log_format: str = DEFAULT_ACCESS_FORMAT  # a plain line's template (AccessFormat)
    # X-Forwarded-* are believed only from these (ProxyOptions takes them as text).
    trusted_proxies: tuple[Network, ...] = ()
    # Each connection starts with a PROXY protocol header from one of trusted_proxies.
    proxy_protocol: bool = _PROXY.proxy_protocol
    affinity_cookie: str = DEFAULT_AFFINITY_COOKIE
    # Seconds the affinity cookie lives; 0 = the browser session (AffinityCookie's own
    # default). The balancer's is session_store's absolute lifetime: a pin that died with
    # the browser while the app's session cookie lived on would route the client by hash,
    # away from its session.
    affinity_max_age: int = 86400
    affinity_secrets: tuple[str, ...] = field(default=(), repr=False)  # newest first
    # The affinity cookie's attributes (AffinityCookie's); it is Secure under TLS, or
    # with affinity_secure behind a front that terminates TLS.
    affinity_same_site: SameSite = DEFAULT_SAME_SITE
    affinity_partitioned: bool = False  # CHIPS: pinned inside third-party iframes too
    affinity_domain: str | None = None
    affinity_path: str = DEFAULT_COOKIE_PATH
    affinity_secure: bool = False
    # TLS on the listener: certificate chains and their keys, pairwise, the first the
    # default (control._tls); () = plain HTTP.
    tls_certs: tuple[Path, ...] = ()
    tls_keys: tuple[Path, ...] = ()
    # With TLS, ALPN offers h2 too, and a connection that chooses it is served HTTP/2
    # (datapath._http2; docs/balancer.md "HTTP/2"), as Caddy and Traefik do by default.
    http2: bool = True
    # The CA bundle that https:// backends are verified against; None: the system's.
    backend_ca: Path | None = None
    balance: Balance = DEFAULT_BALANCE  # for --sticky none
    # A client whose pinned backend is down: re-pinned at once, or 503 + Retry-After for
    # strict_window seconds first.
    on_pinned_down: OnPinnedDown = DEFAULT_ON_PINNED_DOWN
    strict_window: float = DEFAULT_STRICT_WINDOW
    # A response header naming why the client was re-pinned (REPIN_REASONS); None: none.
    repin_header: str | None = None
    # The pin table's shared copy (`control._pin_store`): a Redis URL, any form
    # redis_plumbing reads; None: the in-memory table only. May hold a password.
    pin_store: str | None = field(default=None, repr=False)
    hash_balance_factor: float = DEFAULT_HASH_BALANCE_FACTOR
    hash_table_size: int = DEFAULT_TABLE_SIZE  # Maglev table entries, a prime
    health_path: str = _HEALTH.path
    health_interval: float = _HEALTH.interval
    health_timeout: float = _HEALTH.timeout
    health_rise: int = _HEALTH.rise
    health_fall: int = _HEALTH.fall
    eject_after: int = _BACKEND.eject_after
    ejection_time: float = _BACKEND.ejection_time
    max_ejection_percent: float = _BACKEND.max_ejection_percent
    slow_start: float = _BACKEND.slow_start
    max_request_line: int = _PROXY.max_request_line
    max_header_bytes: int = _PROXY.max_header_bytes
    header_timeout: float = _PROXY.header_timeout
    idle_timeout: float = _PROXY.idle_timeout
    upstream_connect_timeout: float = _PROXY.connect_timeout
    upstream_response_timeout: float = _PROXY.response_timeout
    upstream_keepalive: int = _PROXY.keepalive_per_backend
    max_attempts: int = _PROXY.max_attempts
    retry_budget: float = _PROXY.retry_ratio
    retry_floor: float = _PROXY.retry_floor
    shutdown_deadline: float = _PROXY.shutdown_deadline
    queue_timeout: float = _PROXY.queue_timeout
    # The local cluster supervisor: with `spawn`, the balancer starts that many workers
    # from `worker_cmd` (or `app` under uvicorn) and balances over them too.
    # Workers to start: N, or (MIN, MAX) to autoscale between them; None: no supervisor.
    spawn: int | tuple[int, int] | None = None
    worker_cmd: str | None = None  # command template with {port} and {index}
    app: str | None = None  # MODULE:ATTR, an ASGI app run under uvicorn
    worker_ready_path: str = _SUPERVISOR.ready_path
    worker_ready_timeout: float = _SUPERVISOR.ready_timeout
    worker_hang_timeout: float = _SUPERVISOR.hang_timeout
    worker_stop_timeout: float = _SUPERVISOR.stop_timeout
    # A drain (the admin API's, a rolling restart's, a scale-down's, a deregistration's):
    # pinned clients kept or moved, and when it ends by itself (DrainPolicy).
    drain_sessions: DrainSessions = _DRAIN.sessions
    drain_idle: float = _DRAIN.idle
    drain_deadline: float = _DRAIN.deadline
    restart_backoff: float = _RESTART.backoff
    restart_backoff_max: float = _RESTART.backoff_max
    min_uptime: float = _RESTART.min_uptime
    max_crashes: int = _RESTART.max_crashes
    autoscale_target: float = _AUTOSCALE.target
    autoscale_window: float = _AUTOSCALE.window
    autoscale_cooldown: float = _AUTOSCALE.cooldown
    # The service registry (docs/registry.md): backends are also the live instances of
    # this service, added and removed as they register and leave or die.
    discover: RegistryTarget | None = None  # redis://HOST:PORT[/DB]/SERVICE
    discover_interval: float = DEFAULT_DISCOVER_INTERVAL  # seconds between registry reads
    # What the dashboard shows that the balancer cannot know by itself: the demo's mode
    # (sticky, shared, hybrid), and a Redis to report on (default: --discover's).
    dashboard_mode: str | None = None
    dashboard_redis: str | None = field(default=None, repr=False)  # may hold a password

    def backend_specs(self) -> tuple[tuple[str | None, str], ...]:
        """Each of `backends` as `(name, url)`; the name is None for a bare URL."""
        return tuple((spec.name, spec.url) for spec in self.backend_options())

    def backend_options(self) -> tuple[BackendSpec, ...]:
        """Each of `backends` with its options (weight, backup, max-conns)."""
        return tuple(BackendSpec.parse(spec) for spec in self.backends)

    def backend_policy(self) -> BackendPolicy:
        return BackendPolicy(
            eject_after=self.eject_after,
            ejection_time=self.ejection_time,
            max_ejection_percent=self.max_ejection_percent,
            slow_start=self.slow_start,
            drain=DrainPolicy(
                # Only cookie stickiness pins clients: in modes none and ip nothing is kept,
                # so a drain ends once nothing is in flight ("empty"), not after --drain-idle
                # of nothing (a --sticky none rolling restart of 3 workers took 30 s more).
                sessions=self.drain_sessions if self.sticky.mode == "cookie" else "move",
                idle=self.drain_idle,
                deadline=self.drain_deadline,
            ),
        )

    def health_policy(self) -> HealthPolicy:
        return HealthPolicy(
            path=self.health_path,
            interval=self.health_interval,
            timeout=self.health_timeout,
            rise=self.health_rise,
            fall=self.health_fall,
        )

    def worker_command(self) -> tuple[str, ...]:
        """The workers' argv template (parts hold {port} and {index}); () without one."""
        if self.worker_cmd is not None:
            return tuple(shlex.split(self.worker_cmd))
        if self.app is not None:
            python = sys.executable.replace("{", "{{").replace("}", "}}")
            return (python, "-m", "uvicorn", self.app, "--host", "127.0.0.1", "--port", "{port}")
        return ()

    def affinity(self) -> AffinityCookie:
        """The affinity cookie signer; needs `affinity_secrets` (see `load_or_exit`)."""
        return AffinityCookie(
            secrets=self.affinity_secrets,
            name=self.affinity_cookie,
            max_age=self.affinity_max_age or None,
            secure=self.affinity_secure or bool(self.tls_certs),
            same_site=self.affinity_same_site,
            partitioned=self.affinity_partitioned,
            domain=self.affinity_domain,
            path=self.affinity_path,
        )

    def tls_pairs(self) -> tuple[CertificatePair, ...]:
        """`tls_certs` and `tls_keys` as pairs; () without TLS."""
        return tuple(
            CertificatePair(cert, key)
            for cert, key in zip(self.tls_certs, self.tls_keys, strict=True)
        )


# -- parsers: one per kind of value; each takes a str (command line, environment) or a TOML
# value, and raises _Invalid with what is wrong ------------------------------------------


class _Invalid(Exception):
    pass


Parser = Callable[[object], object]


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {value!r}")
    return value


def _address(value: object) -> Address:
    text = _text(value)
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise _Invalid(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise _Invalid(f"{port_text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise _Invalid(f"port {port} is out of range 0-65535")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _Invalid(f"{host!r} is not an IPv6 address (write [::1]:8080)") from None
    elif not host or any(c.isspace() or c in "/[]" for c in host):
        raise _Invalid(f"{host!r} is not a host")
    return Address(host, port)


def _integer(minimum: int) -> Parser:
    def parse(value: object) -> int:
        if isinstance(value, bool):
            raise _Invalid(f"expected an integer, got {value!r}")
        if isinstance(value, int):
            number = value
        else:
            try:
                number = int(_text(value).strip())
            except ValueError:
                raise _Invalid(f"expected an integer, got {value!r}") from None
        if number < minimum:
            raise _Invalid(f"must be at least {minimum}, got {number}")
        return number

    return parse


def _worker_count(value: object) -> object:
    """N >= 1, "auto": one per CPU, as Node's cluster examples and gunicorn advise, or
    MIN:MAX (1 <= MIN < MAX), a range to autoscale in."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return os.cpu_count() or 1
    if isinstance(value, str) and ":" in value:
        low, _, high = value.strip().partition(":")
        try:
            minimum, maximum = int(low), int(high)
        except ValueError:
            raise _Invalid(f"expected N, auto or MIN:MAX, got {value!r}") from None
        if not 1 <= minimum < maximum:
            raise _Invalid(
                f"MIN:MAX needs 1 <= MIN < MAX (for a fixed count, give N), got {value!r}"
            )
        return (minimum, maximum)
    return _integer(1)(value)


def _window(value: object) -> float:
    number = cast(float, _number(zero=False)(value))
    if not _AUTOSCALE.interval <= number <= MAX_WINDOW:
        raise _Invalid(
            f"must be between {_AUTOSCALE.interval:g} and {MAX_WINDOW:g} seconds, got {value!r}"
        )
    return number


def _number(*, zero: bool) -> Parser:
    """A finite number (seconds, a ratio), > 0 (or >= 0 with `zero`)."""

    def parse(value: object) -> float:
        if isinstance(value, bool):
            raise _Invalid(f"expected a number, got {value!r}")
        if isinstance(value, int | float):
            number = float(value)
        else:
            try:
                number = float(_text(value).strip())
            except ValueError:
                raise _Invalid(f"expected a number, got {value!r}") from None
        if not math.isfinite(number) or number < 0 or (number == 0 and not zero):
            raise _Invalid(f"must be a number {'>= 0' if zero else '> 0'}, got {value!r}")
        return number

    return parse


def _fraction(value: object) -> float:
    number = cast(float, _number(zero=True)(value))
    if number > 1:
        raise _Invalid(f"must be between 0 and 1, got {value!r}")
    return number


def _percent(value: object) -> float:
    number = cast(float, _number(zero=True)(value))
    if number > 100:
        raise _Invalid(f"must be between 0 and 100, got {value!r}")
    return number


def _prime(value: object) -> int:
    number = cast(int, _integer(2)(value))
    if not is_prime(number):
        raise _Invalid(f"must be a prime (Maglev needs one), got {number}")
    return number


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = _text(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise _Invalid(f"expected true or false, got {value!r}")


def _switch(value: object) -> bool:
    """A boolean that the command line takes as a value (`--http2 off`), not as a flag."""
    try:
        return _boolean(value)
    except _Invalid:
        raise _Invalid(f"expected on or off, got {value!r}") from None


def _header_name(value: object) -> str:
    text = _text(value)
    if not is_cookie_name(text):  # a field name is a token too (RFC 9110 section 5.1)
        raise _Invalid(f"{text!r} is not a header field name")
    return text


def _choice(*choices: str) -> Parser:
    def parse(value: object) -> str:
        text = _text(value)
        if text not in choices:
            raise _Invalid(f"expected one of {', '.join(choices)}, got {text!r}")
        return text

    return parse


def _sticky(value: object) -> Sticky:
    try:
        return Sticky.parse(_text(value))
    except ValueError as exc:
        raise _Invalid(str(exc)) from None


def _cookie_name(value: object) -> str:
    text = _text(value)
    if not is_cookie_name(text):
        raise _Invalid(f"{text!r} is not a valid cookie name")
    return text


def _url_path(value: object) -> str:
    text = _text(value)
    if not text.startswith("/") or any(c.isspace() or ord(c) < 0x21 for c in text):
        raise _Invalid(f"expected an absolute path such as /healthz, got {text!r}")
    return text


def _access_format(value: object) -> str:
    text = _text(value)
    try:
        AccessFormat(text)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None
    return text


def _redis_url(value: object) -> str:
    text = _text(value).strip()
    try:
        parse_redis_url(text)  # every topology's form; reads the URL, connects to nothing
    except RedisURLError as exc:
        raise _Invalid(str(exc)) from None
    return text


def _token(value: object) -> str:
    text = _text(value)
    if not text or any(c.isspace() or not c.isprintable() for c in text):
        raise _Invalid("must be non-empty printable text without spaces")
    # The same floor as an affinity secret: the token guards draining and removing backends,
    # and a short one falls to guessing over the network.
    if len(text) < 16:
        raise _Invalid("must be at least 16 characters long")
    return text


def _command_template(value: object) -> str:
    text = _text(value)
    try:
        parts = shlex.split(text)
    except ValueError as exc:
        raise _Invalid(f"{text!r} is not a command line ({exc})") from None
    if not parts:
        raise _Invalid("the command is empty")
    try:
        filled = [part.format(port=1, index=0) for part in parts]
    except (KeyError, IndexError, ValueError) as exc:
        raise _Invalid(f"{text!r}: only {{port}} and {{index}} may be filled in ({exc})") from None
    if filled == parts or not any("{port}" in part for part in parts):
        raise _Invalid(f"{text!r} must pass {{port}} to the worker")
    return text


# Python identifiers (dotted): uvicorn's "module.path:attribute".
_APP_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def _app_spec(value: object) -> str:
    text = _text(value)
    if not _APP_SPEC.fullmatch(text):
        raise _Invalid(f"expected MODULE:ATTR such as demo_app.main:app, got {text!r}")
    return text


def _path(value: object) -> Path:
    return Path(_text(value))


def _cookie_path(value: object) -> str:
    text = _url_path(value)
    if ";" in text or not text.isascii():
        raise _Invalid(f"{text!r}: a cookie path is ASCII without ';'")
    return text


_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")  # RFC 1123 section 2.1


def _cookie_domain(value: object) -> str:
    text = _text(value).strip().lstrip(".")  # RFC 6265 section 5.2.3: a leading dot is ignored
    if not text or not all(_LABEL.fullmatch(label) for label in text.split(".")):
        raise _Invalid(f"{value!r} is not a domain name such as example.com")
    return text.lower()


def _each(item: Parser) -> Parser:
    """A list: a TOML array, or a comma-separated string from the environment."""

    def parse(value: object) -> tuple[object, ...]:
        if isinstance(value, str):
            items: list[object] = [part.strip() for part in value.split(",") if part.strip()]
        elif isinstance(value, list):
            items = list(value)
        else:
            raise _Invalid(f"expected a list, got {value!r}")
        return tuple(item(i) for i in items)

    return parse


def _backend(value: object) -> str:
    """A backend as `[NAME=]http://host:port [weight=N] [backup] [max-conns=N]`, normalized
    (`BackendSpec`); the error names the bad token."""
    try:
        return str(BackendSpec.parse(_text(value)))
    except ValueError as exc:
        raise _Invalid(str(exc)) from None


def _registry_target(value: object) -> RegistryTarget:
    try:
        return parse_registry_url(_text(value).strip())
    except RegistryError as exc:
        raise _Invalid(str(exc)) from None


def _network(value: object) -> Network:
    try:
        return ipaddress.ip_network(_text(value).strip(), strict=False)
    except ValueError:
        raise _Invalid(f"{value!r} is not an IP network (CIDR such as 10.0.0.0/8)") from None


def _secret(value: object) -> str:
    text = _text(value)
    # 16 characters of token_urlsafe carry 96 bits; shorter is guessable offline from a
    # single signed cookie.
    if len(text) < 16:
        raise _Invalid("a secret must be at least 16 characters long")
    return text


@dataclass(frozen=True, slots=True)
class _Option:
    name: str  # the Settings field
    parse: Parser
    help: str
    repeat: str | None = None  # the singular flag of a list option (--backend)
    metavar: str | None = None
    flag: str = field(init=False)
    env: str = field(init=False)

    def __post_init__(self) -> None:
        flag = "--" + (self.repeat or self.name).replace("_", "-")
        object.__setattr__(self, "flag", flag)
        object.__setattr__(self, "env", _ENV_PREFIX + self.name.upper())


_OPTIONS: tuple[_Option, ...] = (
    _Option("listen", _address, "address of the proxy (default 127.0.0.1:8080)", None, "HOST:PORT"),
    _Option(
        "backends",
        _each(_backend),
        "a backend: [NAME=]http://host:port [weight=N] [backup] [max-conns=N] (repeatable)",
        "backend",
        "[NAME=]URL [OPTS]",
    ),
    _Option("sticky", _sticky, "cookie:NAME (the app's session cookie), ip or none", None, "MODE"),
    _Option("admin", _address, "address of the admin API (default: off)", None, "HOST:PORT"),
    _Option("admin_token", _token, "bearer token for the admin API", None, "TOKEN"),
    _Option("config", _path, "a TOML file of settings", None, "PATH"),
    _Option("workers", _integer(1), "processes sharing the port", None, "N"),
    _Option("log_format", _choice("plain", "json"), "plain or json", None, "FORMAT"),
    _Option("access_log", _boolean, "log every request"),
    _Option(
        "access_log_format",
        _access_format,
        "template of a plain access log line ($status, ${request_time}, ...)",
        None,
        "TEMPLATE",
    ),
    _Option(
        "trusted_proxies",
        _each(_network),
        "a network whose X-Forwarded-* are believed (repeatable)",
        "trusted_proxy",
        "CIDR",
    ),
    _Option("proxy_protocol", _boolean, "connections start with a PROXY header (v1, v2)"),
    _Option(
        "affinity_cookie", _cookie_name, "name of the balancer's affinity cookie", None, "NAME"
    ),
    _Option("affinity_max_age", _integer(0), "affinity cookie Max-Age; 0 = session", None, "S"),
    _Option(
        "affinity_same_site",
        _choice("lax", "strict", "none"),
        "affinity cookie SameSite (none needs Secure)",
        None,
        "lax|strict|none",
    ),
    _Option("affinity_partitioned", _boolean, "affinity cookie Partitioned (needs Secure)"),
    _Option("affinity_domain", _cookie_domain, "affinity cookie Domain (default: none)", None, "D"),
    _Option("affinity_path", _cookie_path, "affinity cookie Path (default /)", None, "PATH"),
    _Option("affinity_secure", _boolean, "affinity cookie Secure without --tls-cert"),
    _Option(
        "tls_certs",
        _each(_path),
        "serve TLS: a PEM certificate chain; several are chosen by SNI (repeatable)",
        "tls_cert",
        "PATH",
    ),
    _Option(
        "tls_keys", _each(_path), "the PEM key of each --tls-cert, in order", "tls_key", "PATH"
    ),
    _Option("http2", _switch, "with --tls-cert, offer HTTP/2 (ALPN h2; on)", None, "on|off"),
    _Option("backend_ca", _path, "CA bundle verifying https:// backends", None, "PATH"),
    _Option(
        "affinity_secrets",
        _each(_secret),
        "affinity signing secret, newest first: the first signs (repeatable)",
        "affinity_secret",
        "SECRET",
    ),
    _Option(
        "balance",
        _choice("least-inflight", "round-robin"),
        "policy of --sticky none (default least-inflight)",
    ),
    _Option(
        "on_pinned_down",
        _choice("failover", "strict"),
        "pinned backend down: re-pin now, or 503 for --strict-window first",
        None,
        "failover|strict",
    ),
    _Option("strict_window", _number(zero=True), "seconds strict mode answers 503", None, "S"),
    _Option("repin_header", _header_name, "response header naming a re-pin's reason", None, "NAME"),
    _Option("pin_store", _redis_url, "a Redis every replica shares its pins in", None, "URL"),
    _Option(
        "hash_balance_factor", _number(zero=True), "bounded-load epsilon; 0 = off", None, "EPS"
    ),
    _Option("hash_table_size", _prime, "Maglev table size, a prime", None, "N"),
    _Option("health_path", _url_path, "path of the active health check", None, "PATH"),
    _Option("health_interval", _number(zero=False), "seconds between checks", None, "S"),
    _Option("health_timeout", _number(zero=False), "seconds for one check", None, "S"),
    _Option("health_rise", _integer(1), "passed checks to mark a backend up", None, "N"),
    _Option("health_fall", _integer(1), "failed checks to mark a backend down", None, "N"),
    _Option("eject_after", _integer(0), "failed requests in a row to eject; 0 = off", None, "N"),
    _Option("ejection_time", _number(zero=False), "seconds an ejected backend is out", None, "S"),
    _Option("max_ejection_percent", _percent, "most of the pool ejected at once", None, "PERCENT"),
    _Option("slow_start", _number(zero=True), "seconds of weight ramp; 0 = off", None, "S"),
    _Option("max_request_line", _integer(64), "bytes in the request line", None, "BYTES"),
    _Option("max_header_bytes", _integer(256), "bytes in the request headers", None, "BYTES"),
    _Option("header_timeout", _number(zero=False), "seconds to read request headers", None, "S"),
    _Option("idle_timeout", _number(zero=False), "seconds a keep-alive client idles", None, "S"),
    _Option("upstream_connect_timeout", _number(zero=False), "seconds to connect", None, "S"),
    _Option("upstream_response_timeout", _number(zero=False), "seconds silent: 504", None, "S"),
    _Option(
        "upstream_keepalive", _integer(0), "most idle connections per backend (by use)", None, "N"
    ),
    _Option("max_attempts", _integer(1), "tries of a request, refusals aside", None, "N"),
    _Option("retry_budget", _fraction, "retries earned per request, 0-1", None, "RATIO"),
    _Option("retry_floor", _number(zero=True), "retries earned per second", None, "N"),
    _Option("shutdown_deadline", _number(zero=True), "seconds to finish on SIGTERM", None, "S"),
    _Option("queue_timeout", _number(zero=True), "seconds to wait for a backend", None, "S"),
    _Option(
        "spawn",
        _worker_count,
        "start and supervise N workers, auto: one per CPU, or MIN:MAX: autoscale",
        None,
        "N",
    ),
    _Option(
        "worker_cmd", _command_template, "a worker's command, with {port} {index}", None, "TEMPLATE"
    ),
    _Option("app", _app_spec, "shorthand: run this ASGI app under uvicorn", None, "MODULE:ATTR"),
    _Option("worker_ready_path", _url_path, "a worker is ready once this is 2xx", None, "PATH"),
    _Option("worker_ready_timeout", _number(zero=False), "seconds to get ready", None, "S"),
    _Option("worker_hang_timeout", _number(zero=False), "seconds unhealthy, then kill", None, "S"),
    _Option("worker_stop_timeout", _number(zero=False), "seconds SIGTERM to SIGKILL", None, "S"),
    _Option(
        "drain_sessions",
        _choice("keep", "move"),
        "a drain keeps or moves pinned clients",
        None,
        "keep|move",
    ),
    _Option("drain_idle", _number(zero=True), "seconds without a request end a drain", None, "S"),
    _Option("drain_deadline", _number(zero=True), "seconds at most a drain lasts", None, "S"),
    _Option("restart_backoff", _number(zero=True), "seconds before a restart", None, "S"),
    _Option("restart_backoff_max", _number(zero=True), "most seconds before a restart", None, "S"),
    _Option("min_uptime", _number(zero=True), "seconds up to not count as a crash loop", None, "S"),
    _Option("max_crashes", _integer(0), "early crashes in a row to hold; 0 = never", None, "N"),
    _Option(
        "autoscale_target",
        _number(zero=False),
        "with --spawn MIN:MAX: requests in flight per worker to grow above",
        None,
        "N",
    ),
    _Option("autoscale_window", _window, "seconds the load is averaged over", None, "S"),
    _Option("autoscale_cooldown", _number(zero=True), "seconds between two changes", None, "S"),
    _Option(
        "discover",
        _registry_target,
        "add the live instances of a service from the registry",
        None,
        "redis://HOST:PORT/DB/SERVICE",
    ),
    _Option("discover_interval", _number(zero=False), "seconds between registry reads", None, "S"),
    _Option(
        "dashboard_mode",
        _choice("sticky", "shared", "hybrid"),
        "the mode the dashboard names (the demo's)",
        None,
        "MODE",
    ),
    _Option("dashboard_redis", _redis_url, "a Redis the dashboard reports on", None, "URL"),
)
_BY_FIELD = {option.name: option for option in _OPTIONS}
assert set(_BY_FIELD) == {f.name for f in fields(Settings)}, "an option per setting"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # "argument --workers: expected one argument": name the flag like our own errors.
        prefix = "argument "
        if message.startswith(prefix) and ": " in message:
            flag, _, rest = message[len(prefix) :].partition(": ")
            raise ConfigError(flag.split("/")[0], rest)
        raise ConfigError("command line", message)


class _Version(argparse.Action):
    """`--version`: the version and the build that runs (compiled or interpreted), exit 0."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        print(version_line())
        parser.exit()


def _argument_parser() -> _Parser:
    epilog = "Every option is also BALANCER_<NAME> in the environment and <name> in the TOML file."
    parser = _Parser(
        prog="balancer", description="A sticky-session HTTP load balancer.", epilog=epilog
    )
    parser.add_argument(
        "--version",
        action=_Version,
        nargs=0,
        default=argparse.SUPPRESS,
        help="print the version and whether the data path runs compiled (mypyc) or "
        "interpreted, then exit",
    )
    for option in _OPTIONS:
        help_text = f"{option.help} [{option.env}]"
        if option.parse is _boolean:
            parser.add_argument(
                option.flag,
                dest=option.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            parser.add_argument(
                option.flag,
                dest=option.name,
                action="append" if option.repeat else "store",
                default=argparse.SUPPRESS,
                metavar=option.metavar,
                help=help_text,
            )
    return parser


def load_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Settings from the command line, the environment and the TOML file, validated.

    `argv` excludes the program name (default `sys.argv[1:]`); `environ` defaults to
    `os.environ`. Raises ConfigError naming the first bad setting; never generates secrets.
    """
    argv = sys.argv[1:] if argv is None else argv
    environ = os.environ if environ is None else environ
    cli = vars(_argument_parser().parse_args(list(argv)))
    # Each raw value with where it came from; later sources override earlier ones.
    raw: dict[str, tuple[object, str]] = {}
    config = cli.get("config")
    env_config = environ.get(_BY_FIELD["config"].env)
    if config is None and env_config:
        config = env_config
    if config is not None:
        path = Path(config)
        raw.update(_read_toml(path))
        raw["config"] = (str(path), "")
    for option in _OPTIONS:
        if option.env in environ and option.name != "config":
            raw[option.name] = (environ[option.env], option.env)
    for name, value in cli.items():
        raw[name] = (value, "")
    return _validate(raw)


def _read_toml(path: Path) -> dict[str, tuple[object, str]]:
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from None
    raw: dict[str, tuple[object, str]] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in _BY_FIELD or name == "config":
            known = ", ".join(sorted(o.name for o in _OPTIONS if o.name != "config"))
            raise ConfigError("--config", f"unknown setting {key!r} in {path} (known: {known})")
        raw[name] = (value, f"{path}: {key}")
    return raw


def _validate(raw: Mapping[str, tuple[object, str]]) -> Settings:
    """The one validation step: parse every value, then check them against each other."""
    values: dict[str, Any] = {}
    for name, (value, source) in raw.items():
        option = _BY_FIELD[name]
        try:
            values[name] = option.parse(value)
        except _Invalid as exc:
            where = f" (from {source})" if source else ""
            raise ConfigError(option.flag, f"{exc}{where}") from None
    settings = Settings(**values)
    _validate_spawn(settings, given=raw.keys())
    if not settings.backends and settings.spawn is None and settings.discover is None:
        raise ConfigError("--backend", "at least one backend is needed (or --discover URL)")
    urls = [url for _, url in settings.backend_specs()]
    if len(set(urls)) != len(urls):
        raise ConfigError("--backend", "a backend is listed twice")
    ids: set[str] = set()
    for given, url in settings.backend_specs():
        key = backend_id(url) if given is None else given
        if key in ids:
            raise ConfigError("--backend", f"two backends are named {key!r}")
        ids.add(key)
    admin = settings.admin
    if admin is not None:
        if admin == settings.listen and admin.port != 0:
            raise ConfigError("--admin", f"{admin} is also the --listen address")
        if not admin.is_loopback and settings.admin_token is None:
            raise ConfigError(
                "--admin-token", f"required when --admin binds {admin}, which is not loopback"
            )
    if settings.health_timeout > settings.health_interval:
        raise ConfigError(
            "--health-timeout",
            f"{settings.health_timeout} s is longer than --health-interval "
            f"({settings.health_interval} s)",
        )
    if settings.sticky.cookie == settings.affinity_cookie:
        raise ConfigError(
            "--affinity-cookie", f"{settings.affinity_cookie!r} is the app's session cookie too"
        )
    if settings.proxy_protocol and not settings.trusted_proxies:
        raise ConfigError(
            "--proxy-protocol",
            "needs --trusted-proxy CIDR: the L4 balancers, the only peers believed",
        )
    _validate_tls(settings)
    return settings


def _validate_tls(settings: Settings) -> None:
    """The TLS files load (each error names its flag and file), one key per certificate,
    and the cookie attributes that browsers take only with Secure have it."""
    if len(settings.tls_certs) != len(settings.tls_keys):
        raise ConfigError(
            "--tls-key",
            f"{len(settings.tls_certs)} --tls-cert but {len(settings.tls_keys)} --tls-key: "
            "give each certificate its key, in the same order",
        )
    secure = settings.affinity_secure or bool(settings.tls_certs)
    # Browsers drop a SameSite=None or Partitioned cookie that is not Secure (RFC 6265bis
    # section 5.6; CHIPS).
    if settings.affinity_same_site == "none" and not secure:
        raise ConfigError(
            "--affinity-same-site", "none needs a Secure cookie: --tls-cert or --affinity-secure"
        )
    if settings.affinity_partitioned and not secure:
        raise ConfigError(
            "--affinity-partitioned", "needs a Secure cookie: --tls-cert or --affinity-secure"
        )
    try:
        if settings.tls_certs:
            TlsListener(settings.tls_pairs())
        if settings.backend_ca is not None:
            backend_context(settings.backend_ca)
    except TlsError as exc:
        raise ConfigError(exc.setting, f"{exc.path}: {exc.reason}") from None


def _validate_spawn(settings: Settings, *, given: Collection[str]) -> None:
    """The supervisor's options against each other (see `_validate`); `given`: the
    settings set by any source."""
    # The restart policy is --workers N's too.
    if settings.restart_backoff_max < settings.restart_backoff:
        raise ConfigError(
            "--restart-backoff-max",
            f"{settings.restart_backoff_max} s is less than --restart-backoff "
            f"({settings.restart_backoff} s)",
        )
    if not isinstance(settings.spawn, tuple):
        for name in ("autoscale_target", "autoscale_window", "autoscale_cooldown"):
            if name in given:
                raise ConfigError(_BY_FIELD[name].flag, "needs --spawn MIN:MAX (a range)")
    if settings.spawn is None:
        for name, flag in (("worker_cmd", "--worker-cmd"), ("app", "--app")):
            if getattr(settings, name) is not None:
                raise ConfigError(flag, "needs --spawn N (the number of workers to start)")
        return
    if settings.worker_cmd is None and settings.app is None:
        raise ConfigError("--spawn", "needs --worker-cmd TEMPLATE or --app MODULE:ATTR")
    if settings.worker_cmd is not None and settings.app is not None:
        raise ConfigError("--app", "give --worker-cmd or --app, not both")
    if settings.workers > 1:
        # The supervisor's pool lives in one process: N balancers would each spawn workers.
        raise ConfigError("--spawn", "runs in one balancer process: not with --workers N")


def load_or_exit(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    generate: bool = True,
) -> Settings:
    """`load_settings` for `__main__`: a ConfigError prints one line and exits 2.

    With no affinity secret configured and `generate`, generates one, so a parent process
    that forks its workers after this hands them all the same secret.
    """
    try:
        settings = load_settings(argv, environ)
    except ConfigError as exc:
        print(f"balancer: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if generate and not settings.affinity_secrets:
        settings = replace(settings, affinity_secrets=(generate_secret(),))
    return settings
