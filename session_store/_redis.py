"""Sessions in Redis: one hash per session, one field per session key.

Layout, for a session id ``S`` and the default prefix ``session:``::

    session:{S}          a hash; the braces make it one Redis Cluster slot
      m:c                created, milliseconds since the epoch
      m:v                version, bumped by every save; a create starts it at the server's
                         clock in milliseconds, not 0, so that a session written back into an
                         empty Redis never reuses a version a cache holds from before
      m:x                present only in a tombstone: the session was destroyed
      d:<key>            the JSON text of session[key]

Idle expiry is the key's TTL, refreshed by saves and by throttled touches.
Every write is one Lua script, so it is atomic and carries only the keys a
request changed: concurrent requests that change different keys all keep their
change, and a save that finds no hash (or a tombstone) where it expected one
writes nothing, so a destroyed session never comes back.

Acknowledged writes (``min_replicas_ack=N``): Redis replicates asynchronously, so
a write the primary confirmed is lost if the primary dies before a replica has
it. With N > 0 every save and destroy sends ``WAIT N ack_timeout_ms`` right
behind its script, both in one write on one connection (WAIT counts the replicas
that have everything *this connection* wrote; on a cluster, the connection to
the node that owns the session's slot), and raises `WriteNotAcknowledged` when
fewer than N replicas confirm in time. Touches do not wait: losing one only
brings an idle expiry a touch interval closer. WAIT is not strong consistency
(docs/session_store.md says what it does and does not promise).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import hiredis
import redis.asyncio
import redis.exceptions
from redis.asyncio.connection import DefaultParser
from redis.exceptions import AskError, MovedError

from redis_plumbing import RedisClient, call, parse_redis_url, redis_client

from ._exceptions import SessionStoreError, StoreUnavailable, WriteNotAcknowledged

try:
    # redis-py's private hiredis parser, which `_exchange` reads from directly: where a
    # redis-py release moves or renames it, the store uses redis-py's own send and read.
    from redis._parsers.hiredis import NOT_ENOUGH_DATA, _AsyncHiredisParser

    _LEAN_PARSER: type | None = _AsyncHiredisParser
except ImportError:  # pragma: no cover - depends on the redis-py release
    _LEAN_PARSER = None
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
# names, then field/value pairs to set. Returns the new version, or false. A saved session's
# client-tracking invalidation also names KEYS[1]#<new version>, a key set and deleted at
# once (nothing stays): Redis batches one event-loop cycle's writes into one message, each
# key once, and this name is how a HybridStore tells its own save from another's in it.
_SAVE = """
local mode, ttl, created, n = string.match(ARGV[1], '^(%a+) (%d+) (%d+) (%d+)$')
n = tonumber(n)
local exists = redis.call('EXISTS', KEYS[1]) == 1
if mode == 'create' then
  if exists then return false end
  local now = redis.call('TIME')
  redis.call('HSET', KEYS[1], 'm:c', created, 'm:v', now[1] * 1000 + math.floor(now[2] / 1000))
elseif not exists or redis.call('HEXISTS', KEYS[1], 'm:x') == 1 then
  return false
end
if n > 0 then redis.call('HDEL', KEYS[1], unpack(ARGV, 2, 1 + n)) end
if #ARGV > 1 + n then redis.call('HSET', KEYS[1], unpack(ARGV, 2 + n, #ARGV)) end
local v = redis.call('HINCRBY', KEYS[1], 'm:v', 1)
redis.call('PEXPIRE', KEYS[1], ttl)
local mark = KEYS[1] .. '#' .. v
redis.call('SET', mark, '')
redis.call('DEL', mark)
return v
"""

# KEYS[1] the hash. ARGV[1] ttl ms. Replaces the session with a tombstone. Its invalidation
# also names KEYS[1]#x (set and deleted), as a save's names its version: so that a HybridStore
# never takes a destroy batched with its own save for that save alone.
_DESTROY = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'm:x', '1')
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('SET', KEYS[1] .. '#x', '')
redis.call('DEL', KEYS[1] .. '#x')
return 1
"""

