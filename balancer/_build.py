"""Which build of the package runs: the mypyc extension modules that scripts/build-fast puts
next to their sources in balancer/datapath/ (the default where they are built), or the
sources themselves.

Python imports an extension module before a .py of the same name. `BALANCER_PLAIN=1` in the
environment, read once when the package is imported, turns that around: every module of the
package then loads from its .py file, for a debugger, tracebacks with source lines, or line
coverage (which cannot see into compiled code). Processes started with that environment
(workers, `--spawn`) inherit the choice.

Where the extension modules come from: scripts/build-fast in a checkout, or the wheel
(setup.py compiles the same modules at `pip install` time, where it has mypyc and a C
compiler). `python -m balancer --version` prints `version_line()`: which build runs.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

__all__ = ["PLAIN_ENV", "compiled", "version_line"]

PLAIN_ENV = "BALANCER_PLAIN"
_PACKAGE = Path(__file__).parent


def compiled(module: ModuleType) -> bool:
    """Whether `module` was loaded from an extension module (the compiled build)."""
    origin = getattr(module, "__file__", None) or ""
    return origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def version_line() -> str:
    """One line: the installed version, and whether the data path runs `compiled` or
    `interpreted` (and which modules, and why), the Python and the package's folder.

    Imports every module of balancer/datapath/ (the compiled part, all of it)."""
    try:
        version = importlib.metadata.version("sticky-sessions")
    except importlib.metadata.PackageNotFoundError:
        version = "(not installed)"
    names = sorted(p.stem for p in (_PACKAGE / "datapath").glob("_*.py") if p.stem != "__init__")
    fast = [n for n in names if compiled(importlib.import_module(f"{__package__}.datapath.{n}"))]
    slow = [n for n in names if n not in fast]
    if not slow:
        build = f"compiled (mypyc: {', '.join(fast)})"
    elif fast:
        build = f"partly compiled (mypyc: {', '.join(fast)}; interpreted: {', '.join(slow)})"
    elif os.environ.get(PLAIN_ENV) == "1":
        build = f"interpreted ({PLAIN_ENV}=1)"
    else:
        build = "interpreted (no compiled data path installed)"
    return f"balancer {version} {build}; Python {platform.python_version()}; {_PACKAGE}"


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
