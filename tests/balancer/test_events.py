"""Event names: one list (`balancer/control/_events.py`), every name snake_case, and every
`log_event` and `EventFeed.add` in the balancer naming one of them, never a string written
out at the call (read with `ast`: nothing is run)."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

from balancer.control import _events

PACKAGE = Path(_events.__file__).resolve().parent.parent
NAMES = {
    name: value
    for name, value in vars(_events).items()
    if name.isupper() and not name.startswith("_") and isinstance(value, str)
}


def _event_calls(root: Path) -> Iterator[tuple[str, ast.expr]]:
    """`(where, first argument)` of each `log_event(...)` and `*.add(NAME, {...}, ...)` call
    (the feed's; a set's or a pool's `add` takes one argument)."""
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func
            if (isinstance(func, ast.Name) and func.id == "log_event") or (
                isinstance(func, ast.Attribute) and func.attr == "add" and len(node.args) >= 2
            ):
                yield f"{path.relative_to(root.parent)}:{node.lineno}", node.args[0]


def test_every_event_name_is_snake_case_and_unique() -> None:
    assert len(NAMES) >= 50  # the scan sees the list
    assert [v for v in NAMES.values() if not re.fullmatch(r"[a-z]+(_[a-z]+)*", v)] == []
    assert {name: value for name, value in NAMES.items() if name != value.upper()} == {}
    assert set(NAMES) <= set(_events.__all__)


def test_every_event_is_named_by_a_constant_of_the_list() -> None:
    calls = list(_event_calls(PACKAGE))
    assert len(calls) >= 50  # the scan sees the calls
    written_out = [where for where, arg in calls if isinstance(arg, ast.Constant)]
    unknown = [
        where
        for where, arg in calls
        if not isinstance(arg, ast.Constant)
        and not (isinstance(arg, ast.Name) and (arg.id in NAMES or arg.id == "name"))
    ]
    assert written_out == []
    assert unknown == []


def test_every_name_of_the_list_is_used() -> None:
    used = {arg.id for _, arg in _event_calls(PACKAGE) if isinstance(arg, ast.Name)}
    assert set(NAMES) - used == set()
