"""The benchmarks that need no outside programs still run (the others need wrk, nginx and
HAProxy, and take minutes: they are run by hand, never timed in tests)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent


def _data_path(*args: str, plain: bool = False) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "BALANCER_PLAIN"}
    if plain:
        env["BALANCER_PLAIN"] = "1"
    return subprocess.run(
        [sys.executable, str(_ROOT / "benchmarks" / "data_path.py"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=_ROOT,
        env=env,
    )


def test_data_path_benchmark_prints_a_figure_for_its_build() -> None:
    done = _data_path("--requests", "300", plain=True)
    assert done.returncode == 0, done.stderr
    found = re.fullmatch(r"data path, plain Python: ([\d.]+) us a request \(.*\)\n", done.stdout)
    assert found is not None, done.stdout
    assert float(found.group(1)) > 0


def test_data_path_benchmark_refuses_a_bad_count() -> None:
    done = _data_path("--requests", "0")
    assert done.returncode == 2
    assert "--requests" in done.stderr
