"""Real processes for tests: started on free ports, waited for by a condition, always reaped."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
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
        self.wait_ready_url(self.url + path, within)

    def wait_ready_url(self, url: str, within: float = 15.0) -> None:
        """Wait until ``url`` answers; fail at once, with its output, if the process exits."""
        wait_for(lambda: self.alive() and _answers(url), within, f"{url} to answer")

    def alive(self) -> bool:
        if self.popen.poll() is not None:
            raise AssertionError(
                f"{self.args} exited with {self.popen.returncode}:\n{self.output()}"
            )
        return True

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


def balancer_args(port: int, backends: Sequence[str], *extra: str) -> list[str]:
    args = [sys.executable, "-m", "balancer", "--listen", f"127.0.0.1:{port}"]
    for backend in backends:
        args += ["--backend", backend]
    return [*args, *extra]


@contextlib.contextmanager
def balancer(
    backends: Sequence[str], *extra: str, admin: bool = True
) -> Iterator[tuple[Process, str | None]]:
    """A balancer process; yields it (its ``url`` is the proxy) and its admin URL."""
    port = free_port()
    admin_url = None
    if admin:
        admin_port = free_port()
        extra = (*extra, "--admin", f"127.0.0.1:{admin_port}")
        admin_url = f"http://127.0.0.1:{admin_port}"
    process = Process(balancer_args(port, backends, *extra), f"http://127.0.0.1:{port}")
    try:
        if admin_url is not None:
            process.wait_ready_url(admin_url + "/healthz")
        wait_for(lambda: process.alive() and _accepts(port), 15, "the balancer to listen")
        yield process, admin_url
    finally:
        process.terminate()


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0
