"""``python -m demo_app.stack`` as a real process: what it says when it cannot start."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tests.helpers import free_port


def test_an_unreachable_redis_url_fails_fast_naming_redis_and_the_url() -> None:
    # Nothing listens on this port: the stack used to start the instances, wait 20 s for
    # them, then say only "http://127.0.0.1:9001: not ready within 20.0 s".
    dead = free_port()
    env = {**os.environ, "REDIS_URL": f"redis://:hunter2@127.0.0.1:{dead}/0"}
    argv = [sys.executable, "-m", "demo_app.stack", "--mode", "hybrid", "--instances", "1"]
    argv += ["--base-port", str(free_port()), "--port", str(free_port())]
    argv += ["--admin-port", str(free_port())]
    started = time.monotonic()
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stdout + result.stderr
    assert elapsed < 8, f"{elapsed:.1f} s to fail"
    assert f"Redis at REDIS_URL=redis://127.0.0.1:{dead}/0" in result.stderr, result.stderr
    assert "hunter2" not in result.stdout + result.stderr  # the password is redacted
    assert "Traceback" not in result.stderr
