"""Sessions cached in memory and written through to Redis.

This instance's own saves keep its copy trusted (issue 16: the first read after each
write asked Redis, 0.11 round trips a read in ``demo_app.compare --reads 9``). Client
tracking in BCAST mode sends every write's key to every tracker, the writer's own
included, so the save's invalidation must not evict the copy the save's reply describes;
and it must still evict it for any other write. Why the obvious design is not enough,
and the argument for this one:

- Counting expected invalidations fails: Redis batches the keys one event-loop cycle
  wrote into one message per prefix, each key once. Two saves of one session that land
  in the same cycle (ours and another's) make one message, and a count of one consumes
  it: measured, 76 of 300 pairs of simultaneous saves came as one message.
- So the save script (`_redis`) also sets and deletes ``<key>#<new version>``: each save's
  message names the version it made, and two saves in one message name two versions (a
  destroy names ``<key>#x``: a logout batched with our save is not taken for it).
- A save's reply gives its new version v; the copy it installs is Redis' session at v only
  when this instance held v - 1 (Redis at v is v - 1 plus this save's changes) or the save
  created the session. It is trusted (served without asking Redis) only if, from the send
  to the reply, no other save of the session was in flight here, the tracker's epoch did
  not change, and every invalidation of the session in that time was the one message that
  names only v. If that message has not come yet, v is awaited: the next message of the
  session is consumed only if it names exactly the session and v, and anything else
  (another version, a destroy's x, the key alone: a touch, an expiry, a write outside
  this library's scripts) takes the trust away as any foreign write does. Every message of a
  session while a save of it is in flight also takes the trust of the copy before it away
  (it may be another's write), and in-flight fills are spoiled by every message and by
  every save sent meanwhile, so no reply older than the save replaces the copy trusted.
- Sound because a write that ran after ours is in our save's message (naming a second
  version, or being a non-save write of the same key in the same cycle: see below) or in
  a later one, which arrives after it and is never consumed. A failed or timed-out save
  installs nothing trusted and untrusts the copy; its message, if it ran, finds nothing
  awaiting it and untrusts again. A new epoch (a lost connection) makes every trusted copy
  untrusted; what was awaited is cleared with it.
- What it does not see: a write by something other than this library's scripts (a
  hand-made HSET, an eviction) that Redis runs in the same event-loop cycle as, and after,
  this instance's save of the same session; its key is in the same message, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from ._exceptions import StoreUnavailable
from ._redis import RedisStore, Unchanged
from ._store import Changes, SessionRecord
from ._tracking import Tracking, tracker_for

__all__ = ["HybridStore"]

logger = logging.getLogger("session_store")

# The version of a local copy that may differ from every version Redis holds: Redis never
# answers "unchanged" to it, so the next read that reaches Redis fetches the session whole.
_UNKNOWN = -1
_UNTRUSTED = -1  # no tracker epoch: the copy is checked with Redis before it is served


@dataclass(slots=True)
class _Cached:
    record: SessionRecord
    expires: float  # local clock; the local copy is never served past it
    # The tracker's epoch under which this copy was found current in Redis, with no
    # invalidation of it since: served without asking Redis while that epoch lasts.
    trusted: int = _UNTRUSTED


@dataclass(slots=True)
class _Writing:
    """This instance's saves of one session in flight (see the module doc)."""

    count: int = 0
    marker: int | None = None  # the version named by the one message seen meanwhile
    spoiled: bool = False  # another message came, or two saves overlapped


@dataclass(slots=True)
class _Pending:
    """Writes Redis has not seen yet, merged per key, and the whole local copy they make.

    ``fields`` is what the session holds with these writes (and every earlier one)
    applied: written whole if Redis turns out to have lost the session, so the flusher
    never depends on the cache, which may evict or drop its entry meanwhile.
    """

    fields: dict[str, str]
    created: float
    ttl: float
    updated: dict[str, str] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)

    def merge(self, changes: Changes, fields: dict[str, str], created: float, ttl: float) -> None:
        """Add later writes; ``fields`` is the local copy with them applied."""
        self.deleted.difference_update(changes.updated)
        self.deleted.update(changes.deleted)
        for name in changes.deleted:
            self.updated.pop(name, None)
        self.updated.update(changes.updated)
        self.fields, self.created, self.ttl = fields, created, ttl

    @property
    def changes(self) -> Changes:
        return Changes(dict(self.updated), frozenset(self.deleted))


