"""Sessions by user: bind a session to a user id, list a user's sessions, log out everywhere.

As Spring Session's ``FindByIndexNameSessionRepository.findByPrincipalName``: the store keeps
an index, user id -> the ids of the sessions bound to it, beside the sessions themselves.

The index is a superset, never a subset, of a user's live sessions: a session is bound
after it is stored (at the end of the request that called `bind_user`), and it leaves the
index only when it is found gone (`user_sessions`, `logout_everywhere`) or when its
absolute lifetime is over. Logging out everywhere destroys each listed session with a
tombstone, as a logout does, so that no request in flight and no cached copy (a
`HybridStore` on another instance) brings one back. On a Redis Cluster the index is one
key (one slot, the user's) and each session is destroyed on its own slot: not one atomic
step, and it need not be, since each destroy is. What it does not cover: a session bound
after the listing (a login that finished while the logout ran) is newer than the logout
and stays; a binding lost with a primary that failed over before a replica had it (set
``min_replicas_ack`` to have the binding wait for replicas as session writes do).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol, runtime_checkable

from starlette.requests import HTTPConnection

from ._exceptions import SessionError
from ._session import Session, session_of
from ._store import SessionRecord, SessionStore

__all__ = ["UserIndex", "bind_user", "logout_everywhere", "user_sessions"]


@runtime_checkable
class UserIndex(Protocol):
    """What a store implements to find sessions by user (every store of this package does)."""

    async def bind_user(self, session_id: str, user_id: str, *, ttl: float) -> None:
        """Add the session to the user's index for ``ttl`` seconds (the session's
        absolute lifetime left: it cannot live longer)."""
        ...

    async def user_session_ids(self, user_id: str) -> list[str]:
        """The ids bound to the user and not past their ``ttl``; some may be gone."""
        ...

    async def unbind_user(self, user_id: str, session_ids: Collection[str]) -> None:
        """Remove these ids from the user's index."""
        ...


def _check_user_id(user_id: object) -> str:
    if not isinstance(user_id, str) or not user_id:
        raise ValueError(f"user_id must be a non-empty string, not {user_id!r}")
    return user_id


def bind_user(target: Session | HTTPConnection, user_id: str) -> None:
    """Bind the session to ``user_id`` when this request saves it (its id is final then:
    call it beside ``session.regenerate()`` at login). A session with nothing in it is not
    saved, so not bound. Raises ValueError for an empty or non-string ``user_id``; the save
    raises `SessionError` if the store keeps no `UserIndex`."""
    session = session_of(target)
    session.bind_to = _check_user_id(user_id)
    session.mark_modified()  # the cookie goes out again, as for any change at login


def _indexed(store: SessionStore) -> UserIndex:
    if not isinstance(store, UserIndex):
        raise SessionError(f"{store!r} keeps no index of sessions by user (bind_user)")
    return store


async def user_sessions(store: SessionStore, user_id: str) -> dict[str, SessionRecord]:
    """The user's live sessions, by id; ids found gone are dropped from the index.

    Raises `SessionError` if the store keeps no `UserIndex`, `StoreUnavailable` if it
    cannot be reached."""
    index = _indexed(store)
    ids = await index.user_session_ids(_check_user_id(user_id))
    found: dict[str, SessionRecord] = {}
    gone: list[str] = []
    for session_id in ids:
        record = await store.load(session_id)
        if record is None:
            gone.append(session_id)
        else:
            found[session_id] = record
    if gone:
        await index.unbind_user(user_id, gone)
    return found


async def logout_everywhere(
    store: SessionStore | Session | HTTPConnection,
    user_id: str,
    *,
    keep: Collection[str] | None = None,
    ttl: float | None = None,  # seconds the tombstones last
) -> list[str]:
    """Destroy every session bound to ``user_id`` but those in ``keep``; return the ids
    destroyed (each now a tombstone; some may have been gone already).

    Given the request (``logout_everywhere(request, user_id)``) or its session (FastAPI's
    ``SessionDep``), the store and the
    tombstones' lifetime are the middleware's (its ``idle_timeout``: no cached copy
    outlives it) and the request's own session is kept. Given a store, ``ttl`` is
    required: at least the middleware's ``idle_timeout``. Raises `SessionError` if the
    store keeps no `UserIndex`, `StoreUnavailable` if it cannot be reached (some sessions
    may be destroyed already: call it again)."""
    _check_user_id(user_id)
    if isinstance(store, Session | HTTPConnection):
        session = session_of(store)
        if session.middleware is None:
            raise SessionError("this session has no middleware to log out with")
        if keep is None:
            keep = () if session.id is None else (session.id,)
        ttl = session.middleware.idle_timeout if ttl is None else ttl
        store = session.middleware.store
    if ttl is None or ttl <= 0:
        raise ValueError(f"ttl (seconds the tombstones last) must be positive, not {ttl!r}")
    index = _indexed(store)
    kept = set(keep or ())
    doomed = [s for s in await index.user_session_ids(user_id) if s not in kept]
    for session_id in doomed:
        await store.destroy(session_id, ttl=ttl)
    if doomed:
        await index.unbind_user(user_id, doomed)
    return doomed
