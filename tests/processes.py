"""Real processes for tests: started on free ports, waited for by a condition, always reaped."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence

import httpx

from tests.helpers import free_port, wait_for


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=0.5).status_code < 500
    except httpx.HTTPError:
        return False


class Process:
    """A child process with the URL it serves."""

    def __init__(self, args: Sequence[str], url: str, env: dict[str, str] | None = None):
        self.args = list(args)
        self.url = url
        self.popen = subprocess.Popen(
            self.args,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, path: str = "/healthz", within: float = 15.0) -> None:
        def ready() -> bool:
            if self.popen.poll() is not None:
                raise AssertionError(
                    f"{self.args} exited with {self.popen.returncode}:\n{self.output()}"
                )
            return _answers(self.url + path)

        wait_for(ready, within, f"{self.url}{path} to answer")

    def output(self) -> str:
        if self.popen.poll() is None or self.popen.stdout is None:
            return ""
        return self.popen.stdout.read().decode(errors="replace")

    def terminate(self, within: float = 15.0) -> int:
        """SIGTERM, then SIGKILL after ``within`` seconds; returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(within)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        return self.popen.returncode


def demo_app_args(
    port: int, instance: str, store: str = "memory", redis_url: str | None = None
) -> list[str]:
    args = [sys.executable, "-m", "demo_app", "--port", str(port), "--instance-id", instance]
    args += ["--store", store, "--log-level", "warning"]
    if redis_url:
        args += ["--redis-url", redis_url]
    return args


@contextlib.contextmanager
def demo_app(
    instance: str, store: str = "memory", redis_url: str | None = None
) -> Iterator[Process]:
    port = free_port()
    process = Process(demo_app_args(port, instance, store, redis_url), f"http://127.0.0.1:{port}")
    try:
        process.wait_ready()
        yield process
    finally:
        process.terminate()