# KEYS[1] a user's index (a sorted set: session id -> deadline, ms on the server's clock).
# ARGV[1] a session id, ARGV[2] its absolute lifetime left, ms. Drops the ids past their
# deadline, adds this one, and makes the index expire with its last session.
_BIND = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], last[2])
return 1
"""

_SCRIPTS = (_LOAD, _SAVE, _DESTROY, _BIND)
_DATA = "d:"
_IDLE_MAX = 64  # pooled connections a store keeps between commands, at most
# What redis-py raises on a connection a restart or a failover closed: it has closed the
# connection too, and the next send on it connects again (`_command`).
_RETRIED = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
_UTF8 = frozenset({"utf-8", "utf8", "UTF-8", "UTF8"})
_LEAN_CONNECTIONS = (
    redis.asyncio.Connection,
    redis.asyncio.SSLConnection,
    redis.asyncio.UnixDomainSocketConnection,
)


@dataclass(frozen=True, slots=True)
class Unchanged:
    """`RedisStore.load_unless`: the caller's copy is current."""

    ttl: float | None


class _Expiry:
    """A call's deadline on its connection, armed as one loop timer (`RedisStore._command`).

    When it fires it aborts the connection's socket: the read (or a blocked write) waiting
    on it fails at once, redis-py closes the connection, and `fired` tells that failure
    from a server's own disconnect. The caller then raises TimeoutError, and the connection
    connects again before its next use: the late reply never reaches another command. No
    task is cancelled, so a cancel of the caller is never taken for the deadline's, nor
    the deadline's for the caller's."""

    __slots__ = ("connection", "fired")

    def __init__(self, connection: redis.asyncio.Connection) -> None:
        self.connection = connection
        self.fired = False

    def fire(self) -> None:
        self.fired = True
        # redis-py has no synchronous close that leaves its own read to fail and clean up;
        # its stream writer is where the socket is. abort(), not close(): close() waits to
        # flush what is buffered, to a server that may not be reading.
        writer = self.connection._writer
        if writer is not None:
            writer.transport.abort()


async def _exchange(connection: redis.asyncio.Connection, packed: bytes) -> Any:
    """Write ``packed`` (one command) and read its reply, on a connected plain connection
    whose parser is redis-py's hiredis one speaking RESP2 (`RedisStore.__init__` checks).

    What redis-py's send_packed_command and read_response do for such a connection, without
    their layers (three coroutine frames, the peer's name formatted for every read, the
    timeout and health-check bookkeeping a store without socket timeouts does not use):
    ~10,000 instructions a command (issue 16). Kept, as redis-py does: any failure but an
    error reply closes the connection (its reply stream is no longer known), a socket error
    is raised as redis-py's ConnectionError, an error reply as its exception."""
    parser: Any = connection._parser
    try:
        writer = connection._writer
        assert writer is not None  # connected: `_command` checks
        writer.write(packed)
        if writer.transport.get_write_buffer_size():
            await writer.drain()  # a large write to a slow server: wait, as redis-py does
        reader = parser._reader  # hiredis.Reader: NOT_ENOUGH_DATA while a reply is incomplete
        reply = reader.gets()
        while reply is NOT_ENOUGH_DATA:
            await parser.read_from_socket()  # EOF: ConnectionError
            reply = reader.gets()
    except OSError as exc:
        await connection.disconnect(nowait=True)
        raise redis.exceptions.ConnectionError(f"redis connection lost: {exc}") from exc
    except BaseException:
        await connection.disconnect(nowait=True)
        raise
    if isinstance(reply, redis.exceptions.ResponseError):
        raise reply  # an error reply (NOSCRIPT, ...): the connection is fine
    if isinstance(reply, redis.exceptions.ConnectionError):
        await connection.disconnect(nowait=True)  # LOADING and the like, as redis-py
        raise reply
    return reply


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _check_acks(min_replicas_ack: int, ack_timeout_ms: int, timeout: float) -> None:
    """Raise ValueError, naming the option, for acknowledgement settings that cannot work."""
    if isinstance(min_replicas_ack, bool) or not isinstance(min_replicas_ack, int):
        raise ValueError(f"min_replicas_ack must be an integer, not {min_replicas_ack!r}")
    if min_replicas_ack < 0:
        raise ValueError(f"min_replicas_ack must be 0 (off) or more, not {min_replicas_ack}")
    if isinstance(ack_timeout_ms, bool) or not isinstance(ack_timeout_ms, int):
        raise ValueError(f"ack_timeout_ms must be an integer, not {ack_timeout_ms!r}")
    # WAIT 0 would block forever; and WAIT holds the connection's read for up to
    # ack_timeout_ms, which the client's socket timeout (`timeout`) must outlast.
    if min_replicas_ack and not 0 < ack_timeout_ms < timeout * 1000:
        raise ValueError(
            f"ack_timeout_ms must be between 1 and the store's timeout ({timeout} s) in "
            f"milliseconds, exclusive, not {ack_timeout_ms}"
        )


