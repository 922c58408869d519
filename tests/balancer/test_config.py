from __future__ import annotations

import atexit
import ipaddress
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from balancer import (
    DEFAULT_TABLE_SIZE,
    Address,
    AffinityCookie,
    BackendPolicy,
    ConfigError,
    HealthPolicy,
    ProxyOptions,
    Settings,
    Sticky,
    load_or_exit,
    load_settings,
)
from balancer._balancer import proxy_options, supervisor_options
from balancer.control._discovery import DEFAULT_DISCOVER_INTERVAL
from balancer.control._log import DEFAULT_ACCESS_FORMAT
from balancer.datapath import _router
from balancer.datapath._affinity import DEFAULT_COOKIE_PATH, DEFAULT_SAME_SITE
from balancer.supervisors._autoscale import AutoscalePolicy
from balancer.supervisors._supervisor import SupervisorOptions
from balancer.supervisors._workers import RestartPolicy
from service_registry import RegistryTarget
from tests.balancer.certs import Authority

B1, B2 = "http://127.0.0.1:9001", "http://127.0.0.1:9002"
MIN = ["--backend", B1]
SECRET = "0123456789abcdef-secret"
TOKEN = "admin-token-0123456789"
CMD = "python -m demo_app --port {port} --instance-id 'w {index}'"
DISCOVER = "redis://127.0.0.1:6379/2/demo"
# TLS files that load, for the rows of --tls-cert, --tls-key and --backend-ca.
_TLS_DIR = Path(tempfile.mkdtemp(prefix="balancer-config-tls-"))
atexit.register(shutil.rmtree, _TLS_DIR, True)
_CA = Authority.create(_TLS_DIR)
_LEAF = _CA.issue("leaf", "a.test")
CERT, KEY, CA = str(_LEAF.cert), str(_LEAF.key), str(_CA.cert)


def test_defaults() -> None:
    settings = load_settings(MIN, {})
    assert settings == Settings(backends=(B1,))
    assert settings.listen == Address("127.0.0.1", 8080)
    assert settings.sticky == Sticky("cookie", "session")
    assert settings.affinity_secrets == ()
    # Issue 13: a hung backend gets no new unpinned requests once it holds more than the
    # others, and a silent one answers 504 in 15 s (was round robin, and 60 s).
    assert settings.balance == "least-inflight"
    assert settings.upstream_response_timeout == 15.0


