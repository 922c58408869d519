"""The compiled build of the data path (scripts/build-fast) never lags its source.

Python imports an extension module before a .py of the same name, so a build older than
an edit would silently run the old code. scripts/install rebuilds a stale build; this test
catches a run that skipped it (pytest run by hand after an edit). Without a build
(BALANCER_PLAIN=1, no C compiler) there is nothing to check."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from pathlib import Path

import pytest

import balancer
import balancer.datapath._proxy
import balancer.datapath._router
from balancer import load_settings
from balancer._build import PLAIN_ENV, compiled

_ROOT = Path(balancer.__file__).parent.parent
_PACKAGE = _ROOT / "balancer" / "datapath"  # the compiled part, all of it
_STAMP = _ROOT / "build" / "mypyc" / ".sources"  # written by scripts/build-fast


def _compiled_modules() -> list[str]:
    # scripts/build-fast compiles every module of balancer/datapath/, and only those.
    return sorted(path.stem for path in _PACKAGE.glob("_*.py") if path.stem != "__init__")


def test_only_the_data_path_folder_is_compiled() -> None:
    outside = [
        str(path.relative_to(_ROOT))
        for path in (_ROOT / "balancer").rglob("*.so")
        if path.parent != _PACKAGE
    ]
    assert outside == [], "a stale build: run scripts/build-fast --clean"
    assert {"_proxy", "_router", "_upstream", "_pool"} <= set(_compiled_modules())


def test_compiled_build_is_the_build_of_the_current_source() -> None:
    modules = _compiled_modules()
    built = [m for m in modules if any(_PACKAGE.glob(f"{m}.*.so"))]
    if not built:
        return  # plain Python: nothing can lag
    stale = "run scripts/build-fast again (or scripts/build-fast --clean)"
    assert built == modules, f"only {built} of {modules} are compiled: {stale}"
    assert _STAMP.exists(), f"a build without {_STAMP}: {stale}"
    recorded = {
        line.split()[1]: line.split()[0]
        for line in _STAMP.read_text().splitlines()
        if line.strip() and not line.startswith("mypy ")
    }
    for module in modules:
        source = f"balancer/datapath/{module}.py"
        digest = hashlib.sha256((_ROOT / source).read_bytes()).hexdigest()
        assert recorded.get(source) == digest, f"{source} changed since it was built: {stale}"


def test_the_data_path_runs_the_build_that_is_there() -> None:
    # What the benchmark measures and the tests run must be the build asked for: the
    # compiled one where it is built, the sources with BALANCER_PLAIN=1 (scripts/test runs
    # the suite both ways).
    plain = os.environ.get(PLAIN_ENV) == "1"
    for module in (balancer.datapath._proxy, balancer.datapath._router):
        name = module.__name__.rsplit(".", 1)[1]
        built = any(_PACKAGE.glob(f"{name}.*.so"))
        assert compiled(module) == (built and not plain), module.__file__


def test_version_says_which_build_runs(capsys: pytest.CaptureFixture[str]) -> None:
    # `python -m balancer --version`; an installed wheel's is tests/test_wheel.py's.
    with pytest.raises(SystemExit) as info:
        load_settings(["--version"], {})
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"balancer {importlib.metadata.version('sticky-sessions')} "), out
    modules = _compiled_modules()
    if os.environ.get(PLAIN_ENV) == "1":
        assert " interpreted (BALANCER_PLAIN=1); " in out
    elif all(any(_PACKAGE.glob(f"{m}.*.so")) for m in modules):
        assert f" compiled (mypyc: {', '.join(modules)}); " in out
    else:
        assert " interpreted (no compiled data path installed); " in out
    assert out.endswith(f"; {_ROOT / 'balancer'}\n")
