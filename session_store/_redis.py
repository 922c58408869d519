"""Sessions in Redis: one hash per session, one field per session key.

Layout, for a session id ``S`` and the default prefix ``session:``::

    session:{S}          a hash; the braces make it one Redis Cluster slot
      m:c                created, milliseconds since the epoch
      m:v                version, bumped by every save
      m:x                present only in a tombstone: the session was destroyed
      d:<key>            the JSON text of session[key]

Idle expiry is the key's TTL, refreshed by saves and by throttled touches.
Every write is one Lua script, so it is atomic and carries only the keys a
request changed: concurrent requests that change different keys all keep their
change, and a save that finds no hash (or a tombstone) where it expected one
writes nothing, so a destroyed session never comes back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ._exceptions import SessionStoreError, StoreUnavailable
from ._store import Changes, SessionRecord

__all__ = ["RedisStore", "Unchanged"]

T = TypeVar("T")

# KEYS[1] the hash. ARGV[1] a version the caller already holds, or "".
# Returns nil (no session), {pttl} (the caller's version is current), or {pttl, fields}.
_LOAD = """
local v = redis.call('HGET', KEYS[1], 'm:v')
if not v or redis.call('HEXISTS', KEYS[1], 'm:x') == 1 then return nil end
local pttl = redis.call('PTTL', KEYS[1])
if v == ARGV[1] then return {pttl} end
return {pttl, redis.call('HGETALL', KEYS[1])}
"""

# KEYS[1] the hash. ARGV[1] "MODE TTL_MS CREATED_MS N" (MODE create|update; one argument,
# not four: redis-py's per-argument cost is most of a save's CPU), then N deleted field
# names, then field/value pairs to set. Returns the new version, or false.
_SAVE = """
local mode, ttl, created, n = string.match(ARGV[1], '^(%a+) (%d+) (%d+) (%d+)$')
n = tonumber(n)
local exists = redis.call('EXISTS', KEYS[1]) == 1
if mode == 'create' then
  if exists then return false end
  redis.call('HSET', KEYS[1], 'm:c', created)
elseif not exists or redis.call('HEXISTS', KEYS[1], 'm:x') == 1 then
  return false