# Every option once, as each source spells it: (argv, environ, toml line, field, value).
SOURCES: list[tuple[list[str], dict[str, str], str, str, object]] = [
    (["--listen", "0.0.0.0:80"], {"BALANCER_LISTEN": "0.0.0.0:80"}, 'listen = "0.0.0.0:80"',
     "listen", Address("0.0.0.0", 80)),
    (["--listen", "[::1]:0"], {"BALANCER_LISTEN": "[::1]:0"}, 'listen = "[::1]:0"',
     "listen", Address("::1", 0)),
    (["--backend", B1, "--backend", B2 + "/"], {"BALANCER_BACKENDS": f"{B1}, {B2}/"},
     f'backends = ["{B1}", "{B2}/"]', "backends", (B1, B2)),
    (["--sticky", "ip"], {"BALANCER_STICKY": "ip"}, 'sticky = "ip"', "sticky", Sticky("ip")),
    (["--admin", "127.0.0.1:8081"], {"BALANCER_ADMIN": "127.0.0.1:8081"},
     'admin = "127.0.0.1:8081"', "admin", Address("127.0.0.1", 8081)),
    (["--admin-token", TOKEN], {"BALANCER_ADMIN_TOKEN": TOKEN}, f'admin_token = "{TOKEN}"',
     "admin_token", TOKEN),
    (["--workers", "4"], {"BALANCER_WORKERS": "4"}, "workers = 4", "workers", 4),
    (["--log-format", "json"], {"BALANCER_LOG_FORMAT": "json"}, 'log-format = "json"',
     "log_format", "json"),
    (["--access-log"], {"BALANCER_ACCESS_LOG": "yes"}, "access_log = true", "access_log", True),
    (["--access-log-format", "$status $path"], {"BALANCER_ACCESS_LOG_FORMAT": "$status $path"},
     'access_log_format = "$status $path"', "access_log_format", "$status $path"),
    (["--trusted-proxy", "10.0.0.0/8", "--trusted-proxy", "::1"],
     {"BALANCER_TRUSTED_PROXIES": "10.0.0.0/8,::1"}, 'trusted_proxies = ["10.0.0.0/8", "::1"]',
     "trusted_proxies", (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1"))),
    (["--proxy-protocol", "--trusted-proxy", "::1"],
     {"BALANCER_PROXY_PROTOCOL": "on", "BALANCER_TRUSTED_PROXIES": "::1"},
     'proxy_protocol = true\ntrusted_proxies = ["::1"]', "proxy_protocol", True),
    (["--affinity-cookie", "pin"], {"BALANCER_AFFINITY_COOKIE": "pin"},
     'affinity_cookie = "pin"', "affinity_cookie", "pin"),
    (["--affinity-max-age", "3600"], {"BALANCER_AFFINITY_MAX_AGE": "3600"},
     "affinity_max_age = 3600", "affinity_max_age", 3600),
    (["--affinity-secret", SECRET], {"BALANCER_AFFINITY_SECRETS": SECRET},
     f'affinity_secrets = ["{SECRET}"]', "affinity_secrets", (SECRET,)),
    (["--affinity-same-site", "strict"], {"BALANCER_AFFINITY_SAME_SITE": "strict"},
     'affinity_same_site = "strict"', "affinity_same_site", "strict"),
    (["--affinity-partitioned", "--affinity-secure"],
     {"BALANCER_AFFINITY_PARTITIONED": "1", "BALANCER_AFFINITY_SECURE": "1"},
     "affinity_partitioned = true\naffinity_secure = true", "affinity_partitioned", True),
    (["--affinity-domain", ".Example.com"], {"BALANCER_AFFINITY_DOMAIN": "example.com"},
     'affinity_domain = "example.com"', "affinity_domain", "example.com"),
    (["--affinity-path", "/app"], {"BALANCER_AFFINITY_PATH": "/app"},
     'affinity_path = "/app"', "affinity_path", "/app"),
    (["--affinity-secure"], {"BALANCER_AFFINITY_SECURE": "on"}, "affinity_secure = true",
     "affinity_secure", True),
    (["--tls-cert", CERT, "--tls-key", KEY],
     {"BALANCER_TLS_CERTS": CERT, "BALANCER_TLS_KEYS": KEY},
     f'tls_certs = ["{CERT}"]\ntls_keys = ["{KEY}"]', "tls_certs", (Path(CERT),)),
    (["--tls-cert", CERT, "--tls-key", KEY],
     {"BALANCER_TLS_CERTS": CERT, "BALANCER_TLS_KEYS": KEY},
     f'tls-certs = ["{CERT}"]\ntls-keys = ["{KEY}"]', "tls_keys", (Path(KEY),)),
    (["--backend-ca", CA], {"BALANCER_BACKEND_CA": CA}, f'backend_ca = "{CA}"', "backend_ca",
     Path(CA)),
    (["--http2", "off"], {"BALANCER_HTTP2": "off"}, "http2 = false", "http2", False),
    (["--balance", "round-robin"], {"BALANCER_BALANCE": "round-robin"},
     'balance = "round-robin"', "balance", "round-robin"),
    (["--hash-balance-factor", "0.5"], {"BALANCER_HASH_BALANCE_FACTOR": "0.5"},
     "hash_balance_factor = 0.5", "hash_balance_factor", 0.5),
    (["--hash-table-size", "251"], {"BALANCER_HASH_TABLE_SIZE": "251"},
     "hash_table_size = 251", "hash_table_size", 251),
    (["--health-path", "/ready"], {"BALANCER_HEALTH_PATH": "/ready"},
     'health_path = "/ready"', "health_path", "/ready"),
    (["--health-interval", "5"], {"BALANCER_HEALTH_INTERVAL": "5"}, "health_interval = 5",
     "health_interval", 5.0),
    (["--health-timeout", "0.5"], {"BALANCER_HEALTH_TIMEOUT": "0.5"}, "health_timeout = 0.5",
     "health_timeout", 0.5),
    (["--health-rise", "1"], {"BALANCER_HEALTH_RISE": "1"}, "health_rise = 1", "health_rise", 1),
    (["--health-fall", "9"], {"BALANCER_HEALTH_FALL": "9"}, "health_fall = 9", "health_fall", 9),
    (["--eject-after", "0"], {"BALANCER_EJECT_AFTER": "0"}, "eject_after = 0", "eject_after", 0),
    (["--ejection-time", "1.5"], {"BALANCER_EJECTION_TIME": "1.5"}, "ejection_time = 1.5",
     "ejection_time", 1.5),
    (["--max-ejection-percent", "10"], {"BALANCER_MAX_EJECTION_PERCENT": "10"},
     "max_ejection_percent = 10", "max_ejection_percent", 10.0),
    (["--slow-start", "20"], {"BALANCER_SLOW_START": "20"}, "slow_start = 20", "slow_start", 20.0),
    (["--max-request-line", "4096"], {"BALANCER_MAX_REQUEST_LINE": "4096"},
     "max_request_line = 4096", "max_request_line", 4096),
    (["--max-header-bytes", "1024"], {"BALANCER_MAX_HEADER_BYTES": "1024"},
     "max_header_bytes = 1024", "max_header_bytes", 1024),
    (["--header-timeout", "3"], {"BALANCER_HEADER_TIMEOUT": "3"}, "header_timeout = 3",
     "header_timeout", 3.0),
    (["--idle-timeout", "7"], {"BALANCER_IDLE_TIMEOUT": "7"}, "idle_timeout = 7",
     "idle_timeout", 7.0),
    (["--upstream-connect-timeout", "2"], {"BALANCER_UPSTREAM_CONNECT_TIMEOUT": "2"},
     "upstream_connect_timeout = 2", "upstream_connect_timeout", 2.0),
    (["--upstream-response-timeout", "9"], {"BALANCER_UPSTREAM_RESPONSE_TIMEOUT": "9"},
     "upstream_response_timeout = 9", "upstream_response_timeout", 9.0),
    (["--upstream-keepalive", "0"], {"BALANCER_UPSTREAM_KEEPALIVE": "0"},
     "upstream_keepalive = 0", "upstream_keepalive", 0),
    (["--max-attempts", "1"], {"BALANCER_MAX_ATTEMPTS": "1"}, "max_attempts = 1",
     "max_attempts", 1),
    (["--retry-floor", "0"], {"BALANCER_RETRY_FLOOR": "0"}, "retry_floor = 0", "retry_floor", 0.0),
    (["--retry-budget", "0.1"], {"BALANCER_RETRY_BUDGET": "0.1"}, "retry_budget = 0.1",
     "retry_budget", 0.1),
    (["--shutdown-deadline", "0"], {"BALANCER_SHUTDOWN_DEADLINE": "0"},
     "shutdown_deadline = 0", "shutdown_deadline", 0.0),
    (["--queue-timeout", "0.5"], {"BALANCER_QUEUE_TIMEOUT": "0.5"},
     "queue_timeout = 0.5", "queue_timeout", 0.5),
    (["--spawn", "3", "--app", "demo_app.main:app"],
     {"BALANCER_SPAWN": "3", "BALANCER_APP": "demo_app.main:app"},
     'spawn = 3\napp = "demo_app.main:app"', "spawn", 3),
    (["--spawn", "1", "--worker-cmd", CMD], {"BALANCER_SPAWN": "1", "BALANCER_WORKER_CMD": CMD},
     f'spawn = 1\nworker_cmd = "{CMD}"', "worker_cmd", CMD),
    (["--spawn", "2", "--app", "m:a"], {"BALANCER_SPAWN": "2", "BALANCER_APP": "m:a"},
     'spawn = 2\napp = "m:a"', "app", "m:a"),
    (["--worker-ready-path", "/ready"], {"BALANCER_WORKER_READY_PATH": "/ready"},
     'worker_ready_path = "/ready"', "worker_ready_path", "/ready"),
    (["--worker-ready-timeout", "5"], {"BALANCER_WORKER_READY_TIMEOUT": "5"},
     "worker_ready_timeout = 5", "worker_ready_timeout", 5.0),
    (["--worker-hang-timeout", "3"], {"BALANCER_WORKER_HANG_TIMEOUT": "3"},
     "worker_hang_timeout = 3", "worker_hang_timeout", 3.0),
    (["--worker-stop-timeout", "2"], {"BALANCER_WORKER_STOP_TIMEOUT": "2"},
     "worker_stop_timeout = 2", "worker_stop_timeout", 2.0),
    (["--drain-deadline", "0"], {"BALANCER_DRAIN_DEADLINE": "0"}, "drain_deadline = 0",
     "drain_deadline", 0.0),
    (["--drain-idle", "2.5"], {"BALANCER_DRAIN_IDLE": "2.5"}, "drain_idle = 2.5",
     "drain_idle", 2.5),
    (["--drain-sessions", "move"], {"BALANCER_DRAIN_SESSIONS": "move"},
     'drain_sessions = "move"', "drain_sessions", "move"),
    (["--on-pinned-down", "strict"], {"BALANCER_ON_PINNED_DOWN": "strict"},
     'on_pinned_down = "strict"', "on_pinned_down", "strict"),
    (["--strict-window", "5"], {"BALANCER_STRICT_WINDOW": "5"}, "strict_window = 5",
     "strict_window", 5.0),
    (["--repin-header", "X-Repin"], {"BALANCER_REPIN_HEADER": "X-Repin"},
     'repin_header = "X-Repin"', "repin_header", "X-Repin"),
    (["--restart-backoff", "0"], {"BALANCER_RESTART_BACKOFF": "0"}, "restart_backoff = 0",
     "restart_backoff", 0.0),
    (["--restart-backoff-max", "60"], {"BALANCER_RESTART_BACKOFF_MAX": "60"},
     "restart_backoff_max = 60", "restart_backoff_max", 60.0),
    (["--min-uptime", "0.5"], {"BALANCER_MIN_UPTIME": "0.5"}, "min_uptime = 0.5",
     "min_uptime", 0.5),
    (["--max-crashes", "0"], {"BALANCER_MAX_CRASHES": "0"}, "max_crashes = 0", "max_crashes", 0),
    (["--spawn", "1:3", "--app", "m:a", "--autoscale-target", "2"],
     {"BALANCER_SPAWN": "1:3", "BALANCER_APP": "m:a", "BALANCER_AUTOSCALE_TARGET": "2"},
     'spawn = "1:3"\napp = "m:a"\nautoscale_target = 2', "autoscale_target", 2.0),
    (["--spawn", "1:3", "--app", "m:a", "--autoscale-window", "3"],
     {"BALANCER_SPAWN": "1:3", "BALANCER_APP": "m:a", "BALANCER_AUTOSCALE_WINDOW": "3"},
     'spawn = "1:3"\napp = "m:a"\nautoscale_window = 3', "autoscale_window", 3.0),
    (["--spawn", "1:3", "--app", "m:a", "--autoscale-cooldown", "0"],
     {"BALANCER_SPAWN": "1:3", "BALANCER_APP": "m:a", "BALANCER_AUTOSCALE_COOLDOWN": "0"},
     'spawn = "1:3"\napp = "m:a"\nautoscale_cooldown = 0', "autoscale_cooldown", 0.0),
    (["--discover", DISCOVER], {"BALANCER_DISCOVER": DISCOVER}, f'discover = "{DISCOVER}"',
     "discover", RegistryTarget("redis://127.0.0.1:6379/2", "demo")),
    (["--discover-interval", "0.25"], {"BALANCER_DISCOVER_INTERVAL": "0.25"},
     "discover_interval = 0.25", "discover_interval", 0.25),
    (["--dashboard-mode", "hybrid"], {"BALANCER_DASHBOARD_MODE": "hybrid"},
     'dashboard_mode = "hybrid"', "dashboard_mode", "hybrid"),
    (["--dashboard-redis", "redis://127.0.0.1:6379/1"],
     {"BALANCER_DASHBOARD_REDIS": "redis://127.0.0.1:6379/1"},
     'dashboard_redis = "redis://127.0.0.1:6379/1"', "dashboard_redis",
     "redis://127.0.0.1:6379/1"),
    (["--pin-store", "redis+sentinel://127.0.0.1:26379/pins"],
     {"BALANCER_PIN_STORE": "redis+sentinel://127.0.0.1:26379/pins"},
     'pin_store = "redis+sentinel://127.0.0.1:26379/pins"', "pin_store",
     "redis+sentinel://127.0.0.1:26379/pins"),
]  # fmt: skip


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "balancer.toml"
    path.write_text(text + "\n")
    return path


@pytest.mark.parametrize(("argv", "environ", "toml", "name", "value"), SOURCES)
def test_every_option_from_every_source(
    tmp_path: Path, *, argv: list[str], environ: dict[str, str], toml: str, name: str, value: object
) -> None:
    base = [] if name == "backends" else MIN
    assert getattr(load_settings(base + argv, {}), name) == value
    env_base = {} if name == "backends" else {"BALANCER_BACKENDS": B1}
    assert getattr(load_settings([], env_base | environ), name) == value
    path = _toml(tmp_path, toml)
    settings = load_settings(["--config", str(path), *base], {})
    assert getattr(settings, name) == value
    assert settings.config == path


def test_every_setting_has_a_row() -> None:
    fields = set(Settings.__dataclass_fields__) - {"config"}
    assert {row[3] for row in SOURCES} == fields


def test_precedence_cli_over_env_over_file_over_default(tmp_path: Path) -> None:
    path = _toml(tmp_path, f'workers = 2\nidle_timeout = 5\nhealth_fall = 7\nbackends = ["{B1}"]')
    env = {"BALANCER_CONFIG": str(path), "BALANCER_WORKERS": "3", "BALANCER_IDLE_TIMEOUT": "6"}
    settings = load_settings(["--workers", "4"], env)
    assert settings.workers == 4  # command line
    assert settings.idle_timeout == 6.0  # environment
    assert settings.health_fall == 7  # file, found through BALANCER_CONFIG
    assert settings.health_rise == 2  # default
    assert settings.backends == (B1,)


def test_cli_config_beats_env_config(tmp_path: Path) -> None:
    good = _toml(tmp_path, f'backends = ["{B1}"]')
    settings = load_settings(["--config", str(good)], {"BALANCER_CONFIG": "/nonexistent.toml"})
    assert settings.backends == (B1,)


# Bad values, one per kind of setting: (argv, the setting named, words in the message).
BAD: list[tuple[list[str], str, str]] = [
    (["--listen", "8080"], "--listen", "expected HOST:PORT"),
    (["--listen", "h:http"], "--listen", "not a port number"),
    (["--listen", "h:70000"], "--listen", "out of range"),
    (["--listen", "fe80::zz:80"], "--listen", "not an IPv6 address"),
    (["--listen", "a b:80"], "--listen", "not a host"),
    (["--backend", "ftp://127.0.0.1:1"], "--backend", "only http:// and https://"),
    (["--backend", "http://127.0.0.1:1/x"], "--backend", "without a path"),
    (["--backend", B2, "--backend", B2 + "/"], "--backend", "listed twice"),
    (["--sticky", "cookie:"], "--sticky", "not a valid cookie name"),
    (["--sticky", "hash"], "--sticky", "expected cookie:NAME, ip or none"),
    (["--admin", "nohost"], "--admin", "expected HOST:PORT"),
    (["--admin", "127.0.0.1:8080"], "--admin", "also the --listen address"),
    (["--admin", "0.0.0.0:8081"], "--admin-token", "not loopback"),
    (["--admin-token", "a b"], "--admin-token", "without spaces"),
    (["--admin-token", "short"], "--admin-token", "at least 16 characters"),
    (["--admin-token", "0123456789abcde"], "--admin-token", "at least 16 characters"),
    (["--workers", "0"], "--workers", "at least 1"),
    (["--http2", "maybe"], "--http2", "expected on or off"),
    (["--proxy-protocol"], "--proxy-protocol", "needs --trusted-proxy"),
    (["--workers", "two"], "--workers", "expected an integer"),
    (["--workers"], "--workers", "expected one argument"),
    (["--log-format", "xml"], "--log-format", "expected one of plain, json"),
    (["--access-log-format", "$stauts"], "--access-log-format", "unknown field $stauts"),
    (["--access-log-format", "5 $"], "--access-log-format", "invalid template"),
    (["--trusted-proxy", "10.0.0.0/33"], "--trusted-proxy", "not an IP network"),
    (["--affinity-cookie", "a;b"], "--affinity-cookie", "not a valid cookie name"),
    (["--affinity-cookie", "session"], "--affinity-cookie", "session cookie too"),
    (["--affinity-max-age", "-1"], "--affinity-max-age", "at least 0"),
    (["--affinity-secret", "short"], "--affinity-secret", "at least 16 characters"),
    (["--balance", "random"], "--balance", "expected one of"),
    (["--hash-balance-factor", "-1"], "--hash-balance-factor", ">= 0"),
    (["--hash-balance-factor", "nan"], "--hash-balance-factor", ">= 0"),
    (["--hash-table-size", "65536"], "--hash-table-size", "must be a prime"),
    (["--health-path", "healthz"], "--health-path", "absolute path"),
    (["--health-interval", "0"], "--health-interval", "> 0"),
    (["--health-interval", "inf"], "--health-interval", "> 0"),
    (["--health-timeout", "5"], "--health-timeout", "longer than --health-interval"),
    (["--health-rise", "0"], "--health-rise", "at least 1"),
    (["--health-fall", "1.5"], "--health-fall", "expected an integer"),
    (["--eject-after", "-1"], "--eject-after", "at least 0"),
    (["--ejection-time", "0"], "--ejection-time", "> 0"),
    (["--max-ejection-percent", "101"], "--max-ejection-percent", "between 0 and 100"),
    (["--slow-start", "soon"], "--slow-start", "expected a number"),
    (["--max-request-line", "10"], "--max-request-line", "at least 64"),
    (["--max-header-bytes", "100"], "--max-header-bytes", "at least 256"),
    (["--header-timeout", "-2"], "--header-timeout", "> 0"),
    (["--idle-timeout", ""], "--idle-timeout", "expected a number"),
    (["--upstream-connect-timeout", "0"], "--upstream-connect-timeout", "> 0"),
    (["--upstream-response-timeout", "x"], "--upstream-response-timeout", "expected a number"),
    (["--upstream-keepalive", "-1"], "--upstream-keepalive", "at least 0"),
    (["--max-attempts", "0"], "--max-attempts", "at least 1"),
    (["--retry-floor", "-1"], "--retry-floor", ">= 0"),
    (["--retry-budget", "2"], "--retry-budget", "between 0 and 1"),
    (["--shutdown-deadline", "-1"], "--shutdown-deadline", ">= 0"),
    (["--queue-timeout", "-1"], "--queue-timeout", ">= 0"),
    (["--queue-timeout", "nan"], "--queue-timeout", ""),
    (["--bogus"], "command line", "unrecognized arguments: --bogus"),
    (["--spawn", "0", "--app", "m:a"], "--spawn", "at least 1"),
    (["--spawn", "many", "--app", "m:a"], "--spawn", "expected an integer"),
    (["--spawn", "2"], "--spawn", "needs --worker-cmd TEMPLATE or --app MODULE:ATTR"),
    (["--worker-cmd", CMD], "--worker-cmd", "needs --spawn N"),
    (["--app", "m:a"], "--app", "needs --spawn N"),
    (["--spawn", "2", "--app", "m:a", "--worker-cmd", CMD], "--app", "not both"),
    (["--spawn", "2", "--app", "m:a", "--workers", "2"], "--spawn", "not with --workers"),
    (["--spawn", "1", "--worker-cmd", "serve --port 80"], "--worker-cmd", "must pass {port}"),
    (["--spawn", "1", "--worker-cmd", "serve {port} {name}"], "--worker-cmd", "only {port}"),
    (["--spawn", "1", "--worker-cmd", "serve {port"], "--worker-cmd", "only {port}"),
    (["--spawn", "1", "--worker-cmd", "serve '{port}"], "--worker-cmd", "not a command line"),
    (["--spawn", "1", "--worker-cmd", "  "], "--worker-cmd", "the command is empty"),
    (["--spawn", "1", "--app", "demo_app"], "--app", "expected MODULE:ATTR"),
    (["--spawn", "1", "--app", "a b:c"], "--app", "expected MODULE:ATTR"),
    (["--worker-ready-path", "readyz"], "--worker-ready-path", "absolute path"),
    (["--worker-ready-timeout", "0"], "--worker-ready-timeout", "> 0"),
    (["--worker-hang-timeout", "-1"], "--worker-hang-timeout", "> 0"),
    (["--worker-stop-timeout", "x"], "--worker-stop-timeout", "expected a number"),
    (["--drain-deadline", "-1"], "--drain-deadline", ">= 0"),
    (["--restart-backoff", "-0.1"], "--restart-backoff", ">= 0"),
    (["--spawn", "1", "--app", "m:a", "--restart-backoff", "20"], "--restart-backoff-max", "less"),
    (["--min-uptime", "nan"], "--min-uptime", ">= 0"),
    (["--max-crashes", "-1"], "--max-crashes", "at least 0"),
    (["--spawn", "3:1", "--app", "m:a"], "--spawn", "1 <= MIN < MAX"),
    (["--spawn", "2:2", "--app", "m:a"], "--spawn", "for a fixed count, give N"),
    (["--spawn", "0:2", "--app", "m:a"], "--spawn", "1 <= MIN < MAX"),
    (["--spawn", "1:many", "--app", "m:a"], "--spawn", "expected N, auto or MIN:MAX"),
    (["--spawn", "1:3", "--app", "m:a", "--autoscale-target", "0"], "--autoscale-target", "> 0"),
    (["--spawn", "1:3", "--app", "m:a", "--autoscale-window", "0.01"], "--autoscale-window", "0.1"),
    (
        ["--spawn", "1:3", "--app", "m:a", "--autoscale-window", "4000"],
        "--autoscale-window",
        "3600",
    ),
    (
        ["--spawn", "1:3", "--app", "m:a", "--autoscale-cooldown", "-1"],
        "--autoscale-cooldown",
        ">=",
    ),
    (["--spawn", "2", "--app", "m:a", "--autoscale-target", "3"], "--autoscale-target", "MIN:MAX"),
    (["--autoscale-window", "3"], "--autoscale-window", "needs --spawn MIN:MAX"),
    (["--discover", "http://127.0.0.1:6379/demo"], "--discover", "expected redis://"),
    (["--discover", "redis://127.0.0.1:6379/0"], "--discover", "names no service"),
    (["--discover", "redis://127.0.0.1:6379"], "--discover", "names no service"),
    (["--discover", "redis://127.0.0.1:6379/a/b"], "--discover", "/DB/SERVICE"),
    (["--discover", "redis://127.0.0.1:99999/demo"], "--discover", "not a valid URL"),
    (["--discover-interval", "0"], "--discover-interval", "> 0"),
    (["--dashboard-mode", "cluster"], "--dashboard-mode", "expected one of sticky"),
    (["--dashboard-redis", "http://127.0.0.1:6379"], "--dashboard-redis", "http"),
    (["--pin-store", "http://127.0.0.1:6379"], "--pin-store", "http"),
]


@pytest.mark.parametrize(("argv", "setting", "words"), BAD)
def test_bad_values_name_the_setting(argv: list[str], setting: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(MIN + argv, {})
    assert info.value.setting == setting
    assert str(info.value).startswith(f"{setting}: ")
    assert words in str(info.value)


def test_named_backends_from_every_source(tmp_path: Path) -> None:
    cli = load_settings(["--backend", "app1=http://localhost:9001/", "--backend", B2], {})
    assert cli.backends == ("app1=http://localhost:9001", B2)
    assert cli.backend_specs() == (("app1", "http://localhost:9001"), (None, B2))
    env = load_settings([], {"BALANCER_BACKENDS": f"app1={B1},app2={B2}"})
    assert env.backend_specs() == (("app1", B1), ("app2", B2))
    path = tmp_path / "b.toml"
    path.write_text(f'backends = ["app1={B1}", "{B2}"]\n')
    assert load_settings(["--config", str(path)], {}).backend_specs() == (("app1", B1), (None, B2))


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--backend", f"a b={B1}"], "'a b' is not a backend name"),
        (["--backend", f"={B1}"], "'' is not a backend name"),
        (["--backend", f"_a={B1}"], "'_a' is not a backend name"),
        (["--backend", f"{'a' * 64}={B1}"], "is not a backend name"),
        (["--backend", f"a={B1}", "--backend", f"a={B2}"], "two backends are named 'a'"),
        (["--backend", f"a={B1}", "--backend", f"b={B1}"], "a backend is listed twice"),
        (["--backend", f"a={B1}", "--backend", B1], "a backend is listed twice"),
    ],
)
def test_bad_backend_names(argv: list[str], words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(argv, {})
    assert info.value.setting == "--backend"
    assert words in info.value.message


def test_backend_options_from_every_source(tmp_path: Path) -> None:
    # HAProxy's `server` line: options after the URL, in any order, separated by spaces.
    spec = f"app1={B1}/  max-conns=20 backup   weight=3"
    cli = load_settings(["--backend", spec, "--backend", f"{B2} weight=1"], {})
    assert cli.backends == (f"app1={B1} weight=3 backup max-conns=20", B2)
    assert cli.backend_specs() == (("app1", B1), (None, B2))
    first, second = cli.backend_options()
    assert (first.name, first.url, first.weight, first.backup, first.max_conns) == (
        "app1",
        B1,
        3,
        True,
        20,
    )
    assert (second.weight, second.backup, second.max_conns) == (1, False, 0)
    env = load_settings([], {"BALANCER_BACKENDS": f"{B1} weight=2,{B2} backup"})
    assert [(b.weight, b.backup) for b in env.backend_options()] == [(2, False), (1, True)]
    path = tmp_path / "b.toml"
    path.write_text(f'backends = ["{B1} weight=5 max-conns=1", "{B2}"]\n')
    from_file = load_settings(["--config", str(path)], {}).backend_options()
    assert [(b.weight, b.max_conns) for b in from_file] == [(5, 1), (1, 0)]


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        (f"{B1} weight=0", "weight must be an integer from 1 to 256, not 0"),
        (f"{B1} weight=257", "weight must be an integer from 1 to 256, not 257"),
        (f"{B1} weight=two", "'weight=two': weight takes an integer"),
        (f"{B1} weight=", "'weight=': weight takes an integer"),
        (f"{B1} weight=-1", "'weight=-1': weight takes an integer"),
        (f"{B1} max-conns=x", "'max-conns=x': max-conns takes an integer"),
        (f"{B1} maxconn=3", "'maxconn=3' is not a backend option (weight=N, backup, max-conns=N)"),
        (f"{B1} backup=yes", "'backup=yes' is not a backend option"),
        (f"{B1} heavy", "'heavy' is not a backend option"),
        (f"weight=2 {B1}", "'weight=2': the URL comes first, then the options"),
        ("   ", "a backend is needed"),
    ],
)
def test_bad_backend_options_name_the_flag_and_the_token(spec: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(["--backend", spec], {})
    assert info.value.setting == "--backend"
    assert words in info.value.message


def test_no_backend_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"^--backend: at least one backend"):
        load_settings([], {})


