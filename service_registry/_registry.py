"""The service registry in Redis: both sides of the protocol, documented here and only here.

An instance of service ``S`` with id ``I`` announces itself with a heartbeat, one Lua script
that writes, atomically and by Redis's own clock (``TIME``, so instances on machines with
skewed clocks agree):

    registry:{S}:instance:I   string, the instance's record as JSON (below), PX = its ttl
    registry:{S}:heartbeats   sorted set: member I, score = last heartbeat, ms since the epoch
    registry:{S}:epoch        a random token, SET NX, no TTL: it changes only when Redis lost
                              its data (a restart without persistence, a failover to an empty
                              replica), which tells a watcher to wait before removing anyone
    registry:{S}:changes      pub/sub channel: {"event": "up" | "down", "id": I}
    registry:{S}:left         sorted set: member I, score = when it deregistered (ms, Redis's
                              clock), kept LEFT_WINDOW seconds: a deregistration told apart
                              from a death in every read, not only in a notice that may be lost

The braces make every key of a service one Redis Cluster slot (its hash tag is the service
name), so each script below runs whole on the one node that owns that slot, reads included:
on a cluster a read is as atomic and as correct as on one server. The price is that one
service's registry lives on one shard; a registry is small (one record per instance) and is
read a few times a second, so that costs nothing worth sharding. The record:

    {"service": S, "id": I, "address": "http://host:port", "version": "1.2",
     "metadata": {"zone": "a"}, "ttl": 3.0}

`ttl` (seconds) is the instance's own promise: it heartbeats well within it (a third of it
by default). It is live while its record exists and its last heartbeat is less than `ttl`
old; a killed instance disappears from reads when its TTL runs out. A heartbeat that finds
no record (first registration, or Redis restarted) publishes "up" (and drops the instance
from `left`); deregistration deletes both entries, adds the instance to `left`, and publishes
"down". A watcher that finds an instance gone from a read can so tell the two endings apart:
in `left` (`Snapshot.left`) it left on purpose (drain it), else it died (its TTL ran out).

Watchers never rely on keyspace `expired` notifications (Redis delivers them late:
docs/architecture.md, "Measured facts") nor on pub/sub alone (messages are lost across
reconnects): the source of truth is a periodic full read of the sorted set and the records
(`Registry.read`, one script, which also drops members whose record expired). Notices only
make a watcher read sooner.

Decide, then do: `Instance`, `live_instances` and `Membership` are pure (records and a clock
in, decisions out); `Registry` does the Redis I/O and is the one place redis-py's errors
become `RegistryUnavailable` or `RegistryError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import redis.exceptions

from redis_plumbing import (
    RedisClient,
    RedisURLError,
    call,
    parse_redis_url,
    redact_url,
    redis_client,
)

from ._exceptions import RegistryError, RegistryUnavailable

__all__ = [
    "DEFAULT_PREFIX",
    "DEFAULT_REGISTRY_TTL",
    "Changes",
    "Instance",
    "Membership",
    "Notice",
    "Registry",
    "RegistryTarget",
    "Snapshot",
    "live_instances",
    "parse_registry_url",
]

T = TypeVar("T")

DEFAULT_PREFIX = "registry:"
DEFAULT_REGISTRY_TTL = 3.0  # seconds: three heartbeats of one second may be missed before removal
# Seconds a deregistration stays in `left`: every watcher reads far more often than this (an
# outage of its reads longer than this makes a deregistration look like a death).
LEFT_WINDOW = 60.0

# Service names and instance ids end up inside key names and a channel name.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

# KEYS: heartbeats, instance key, epoch, left. ARGV: id, record, ttl ms, epoch token, channel.
# Returns 1 when the record was absent (a new registration, or Redis lost it), else 0.
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local new = redis.call('EXISTS', KEYS[2]) == 0
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('SET', KEYS[3], ARGV[4], 'NX')
if new then
  redis.call('ZREM', KEYS[4], ARGV[1])
  redis.call('PUBLISH', ARGV[5], cjson.encode({event = 'up', id = ARGV[1]}))
  return 1
end
return 0
"""

