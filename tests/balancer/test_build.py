"""The optional compiled build of the data path (scripts/build-fast) never lags its source.

Python imports an extension module before a .py of the same name, so a build older than
an edit would silently run the old code. Without a build (a clean clone, CI) there is
nothing to check."""

from __future__ import annotations

from pathlib import Path

import balancer

_COMPILED = ("_proxy", "_upstream")


def test_compiled_build_is_not_older_than_its_source() -> None:
    package = Path(balancer.__file__).parent
    for name in _COMPILED:
        source = package / f"{name}.py"
        for built in package.glob(f"{name}.*.so"):
            assert built.stat().st_mtime >= source.stat().st_mtime, (
                f"{built.name} is older than {source.name}: run scripts/build-fast again "
                "(or scripts/build-fast --clean)"
            )