def test_spawn_makes_backends_optional_and_keeps_given_ones() -> None:
    alone = load_settings(["--spawn", "2", "--worker-cmd", CMD], {})
    assert (alone.spawn, alone.backends) == (2, ())
    both = load_settings([*MIN, "--spawn", "1", "--app", "m:a"], {})
    assert both.backends == (B1,)


def test_discover_makes_backends_optional_and_hides_the_password() -> None:
    settings = load_settings(["--discover", "redis://:hunter2@10.0.0.1/demo"], {})
    assert settings.backends == ()
    assert settings.discover == RegistryTarget("redis://:hunter2@10.0.0.1/0", "demo")
    assert str(settings.discover) == "redis://10.0.0.1/0/demo"
    assert "hunter2" not in repr(settings)


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        ([], ()),
        (["--spawn", "2", "--worker-cmd", CMD],
         ("python", "-m", "demo_app", "--port", "{port}", "--instance-id", "w {index}")),
        (["--spawn", "2", "--app", "pkg.mod:app"],
         (sys.executable, "-m", "uvicorn", "pkg.mod:app", "--host", "127.0.0.1", "--port",
          "{port}")),
    ],
)  # fmt: skip
def test_worker_command(argv: list[str], command: tuple[str, ...]) -> None:
    assert load_settings([*MIN, *argv], {}).worker_command() == command