# KEYS: heartbeats, instance key, left. ARGV: id, channel, left window ms.
# Returns 1 if it was registered.
_DEREGISTER = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local was = redis.call('ZREM', KEYS[1], ARGV[1]) + redis.call('DEL', KEYS[2])
redis.call('ZADD', KEYS[3], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[3]))
redis.call('PUBLISH', ARGV[2], cjson.encode({event = 'down', id = ARGV[1]}))
return was > 0 and 1 or 0
"""

# KEYS: heartbeats, epoch, left. ARGV: the instance key prefix, left window ms. Returns
# {now ms, epoch or nil, {id, score, record, ...}, {id of an instance that left, ...}}. The
# record keys are derived, not declared: they share the service's hash slot, so this holds
# on Redis Cluster too. A member whose record is gone
# (expired or deleted) is dropped: the sorted set never outgrows the live set for long.
_READ = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local entries = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local out = {}
for i = 1, #entries, 2 do
  local record = redis.call('GET', ARGV[1] .. entries[i])
  if record then
    out[#out + 1] = entries[i]
    out[#out + 1] = entries[i + 1]
    out[#out + 1] = record
  else
    redis.call('ZREM', KEYS[1], entries[i])
  end
end
local left = redis.call('ZRANGEBYSCORE', KEYS[3], now - tonumber(ARGV[2]), '+inf')
return {now, redis.call('GET', KEYS[2]), out, left}
"""


_SHAS = {
    script: hashlib.sha1(script.encode()).hexdigest() for script in (_HEARTBEAT, _DEREGISTER, _READ)
}


def _check_name(kind: str, name: str) -> str:
    if not _NAME.fullmatch(name):
        raise RegistryError(
            f"{kind} {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting with one "
            "letter or digit"
        )
    return name


