"""Sessions cached in memory and written through to Redis."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from ._exceptions import StoreUnavailable
from ._redis import RedisStore, Unchanged
from ._store import Changes, SessionRecord

__all__ = ["HybridStore"]

logger = logging.getLogger("session_store")


@dataclass(slots=True)
class _Cached:
    record: SessionRecord
    expires: float  # local clock; the local copy is never served past it


@dataclass(slots=True)
class _Pending:
    """Writes Redis has not seen yet, merged per key."""

    updated: dict[str, str] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)
    created: float = 0.0
    ttl: float = 0.0

    def merge(self, changes: Changes, created: float, ttl: float) -> None:
        self.deleted.difference_update(changes.updated)
        self.deleted.update(changes.deleted)
        for name in changes.deleted:
            self.updated.pop(name, None)
        self.updated.update(changes.updated)
        self.created, self.ttl = created, ttl


def _apply(fields: dict[str, str] | SessionRecord, changes: Changes) -> dict[str, str]:
    source = fields.fields if isinstance(fields, SessionRecord) else fields
    merged = {k: v for k, v in source.items() if k not in changes.deleted}
    merged.update(changes.updated)
    return merged


class HybridStore:
    """A bounded in-memory cache in front of a `RedisStore`, for pinned clients.

    Reads come from memory while the local copy is current: one small Lua call
    compares versions and returns the session only when it changed elsewhere
    (after a failover and return), so a stale copy is never served. Writes go
    to Redis first, then to the cache.

    While Redis is unavailable the store keeps serving the sessions it has in
    memory and accepts writes to them; the writes are merged per key and pushed
    to Redis by a background task as soon as it answers again (every
    ``retry_interval`` seconds). If Redis came back without the session (a
    restart without persistence) but this process holds a live copy, the copy is
    written back, unless the session was destroyed (a tombstone says so).
    Destroying a session needs Redis: a logout is never only local.

    What a successful save promises: without ``min_replicas_ack`` on the
    `RedisStore`, that the write is in Redis, or, while Redis is unavailable, in
    this process's memory and on its way to Redis (lost if this process dies
    first). With ``min_replicas_ack=N``, that it is on the primary and N replicas:
    nothing is deferred then, since memory is not a replica, and a write Redis
    cannot take or replicate in time raises `StoreUnavailable` (503) like a
    `RedisStore` would. Reads are still served from memory while Redis is away.
    """

    def __init__(
        self,
        redis: RedisStore,
        *,
        max_entries: int = 100_000,
        retry_interval: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.max_entries = max_entries
        self.retry_interval = retry_interval
        self._clock = clock
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        self._pending: dict[str, _Pending] = {}
        self._pushing: set[str] = set()  # taken out of _pending, on their way to Redis
        self._flusher: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        """How many sessions have writes that Redis has not acknowledged yet."""
        return len(self._pending.keys() | self._pushing)

    def _local(self, session_id: str) -> _Cached | None:
        cached = self._cache.get(session_id)
        if cached is None:
            return None
        if cached.expires <= self._clock():
            del self._cache[session_id]
            return None
        self._cache.move_to_end(session_id)
        return cached

    def _remember(self, session_id: str, record: SessionRecord, ttl: float) -> None:
        self._cache[session_id] = _Cached(record, self._clock() + ttl)
        self._cache.move_to_end(session_id)
        while len(self._cache) > self.max_entries:
            evicted, _ = self._cache.popitem(last=False)
            # A session with unpushed writes stays reachable through _pending.
            self._pending.pop(evicted, None)

    async def load(self, session_id: str) -> SessionRecord | None:
        cached = self._local(session_id)
        known = cached.record.version if cached else None
        try:
            result = await self.redis.load_unless(session_id, known)
        except StoreUnavailable:
            if cached is None:
                raise
            return cached.record  # degraded: Redis is down, memory still serves
        if isinstance(result, Unchanged):
            assert cached is not None
            if result.ttl is not None:
                cached.expires = self._clock() + result.ttl
                cached.record = dataclasses.replace(cached.record, ttl=result.ttl)
            return cached.record
        if result is None:
            if cached is None:
                return None
            if session_id in self._pending or session_id in self._pushing:
                return cached.record  # the flusher is about to write it back
            return await self._restore(session_id, cached)
        pending = self._pending.get(session_id)
        if pending is not None:
            # Changed elsewhere too: show our unpushed writes on top until they are pushed.
            changes = Changes(pending.updated, frozenset(pending.deleted))
            result = SessionRecord(
                _apply(dict(result.fields), changes), result.created, result.version, result.ttl
            )
        self._remember(session_id, result, result.ttl or 0.0)
        return result

    async def _restore(self, session_id: str, cached: _Cached) -> SessionRecord | None:
        """Redis lost a session we hold a live copy of: write it back, unless it was destroyed."""
        ttl = cached.expires - self._clock()
        record = cached.record
        version = await self.redis.save(
            session_id, Changes(record.fields), created=record.created, ttl=ttl, create=True
        )
        if version is None:  # a tombstone, or another instance restored it first
            self._cache.pop(session_id, None)
            return await self.load(session_id)
        restored = SessionRecord(record.fields, record.created, version, ttl)
        self._remember(session_id, restored, ttl)
        logger.info("restored session into redis from the local copy")
        return restored

    async def save(
        self, session_id: str, changes: Changes, *, created: float, ttl: float, create: bool
    ) -> int | None:
        cached = self._local(session_id)
        try:
            version = await self.redis.save(
                session_id, changes, created=created, ttl=ttl, create=create
            )
        except StoreUnavailable:
            if self.redis.min_replicas_ack:
                # Memory is no replica: nothing is deferred. The write may be on the primary
                # or nowhere; the local copy stays, and the next read that reaches Redis
                # compares versions, as after any failover.
                raise
            if cached is None and not create:
                raise
            return self._defer(session_id, changes, cached, created=created, ttl=ttl)
        if version is None:
            self._cache.pop(session_id, None)
            return None
        # Redis at `version` is exactly Redis at `version - 1` plus these changes. Only
        # a local copy of `version - 1` can be brought forward; after interleaved writes
        # the copy is dropped and the next read fetches the session whole.
        current = self._local(session_id)
        if create:
            base: dict[str, str] | None = {}
        elif current is not None and current.record.version == version - 1:
            base = dict(current.record.fields)
        else:
            base = None
        if base is None:
            self._cache.pop(session_id, None)
        else:
            record = SessionRecord(_apply(base, changes), created, version, ttl)
            self._remember(session_id, record, ttl)
        return version

    def _defer(
        self,
        session_id: str,
        changes: Changes,
        cached: _Cached | None,
        *,
        created: float,
        ttl: float,
    ) -> int:
        version = cached.record.version if cached else 0
        base = cached.record.fields if cached else {}
        record = SessionRecord(_apply(dict(base), changes), created, version, ttl)
        self._remember(session_id, record, ttl)
        self._pending.setdefault(session_id, _Pending()).merge(changes, created, ttl)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_until_done())
        return version

    async def _flush_until_done(self) -> None:
        while self._pending:
            try:
                await self.flush()
            except StoreUnavailable:
                await asyncio.sleep(self.retry_interval)  # Redis is still down: wait, then retry

    async def flush(self) -> None:
        """Push every deferred write to Redis; raises `StoreUnavailable` if it is still down."""
        for session_id in list(self._pending):
            # Taken out while it is pushed: writes deferred meanwhile start a new entry.
            pending = self._pending.pop(session_id)
            self._pushing.add(session_id)
            try:
                await self._push(session_id, pending)
            except StoreUnavailable:
                newer = self._pending.pop(session_id, None)
                if newer is not None:
                    pending.merge(
                        Changes(newer.updated, frozenset(newer.deleted)), newer.created, newer.ttl
                    )
                self._pending[session_id] = pending
                raise
            finally:
                self._pushing.discard(session_id)
            if session_id not in self._pending:
                # Other instances may have written other keys meanwhile: the next
                # read takes the merged session from Redis rather than trust ours.
                self._cache.pop(session_id, None)

    async def _push(self, session_id: str, pending: _Pending) -> None:
        changes = Changes(dict(pending.updated), frozenset(pending.deleted))
        version = await self.redis.save(
            session_id, changes, created=pending.created, ttl=pending.ttl, create=False
        )
        cached = self._local(session_id)
        if version is None and cached is not None:
            # Redis lost it (a restart without persistence): write the whole local copy.
            await self.redis.save(
                session_id,
                Changes(cached.record.fields),
                created=pending.created,
                ttl=pending.ttl,
                create=True,
            )

    async def touch(self, session_id: str, ttl: float) -> None:
        cached = self._local(session_id)
        if cached is not None:
            cached.expires = self._clock() + ttl
        with contextlib.suppress(StoreUnavailable):
            await self.redis.touch(session_id, ttl)

    async def destroy(self, session_id: str, *, ttl: float) -> None:
        await self.redis.destroy(session_id, ttl=ttl)
        self._cache.pop(session_id, None)
        self._pending.pop(session_id, None)

    async def ping(self) -> None:
        await self.redis.ping()

    async def aclose(self) -> None:
        if self._flusher is not None:
            # Last chance to push deferred writes before the process goes.
            with contextlib.suppress(StoreUnavailable):
                await self.flush()
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self.redis.aclose()

    def __repr__(self) -> str:
        return f"<HybridStore [{len(self._cache)} cached, {len(self._pending)} pending]>"
