from __future__ import annotations

import inspect

import balancer


def test_all_is_sorted_and_holds_exactly_the_public_names() -> None:
    public = {name for name in dir(balancer) if not name.startswith("_")} - {"annotations"}
    assert set(balancer.__all__) == public
    # ruff's RUF022 order: constants, then classes, then functions.
    assert balancer.__all__ == sorted(balancer.__all__, key=lambda n: (not n.isupper(), n))


def test_exported_classes_and_functions_come_from_private_modules() -> None:
    for name in balancer.__all__:
        value = getattr(balancer, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert value.__module__.startswith("balancer._"), name
