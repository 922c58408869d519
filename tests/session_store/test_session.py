"""`Session`: a dict that records it was accessed, and refuses use before it is loaded."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from session_store import Session, SessionNotLoaded

USES: dict[str, Callable[[Session], object]] = {
    "keys": lambda s: s.keys(),
    "values": lambda s: s.values(),
    "items": lambda s: s.items(),
    "getitem": lambda s: s["a"],
    "get": lambda s: s.get("a"),
    "contains": lambda s: "a" in s,
    "iter": list,
    "len": len,
    "copy": lambda s: s.copy(),
    "setitem": lambda s: s.__setitem__("b", 2),
    "update": lambda s: s.update(b=2),
}


def _session(**values: Any) -> Session:
    session = Session()
    dict.update(session, values)  # as a store's load fills it: not an access
    return session


@pytest.mark.parametrize("use", USES.values(), ids=USES.keys())
def test_every_use_before_loading_raises(use: Callable[[Session], object]) -> None:
    session = _session(a=1)
    session.loaded = False
    with pytest.raises(SessionNotLoaded, match="load_session"):
        use(session)
    assert not session.accessed


@pytest.mark.parametrize("use", USES.values(), ids=USES.keys())
def test_every_use_marks_the_session_accessed(use: Callable[[Session], object]) -> None:
    session = _session(a=1)
    use(session)
    assert session.accessed


def test_the_views_are_dicts_own_and_live() -> None:
    session = _session(a=1)
    keys, values, items = session.keys(), session.values(), session.items()
    assert (type(keys), type(values), type(items)) == (
        type({}.keys()),
        type({}.values()),
        type({}.items()),
    )
    session["b"] = 2
    assert list(keys) == ["a", "b"]
    assert list(values) == [1, 2]
    assert [key.upper() for key, _ in items] == ["A", "B"]  # typed as str, Any
    assert Session.keys.__name__ == "keys"
