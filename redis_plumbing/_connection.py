"""One Redis URL in, one redis-py client out, whatever the topology behind it.

The forms, each also over TLS with the scheme's ``s`` (``rediss``, ``rediss+sentinel``,
``rediss+cluster``)::

    redis://[[USER]:PASSWORD@]HOST[:PORT][/DB][?OPTION=VALUE&...]      one server
    unix://[[USER]:PASSWORD@]/PATH/TO/SOCKET[?db=DB&...]               one server, a socket
    redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/MASTER_NAME[/DB][?...]
    redis+cluster://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...][/0][?...]

Ports default to 6379, and to 26379 for the sentinels. USER and PASSWORD (an ACL user, or
only a password for ``requirepass``) are those of the data nodes; the sentinels take theirs
from ``sentinel_username`` and ``sentinel_password``. The options are redis-py's own
(``socket_timeout``, ``max_connections``, ``client_name``, ``protocol``, ...) and, on a TLS
scheme, ``ssl_ca_certs`` (a CA file), ``ssl_certfile`` and ``ssl_keyfile`` (a client
certificate), ``ssl_cert_reqs``, ``ssl_check_hostname``; with ``rediss+sentinel`` the TLS
options hold for the sentinels too.

`parse_redis_url` is pure: it reads a URL into a `RedisURL` or raises `RedisURLError` saying
what is wrong, the password never in the message. `redis_client` builds the client:
`redis.asyncio.Redis` for one server, the same fed by `redis.asyncio.Sentinel(...)
.master_for(...)` (it asks the sentinels where the primary is and follows a failover with
no restart), or `redis.asyncio.RedisCluster` seeded with every node given. Every client
gets connect and read timeouts of ``timeout`` seconds (they are what bounds each call) and
one immediate retry, which heals a pooled connection that a restart or a failover closed.
No other module of the project knows which topology it talks to.

`cancellable` wraps each call on such a client where a task may be cancelled: on Python
3.11 redis-py can return from a call as if the task's cancel had never come. `call` is
`cancellable` plus the one translation of redis-py's errors into the caller's own
exceptions: the session store's and the service registry's seam to Redis.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias, TypeVar
from urllib.parse import parse_qsl, unquote

import redis.asyncio
import redis.exceptions
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import URL_QUERY_ARGUMENT_PARSERS
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

from ._exceptions import RedisURLError

__all__ = [
    "UNAVAILABLE_ERRORS",
    "RedisClient",
    "RedisURL",
    "call",
    "cancellable",
    "parse_redis_url",
    "redact_url",
    "redis_client",
]

RedisClient: TypeAlias = redis.asyncio.Redis | redis.asyncio.RedisCluster
T = TypeVar("T")

# What a redis-py call raises when Redis is down, loading, read-only (a replica during a
# failover), too slow, or a cluster slot has no primary yet: "unavailable, retry later",
# where any other RedisError is a refusal. Every Redis user of the project translates
# these the same way, through `call` (RedisStore._call and Registry._call are one line each).
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.SlotNotCoveredError,
    OSError,
)


async def cancellable(call: Awaitable[T]) -> T:
    """Await one redis-py call; raise CancelledError if the task was cancelled while it
    ran, even when the call returned its result.

    On Python 3.11, `asyncio.wait_for` returns the inner result when a cancel lands just as
    the inner call finishes, and the cancel is lost (CPython gh-86296; 3.12 rewrote
    wait_for). redis-py writes every command through `wait_for` once a socket timeout is
    set, as on every client `redis_client` makes: a task cancelled at that moment went on
    as if it had not been, and a loop of Redis calls (a registry watcher, a heartbeat, a
    flusher) outlived its `cancel()` and hung the shutdown that awaited it. Only a cancel
    that came during this call is raised; one the task took in and dealt with before it
    is not raised again.
    """
    task = asyncio.current_task()
    if task is None:
        return await call
    before = task.cancelling()
    result = await call
    if task.cancelling() > before:
        raise asyncio.CancelledError
    return result


async def call(
    operation: Awaitable[T],
    *,
    unavailable: type[Exception],
    refused: type[Exception],
    client_timeout: float,
) -> T:
    """Await one redis-py call through `cancellable`, its errors translated: a timeout or
    one of `UNAVAILABLE_ERRORS` raises ``unavailable(message)`` (try again later), any
    other redis-py error ``refused(message)``; the redis-py error is the ``__cause__``.
    ``client_timeout`` is only named in the message: the client's own socket timeouts
    (set by `redis_client`) bound the call, since a second timer per command cost ~10% of
    the session store's CPU (docs/architecture.md)."""
    try:
        return await cancellable(operation)
    except TimeoutError as exc:
        raise unavailable(f"redis did not answer within {client_timeout} s") from exc
    except UNAVAILABLE_ERRORS as exc:
        raise unavailable(f"redis is unavailable: {exc}") from exc
    except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as exc:
        raise refused(f"redis refused the operation: {exc}") from exc