class RedisStore:
    """Sessions in Redis (or Valkey), shared by every instance.

    ``client`` is a `redis.asyncio.Redis` or `redis.asyncio.RedisCluster` the
    caller created and will close; `RedisStore.from_url` builds one with
    `redis_client` (one server, Sentinel or Cluster) whose connect and read
    timeouts are ``timeout`` seconds, and closes it itself (a client of your own
    should set ``socket_timeout`` and ``socket_connect_timeout`` likewise: they
    are what bounds each call). A Redis that is down, loading, read-only (a
    replica during failover), failing over (a cluster slot with no primary yet)
    or too slow raises `StoreUnavailable`, never a redis-py error and never a
    hang. Every command and script names one key, the session's hash: on a
    cluster each runs on the node that owns the session's slot.

    ``min_replicas_ack=N`` (0: off, no WAIT at all): a save or destroy returns only
    once N replicas have it, and raises `WriteNotAcknowledged` (a
    `StoreUnavailable`) if they do not confirm within ``ack_timeout_ms``, which
    must be shorter than ``timeout`` (the read that waits for WAIT's reply is
    bounded by it). Raises ValueError for settings that cannot work.
    """

    def __init__(
        self,
        client: RedisClient,
        *,
        prefix: str = "session:",
        timeout: float = 1.0,
        owns_client: bool = False,
        min_replicas_ack: int = 0,
        ack_timeout_ms: int = 500,  # milliseconds
    ) -> None:
        _check_acks(min_replicas_ack, ack_timeout_ms, timeout)
        self.client = client
        self.prefix = prefix
        self.timeout = timeout
        self.min_replicas_ack = min_replicas_ack
        self.ack_timeout_ms = ack_timeout_ms
        self._owns_client = owns_client
        # WAIT must run on the connection that carried the write (see `_acknowledged`):
        # taken from the pool of one server, or of the node that owns the key's slot.
        self._pool: redis.asyncio.ConnectionPool | None = None
        self._node_for: Callable[[str], Any] | None = None
        # redis-py leaves execute_command untyped; this is the one place we say what it is.
        self._execute: Callable[..., Awaitable[Any]] = client.execute_command
        # Connections this store took from the pool and keeps between commands (see
        # `_command`), at most half the pool's, so that other users of a shared client
        # still get theirs.
        self._idle: list[redis.asyncio.Connection] = []
        self._idle_max = 0
        # What every session command goes through, given the call's deadline (loop time):
        # `_command` on one server (or a Sentinel's primary), the client's own routing on
        # a cluster (bounded by `_call`'s asyncio.timeout there).
        self._run: Callable[..., Awaitable[Any]] = self._routed
        self._pack: Callable[[tuple[str | int, ...]], Any] | None = None
        self._lean = False  # `_exchange` instead of redis-py's send and read
        if isinstance(client, redis.asyncio.RedisCluster):
            self._node_for = client.get_node_from_key
        else:
            self._pool = client.connection_pool
            self._idle_max = min(_IDLE_MAX, self._pool.max_connections // 2)
            self._run = self._command
            options = self._pool.connection_kwargs
            if (
                options.get("encoding", "utf-8") in _UTF8
                and options.get("encoding_errors", "strict") == "strict"
            ):
                # hiredis packs a command in C, as redis-py's packer ends up doing after
                # encoding each argument in Python (~4 us a command); it encodes text as
                # UTF-8, strictly, which is what redis-py does unless told otherwise.
                self._pack = hiredis.pack_command  # type: ignore[assignment]  # its stub: 1-tuples
                # Not a Sentinel's connection (its read turns READONLY from a demoted
                # primary into a reconnect), nor RESP3 (push frames), nor another parser.
                self._lean = (
                    _LEAN_PARSER is not None
                    and self._pool.connection_class in _LEAN_CONNECTIONS
                    and options.get("parser_class", DefaultParser) is _LEAN_PARSER
                    and options.get("protocol") in (None, 2, "2")
                )
        self._shas = {script: hashlib.sha1(script.encode()).hexdigest() for script in _SCRIPTS}

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "session:",
        timeout: float = 1.0,
        min_replicas_ack: int = 0,
        ack_timeout_ms: int = 500,  # milliseconds
    ) -> RedisStore:
        """A store with its own client for ``url``, any form `redis_client` reads
        (``redis://``, ``rediss://``, ``redis+sentinel://``, ``redis+cluster://``, ...);
        raises `RedisURLError` for a URL it cannot read."""
        _check_acks(min_replicas_ack, ack_timeout_ms, timeout)
        # No socket_timeout: redis-py wraps every send in a wait_for for it (~9 us of CPU a
        # request, issue 16); each call has one deadline instead (`_command`, `_call`).
        # The sentinels keep theirs: a dead one must not eat the whole deadline.
        options: dict[str, Any] = {}
        target = parse_redis_url(url)
        if target.topology != "sentinel" and "socket_timeout" not in target.options:
            options["socket_timeout"] = None
        client = redis_client(url, timeout=timeout, **options)
        return cls(
            client,
            prefix=prefix,
            timeout=timeout,
            owns_client=True,
            min_replicas_ack=min_replicas_ack,
            ack_timeout_ms=ack_timeout_ms,
        )

    def _routed(self, deadline: float, *args: str | int) -> Awaitable[Any]:
        return self._execute(*args)

    async def _command(self, deadline: float, *args: str | int) -> Any:
        """One command on one server, written and read straight on a connection of the
        client's pool, which this store keeps between commands instead of giving it back;
        raises TimeoutError once the loop's clock reaches ``deadline``.

        `execute_command` costs ~20 us of CPU more a command (issue 16: the pool's lock and
        its health check of every connection it hands out, metrics hooks, the retry
        object, the reply callbacks): half a write request's Redis cost. What it did that
        counts is done here too: redis-py closes a connection on any error but an error
        reply (and on a cancel), so a kept connection is clean or closed, and a closed one
        connects again before its next send (to the primary a Sentinel names now); a command
        that finds its connection closed under it (a restart, a failover) is sent once
        more, as the client's one retry did.

        The deadline: on a connected connection (every command but a store's first ones),
        one loop timer (`_Expiry`) aborts the socket at ``deadline`` and is cancelled when
        the reply is in; an asyncio.timeout costs ~28,000 instructions a call more
        (issue 16). What may wait on a connect (a new or closed connection, the pool's
        own) runs under asyncio.timeout_at(deadline), as rare as connects are."""
        pool = self._pool
        assert pool is not None  # `_run` is `_command` only on one server
        if self._idle:
            connection = self._idle.pop()
        else:
            async with asyncio.timeout_at(deadline):
                connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        packed: Any = self._pack(args) if self._pack is not None else connection.pack_command(*args)
        try:
            if connection.is_connected:
                expiry = _Expiry(connection)
                timer = asyncio.get_running_loop().call_at(deadline, expiry.fire)
                try:
                    if self._lean:
                        return await _exchange(connection, packed)
                    await connection.send_packed_command(packed, check_health=False)
                    return await connection.read_response()
                except _RETRIED:
                    if expiry.fired:
                        raise TimeoutError from None
                    # Closed under it (a restart, a failover): connect again, below.
                finally:
                    timer.cancel()
                    if expiry.fired and connection.is_connected:
                        # The reply came in the very loop cycle the timer fired in: it
                        # was read, but the socket is aborted under redis-py's feet.
                        await connection.disconnect(nowait=True)
            # connect(), not the send's own reconnect: a Sentinel's connection asks the
            # sentinels where the primary is now only in connect().
            async with asyncio.timeout_at(deadline):
                await connection.connect()  # type: ignore[no-untyped-call]  # redis-py
                await connection.send_packed_command(packed, check_health=False)
                return await connection.read_response()
        finally:
            if len(self._idle) < self._idle_max:
                self._idle.append(connection)
            else:
                await pool.release(connection)

    async def _script(self, script: str, key: str, *args: str | int) -> Any:
        # EVALSHA through `_command` (one server) or execute_command (a cluster): redis-py's
        # Script objects and evalsha() add layers that cost ~20% of a session read's CPU
        # (docs/architecture.md, "Measured facts").
        # One deadline for both sends: a NOSCRIPT reply does not buy the call more time.
        deadline = asyncio.get_running_loop().time() + self.timeout
        sha = self._shas[script]
        try:
            return await self._run(deadline, "EVALSHA", sha, 1, key, *args)
        except redis.exceptions.NoScriptError:
            # First use on this server, or it restarted, or a replica was promoted (the
            # script cache is not replicated): EVAL runs the script and caches it on the
            # node that owns the key, where SCRIPT LOAD would go to every cluster primary.
            return await self._run(deadline, "EVAL", script, 1, key, *args)

    def _write(self, script: str, key: str, *args: str | int) -> Awaitable[Any]:
        """Run a writing script; with ``min_replicas_ack``, only return once replicas have it.

        A plain function that hands back the coroutine: with the option off, a write costs
        exactly what it did before the option existed, not one coroutine frame more."""
        if not self.min_replicas_ack:
            return self._bounded(self._script(script, key, *args))
        return self._call(self._acknowledged(script, key, *args))

    async def _acknowledged(self, script: str, key: str, *args: str | int) -> Any:
        # The script and WAIT go out together on one connection: WAIT counts the replicas
        # that have every write of the connection it runs on, and that must be the script's.
        command: tuple[str | int, ...] = ("EVALSHA", self._shas[script], 1, key, *args)
        # At most three sends: a cluster failover can answer MOVED (the slot's new primary)
        # and then NOSCRIPT (whose script cache was not replicated), one each.
        redirected = False
        while True:
            if self._pool is not None:
                reply, acked = await self._send_with_wait(self._pool, command)
            else:
                reply, acked = await self._send_with_wait_on_node(command, key)
            if isinstance(reply, redis.exceptions.NoScriptError) and command[0] == "EVALSHA":
                command = ("EVAL", script, 1, key, *args)  # as `_script` does
                continue
            if isinstance(reply, (MovedError, AskError)):
                if redirected:
                    break
                redirected = True
                # The slot moved (a resharding, a cluster failover): a keyed command through
                # the client's own routing follows the redirect and updates its slot map.
                # (WAIT's own error, when the node is a replica now, says nothing more.)
                await self._execute("EXISTS", key)
                continue
            if isinstance(reply, Exception):
                raise reply
            if isinstance(acked, Exception):
                raise acked
            if reply and int(acked) < self.min_replicas_ack:
                # A script that wrote nothing (it returned false) has nothing to lose.
                raise WriteNotAcknowledged(int(acked), self.min_replicas_ack, self.ack_timeout_ms)
            return reply
        raise StoreUnavailable(f"redis kept redirecting the write of {key!r} (a slot migration?)")

    async def _send_with_wait(
        self, pool: redis.asyncio.ConnectionPool, command: tuple[str | int, ...]
    ) -> tuple[Any, Any]:
        """One server (or the primary a Sentinel names): both commands on one pooled
        connection, written at once. A pipeline object would do the same for ~110 us
        more CPU a write; this costs ~25 us over a write without WAIT (docs/architecture.md,
        "Measured facts")."""
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]  # redis-py
        try:
            # redis-py disconnects on a timeout or a broken read, so the pool gets
            # back either a clean connection or a closed one.
            return await self._with_wait(connection, command)
        finally:
            await pool.release(connection)

    async def _with_wait(
        self, connection: redis.asyncio.Connection, command: tuple[str | int, ...]
    ) -> tuple[Any, Any]:
        """Write ``command`` and ``WAIT`` at once on ``connection``; both replies, each an
        exception object when it is an error reply (NOSCRIPT, MOVED; a WAIT sent to a node
        that a failover made a replica is refused)."""
        wait = ("WAIT", self.min_replicas_ack, self.ack_timeout_ms)
        await connection.send_packed_command(connection.pack_commands((command, wait)))
        replies: list[Any] = []
        for _ in range(2):
            try:
                replies.append(await connection.read_response())
            except redis.exceptions.ResponseError as exc:
                replies.append(exc)  # an error reply: the next one still follows
        return replies[0], replies[1]

    async def _send_with_wait_on_node(
        self, command: tuple[str | int, ...], key: str
    ) -> tuple[Any, Any]:
        """A cluster: both commands on one connection of the node that owns the key's slot,
        as `_send_with_wait` does on one server (keyless, WAIT would go to any primary).
        Not redis-py's cluster pipeline: on a dead node it closes the whole client, under
        the feet of every other request in flight. A MOVED reply goes up to
        `_acknowledged`, which refreshes the slot map and tries again; a node that does not
        answer makes the client reload its slot map, since a failover may have moved it."""
        assert self._node_for is not None
        # A new client (or one that lost a node) has no slot map until this loads it.
        await self.client.initialize()  # a RedisCluster here
        node = self._node_for(key)
        connection = node.acquire_connection()
        try:
            return await self._with_wait(connection, command)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
            await connection.disconnect()
            # The client's own routing marks the node failed and reloads the slot map on
            # its next command; this keyed command is that one (it fails too, for now).
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                await self._execute("EXISTS", key)
            raise
        finally:
            node.release(connection)

    def key(self, session_id: str) -> str:
        return f"{self.prefix}{{{session_id}}}"

    def _bounded(self, operation: Awaitable[T]) -> Awaitable[T]:
        """`_call` for an operation that runs through `_run`: on one server `_command`
        bounds it by its own deadline (and its TimeoutError becomes `StoreUnavailable`
        in `call`), so it needs no asyncio.timeout around it; on a cluster it does."""
        if self._pool is None:
            return self._call(operation)
        return call(
            operation,
            unavailable=StoreUnavailable,
            refused=SessionStoreError,
            client_timeout=self.timeout,
        )

    async def _call(self, operation: Awaitable[T]) -> T:
        # The one seam where redis-py's errors become ours (redis_plumbing.call), and
        # where each call's deadline is: one timer, where socket timeouts cost a wait_for
        # on every send. A cancel is not lost: asyncio.timeout tells its own from others.
        # (The session commands on one server have a cheaper deadline: `_bounded`.)
        try:
            async with asyncio.timeout(self.timeout):
                return await call(
                    operation,
                    unavailable=StoreUnavailable,
                    refused=SessionStoreError,
                    client_timeout=self.timeout,
                )
        except TimeoutError as exc:
            # redis-py closed the connection it was cut off on: the pool stays clean.
            raise StoreUnavailable(f"redis did not answer within {self.timeout} s") from exc

    async def load(self, session_id: str) -> SessionRecord | None:
        result = await self.load_unless(session_id, None)
        assert not isinstance(result, Unchanged)
        return result

    async def load_unless(
        self, session_id: str, version: int | None
    ) -> SessionRecord | Unchanged | None:
        """Load the session, or say `Unchanged` if its version is still ``version``."""
        known = "" if version is None else str(version)
        reply = await self._bounded(self._script(_LOAD, self.key(session_id), known))
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
        reply = await self._write(_SAVE, self.key(session_id), *args)
        return int(reply) if reply else None

    async def touch(self, session_id: str, ttl: float) -> None:
        deadline = asyncio.get_running_loop().time() + self.timeout
        await self._bounded(self._run(deadline, "PEXPIRE", self.key(session_id), _ms(ttl)))

    async def destroy(self, session_id: str, *, ttl: float) -> None:
        await self._write(_DESTROY, self.key(session_id), _ms(ttl))

    def user_key(self, user_id: str) -> str:
        """The user's index: its own prefix, so that it never shares a name (nor a client
        tracking prefix) with a session's hash; one slot per user on a cluster."""
        return f"{self.prefix.rstrip(':')}-user:{{{user_id}}}"

    async def bind_user(self, session_id: str, user_id: str, *, ttl: float) -> None:
        # A write like a save: with min_replicas_ack it waits for replicas too, or a
        # failover could lose the binding and the session escape a logout everywhere.
        await self._write(_BIND, self.user_key(user_id), session_id, _ms(ttl))

    async def user_session_ids(self, user_id: str) -> list[str]:
        ids = await self._call(self._execute("ZRANGE", self.user_key(user_id), 0, -1))
        return [_text(s) for s in ids]

    async def unbind_user(self, user_id: str, session_ids: Collection[str]) -> None:
        if session_ids:
            await self._call(self._execute("ZREM", self.user_key(user_id), *session_ids))

    async def ping(self) -> None:
        await self._call(self.client.ping())

    async def aclose(self) -> None:
        # The kept connections go back to the pool, which closes them with the client (or
        # keeps them for a caller's client that outlives this store).
        while self._idle:
            await self._pool.release(self._idle.pop())  # type: ignore[union-attr]
        if self._owns_client:
            await self.client.aclose()

    def __repr__(self) -> str:
        return f"<RedisStore prefix={self.prefix!r}>"
