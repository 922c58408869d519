"""The store interface every session store implements, and the values it trades in."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

__all__ = ["Changes", "SessionRecord", "SessionStore", "VersionedStore"]


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """A session as a store holds it.

    ``fields`` maps each session key to the JSON text of its value: stores never
    parse values, and comparing texts is how the middleware finds what changed.
    """

    fields: Mapping[str, str]
    created: float  # seconds since the epoch, when the session was first saved
    version: int  # bumped by every save; a cache compares it to know it is current
    ttl: float | None = None  # seconds left before it expires untouched, if the store knows


@dataclass(frozen=True, slots=True)
class Changes:
    """What one request changed: keys set (to JSON texts) and keys deleted."""

    updated: Mapping[str, str] = field(default_factory=dict)
    deleted: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.updated or self.deleted)


class SessionStore(Protocol):
    """Where sessions live. Every method raises `SessionStoreError` (most often
    `StoreUnavailable`) when the store cannot do its job, and nothing else.

    Writes are per key and atomic: two requests of one client that change
    different keys both keep their change, and a destroyed session is never
    brought back by a request that loaded it before it was destroyed.
    """

    async def load(self, session_id: str) -> SessionRecord | None:
        """The session, or None if it does not exist, expired or was destroyed."""
        ...

    async def save(
        self, session_id: str, changes: Changes, *, created: float, ttl: float, create: bool
    ) -> int | None:
        """Apply ``changes`` in one atomic step and make the session expire in ``ttl`` seconds.

        ``create=True``: the session must not exist yet (a new id, or a regenerated
        one). ``create=False``: it must still exist. Returns the new version, or
        None when that condition does not hold, in which case nothing was written.
        """
        ...

    async def touch(self, session_id: str, ttl: float) -> None:
        """Make an existing session expire in ``ttl`` seconds; no-op if it is gone."""
        ...

    async def destroy(self, session_id: str, *, ttl: float) -> None:
        """Delete the session, and remember for ``ttl`` seconds that it was destroyed
        so that no cache and no concurrent request brings it back."""
        ...

    async def ping(self) -> None:
        """Return if the store can serve requests; raise `StoreUnavailable` if not."""
        ...

    async def aclose(self) -> None:
        """Release connections and tasks. The store is unusable afterwards."""
        ...


@runtime_checkable
class VersionedStore(Protocol):
    """A store that may serve a cached copy (`HybridStore`): the middleware hands it the
    version the client last saw written (its version cookie), so that a copy older than
    that is never served, whichever instance the client reaches next."""

    async def load_at_least(self, session_id: str, version: int) -> SessionRecord | None:
        """`SessionStore.load`, never from a copy older than ``version``."""
        ...
