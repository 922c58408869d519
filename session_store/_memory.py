"""Sessions in this process's memory, bounded in count and expiring."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Collection

from ._store import Changes, SessionRecord

__all__ = ["MemoryStore"]


class _Entry:
    __slots__ = ("created", "expires", "fields", "version")

    def __init__(self, fields: dict[str, str], created: float, version: int, expires: float):
        # Replaced, never mutated, on save: a record handed out earlier stays as it was
        # loaded, which is what the middleware diffs against.
        self.fields = fields
        self.created = created
        self.version = version
        self.expires = expires


class MemoryStore:
    """Sessions in a dict, in least-recently-used order.

    At most ``max_entries`` sessions are kept; beyond that the least recently
    used one is evicted. Expired sessions are dropped when they are read and
    swept from the old end when new ones are added. Sessions die with the
    process: this is the store of the `sticky` mode.
    """

    def __init__(
        self, *, max_entries: int = 100_000, clock: Callable[[], float] = time.time
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._users: dict[str, dict[str, float]] = {}  # user id -> session id -> deadline

    def __len__(self) -> int:
        return len(self._entries)

    def _live(self, session_id: str, now: float) -> _Entry | None:
        entry = self._entries.get(session_id)
        if entry is None:
            return None
        if entry.expires <= now:
            del self._entries[session_id]
            return None
        self._entries.move_to_end(session_id)
        return entry

    async def load(self, session_id: str) -> SessionRecord | None:
        now = self._clock()
        entry = self._live(session_id, now)
        if entry is None:
            return None
        return SessionRecord(entry.fields, entry.created, entry.version, entry.expires - now)

    async def save(
        self, session_id: str, changes: Changes, *, created: float, ttl: float, create: bool
    ) -> int | None:
        now = self._clock()
        entry = self._live(session_id, now)
        if create:
            if entry is not None:
                return None
            self._sweep(now)
            self._entries[session_id] = _Entry(dict(changes.updated), created, 1, now + ttl)
            return 1
        if entry is None:
            return None
        fields = {k: v for k, v in entry.fields.items() if k not in changes.deleted}
        fields.update(changes.updated)
        entry.fields = fields
        entry.version += 1
        entry.expires = now + ttl
        return entry.version

    def _sweep(self, now: float) -> None:
        # Amortised: a few expired entries from the least recently used end, then
        # evict down to the bound.
        for _ in range(4):
            if not self._entries:
                break
            oldest_id, oldest = next(iter(self._entries.items()))
            if oldest.expires > now:
                break
            del self._entries[oldest_id]
        while len(self._entries) >= self.max_entries:
            self._entries.popitem(last=False)

    async def touch(self, session_id: str, ttl: float) -> None:
        now = self._clock()
        entry = self._live(session_id, now)
        if entry is not None:
            entry.expires = now + ttl

    async def destroy(self, session_id: str, *, ttl: float) -> None:
        # One process holds the only copy: deleting it is enough, since a later
        # update of a missing session is refused.
        self._entries.pop(session_id, None)

    async def bind_user(self, session_id: str, user_id: str, *, ttl: float) -> None:
        now = self._clock()
        bound = self._users.setdefault(user_id, {})
        for gone in [s for s, deadline in bound.items() if deadline <= now]:
            del bound[gone]
        bound[session_id] = now + ttl
        if len(self._users) > 2 * self.max_entries:
            # Users whose sessions were all evicted or destroyed: dropped, amortised (the
            # next sweep is at least max_entries bindings away), so the index stays bounded.
            kept: dict[str, dict[str, float]] = {}
            for user, sessions in self._users.items():
                live = {s: d for s, d in sessions.items() if s in self._entries}
                if live:
                    kept[user] = live
            self._users = kept

    async def user_session_ids(self, user_id: str) -> list[str]:
        now = self._clock()
        return [s for s, deadline in self._users.get(user_id, {}).items() if deadline > now]

    async def unbind_user(self, user_id: str, session_ids: Collection[str]) -> None:
        bound = self._users.get(user_id)
        if bound is None:
            return
        for session_id in session_ids:
            bound.pop(session_id, None)
        if not bound:
            del self._users[user_id]

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        self._entries.clear()
        self._users.clear()

    def __repr__(self) -> str:
        return f"<MemoryStore [{len(self._entries)}/{self.max_entries} sessions]>"