# Bad values from the environment and the file say where they came from.
@pytest.mark.parametrize(
    ("environ", "toml", "setting", "words"),
    [
        ({"BALANCER_WORKERS": "many"}, "", "--workers", "(from BALANCER_WORKERS)"),
        ({"BALANCER_ACCESS_LOG": "maybe"}, "", "--access-log", "expected true or false"),
        ({}, 'workers = "four"', "--workers", "(from {path}: workers)"),
        ({}, "workers = true", "--workers", "expected an integer"),
        ({}, "health_interval = false", "--health-interval", "expected a number"),
        ({}, "access_log = 1", "--access-log", "expected a string"),
        ({}, 'backends = "http://a:1"', "--backends", ""),
        ({}, "backends = 7", "--backend", "expected a list"),
        ({}, "listen = 8080", "--listen", "expected a string"),
        ({}, "colour = 1", "--config", "unknown setting 'colour'"),
        ({}, "workers = [", "--config", "is not valid TOML"),
        ({"BALANCER_ADMIN_TOKEN": "short"}, "", "--admin-token", "at least 16 characters"),
        ({}, 'admin_token = "short"', "--admin-token", "(from {path}: admin_token)"),
    ],
)
def test_bad_values_from_env_and_file(
    tmp_path: Path, environ: dict[str, str], toml: str, setting: str, words: str
) -> None:
    path = _toml(tmp_path, toml)
    if setting == "--backends":  # a string where a list is expected: one backend
        assert load_settings(["--config", str(path)], environ).backends == ("http://a:1",)
        return
    base = [] if toml.startswith("backends") else MIN  # the command line would win
    with pytest.raises(ConfigError) as info:
        load_settings(["--config", str(path), *base], environ)
    assert info.value.setting == setting
    assert words.format(path=path) in str(info.value)


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match=r"^--config: cannot read /nonexistent/b\.toml"):
        load_settings(["--config", "/nonexistent/b.toml", *MIN], {})