def _apply(fields: dict[str, str] | SessionRecord, changes: Changes) -> dict[str, str]:
    source = fields.fields if isinstance(fields, SessionRecord) else fields
    merged = {k: v for k, v in source.items() if k not in changes.deleted}
    merged.update(changes.updated)
    return merged


class HybridStore:
    """A bounded in-memory cache in front of a `RedisStore`, for pinned clients.

    Reads come from memory while the local copy is current. With ``tracking=True`` (the
    default; one server, Sentinel or Cluster) a copy that Redis client tracking vouches
    for is served with no Redis call at all (`_tracking`, docs/session_store.md); otherwise
    one small Lua call compares versions and returns the session only when it changed
    elsewhere (after a failover and return), so a stale copy is never served. Writes
    go to Redis first, then to the cache.

    While Redis is unavailable the store keeps serving the sessions it has in
    memory and accepts writes to them; the writes are merged per key and pushed
    to Redis by a background task as soon as it answers again (tried every
    ``retry_interval`` seconds, and at once when any call reaches Redis). Until
    they are pushed, every later write of that session queues behind them, so
    Redis sees one session's writes in the order they were made. If Redis came
    back without the session (a restart without persistence) but this process
    holds a live copy, the copy is written back, unless the session was
    destroyed (a tombstone says so): on a read, on a write, and in the flusher,
    whichever reaches Redis first. Destroying a session needs Redis: a logout is
    never only local.

    What a successful save promises: without ``min_replicas_ack`` on the
    `RedisStore`, that the write is in Redis, or, while Redis is unavailable (or
    the session still has writes queued for it), in this process's memory and on
    its way to Redis (lost if this process dies first). With
    ``min_replicas_ack=N``, that it is on the primary and N replicas: nothing is
    deferred then, since memory is not a replica, and a write Redis cannot take
    or replicate in time raises `StoreUnavailable` (503) like a `RedisStore`
    would. Reads are still served from memory while Redis is away.
    """

    def __init__(
        self,
        redis: RedisStore,
        *,
        max_entries: int = 100_000,
        retry_interval: float = 1.0,
        tracking: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        # Server-assisted client tracking (`_tracking`): reads of a copy Redis has not
        # invalidated are served from memory, on one server, a Sentinel or a Cluster.
        self.tracker: Tracking | None = (
            tracker_for(redis.client, redis.prefix, self._invalidated) if tracking else None
        )
        self._key_start = f"{redis.prefix}{{"
        self.hits = 0  # reads served from memory without a Redis round trip
        self._invalidations = 0  # invalidations received, a sequence number for fills
        self._flushed_at = 0  # the sequence number of the last flush (FLUSHDB)
        self._filling: dict[str, int] = {}  # session id -> loads from Redis in flight
        self._invalidated_at: dict[str, int] = {}  # of the sessions being filled
        self._writing: dict[str, _Writing] = {}  # session id -> own saves in flight
        # session id -> the version of an own save whose copy is trusted and whose
        # invalidation has not come yet; all made under tracker epoch _awaiting_epoch.
        self._awaiting: dict[str, int] = {}
        self._awaiting_epoch = _UNTRUSTED
        self.max_entries = max_entries
        self.retry_interval = retry_interval
        self._clock = clock
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        self._pending: dict[str, _Pending] = {}
        self._pushing: set[str] = set()  # taken out of _pending, on their way to Redis
        self._flusher: asyncio.Task[None] | None = None
        self._redis_answered = asyncio.Event()  # wakes the flusher before its retry interval

    @property
    def pending(self) -> int:
        """How many sessions have writes that Redis has not acknowledged yet."""
        return len(self._pending.keys() | self._pushing)

    def _queued(self, session_id: str) -> bool:
        return session_id in self._pending or session_id in self._pushing

    def _answered(self) -> None:
        """A call reached Redis: if writes wait for it, push them now, not a retry later."""
        if self._pending:
            self._redis_answered.set()

    def _local(self, session_id: str, now: float | None = None) -> _Cached | None:
        """The copy of ``session_id`` if it has not expired by ``now`` (default: the clock)."""
        cached = self._cache.get(session_id)
        if cached is None:
            return None
        if cached.expires <= (self._clock() if now is None else now):
            del self._cache[session_id]
            return None
        self._cache.move_to_end(session_id)
        return cached

    def _remember(self, session_id: str, record: SessionRecord, ttl: float) -> None:
        self._cache[session_id] = _Cached(record, self._clock() + ttl)
        self._cache.move_to_end(session_id)
        while len(self._cache) > self.max_entries:
            # A session with queued writes keeps them: its _Pending holds its whole copy.
            self._cache.popitem(last=False)

    def _invalidated(self, keys: Sequence[str] | None) -> None:
        """The tracker's news: these keys were written by someone (None: all were flushed)."""
        self._invalidations += 1
        if keys is None:
            # FLUSHDB or FLUSHALL: the sessions are gone on purpose, so are our copies
            # (those with writes still queued keep them: the flusher writes them back).
            self._flushed_at = self._invalidations
            self._awaiting.clear()
            for saves in self._writing.values():
                saves.spoiled = True
            for session_id in list(self._cache):
                if self._queued(session_id):
                    self._cache[session_id].trusted = _UNTRUSTED
                else:
                    del self._cache[session_id]
            return
        start = self._key_start
        # Session id -> what this message names after the session's key and a "#": a save's
        # new version, "x" for a destroy (see the module doc); and whether it names the key.
        written: dict[str, list[str]] = {}
        bare: set[str] = set()
        for key in keys:
            if not key.startswith(start):
                continue  # another key under the prefix
            if key.endswith("}"):
                session_id = key[len(start) : -1]
                bare.add(session_id)
                written.setdefault(session_id, [])
                continue
            session_id, brace, mark = key[len(start) :].rpartition("}#")
            if brace:
                written.setdefault(session_id, []).append(mark)
        for session_id, marks in written.items():
            own = session_id in bare and len(marks) == 1 and marks[0].isascii()
            own = own and marks[0].isdigit()  # ASCII digits only: int() takes them all
            awaited = self._awaiting.pop(session_id, None)
            if own and awaited == int(marks[0]):
                continue  # our own save's, whose reply installed the copy it describes
            writing = self._writing.get(session_id)
            if writing is not None:
                if own and awaited is None and writing.marker is None:
                    writing.marker = int(marks[0])  # ours if the reply names it
                else:
                    writing.spoiled = True
            cached = self._cache.get(session_id)
            if cached is not None:
                cached.trusted = _UNTRUSTED
            if session_id in self._filling:
                self._invalidated_at[session_id] = self._invalidations

    async def load(self, session_id: str) -> SessionRecord | None:
        return await self.load_at_least(session_id, 0)

    async def load_at_least(self, session_id: str, version: int) -> SessionRecord | None:
        """`load`, never served from a copy older than ``version``: the version the client
        saw its last write get, from any instance (the middleware's version cookie). An
        invalidation may reach this instance after the client's next request does."""
        now = self._clock()  # one reading for the expiry check and the ttl of a hit
        cached = self._local(session_id, now)
        tracker = self.tracker
        if tracker is not None:
            if (
                cached is not None
                and cached.trusted == tracker.epoch
                and cached.record.version >= version
                and tracker.current
            ):
                self.hits += 1
                record = cached.record
                ttl = cached.expires - now
                # Built directly: dataclasses.replace cost ~3 us of a ~25 us request.
                return SessionRecord(record.fields, record.created, record.version, ttl)
            tracker.start()  # a no-op once it runs; here since __init__ has no event loop
        known = cached.record.version if cached else None
        # The fill race (issue 16: 37-71 stale copies in 2,000 writes without this): a write
        # elsewhere that lands while this load is in flight may be invalidated before the
        # reply comes, and the reply may still show the older session. Trusted only if no
        # invalidation of it, no flush and no lost tracking came in between.
        epoch = tracker.epoch if tracker is not None else _UNTRUSTED
        before = self._invalidations
        saving = session_id in self._writing  # its reply may come before the fill's
        self._filling[session_id] = self._filling.get(session_id, 0) + 1
        try:
            result = await self.redis.load_unless(session_id, known)
        except StoreUnavailable:
            if cached is None:
                raise
            return cached.record  # degraded: Redis is down, memory still serves
        finally:
            clean = (
                tracker is not None
                and not saving
                and tracker.epoch == epoch
                and self._flushed_at <= before
                and self._invalidated_at.get(session_id, 0) <= before
            )
            self._filling[session_id] -= 1
            if not self._filling[session_id]:
                del self._filling[session_id]
                self._invalidated_at.pop(session_id, None)
        self._answered()
        trusted = epoch if clean and not self._queued(session_id) else _UNTRUSTED
        if isinstance(result, Unchanged):
            assert cached is not None
            if result.ttl is not None:
                cached.expires = self._clock() + result.ttl
                cached.record = dataclasses.replace(cached.record, ttl=result.ttl)
            if cached.record.version != _UNKNOWN and self._cache.get(session_id) is cached:
                cached.trusted = trusted
            return cached.record
        if result is None:
            if cached is None:
                return None
            if self._queued(session_id):
                return cached.record  # the flusher is about to write it back
            return await self._restore(session_id, cached)
        pending = self._pending.get(session_id)
        if pending is not None:
            # Changed elsewhere too: show our unpushed writes on top until they are pushed.
            result = SessionRecord(
                _apply(dict(result.fields), pending.changes),
                result.created,
                result.version,
                result.ttl,
            )
        self._remember(session_id, result, result.ttl or 0.0)
        if pending is None:
            self._cache[session_id].trusted = trusted
        return result

    async def _restore(self, session_id: str, cached: _Cached) -> SessionRecord | None:
        """Redis lost a session we hold a live copy of: write it back, unless it was destroyed."""
        ttl = cached.expires - self._clock()
        record = cached.record
        fields = dict(record.fields)
        version = await self._write_back(session_id, fields, None, record.created, ttl)
        if version is None:  # a tombstone, or another instance restored it first
            self._cache.pop(session_id, None)
            return await self.load(session_id)
        restored = SessionRecord(fields, record.created, version, ttl)
        self._remember(session_id, restored, ttl)
        return restored

    async def save(
        self, session_id: str, changes: Changes, *, created: float, ttl: float, create: bool
    ) -> int | None:
        cached = self._local(session_id)
        if self._queued(session_id):
            # Earlier writes of this session wait for Redis: this one goes behind them,
            # or the flusher would later write older values over it.
            return self._defer(session_id, changes, cached, created=created, ttl=ttl)
        epoch = self._saving(session_id)
        try:
            version = await self.redis.save(
                session_id, changes, created=created, ttl=ttl, create=create
            )
        except StoreUnavailable:
            self._saved(session_id, None, epoch)
            if self.redis.min_replicas_ack:
                # Memory is no replica: nothing is deferred. The write may be on the primary
                # or nowhere; the local copy stays, and the next read that reaches Redis
                # compares versions, as after any failover.
                raise
            if cached is None and not create:
                raise
            return self._defer(session_id, changes, cached, created=created, ttl=ttl)
        except BaseException:
            self._saved(session_id, None, epoch)  # a cancel: it may have run or not
            raise
        trusted = self._saved(session_id, version, epoch)
        self._answered()
        if version is None and not create:
            current = self._local(session_id) or cached
            if current is not None:
                # Redis has no such session, or a tombstone: a restart without persistence
                # loses it while we hold it live, and then this write brings it back whole.
                fields = _apply(current.record, changes)
                version = await self._write_back(session_id, fields, changes, created, ttl)
                if version is not None:
                    # Not current: another request or instance may have written it back
                    # first, and then Redis holds theirs plus these changes, not ours.
                    record = SessionRecord(fields, created, _UNKNOWN, ttl)
                    self._remember(session_id, record, ttl)
                    return version
        if version is None:
            self._cache.pop(session_id, None)
            return None
        # Redis at `version` is exactly Redis at `version - 1` plus these changes. Only
        # a local copy of `version - 1` can be brought forward as it is. After interleaved
        # writes (two requests of one session) the copy keeps these changes but not its
        # version: the next read that reaches Redis fetches the session whole, and if Redis
        # goes away first, memory still serves it rather than answer 503.
        current = self._local(session_id)
        if create:
            record = SessionRecord(_apply({}, changes), created, version, ttl)
        elif current is None:
            return version
        elif current.record.version == version - 1:
            record = SessionRecord(_apply(current.record, changes), created, version, ttl)
        else:
            record = SessionRecord(_apply(current.record, changes), created, _UNKNOWN, ttl)
            trusted = _UNTRUSTED
        self._remember(session_id, record, ttl)
        if not self._queued(session_id):
            self._cache[session_id].trusted = trusted
        return version

    def _saving(self, session_id: str) -> int:
        """A save of the session is about to be sent: the tracker epoch it goes under."""
        writing = self._writing.get(session_id)
        if writing is None:
            writing = self._writing[session_id] = _Writing()
        else:
            writing.spoiled = True  # two in flight: whose message is whose is unknown
        writing.count += 1
        if session_id in self._filling:
            # A fill in flight may read the session before this save and reply after it.
            self._invalidated_at[session_id] = self._invalidations + 1
        return self.tracker.epoch if self.tracker is not None else _UNTRUSTED

    def _saved(self, session_id: str, version: int | None, epoch: int) -> int:
        """A save sent under ``epoch`` came back with ``version`` (None: it failed, made
        nothing, or its outcome is unknown): the epoch under which the copy its reply
        describes may be trusted, or _UNTRUSTED (and the copy held is untrusted too)."""
        writing = self._writing[session_id]
        writing.count -= 1
        if not writing.count:
            del self._writing[session_id]
        tracker = self.tracker
        if (
            version is None
            or tracker is None
            or tracker.epoch != epoch
            or writing.spoiled
            or writing.marker not in (None, version)
        ):
            cached = self._cache.get(session_id)
            if cached is not None:
                cached.trusted = _UNTRUSTED
            return _UNTRUSTED
        if writing.marker is None:  # its message is still to come: consumed when it does
            if self._awaiting_epoch != epoch:
                self._awaiting.clear()  # a lost connection lost those messages
                self._awaiting_epoch = epoch
            self._awaiting[session_id] = version
        return epoch

    async def _write_back(
        self,
        session_id: str,
        fields: dict[str, str],
        changes: Changes | None,
        created: float,
        ttl: float,
    ) -> int | None:
        """Write a session Redis does not have (``fields``, the whole local copy), unless a
        tombstone says it was destroyed. If another request or instance wrote it back
        first, apply only ``changes`` on top of theirs (None: nothing to apply). None: it
        was destroyed, or written back by another and ``changes`` is None."""
        version = await self.redis.save(
            session_id, Changes(fields), created=created, ttl=ttl, create=True
        )
        if version is not None:
            logger.info("restored session into redis from the local copy")
            return version
        if changes is None:
            return None
        # Create refused: the key exists, as a tombstone or as someone else's write-back.
        return await self.redis.save(session_id, changes, created=created, ttl=ttl, create=False)

    def _defer(
        self,
        session_id: str,
        changes: Changes,
        cached: _Cached | None,
        *,
        created: float,
        ttl: float,
    ) -> int:
        pending = self._pending.get(session_id)
        version = cached.record.version if cached else 0
        base = cached.record.fields if cached else (pending.fields if pending else {})
        fields = _apply(dict(base), changes)
        self._remember(session_id, SessionRecord(fields, created, version, ttl), ttl)
        if pending is None:
            self._pending[session_id] = pending = _Pending(fields, created, ttl)
        pending.merge(changes, fields, created, ttl)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_until_done())
        return version

    async def _flush_until_done(self) -> None:
        while self._pending:
            self._redis_answered.clear()
            try:
                await self.flush()
            except StoreUnavailable:
                # Redis is still down: try again after the interval, or as soon as any
                # request's call reaches it.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.retry_interval):
                        await self._redis_answered.wait()

    async def flush(self) -> None:
        """Push every deferred write to Redis; raises `StoreUnavailable` if it is still down."""
        for session_id in list(self._pending):
            # Taken out while it is pushed: writes deferred meanwhile start a new entry,
            # which a later pass of the loop pushes after this one.
            pending = self._pending.pop(session_id, None)
            if pending is None:
                continue  # destroyed meanwhile
            self._pushing.add(session_id)
            try:
                await self._push(session_id, pending)
            except StoreUnavailable:
                newer = self._pending.pop(session_id, None)
                if newer is not None:
                    pending.merge(newer.changes, newer.fields, newer.created, newer.ttl)
                self._pending[session_id] = pending
                raise
            finally:
                self._pushing.discard(session_id)
            cached = self._cache.get(session_id)
            if cached is not None and session_id not in self._pending:
                # Other instances may have written other keys meanwhile: the next read
                # that reaches Redis takes the merged session rather than trust ours.
                cached.record = dataclasses.replace(cached.record, version=_UNKNOWN)

    async def _push(self, session_id: str, pending: _Pending) -> None:
        changes = pending.changes
        version = await self.redis.save(
            session_id, changes, created=pending.created, ttl=pending.ttl, create=False
        )
        if version is None:
            # Redis lost it (a restart without persistence): write the whole local copy.
            version = await self._write_back(
                session_id, dict(pending.fields), changes, pending.created, pending.ttl
            )
            if version is None:
                logger.info("dropped deferred writes of a session destroyed meanwhile")

    async def touch(self, session_id: str, ttl: float) -> None:
        cached = self._local(session_id)
        if cached is not None:
            cached.expires = self._clock() + ttl
        with contextlib.suppress(StoreUnavailable):
            await self.redis.touch(session_id, ttl)

    async def destroy(self, session_id: str, *, ttl: float) -> None:
        await self.redis.destroy(session_id, ttl=ttl)
        # A push already under way meets the tombstone and writes nothing.
        self._cache.pop(session_id, None)
        self._pending.pop(session_id, None)

    async def bind_user(self, session_id: str, user_id: str, *, ttl: float) -> None:
        # The index lives in Redis only: a logout everywhere is never only local.
        await self.redis.bind_user(session_id, user_id, ttl=ttl)

    async def user_session_ids(self, user_id: str) -> list[str]:
        return await self.redis.user_session_ids(user_id)

    async def unbind_user(self, user_id: str, session_ids: Collection[str]) -> None:
        await self.redis.unbind_user(user_id, session_ids)

    async def ping(self) -> None:
        await self.redis.ping()

    async def aclose(self) -> None:
        if self.tracker is not None:
            await self.tracker.aclose()
        if self._flusher is not None:
            # Last chance to push deferred writes before the process goes.
            with contextlib.suppress(StoreUnavailable):
                await self.flush()
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self.redis.aclose()

    def __repr__(self) -> str:
        return f"<HybridStore [{len(self._cache)} cached, {self.pending} pending]>"
