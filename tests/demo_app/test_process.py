"""The demo app as a real process: every store mode over real HTTP, SIGTERM, bad flags."""

from __future__ import annotations

import subprocess
import sys
import threading

import httpx
import psutil
import pytest

from redis_plumbing import RedisServer
from tests.helpers import free_port, wait_for
from tests.processes import Process, demo_app, demo_app_args


@pytest.mark.parametrize("store", ["memory", "redis", "hybrid"])
def test_counter_over_http_in_every_store_mode(store: str, redis_server: RedisServer) -> None:
    with demo_app("a", store, redis_server.url) as app, httpx.Client(base_url=app.url) as client:
        counts = [client.post("/api/counter").json()["count"] for _ in range(3)]
        assert counts == [1, 2, 3]
        assert client.get("/readyz").status_code == 200


def test_sessions_are_shared_between_instances_with_redis(redis_server: RedisServer) -> None:
    with (
        demo_app("a", "redis", redis_server.url) as a,
        demo_app("b", "redis", redis_server.url) as b,
        httpx.Client() as client,
    ):
        assert client.post(f"{a.url}/api/counter").json() == {
            "instance": "a",
            "pid": a.popen.pid,
            "count": 1,
        }
        assert client.post(f"{b.url}/api/counter").json()["count"] == 2


def test_sigterm_finishes_the_request_in_flight_then_exits_0() -> None:
    port = free_port()
    app = Process(demo_app_args(port, "t"), f"http://127.0.0.1:{port}")
    app.wait_ready()
    result: dict[str, object] = {}

    def slow_request() -> None:
        response = httpx.get(f"{app.url}/work", params={"iterations": 20_000_000}, timeout=30)
        result["status"] = response.status_code

    thread = threading.Thread(target=slow_request)
    thread.start()
    # The request is in flight once the process burns CPU for it.
    process = psutil.Process(app.popen.pid)
    process.cpu_percent()
    wait_for(lambda: process.cpu_percent(0.05) > 50, 10, "the worker to start the work")
    assert app.terminate() == 0
    thread.join(30)
    assert result["status"] == 200


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--port", "9", "--instance-id", "a", "--store", "redis"], "--redis-url"),
        (["--port", "70000", "--instance-id", "a"], "--port"),
        (["--port", "x", "--instance-id", "a"], "--port"),
        (["--port", "9"], "--instance-id"),
        (["--port", "9", "--instance-id", "a", "--store", "disk"], "--store"),
        (["--port", "9", "--instance-id", "a", "--secret-key", "short"], "--secret-key"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(flags: list[str], message: str) -> None:
    env = {"PATH": "", "PYTHONPATH": ":".join(sys.path)}
    result = subprocess.run(
        [sys.executable, "-m", "demo_app", *flags],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