# -- the pure part ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Instance:
    """One registered instance of a service: its record in the registry.

    Raises RegistryError for an invalid service name, id, address or ttl.
    """

    service: str
    id: str
    address: str  # http://host:port, where callers reach it
    version: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    ttl: float = DEFAULT_REGISTRY_TTL  # seconds without a heartbeat before it counts as dead

    def __post_init__(self) -> None:
        _check_name("service", self.service)
        _check_name("instance id", self.id)
        parts = urlsplit(self.address)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RegistryError(f"address {self.address!r}: expected http://host:port")
        if not (math.isfinite(self.ttl) and self.ttl > 0):
            raise RegistryError(f"ttl must be a number of seconds > 0, got {self.ttl!r}")

    def to_json(self) -> str:
        return json.dumps(
            {
                "service": self.service,
                "id": self.id,
                "address": self.address,
                "version": self.version,
                "metadata": dict(self.metadata),
                "ttl": self.ttl,
            },
            separators=(",", ":"),
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Instance:
        """Parse a record; raises RegistryError if it is not one."""
        try:
            data = json.loads(text)
            metadata = data.get("metadata") or {}
            return cls(
                service=str(data["service"]),
                id=str(data["id"]),
                address=str(data["address"]),
                version=str(data.get("version", "")),
                metadata={str(k): str(v) for k, v in metadata.items()},
                ttl=float(data.get("ttl", DEFAULT_REGISTRY_TTL)),
            )
        except RegistryError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise RegistryError(f"not a registry record: {exc}") from None


def live_instances(
    entries: Iterable[tuple[str, float, str | bytes]], now: float, *, service: str | None = None
) -> tuple[Instance, ...]:
    """The instances alive at `now`, sorted by id: pure.

    `entries` are (id, last heartbeat, record) with times in seconds on one clock (Redis's).
    An instance is alive while its last heartbeat is at most its record's `ttl` old; records
    that do not parse, or name another id or service, are skipped (a bad writer must not
    take the others down with it).
    """
    live: list[Instance] = []
    for instance_id, last_seen, record in entries:
        try:
            instance = Instance.from_json(record)
        except RegistryError:
            continue
        if instance.id != instance_id or (service is not None and instance.service != service):
            continue
        if now - last_seen <= instance.ttl:
            live.append(instance)
    return tuple(sorted(live, key=lambda i: i.id))


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One full read of a service: the live instances, Redis's time, the epoch, and the
    instances that deregistered in the last LEFT_WINDOW seconds."""

    instances: tuple[Instance, ...]
    now: float  # seconds since the epoch, by Redis's clock
    epoch: str | None  # None: no instance has written since Redis (re)started
    left: frozenset[str] = frozenset()  # ids: gone on purpose, not dead


@dataclass(frozen=True, slots=True)
class Changes:
    added: tuple[Instance, ...] = ()
    removed: tuple[Instance, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)


class Membership:
    """The watcher's view of a service, and what to add or remove after each read. Pure.

    Additions apply at once. Removals too, except during a grace period after the registry
    may have lost its data, when an absent instance may merely not have heartbeated yet:
    after the epoch changed or vanished, and after an outage of the watcher's reads. The
    grace lasts the longest ttl among the known instances (each heartbeats within its ttl).
    An instance that said "down" (`gone`, or the read's `left`) is removed whatever the grace.
    """

    def __init__(self) -> None:
        self.instances: dict[str, Instance] = {}
        self._epoch: str | None = None
        self._grace_until: float | None = None  # seconds, on the caller's clock
        self._outage = False

    def unreachable(self) -> None:
        """A read failed: the next successful one may see a registry that lost its data."""
        self._outage = True

    def update(self, snapshot: Snapshot, now: float, gone: Iterable[str] = ()) -> Changes:
        """Compare a read with what is known; returns the changes and applies them here.

        `now` is the caller's (monotonic) clock; `gone` are ids that announced "down"
        (the read's `left` counts too: a notice may be lost).
        """
        if self.instances and (self._outage or snapshot.epoch != self._epoch):
            longest = max(i.ttl for i in self.instances.values())
            self._grace_until = now + longest
        self._outage = False
        self._epoch = snapshot.epoch
        if self._grace_until is not None and now >= self._grace_until:
            self._grace_until = None
        fresh = {i.id: i for i in snapshot.instances}
        gone_ids = set(gone) | snapshot.left
        added = [i for i in snapshot.instances if self.instances.get(i.id) != i]
        removed = []
        for instance_id, instance in list(self.instances.items()):
            new = fresh.get(instance_id)
            if new is not None and new != instance:
                removed.append(instance)  # changed address or record: replaced by `added`
            elif new is None and (self._grace_until is None or instance_id in gone_ids):
                removed.append(instance)
        for instance in removed:
            del self.instances[instance.id]
        for instance in added:
            self.instances[instance.id] = instance
        return Changes(tuple(added), tuple(removed))


@dataclass(frozen=True, slots=True)
class Notice:
    """A change notice from the pub/sub channel: a hint to read, never the truth."""

    event: Literal["up", "down"]
    id: str


@dataclass(frozen=True, slots=True)
class RegistryTarget:
    """Where a service is registered: a Redis URL and the service name.

    `parse_registry_url` reads the one-URL form `redis://HOST:PORT[/DB]/SERVICE` (or any other
    topology's URL with `/SERVICE` at the end of its path).
    """

    redis_url: str
    service: str

    def __str__(self) -> str:
        base = redact_url(self.redis_url).partition("?")[0].rstrip("/")  # never a password
        return f"{base}/{self.service}"

    __repr__ = __str__


# The registry URL of each scheme: a Redis URL of that scheme with /SERVICE at the end.
_FORMS = {
    "redis": "redis://HOST:PORT[/DB]/SERVICE",
    "rediss": "rediss://HOST:PORT[/DB]/SERVICE",
    "redis+sentinel": "redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER_NAME[/DB]/SERVICE",
    "rediss+sentinel": "rediss+sentinel://HOST:PORT[,HOST:PORT...]/MASTER_NAME[/DB]/SERVICE",
    "redis+cluster": "redis+cluster://HOST:PORT[,HOST:PORT...]/SERVICE",
    "rediss+cluster": "rediss+cluster://HOST:PORT[,HOST:PORT...]/SERVICE",
}


def parse_registry_url(url: str) -> RegistryTarget:
    """A Redis URL with the service as its last path segment into a RegistryTarget.

    `redis[s]://[user:password@]HOST[:PORT][/DB]/SERVICE[?query]`: a number before the
    service is the database (default 0). The Sentinel and Cluster forms of
    `redis_plumbing.redis_client` work the same way: `redis+sentinel://H:P,H:P/MASTER[/DB]/S`,
    `redis+cluster://H:P,H:P/S`. Raises RegistryError saying what is wrong, never showing
    the password.
    """
    scheme, sep, rest = url.partition("://")
    form = _FORMS.get(scheme.lower()) if sep else None
    if form is None:
        raise RegistryError(
            f"{redact_url(url)!r}: expected redis://HOST:PORT/DB/SERVICE "
            "(or rediss://, redis+sentinel://, redis+cluster://: docs/registry.md)"
        )
    rest = rest.partition("#")[0]
    rest, question, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    segments = [s for s in path.split("/") if s] if slash else []
    plain = scheme.lower() in ("redis", "rediss")
    if not segments or (plain and len(segments) == 1 and segments[0].isdigit()):
        raise RegistryError(f"{redact_url(url)!r} names no service ({form})")
    service = _check_name("service", segments[-1])
    base = segments[:-1]
    if plain:
        if len(base) > 1 or (base and not base[0].isdigit()):
            raise RegistryError(f"{redact_url(url)!r}: expected the path /DB/SERVICE or /SERVICE")
        base = base or ["0"]
    store_path = "/" + "/".join(base) if base else ""
    redis_url = f"{scheme}://{netloc}{store_path}{question}{query}"
    try:
        parse_redis_url(redis_url)
    except RedisURLError as exc:
        raise RegistryError(f"not a valid URL: {exc} (expected {form})") from None
    return RegistryTarget(redis_url, service)


def _decode(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# -- the I/O -----------------------------------------------------------------------------


class Registry:
    """One service's registry in Redis: register, heartbeat, deregister, read, watch.

    `client` is a `redis.asyncio.Redis` or `redis.asyncio.RedisCluster` the caller created
    (with socket timeouts: they bound every call) and closes, unless `owns_client`;
    `Registry.from_url` builds one with `redis_plumbing.redis_client`, for any topology. Every
    method raises RegistryUnavailable when Redis is down, too slow, read-only or failing over,
    RegistryError when it refuses otherwise; never a redis-py error.
    """

    def __init__(
        self,
        client: RedisClient,
        service: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = 1.0,
        owns_client: bool = False,
    ) -> None:
        self.client = client
        self.service = _check_name("service", service)
        self.timeout = timeout
        self._owns_client = owns_client
        base = f"{prefix}{{{service}}}:"
        self.heartbeats_key = base + "heartbeats"
        self.instance_prefix = base + "instance:"
        self.epoch_key = base + "epoch"
        self.left_key = base + "left"
        self.channel = base + "changes"
        # redis-py leaves execute_command untyped; this is the one place we say what it is.
        self._execute: Callable[..., Awaitable[Any]] = client.execute_command

    @classmethod
    def from_url(
        cls, url: str, service: str, *, prefix: str = DEFAULT_PREFIX, timeout: float = 1.0
    ) -> Registry:
        """A registry with its own client for the Redis at `url`: any URL that
        `redis_plumbing.redis_client` reads (one server, Sentinel, Cluster; TLS, ACL)."""
        try:
            client = redis_client(url, timeout=timeout)
        except RedisURLError as exc:
            raise RegistryError(f"not a Redis URL: {exc}") from None
        return cls(client, service, prefix=prefix, timeout=timeout, owns_client=True)

    @classmethod
    def from_target(cls, target: RegistryTarget, *, timeout: float = 1.0) -> Registry:
        return cls.from_url(target.redis_url, target.service, timeout=timeout)

    def __repr__(self) -> str:
        return f"<Registry service={self.service!r}>"

    async def _script(self, script: str, keys: Sequence[str], *args: str | int) -> Any:
        # Every key of a script shares the service's slot: on a cluster, the script is
        # routed by its first key to the one node that owns them all.
        sha = _SHAS[script]
        try:
            return await self._execute("EVALSHA", sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            # A new or restarted server, or a promoted replica (the script cache is not
            # replicated): EVAL runs it and caches it on that node only, where SCRIPT LOAD
            # would go to every primary of a cluster.
            return await self._execute("EVAL", script, len(keys), *keys, *args)

    def _call(self, operation: Awaitable[T]) -> Awaitable[T]:
        # The one seam where redis-py's errors (and its lost cancels) become ours.
        # A plain function that hands back call()'s coroutine: one frame less a command.
        return call(
            operation,
            unavailable=RegistryUnavailable,
            refused=RegistryError,
            client_timeout=self.timeout,
        )

    async def register(self, instance: Instance) -> bool:
        """Register or heartbeat `instance`; True when it was not registered before."""
        if instance.service != self.service:
            raise RegistryError(f"{instance.id} is of service {instance.service!r}")
        keys = [self.heartbeats_key, self.instance_prefix + instance.id, self.epoch_key]
        keys.append(self.left_key)
        ttl_ms = max(1, int(instance.ttl * 1000))
        args: list[str | int] = [
            instance.id,
            instance.to_json(),
            ttl_ms,
            # A fresh token each time (SET NX keeps the first): a token of this process's
            # own would come back unchanged when this instance is the first to write after
            # Redis lost everything, and the watchers would miss the restart.
            secrets.token_hex(8),
            self.channel,
        ]
        return bool(await self._call(self._script(_HEARTBEAT, keys, *args)))

    async def deregister(self, instance_id: str) -> bool:
        """Remove an instance at once and say so; True if it was registered."""
        keys = [self.heartbeats_key, self.instance_prefix + instance_id, self.left_key]
        args = (instance_id, self.channel, int(LEFT_WINDOW * 1000))
        return bool(await self._call(self._script(_DEREGISTER, keys, *args)))

    async def read(self) -> Snapshot:
        """The live instances now: one atomic read of the heartbeats and the records."""
        keys = [self.heartbeats_key, self.epoch_key, self.left_key]
        window = int(LEFT_WINDOW * 1000)
        reply = await self._call(self._script(_READ, keys, self.instance_prefix, window))
        now = int(reply[0]) / 1000
        epoch = None if reply[1] is None else _decode(reply[1])
        flat: Sequence[bytes | str] = reply[2]
        entries = [
            (_decode(flat[i]), float(flat[i + 1]) / 1000, flat[i + 2])
            for i in range(0, len(flat), 3)
        ]
        left = frozenset(_decode(member) for member in reply[3])
        return Snapshot(live_instances(entries, now, service=self.service), now, epoch, left)

    @contextlib.asynccontextmanager
    async def notices(self) -> AsyncIterator[Callable[[float], Awaitable[Notice | None]]]:
        """Subscribe to the change notices; yields `next(wait)`: a Notice, or None after
        `wait` seconds without one. Raises RegistryUnavailable when the subscription
        breaks: subscribe again, and read in full, since notices were lost meanwhile."""
        # A command first: a cluster client learns its slot map on its first command, and
        # its pub/sub needs that map to pick the node to subscribe on.
        await self._call(self.client.ping())
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        try:
            await self._call(pubsub.subscribe(self.channel))

            async def next_notice(wait: float) -> Notice | None:
                message = await self._call(pubsub.get_message(timeout=wait))
                if message is None or message.get("type") != "message":
                    return None
                try:
                    data = json.loads(message["data"])
                    event, instance_id = data["event"], str(data["id"])
                except (ValueError, TypeError, KeyError):
                    return None  # not ours: a notice is only a hint
                if event not in ("up", "down"):
                    return None
                return Notice(event, instance_id)

            yield next_notice
        finally:
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                # Through a typed name: redis-py annotated it only in 8.2, and this must
                # type-check against the older ones that pyproject allows too.
                aclose: Callable[[], Awaitable[None]] = pubsub.aclose
                await aclose()

    async def ping(self) -> None:
        await self._call(self.client.ping())

    async def aclose(self) -> None:
        """Close the client if this registry created it."""
        if self._owns_client:
            await self.client.aclose()