def test_non_loopback_admin_with_token_is_fine() -> None:
    settings = load_settings([*MIN, "--admin", "0.0.0.0:8081", "--admin-token", TOKEN], {})
    assert settings.admin == Address("0.0.0.0", 8081)
    assert not settings.admin.is_loopback
    assert TOKEN not in repr(settings)  # the token stays out of logs


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("example.com", False)],
)  # fmt: skip
def test_loopback(host: str, loopback: bool) -> None:
    assert Address(host, 1).is_loopback is loopback


def test_address_str() -> None:
    assert str(Address("::1", 80)) == "[::1]:80"
    assert str(Address("127.0.0.1", 80)) == "127.0.0.1:80"


def test_load_or_exit_prints_one_line_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        load_or_exit(["--backend", "ftp://x"], {})
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == (
        "balancer: error: --backend: 'ftp://x': only http:// and https:// backends are supported\n"
    )


def test_load_or_exit_generates_a_secret_only_when_none() -> None:
    generated = load_or_exit(MIN, {})
    assert len(generated.affinity_secrets) == 1
    assert len(generated.affinity_secrets[0]) >= 32
    assert generated.affinity().sign("x")
    given = load_or_exit([*MIN, "--affinity-secret", SECRET], {})
    assert given.affinity_secrets == (SECRET,)


