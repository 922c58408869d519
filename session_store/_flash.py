"""Flash messages: a message put in the session for the next request to show once.

As Flask's ``flash``/``get_flashed_messages`` and Django's messages: the usual case is a
POST that redirects, and the page it redirects to shows "Saved." once. They live in the
session under one key, ``_flashes``, a list of ``[category, message]`` pairs (Flask's key
and shape), so they are stored, merged and expired as any session key is.
"""

from __future__ import annotations

from collections.abc import Collection

from starlette.requests import HTTPConnection

from ._session import Session, session_of

__all__ = ["FLASHES_KEY", "flash", "get_flashed_messages"]

FLASHES_KEY = "_flashes"


def flash(target: Session | HTTPConnection, message: str, category: str = "message") -> None:
    """Add ``message`` for a later request to show once (`get_flashed_messages`).

    Raises TypeError for a message or category that is not a string, `SessionNotLoaded`
    as any session use before the session is loaded."""
    if not isinstance(message, str) or not isinstance(category, str):
        raise TypeError(
            f"flash(request, message, category): both strings, not {message!r}, {category!r}"
        )
    session = session_of(target)
    flashes = session.get(FLASHES_KEY)
    if not isinstance(flashes, list):
        flashes = []
    # A new list, assigned: the session sees a change (its cookie goes out again).
    session[FLASHES_KEY] = [*flashes, [category, message]]


def get_flashed_messages(
    target: Session | HTTPConnection, *, category_filter: Collection[str] = ()
) -> list[tuple[str, str]]:
    """The flashed messages, oldest first, as ``(category, message)`` pairs, taken out
    of the session: each is shown once. With ``category_filter``, only those categories
    are taken; the others stay for a later call (Flask drops them)."""
    session = session_of(target)
    flashes = session.get(FLASHES_KEY)
    if not flashes or not isinstance(flashes, list):
        return []
    pairs = [(str(c), str(m)) for c, m in (p for p in flashes if _is_pair(p))]
    taken = [p for p in pairs if not category_filter or p[0] in category_filter]
    left = [list(p) for p in pairs if category_filter and p[0] not in category_filter]
    if left:
        session[FLASHES_KEY] = left
    else:
        del session[FLASHES_KEY]
    return taken


def _is_pair(item: object) -> bool:
    # What another version (or a hand edit of the store) left is skipped, not a 500.
    return isinstance(item, list) and len(item) == 2
