"""What the packages import: only distributions pyproject.toml declares (a package that
arrives only as another's dependency can leave with its next release), and no private
module of the standard library (``_collections_abc`` and the like may change in any
Python release)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("redis_plumbing", "service_registry", "session_store", "balancer", "demo_app")
# Imported only under `try: ... except ImportError`, as an optional speed-up:
# uvicorn[standard] brings it where it builds.
OPTIONAL = {"uvloop"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def _imported() -> dict[str, set[str]]:
    """Each top-level module the packages import, and the files importing it."""
    found: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.partition(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def _declared() -> set[str]:
    """The distributions pyproject.toml names, in its dependencies and its extras but dev."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra, more in project["optional-dependencies"].items():
        if extra != "dev":
            requirements += more
    return {_canonical(re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0]) for r in requirements}


def test_every_imported_distribution_is_declared() -> None:
    imported = _imported()
    assert {"anyio", "httpx", "redis", "starlette"} <= set(imported)  # the scan sees imports
    distributions = importlib.metadata.packages_distributions()
    declared = _declared()
    undeclared = {
        module: sorted(files)
        for module, files in imported.items()
        if module not in sys.stdlib_module_names
        and module not in PACKAGES
        and module not in OPTIONAL
        and not {_canonical(d) for d in distributions.get(module, [module])} & declared
    }
    assert undeclared == {}, "imported but not in pyproject.toml's dependencies"


def test_no_private_standard_library_module_is_imported() -> None:
    private = {
        module: sorted(files)
        for module, files in _imported().items()
        if module.startswith("_") and module != "__future__" and module in sys.stdlib_module_names
    }
    assert private == {}
