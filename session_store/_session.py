"""The session object the app sees as ``request.session``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any, Concatenate, ParamSpec, Protocol, Self, TypeVar

from starlette.requests import HTTPConnection

from ._exceptions import SessionError, SessionNotLoaded
from ._store import SessionStore

__all__ = ["Session", "session_of"]

_MISSING: Any = object()


class SessionOwner(Protocol):
    """What `logout_everywhere` reads of the middleware that made a session."""

    store: SessionStore
    idle_timeout: float  # seconds


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _accessing(
    method: Callable[Concatenate[dict[str, Any], _P], _R],
) -> Callable[Concatenate[Session, _P], _R]:
    """``method`` of dict, marking the session accessed (or raising `SessionNotLoaded`) first.

    For the views (``keys``, ``values``, ``items``): their types, ``dict_keys`` and the
    like, have no public name to annotate an override with, so this keeps dict's own.
    """

    def accessing(self: Session, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        self._access()
        return method(self, *args, **kwargs)

    accessing.__name__, accessing.__qualname__ = method.__name__, f"Session.{method.__name__}"
    accessing.__doc__ = method.__doc__
    return accessing


class Session(dict[str, Any]):
    """A dict of JSON values, plus the session's identity and fate.

    It behaves as the ``Session`` of Starlette's own ``SessionMiddleware``: built
    from a dict (``Session({"a": 1})``), with its ``accessed`` and ``modified``
    flags, set by the same methods, and ``mark_accessed()``/``mark_modified()``.
    What to write is found at the end of the request by comparing each value's
    JSON text with the one loaded, so nested changes (``session["cart"].append(x)``)
    are saved too, without ``mark_modified()``, and only the keys that changed are
    written. ``modified`` decides only whether the response carries the cookie
    again, as Starlette's does.

    When the middleware does not load sessions up front (``autoload``), any use
    before ``await load_session(request)`` raises `SessionNotLoaded`.
    """

    # Class defaults, set on an instance only where used: no cost to every request.
    bind_to: str | None = None  # `bind_user`: bind to this user id when the session is saved
    saved_version: int | None = None  # the version this request's save gave the session
    saver: Callable[[], Awaitable[None]] | None = None  # `save_session`, on a WebSocket
    middleware: SessionOwner | None = None  # whose session it is (`logout_everywhere`)
    # Immutable, so class defaults too: ~9 attribute stores less a request (issue 16).
    id: str | None = None  # None for a session not stored yet
    loaded: bool = True
    accessed: bool = False  # read or written: the response depends on the cookie
    modified: bool = False  # written through a dict method, or mark_modified()
    created: float = 0.0  # seconds since the epoch; 0.0 for a new session
    destroyed: bool = False
    regenerated: bool = False
    ttl: float | None = None  # as the store said at load time
    loader: Callable[[], Awaitable[None]] | None = None

    def __init__(
        self, data: Mapping[str, Any] | Iterable[tuple[str, Any]] = (), /, **kwargs: Any
    ) -> None:
        if data or kwargs:  # the middleware's sessions start empty: no call to dict's
            super().__init__(data, **kwargs)
        # Mutable: one of each per session.
        self.baseline: dict[str, str] = {}  # key -> JSON text as loaded
        # key -> the value decoded from that text: an immutable one still the same object
        # at the end of the request cannot have changed, and is not encoded again.
        self.loaded_values: dict[str, Any] = {}

    def mark_accessed(self) -> None:
        """Say that the response depends on the session (``Vary: Cookie``). Starlette's
        ``request.session`` calls it; it never raises, even before the session is loaded."""
        self.accessed = True

    def mark_modified(self) -> None:
        """Say that the session changed: the response carries its cookie again."""
        self._access()
        self.modified = True

    @property
    def is_new(self) -> bool:
        return self.id is None

    def regenerate(self) -> None:
        """Give the session a new id at the end of this request, keeping its data.

        Call it when privileges change (at login) so that an id an attacker may
        have planted before is worthless afterwards (session fixation).
        """
        self._access()
        self.regenerated = True

    def destroy(self) -> None:
        """Empty the session, delete it from the store and clear the cookie."""
        self._access()
        super().clear()
        self.destroyed = True

    async def load(self) -> None:
        """Load the session from the store if it is not loaded yet."""
        if not self.loaded and self.loader is not None:
            await self.loader()

    def _check_loaded(self) -> None:
        if not self.loaded:
            raise SessionNotLoaded(
                "the session is not loaded: call `await load_session(request)` first "
                "(the middleware's autoload is off for this request)"
            )

    def _access(self) -> None:
        self._check_loaded()
        self.accessed = True

    def __getitem__(self, key: str) -> Any:
        self._access()
        return super().__getitem__(key)

    def __setitem__(self, key: str, value: Any) -> None:
        self.mark_modified()
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self.mark_modified()
        super().__delitem__(key)

    def __contains__(self, key: object) -> bool:
        self._access()
        return super().__contains__(key)

    def __iter__(self) -> Iterator[str]:
        self._access()
        return super().__iter__()

    def __len__(self) -> int:
        self._access()
        return super().__len__()

    def get(self, key: str, default: Any = None) -> Any:
        self._access()
        return super().get(key, default)

    def setdefault(self, key: str, default: Any = None) -> Any:
        # An existing value may be changed in place (``setdefault("cart", []).append``):
        # accessed, so the end of the request compares it; modified only when added.
        if dict.__contains__(self, key):
            self._access()
        else:
            self.mark_modified()
        return super().setdefault(key, default)

    def pop(self, key: str, default: Any = _MISSING) -> Any:
        # As Starlette's: popping a missing key with a default changes nothing.
        self._check_loaded()
        if dict.__contains__(self, key):
            self.mark_modified()
        if default is _MISSING:
            return super().pop(key)
        return super().pop(key, default)

    def popitem(self) -> tuple[str, Any]:
        self._check_loaded()
        item = super().popitem()
        self.mark_modified()
        return item

    def update(self, *args: Any, **kwargs: Any) -> None:
        self.mark_modified()
        super().update(*args, **kwargs)

    def __ior__(self, other: Any, /) -> Self:  # type: ignore[override,misc]
        # dict's own ``|=`` would skip `update`, and the change would go unseen.
        self.update(other)
        return self

    def clear(self) -> None:
        self.mark_modified()
        super().clear()

    keys = _accessing(dict.keys)
    values = _accessing(dict.values)
    items = _accessing(dict.items)

    def copy(self) -> dict[str, Any]:
        self._access()
        return dict(super().items())

    def __repr__(self) -> str:
        state = "not loaded" if not self.loaded else f"{dict.__len__(self)} keys"
        return f"<Session id={(self.id or 'new')[:8]}... {state}>"


def session_of(target: Session | HTTPConnection) -> Session:
    """``target`` itself, or the session our middleware gave the request; `SessionError`
    if there is none (no `SessionMiddleware` of ours in front of the app)."""
    session = target if isinstance(target, Session) else target.scope.get("session")
    if not isinstance(session, Session):
        raise SessionError(
            "no session_store.SessionMiddleware in front of this app: add it "
            "(app.add_middleware(SessionMiddleware, secret_key=...)) before using the session"
        )
    return session