end
if n > 0 then redis.call('HDEL', KEYS[1], unpack(ARGV, 2, 1 + n)) end
if #ARGV > 1 + n then redis.call('HSET', KEYS[1], unpack(ARGV, 2 + n, #ARGV)) end
local v = redis.call('HINCRBY', KEYS[1], 'm:v', 1)
redis.call('PEXPIRE', KEYS[1], ttl)
return v
"""

# KEYS[1] the hash. ARGV[1] ttl ms. Replaces the session with a tombstone.
_DESTROY = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'm:x', '1')
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""

_SCRIPTS = (_LOAD, _SAVE, _DESTROY)
_DATA = "d:"


@dataclass(frozen=True, slots=True)
class Unchanged:
    """`RedisStore.load_unless`: the caller's copy is current."""

    ttl: float | None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class RedisStore:
    """Sessions in Redis (or Valkey), shared by every instance.

    ``client`` is a `redis.asyncio.Redis` the caller created and will close;
    `RedisStore.from_url` builds one whose connect and read timeouts are
    ``timeout`` seconds, and closes it itself (a client of your own should set
    ``socket_timeout`` and ``socket_connect_timeout`` likewise: they are what
    bounds each call). A Redis that is down, loading, read-only (a replica
    during failover) or too slow raises `StoreUnavailable`, never a redis-py
    error and never a hang.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        prefix: str = "session:",
        timeout: float = 1.0,
        owns_client: bool = False,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.timeout = timeout
        self._owns_client = owns_client
        # redis-py leaves execute_command untyped; this is the one place we say what it is.
        self._execute: Callable[..., Awaitable[Any]] = client.execute_command
        self._shas = {script: hashlib.sha1(script.encode()).hexdigest() for script in _SCRIPTS}

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "session:", timeout: float = 1.0) -> RedisStore:
        """A store with its own client for ``url`` (``redis://`` or ``rediss://``)."""
        client = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # One immediate retry heals a pooled connection that a Redis restart
            # closed; more would only stretch the time a request waits on a dead server.
            retry=Retry(NoBackoff(), 1),
        )
        return cls(client, prefix=prefix, timeout=timeout, owns_client=True)

    async def _script(self, script: str, key: str, *args: str | int) -> Any:
        # EVALSHA through execute_command: redis-py's Script objects and evalsha()
        # add layers that cost ~20% of a session read's CPU (benchmarks/session_store.py).
        sha = self._shas[script]
        try:
            return await self._execute("EVALSHA", sha, 1, key, *args)
        except redis.exceptions.NoScriptError:
            # First use on this server, or it restarted: load the script and go on.
            await self._execute("SCRIPT LOAD", script)
            return await self._execute("EVALSHA", sha, 1, key, *args)

    def key(self, session_id: str) -> str:
        return f"{self.prefix}{{{session_id}}}"

    async def _call(self, operation: Awaitable[T]) -> T:
        # The one seam where redis-py's errors become ours. No asyncio.timeout here:
        # the client's own socket timeouts bound every read and connect, and a
        # second timer per command cost ~10% of the store's CPU (benchmarks/).
        try:
            return await operation
        except TimeoutError as exc:
            raise StoreUnavailable(f"redis did not answer within {self.timeout} s") from exc
        except (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            redis.exceptions.ReadOnlyError,
            redis.exceptions.BusyLoadingError,
            OSError,
        ) as exc:
            raise StoreUnavailable(f"redis is unavailable: {exc}") from exc
        except redis.exceptions.RedisError as exc:
            raise SessionStoreError(f"redis refused the operation: {exc}") from exc

    async def load(self, session_id: str) -> SessionRecord | None:
        result = await self.load_unless(session_id, None)
        assert not isinstance(result, Unchanged)
        return result

    async def load_unless(
        self, session_id: str, version: int | None
    ) -> SessionRecord | Unchanged | None:
        """Load the session, or say `Unchanged` if its version is still ``version``."""
        known = "" if version is None else str(version)
        reply = await self._call(self._script(_LOAD, self.key(session_id), known))
        if reply is None:
            return None
        pttl = int(reply[0])
        ttl = pttl / 1000 if pttl >= 0 else None
        if len(reply) == 1:
            return Unchanged(ttl)
        raw: Sequence[bytes | str] = reply[1]
        fields: dict[str, str] = {}
        created = 0.0
        current = 0
        for i in range(0, len(raw), 2):
            name = _text(raw[i])
            if name.startswith(_DATA):
                fields[name[2:]] = _text(raw[i + 1])
            elif name == "m:c":
                created = int(raw[i + 1]) / 1000
            elif name == "m:v":
                current = int(raw[i + 1])
        return SessionRecord(fields, created, current, ttl)

    async def save(
        self, session_id: str, changes: Changes, *, created: float, ttl: float, create: bool
    ) -> int | None:
        mode = "create" if create else "update"
        args = [f"{mode} {_ms(ttl)} {int(created * 1000)} {len(changes.deleted)}"]
        args.extend(_DATA + name for name in changes.deleted)
        for name, value in changes.updated.items():
            args.append(_DATA + name)
            args.append(value)
        reply = await self._call(self._script(_SAVE, self.key(session_id), *args))
        return int(reply) if reply else None

    async def touch(self, session_id: str, ttl: float) -> None:
        await self._call(self.client.pexpire(self.key(session_id), _ms(ttl)))

    async def destroy(self, session_id: str, *, ttl: float) -> None:
        await self._call(self._script(_DESTROY, self.key(session_id), _ms(ttl)))

    async def ping(self) -> None:
        await self._call(self.client.ping())

    async def aclose(self) -> None:
        if self._owns_client:
            await self.client.aclose()

    def __repr__(self) -> str:
        return f"<RedisStore prefix={self.prefix!r}>"