def test_help_names_environment_variables(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        load_settings(["--help"], {})
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--backend [NAME=]URL" in out
    assert "[BALANCER_BACKENDS]" in out
    assert "--no-access-log" in out


def test_backend_policy_from_settings() -> None:
    settings = load_settings([*MIN, "--eject-after", "2", "--slow-start", "9"], {})
    policy = settings.backend_policy()
    assert (policy.eject_after, policy.ejection_time, policy.slow_start) == (2, 30.0, 9.0)


@pytest.mark.parametrize(
    ("argv", "suffix"),
    [
        ([], b"Max-Age=86400"),
        (["--affinity-max-age", "60"], b"Max-Age=60"),
        (["--affinity-max-age", "0"], b"Lax"),
    ],
)
def test_affinity_from_settings(argv: list[str], suffix: bytes) -> None:
    settings = load_settings(
        [*MIN, "--affinity-secret", SECRET, "--affinity-cookie", "pin", *argv], {}
    )
    value = settings.affinity().set_cookie("abc")
    assert value.startswith(b"pin=abc.")
    assert value.endswith(suffix)


_PROXY, _HEALTH, _BACKEND, _RESTART = (
    ProxyOptions(),
    HealthPolicy(),
    BackendPolicy(),
    RestartPolicy(),
)
_SUPERVISOR = SupervisorOptions(command=(), count=1)
_AUTOSCALE = AutoscalePolicy(minimum=1, maximum=2)
# Each setting that a library class also takes, with that class's own default: the one
# place it lives (issue 14: queue_timeout was 3 s in Settings and 0 in ProxyOptions).
LIBRARY_DEFAULTS: dict[str, object] = {
    "max_request_line": _PROXY.max_request_line,
    "max_header_bytes": _PROXY.max_header_bytes,
    "header_timeout": _PROXY.header_timeout,
    "idle_timeout": _PROXY.idle_timeout,
    "upstream_connect_timeout": _PROXY.connect_timeout,
    "upstream_response_timeout": _PROXY.response_timeout,
    "upstream_keepalive": _PROXY.keepalive_per_backend,
    "retry_budget": _PROXY.retry_ratio,
    "retry_floor": _PROXY.retry_floor,
    "max_attempts": _PROXY.max_attempts,
    "trusted_proxies": _PROXY.trusted_proxies,
    "proxy_protocol": _PROXY.proxy_protocol,
    "shutdown_deadline": _PROXY.shutdown_deadline,
    "access_log": _PROXY.access_log,
    "access_log_format": DEFAULT_ACCESS_FORMAT,
    "queue_timeout": _PROXY.queue_timeout,
    "health_path": _HEALTH.path,
    "health_interval": _HEALTH.interval,
    "health_timeout": _HEALTH.timeout,
    "health_rise": _HEALTH.rise,
    "health_fall": _HEALTH.fall,
    "eject_after": _BACKEND.eject_after,
    "ejection_time": _BACKEND.ejection_time,
    "max_ejection_percent": _BACKEND.max_ejection_percent,
    "slow_start": _BACKEND.slow_start,
    "worker_ready_path": _SUPERVISOR.ready_path,
    "worker_ready_timeout": _SUPERVISOR.ready_timeout,
    "worker_hang_timeout": _SUPERVISOR.hang_timeout,
    "worker_stop_timeout": _SUPERVISOR.stop_timeout,
    "drain_deadline": _BACKEND.drain.deadline,
    "drain_idle": _BACKEND.drain.idle,
    "drain_sessions": _BACKEND.drain.sessions,
    "on_pinned_down": _router.DEFAULT_ON_PINNED_DOWN,
    "strict_window": _router.DEFAULT_STRICT_WINDOW,
    "repin_header": _PROXY.repin_header,
    "restart_backoff": _RESTART.backoff,
    "restart_backoff_max": _RESTART.backoff_max,
    "min_uptime": _RESTART.min_uptime,
    "max_crashes": _RESTART.max_crashes,
    "autoscale_target": _AUTOSCALE.target,
    "autoscale_window": _AUTOSCALE.window,
    "autoscale_cooldown": _AUTOSCALE.cooldown,
    "balance": _router.DEFAULT_BALANCE,
    "hash_balance_factor": _router.DEFAULT_HASH_BALANCE_FACTOR,
    "hash_table_size": DEFAULT_TABLE_SIZE,
    "discover_interval": DEFAULT_DISCOVER_INTERVAL,
    "affinity_same_site": DEFAULT_SAME_SITE,
    "affinity_path": DEFAULT_COOKIE_PATH,
}
# The settings no library class takes with a default of its own: the config layer's.
# affinity_max_age: AffinityCookie's default is a browser-session cookie; the balancer's
# is a day, session_store's absolute lifetime (see Settings).
CONFIG_ONLY = {
    "listen", "backends", "sticky", "admin", "admin_token", "config", "workers", "log_format",
    "affinity_cookie", "affinity_max_age", "affinity_secrets", "spawn", "worker_cmd", "app",
    "discover", "dashboard_mode", "dashboard_redis", "pin_store", "affinity_partitioned",
    "affinity_domain", "affinity_secure", "tls_certs", "tls_keys", "backend_ca", "http2",
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(LIBRARY_DEFAULTS))
def test_each_default_is_the_library_classes(name: str) -> None:
    assert getattr(Settings(), name) == LIBRARY_DEFAULTS[name]


def test_every_setting_is_a_library_default_or_the_config_layers() -> None:
    names = set(Settings.__dataclass_fields__)
    assert names == set(LIBRARY_DEFAULTS) | CONFIG_ONLY
    assert not set(LIBRARY_DEFAULTS) & CONFIG_ONLY


def test_default_settings_build_the_default_library_objects() -> None:
    # The translation as the balancer runs it: nothing restated, nothing mapped wrong.
    settings = Settings(spawn=1, worker_cmd=CMD)
    assert proxy_options(settings) == ProxyOptions()
    assert settings.health_policy() == HealthPolicy()
    assert settings.backend_policy() == BackendPolicy()
    assert supervisor_options(settings) == SupervisorOptions(
        command=settings.worker_command(), count=1
    )


OLD_SECRET = "the-old-affinity-secret-0123"
NEW_SECRET = "the-new-affinity-secret-4567"


@pytest.mark.parametrize(
    ("argv", "environ", "toml"),
    [
        (["--affinity-secret", NEW_SECRET, "--affinity-secret", OLD_SECRET], {}, None),
        ([], {"BALANCER_AFFINITY_SECRETS": f"{NEW_SECRET},{OLD_SECRET}"}, None),
        ([], {}, f'affinity_secrets = ["{NEW_SECRET}", "{OLD_SECRET}"]'),
    ],
)
def test_affinity_secrets_are_newest_first_like_session_keys(
    tmp_path: Path, argv: list[str], environ: dict[str, str], toml: str | None
) -> None:
    # One order for the balancer and SessionMiddleware(secret_keys=...): the first signs,
    # every one verifies, so an operator rotating both lists them alike.
    if toml is not None:
        path = tmp_path / "balancer.toml"
        path.write_text(toml + "\n")
        argv = ["--config", str(path)]
    settings = load_settings([*MIN, *argv], environ)
    assert settings.affinity_secrets == (NEW_SECRET, OLD_SECRET)
    affinity = settings.affinity()
    assert affinity.sign("abc") == AffinityCookie(secrets=[NEW_SECRET]).sign("abc")
    assert affinity.verify(AffinityCookie(secrets=[OLD_SECRET]).sign("abc")) == ("abc", False)
    assert affinity.verify(affinity.sign("abc")) == ("abc", True)


def test_health_policy_from_settings() -> None:
    settings = load_settings([*MIN, "--health-path", "/up", "--health-fall", "5"], {})
    policy = settings.health_policy()
    assert (policy.path, policy.interval, policy.timeout, policy.rise, policy.fall) == (
        "/up",
        2.0,
        1.0,
        2,
        5,
    )


def test_spawn_auto_is_one_worker_per_cpu() -> None:
    settings = load_settings([*MIN, "--spawn", "auto", "--app", "m:a"], {})
    assert settings.spawn == (os.cpu_count() or 1)
    from_env = load_settings(MIN, {"BALANCER_SPAWN": "AUTO", "BALANCER_APP": "m:a"})
    assert from_env.spawn == settings.spawn


@pytest.mark.parametrize(
    ("argv", "environ", "toml"),
    [
        (["--spawn", "1:3", "--autoscale-target", "2.5", "--autoscale-window", "3"], {}, None),
        (
            [],
            {
                "BALANCER_SPAWN": "1:3",
                "BALANCER_AUTOSCALE_TARGET": "2.5",
                "BALANCER_AUTOSCALE_WINDOW": "3",
            },
            None,
        ),
        ([], {}, 'spawn = "1:3"\nautoscale_target = 2.5\nautoscale-window = 3'),
    ],
)
def test_spawn_min_max_autoscales_in_that_range(
    tmp_path: Path, argv: list[str], environ: dict[str, str], toml: str | None
) -> None:
    if toml is not None:
        path = tmp_path / "balancer.toml"
        path.write_text(toml + "\n")
        argv = ["--config", str(path)]
    settings = load_settings([*MIN, *argv, "--app", "m:a"], environ)
    assert settings.spawn == (1, 3)
    options = supervisor_options(settings)
    assert options is not None
    assert options.count == 1  # it starts at the minimum
    assert options.autoscale == AutoscalePolicy(minimum=1, maximum=3, target=2.5, window=3.0)


def test_a_fixed_spawn_count_does_not_autoscale() -> None:
    options = supervisor_options(load_settings([*MIN, "--spawn", "2", "--app", "m:a"], {}))
    assert options is not None
    assert (options.count, options.autoscale) == (2, None)
