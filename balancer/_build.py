"""Which build of the package runs: the mypyc extension modules that scripts/build-fast puts
next to their sources in balancer/datapath/ (the default where they are built), or the
sources themselves.

Python imports an extension module before a .py of the same name. `BALANCER_PLAIN=1` in the
environment, read once when the package is imported, turns that around: every module of the
package then loads from its .py file, for a debugger, tracebacks with source lines, or line
coverage (which cannot see into compiled code). Processes started with that environment
(workers, `--spawn`) inherit the choice.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

__all__ = ["PLAIN_ENV", "compiled"]

PLAIN_ENV = "BALANCER_PLAIN"
_PACKAGE = Path(__file__).parent


def compiled(module: ModuleType) -> bool:
    """Whether `module` was loaded from an extension module (the compiled build)."""
    origin = getattr(module, "__file__", None) or ""
    return origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


class _SourceFirst(importlib.abc.MetaPathFinder):
    """Finds this package's modules by their .py file, ahead of any extension module."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        package, _, name = fullname.partition(".")
        if package != __package__ or not name:
            return None
        # Any depth: the compiled modules are in balancer/datapath/. A subpackage itself
        # (its __init__.py, never compiled) is left to the usual finders.
        source = _PACKAGE.joinpath(*name.split(".")).with_suffix(".py")
        if not source.is_file():
            return None
        return importlib.util.spec_from_file_location(fullname, source)


if os.environ.get(PLAIN_ENV) == "1" and not any(
    isinstance(finder, _SourceFirst) for finder in sys.meta_path
):
    sys.meta_path.insert(0, _SourceFirst())