Topology = Literal["server", "unix", "sentinel", "cluster"]

_SCHEMES: Mapping[str, tuple[Topology, bool]] = {
    "redis": ("server", False),
    "rediss": ("server", True),
    "unix": ("unix", False),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
}
_DEFAULT_PORT = 6379
_DEFAULT_SENTINEL_PORT = 26379

# Options with a type are parsed by redis-py's own table; these are kept as text. Every
# ssl_* option needs a TLS scheme.
_TEXT_OPTIONS = frozenset(
    {"client_name", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_ciphers"}
)
_SENTINEL_OPTIONS = frozenset({"sentinel_username", "sentinel_password"})
# "timeout" in redis-py's table is an alias of nothing a client takes.
_TYPED_OPTIONS = {k: v for k, v in URL_QUERY_ARGUMENT_PARSERS.items() if k != "timeout"}
_NAME = re.compile(r"[A-Za-z0-9._-]+")


@dataclass(frozen=True, slots=True)
class RedisURL:
    """A Redis URL, read: where the nodes are, who to be, and the client options."""

    topology: Topology
    tls: bool
    nodes: tuple[tuple[str, int], ...] = ()  # (host, port); the sentinels for "sentinel"
    socket_path: str | None = None  # for "unix"
    master: str | None = None  # the sentinels' name of the primary, for "sentinel"
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    options: Mapping[str, object] = field(default_factory=dict, repr=False)
    sentinel_options: Mapping[str, object] = field(default_factory=dict, repr=False)


def redact_url(url: str) -> str:
    """``url`` without its password (the user stays); never raises, whatever ``url`` is."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = len(rest)
    for stop in "/?#":
        index = rest.find(stop)
        if index != -1:
            end = min(end, index)
    netloc, tail = rest[:end], rest[end:]
    userinfo, at, hosts = netloc.rpartition("@")
    if at:
        user = userinfo.partition(":")[0]
        netloc = f"{user}@{hosts}" if user else hosts
    tail = re.sub(r"(?i)(password=)[^&#]*", r"\1***", tail)
    return f"{scheme}{sep}{netloc}{tail}"


def _fail(url: str, problem: str) -> RedisURLError:
    return RedisURLError(f"{redact_url(url)!r}: {problem}")


def _node(url: str, text: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):  # [IPv6]:port
        host, bracket, port_text = text[1:].partition("]")
        if not bracket or (port_text and not port_text.startswith(":")):
            raise _fail(url, f"{text!r} is not HOST:PORT")
        port_text = port_text[1:]
    else:
        host, _, port_text = text.rpartition(":") if ":" in text else (text, "", "")
    if not host:
        raise _fail(url, f"{text!r} has no host")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise _fail(url, f"port {port_text!r} of {text!r} is not a number from 1 to 65535")
    return host, int(port_text)


def _options(url: str, query: str, tls: bool) -> tuple[dict[str, object], dict[str, object]]:
    options: dict[str, object] = {}
    sentinel: dict[str, object] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise _fail(url, f"the query {query!r} is not NAME=VALUE&...") from None
    for name, value in pairs:
        if name.startswith("ssl_") and not tls:
            raise _fail(url, f"option {name} needs TLS: use rediss:// (or rediss+...)")
        if name in _TYPED_OPTIONS:
            try:
                options[name] = _TYPED_OPTIONS[name](value)
            except (TypeError, ValueError):
                raise _fail(url, f"option {name}={value!r} is not a valid value") from None
        elif name in _TEXT_OPTIONS:
            options[name] = value
        elif name in _SENTINEL_OPTIONS:
            sentinel[name.removeprefix("sentinel_")] = value
        else:
            known = sorted({*_TYPED_OPTIONS, *_TEXT_OPTIONS, *_SENTINEL_OPTIONS})
            raise _fail(url, f"unknown option {name!r} (known: {', '.join(known)})")
    return options, sentinel


def _db(url: str, text: str) -> int:
    if not text.isdigit():
        raise _fail(url, f"database {text!r} is not a number")
    return int(text)


def parse_redis_url(url: str) -> RedisURL:
    """Read ``url`` (a form of the module docstring); raises `RedisURLError` naming the fault."""
    if not isinstance(url, str) or not url.strip():
        raise RedisURLError("the Redis URL is empty")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in _SCHEMES:
        schemes = ", ".join(f"{name}://" for name in _SCHEMES)
        raise _fail(url, f"expected {schemes}")
    topology, tls = _SCHEMES[scheme.lower()]
    rest, _, _fragment = rest.partition("#")
    rest, _, query = rest.partition("?")
    slash = rest.find("/")
    netloc, path = (rest, "") if slash == -1 else (rest[:slash], rest[slash:])
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon and secret else None
    options, sentinel_options = _options(url, query, tls)
    if sentinel_options and topology != "sentinel":
        raise _fail(url, "sentinel_username and sentinel_password are for redis+sentinel://")
    db_option = options.pop("db", None)
    segments = [unquote(s) for s in path.split("/") if s]

    if topology == "unix":
        if hosts:
            raise _fail(url, "unix:// takes no host: unix:///path/to/redis.sock")
        if not path.strip("/"):
            raise _fail(url, "names no socket: unix:///path/to/redis.sock")
        db = int(db_option) if isinstance(db_option, int) else 0
        return RedisURL(
            topology, tls, socket_path=unquote(path), db=db, username=username,
            password=password, options=options,
        )  # fmt: skip

    if not hosts:
        raise _fail(url, "has no host")
    items = hosts.split(",")
    if any(not item for item in items):
        raise _fail(url, "has an empty entry in its list of hosts")
    if topology == "server" and len(items) > 1:
        raise _fail(
            url,
            f"{scheme}:// takes one host; for several, use redis+sentinel:// or redis+cluster://",
        )
    default_port = _DEFAULT_SENTINEL_PORT if topology == "sentinel" else _DEFAULT_PORT
    nodes = tuple(_node(url, item, default_port) for item in items)

    master = None
    if topology == "sentinel":
        if not segments:
            raise _fail(url, "names no master: redis+sentinel://HOST:PORT/MASTER_NAME[/DB]")
        if len(segments) > 2:
            raise _fail(url, "expected the path /MASTER_NAME or /MASTER_NAME/DB")
        master = segments[0]
        if not _NAME.fullmatch(master):
            raise _fail(url, f"master name {master!r}: use letters, digits, '.', '_', '-'")
        db = _db(url, segments[1]) if len(segments) == 2 else 0
    elif len(segments) > 1:
        raise _fail(url, "expected the path /DB, a number, or none")
    else:
        db = _db(url, segments[0]) if segments else 0
    if isinstance(db_option, int):
        db = db_option
    if topology == "cluster" and db != 0:
        raise _fail(url, f"Redis Cluster has only database 0, not {db}")
    return RedisURL(
        topology, tls, nodes=nodes, master=master, db=db, username=username,
        password=password, options=options, sentinel_options=sentinel_options,
    )  # fmt: skip


class _SentinelMaster(redis.asyncio.Redis):
    """The primary that the sentinels name; `aclose` also closes the sentinel connections."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        pool = self.connection_pool
        if isinstance(pool, SentinelConnectionPool):
            for sentinel in pool.sentinel_manager.sentinels:
                await sentinel.aclose()


def redis_client(url: str, *, timeout: float = 1.0, **options: Any) -> RedisClient:
    """A client for ``url``, connecting lazily (on its first command); close it with aclose().

    ``timeout`` (seconds) bounds each connect and each read; ``options`` are redis-py
    keyword arguments and win over the URL's. Raises `RedisURLError` for a URL that is not
    one of the module docstring's forms, or an option the topology's client does not take.
    """
    target = parse_redis_url(url)
    kwargs: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        # One immediate retry heals a pooled connection that a restart or failover
        # closed; more would only stretch the time a request waits on a dead server.
        "retry": Retry(NoBackoff(), 1),
    }
    if target.username is not None:
        kwargs["username"] = target.username
    if target.password is not None:
        kwargs["password"] = target.password
    if target.tls:
        kwargs["ssl"] = True
    kwargs.update(target.options)
    kwargs.update(options)
    try:
        if target.topology == "server":
            host, port = target.nodes[0]
            return redis.asyncio.Redis(host=host, port=port, db=target.db, **kwargs)
        if target.topology == "unix":
            return redis.asyncio.Redis(unix_socket_path=target.socket_path, db=target.db, **kwargs)
        if target.topology == "cluster":
            nodes = [ClusterNode(host, port) for host, port in target.nodes]
            return redis.asyncio.RedisCluster(startup_nodes=nodes, **kwargs)
        return _sentinel_master(target, kwargs)
    except TypeError as exc:  # an option this topology's client does not take
        raise _fail(url, f"an option does not fit a {target.topology} client: {exc}") from None


def _sentinel_master(target: RedisURL, kwargs: dict[str, Any]) -> redis.asyncio.Redis:
    assert target.master is not None
    sentinel_kwargs: dict[str, Any] = {
        name: value for name, value in kwargs.items() if name.startswith(("socket_", "ssl"))
    }
    sentinel_kwargs.update(target.sentinel_options)
    # Through a typed name: redis-py annotated Sentinel's __init__ only in 8.2, and this
    # must type-check against the older ones that pyproject allows too.
    make_sentinel: Callable[..., Sentinel] = Sentinel
    manager = make_sentinel(list(target.nodes), sentinel_kwargs=sentinel_kwargs, **kwargs)
    client: redis.asyncio.Redis = manager.master_for(
        target.master, redis_class=_SentinelMaster, db=target.db
    )
    return client
