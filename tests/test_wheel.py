"""`pip install .` compiles the balancer's data path (setup.py, mypyc), and without a C
compiler still installs, interpreted, saying so in one line.

Each test builds a real wheel of a copy of the project (only what the wheel is made of: no
build of this checkout's can leak in) with pip, in pip's isolated build environment as a
user's `pip install .` gets, installs it into a folder of its own, and asks the installed
balancer which build it runs (`python -m balancer --version`). The compiled build takes
mypyc about a minute."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What a wheel is built from (as the Dockerfile copies it).
SOURCES = ("pyproject.toml", "setup.py", "README.md")
PACKAGES = ("redis_plumbing", "service_registry", "session_store", "balancer", "demo_app")
DATA_PATH = sorted(
    path.stem for path in (ROOT / "balancer" / "datapath").glob("_*.py") if path.stem != "__init__"
)
HAS_CC = any(shutil.which(name) for name in ("cc", "gcc"))

pytestmark = pytest.mark.timeout(300)


def _copy_project(target: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so")
    for name in SOURCES:
        shutil.copy2(ROOT / name, target / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, target / package, ignore=ignore)
    return target


def _build(tmp: Path, name: str, **env: str) -> tuple[Path, str]:
    """A wheel of a fresh copy of the project, and pip's verbose output (the build's lines)."""
    source = _copy_project(_mkdir(tmp / name))
    wheels = _mkdir(tmp / f"{name}-wheel")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(wheels), str(source)],
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", **env},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    (wheel,) = wheels.glob("*.whl")
    return wheel, output


def _notes(output: str) -> list[str]:
    """setup.py's own lines in pip's verbose output."""
    lines = [line.strip() for line in output.splitlines()]
    return [line for line in lines if line.startswith("sticky-sessions: ")]


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _installed_version(tmp: Path, wheel: Path) -> str:
    """`python -m balancer --version` of the wheel installed on its own (its dependencies are
    this environment's)."""
    site = tmp / f"{wheel.stem}-site"
    install = ["install", "-q", "--no-deps", "--no-index", "--target", str(site), str(wheel)]
    subprocess.run(
        [sys.executable, "-m", "pip", *install],
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        capture_output=True,
        timeout=60,
        check=True,
    )
    env = {k: v for k, v in os.environ.items() if k != "BALANCER_PLAIN"}  # the installed build
    done = subprocess.run(
        [sys.executable, "-m", "balancer", "--version"],
        env={**env, "PYTHONPATH": str(site)},
        cwd=tmp,  # not this checkout
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"; {site / 'balancer'}" in done.stdout, "not the installed copy"
    return done.stdout


@pytest.mark.skipif(not HAS_CC, reason="no C compiler (cc) to compile the data path with")
def test_pip_builds_a_wheel_with_the_data_path_compiled(tmp_path: Path) -> None:
    wheel, output = _build(tmp_path, "compiled")
    compiled = f"sticky-sessions: compiled balancer.datapath._fast: {', '.join(DATA_PATH)}"
    assert compiled in _notes(output), output[-6000:]
    assert not wheel.name.endswith("-none-any.whl"), wheel.name  # tagged for this platform
    extensions = sorted(
        Path(name).name.split(".")[0]
        for name in zipfile.ZipFile(wheel).namelist()
        if name.endswith(".so")
    )
    assert extensions == sorted([*DATA_PATH, "_fast__mypyc"])
    version = _installed_version(tmp_path, wheel)
    assert version.startswith(f"balancer 0.1.0 compiled (mypyc: {', '.join(DATA_PATH)});"), version


def test_without_a_c_compiler_the_wheel_is_interpreted_and_says_so(tmp_path: Path) -> None:
    wheel, output = _build(tmp_path, "plain", CC="/bin/false")
    assert _notes(output) == [
        "sticky-sessions: the data path is not compiled (no working C compiler (/bin/false: exit "
        "status 1)): it runs as plain Python, ~1.7x the CPU a request (docs/balancer.md, "
        "Performance)"
    ]
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    assert not [name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".so")]
    version = _installed_version(tmp_path, wheel)
    assert version.startswith("balancer 0.1.0 interpreted (no compiled data path installed);")
