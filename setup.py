"""The wheel's one addition to pyproject.toml: the balancer's data path, compiled with mypyc
where it can be, as mypy and black ship theirs.

Every module of balancer/datapath/ is compiled as one group, `balancer.datapath._fast`: the
same modules and the same extension modules as scripts/build-fast, which a wheel holds beside
their .py files and Python imports first (balancer/_build.py; BALANCER_PLAIN=1 runs the
sources at run time). pyproject.toml's build requirements bring mypy (mypyc) and what the
data path's types come from.

When it cannot compile (mypyc missing, no C compiler that builds against this Python's
headers, or a failed compile) the build goes on without it: one line on stderr says why
(pip shows it with -v), and the wheel is the interpreted build, the same code as plain
Python; `python -m balancer --version` says which build an install runs. An editable install
(`pip install -e .`, as scripts/install makes) never compiles: scripts/build-fast compiles
that tree in place.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py
from setuptools.errors import CCompilerError, CompileError, ExecError, PlatformError

PACKAGE = "balancer/datapath"
GROUP = "balancer.datapath._fast"  # scripts/build-fast's name: the same extension modules
PLAIN = "plain Python, ~1.7x the CPU a request (docs/balancer.md, Performance)"


def _say(line: str) -> None:
    print(f"sticky-sessions: {line}", file=sys.stderr, flush=True)


def _modules() -> list[str]:
    """The compiled modules: every module of the data path's folder, as scripts/build-fast."""
    return sorted(p.stem for p in Path(PACKAGE).glob("_*.py") if p.stem != "__init__")


def _compiler_problem() -> str | None:
    """Why no C extension can be built here, or None: a one-second probe, so that a machine
    without a compiler (or without Python's headers) skips mypyc's minute of work."""
    from distutils.ccompiler import new_compiler  # noqa: PLC0415 - setuptools' own copy
    from distutils.sysconfig import customize_compiler  # noqa: PLC0415

    compiler = new_compiler()
    customize_compiler(compiler)  # CC, CFLAGS and the rest, as the build will
    command = list(getattr(compiler, "compiler_so", None) or [])
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp, "probe.c")
        source.write_text("#include <Python.h>\nint main(void) { return 0; }\n")
        include = sysconfig.get_paths()["include"]
        if not command:  # not a Unix compiler: ask it through setuptools
            try:
                compiler.compile([str(source)], output_dir=tmp, include_dirs=[include])
            except (CCompilerError, CompileError, ExecError, PlatformError) as exc:
                return f"no working C compiler: {exc}"
            return None
        argv = [*command, f"-I{include}", "-c", str(source), "-o", str(Path(tmp, "probe.o"))]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"no working C compiler ({shlex.join(command[:1])}: {exc})"
    if done.returncode != 0:
        detail = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[0]
        return f"no working C compiler ({shlex.join(command[:1])}: {detail})"
    return None


def _unavailable() -> str | None:
    """Why the data path cannot be compiled here, or None when it can be tried."""
    if importlib.util.find_spec("mypyc") is None:
        return "mypyc is not installed (it comes with mypy)"
    return _compiler_problem()


def _prebuilt() -> list[Path]:
    # scripts/build-fast's extension modules, where it ran in this tree; the Dockerfile's
    # second stage, which has no compiler, installs them (pyproject.toml's package data).
    return sorted(Path(PACKAGE).glob("*.so"))


class BuildPy(build_py):
    """build_py, and the line that says the wheel is not compiled when nothing will be."""

    def run(self) -> None:
        super().run()
        if _UNAVAILABLE is not None and not self.editable_mode:
            _fallback(_UNAVAILABLE, _prebuilt())


class BuildDataPath(build_ext):
    """Compiles the data path with mypyc into the wheel; on failure, a wheel without it.

    setup() is given one placeholder extension a module (the names mypycify will give them),
    so that the wheel is tagged for this platform; mypycify runs here, at build time only, and
    fills them in (it type-checks and writes the C: it must not run for each metadata pass)."""

    def run(self) -> None:
        if self.inplace:  # pip install -e, or build_ext --inplace
            _say("the data path is not compiled in place by pip: scripts/build-fast does that")
            self.extensions = []
            return
        modules = _modules()
        _say(f"compiling the balancer's data path with mypyc ({PACKAGE}/: {len(modules)} modules)")
        # The wheel holds what this build compiles, never a build left in the tree.
        for stale in Path(self.build_lib, PACKAGE).glob("*.so"):
            stale.unlink()
        try:
            self._fill_in(modules)
            super().run()
        except (SystemExit, Exception) as exc:  # mypyc exits on a type error
            for ext in self.extensions:
                Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
            self.extensions = []
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            if len(detail) > 160:  # a compiler's whole command line
                detail = f"{detail[:157]}..."
            _fallback(f"the build failed: {detail}", [])
            return
        _say(f"compiled {GROUP}: {', '.join(modules)}")

    def _fill_in(self, modules: list[str]) -> None:
        from mypyc.build import mypycify  # noqa: PLC0415 - a build requirement, checked first

        target = os.path.join(self.build_temp, "mypyc")
        # The data path's own errors only: what it imports from the rest of the balancer
        # (`balancer._exceptions`, and so `balancer/__init__`) pulls in the whole project,
        # whose dependencies the build environment does not have.
        paths = ["--follow-imports=silent", *(f"{PACKAGE}/{name}.py" for name in modules)]
        generated = {ext.name: ext for ext in mypycify(paths, group_name=GROUP, target_dir=target)}
        expected = {ext.name for ext in self.extensions}
        if set(generated) != expected:
            raise CompileError(f"mypyc made {sorted(generated)}, not {sorted(expected)}")
        for ext in self.extensions:
            # The fields mypyc set (sources, include dirs, flags); setuptools' own, from
            # finalize_options, stay.
            for field, value in vars(generated[ext.name]).items():
                if not field.startswith("_"):
                    setattr(ext, field, value)


def _fallback(reason: str, prebuilt: list[Path]) -> None:
    if prebuilt:
        _say(
            f"the data path is not compiled here ({reason}); the wheel takes the {len(prebuilt)} "
            f"extension modules scripts/build-fast left in {PACKAGE}/"
        )
    else:
        _say(f"the data path is not compiled ({reason}): it runs as {PLAIN}")


def _placeholders() -> list[Extension]:
    from mypyc.common import shared_lib_name  # noqa: PLC0415

    names = [shared_lib_name(GROUP)] + [f"{PACKAGE.replace('/', '.')}.{m}" for m in _modules()]
    return [Extension(name, sources=[]) for name in names]


_UNAVAILABLE = _unavailable()
setup(
    ext_modules=_placeholders() if _UNAVAILABLE is None else [],
    cmdclass={"build_py": BuildPy, "build_ext": BuildDataPath},
)
