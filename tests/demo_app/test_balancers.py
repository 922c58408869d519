"""Several balancer replicas: the same pins on every one, and a replica killed loses nothing.

Real processes: demo_app instances and balancer replicas (`demo_app.compare.Stack`, and
`python -m demo_app.stack --balancers 2`), on free ports of 127.0.0.1, and a real Redis.
The replicas share nothing but their options (the backend list, or the registry) and the
affinity secret.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from demo_app.compare import Stack, run_mode
from redis_plumbing import RedisServer
from tests.helpers import Stream, wait_for

CLIENTS = 30
# One TLS context for every client (none is used): httpx builds one per client otherwise,
# ~0.1 s each.
TLS = ssl.create_default_context()
USERS, REQUESTS = 20, 6


@pytest.fixture(scope="module")
def two_balancers(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """Three instances keeping sessions in memory (``sticky``) behind two balancer replicas."""
    logs = tmp_path_factory.mktemp("two-balancers")
    stack = Stack("sticky", 3, redis_server.url, logs, balancers=2)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def test_replicas_pin_every_session_to_its_creating_instance(two_balancers: Stack) -> None:
    first, second = two_balancers.urls
    created: dict[int, str] = {}
    for index in range(CLIENTS):
        # The creating request on one replica, every later one alternating between both.
        order = [first, second] if index % 2 == 0 else [second, first]
        with httpx.Client(timeout=5, verify=TLS) as client:
            for count in range(1, 7):
                reply = client.post(order[count % 2 - 1] + "/api/counter")
                assert reply.status_code == 200, reply.text
                body = reply.json()
                created.setdefault(index, body["instance"])
                # In memory only: another instance would have started the count again.
                assert (body["instance"], body["count"]) == (created[index], count), index
    assert len(set(created.values())) > 1, "the sessions should spread over the instances"


def test_replicas_agree_on_the_session_cookie_alone(two_balancers: Stack) -> None:
    """Without the balancer's affinity cookie both replicas hash the session cookie alike."""
    first, second = two_balancers.urls
    served: set[str] = set()
    for _ in range(CLIENTS):
        with httpx.Client(timeout=5, verify=TLS) as client:
            assert client.post(first + "/api/counter").status_code == 200
            sid = client.cookies["sid"]
        with httpx.Client(timeout=5, verify=TLS, cookies={"sid": sid}) as bare:
            on_first = bare.get(first + "/api/session").json()["instance"]
            on_second = bare.get(second + "/api/session").json()["instance"]
        assert on_first == on_second
        served.add(on_first)
    assert len(served) > 1


@pytest.mark.parametrize("mode", ["hybrid", "sticky"])
def test_killing_a_balancer_loses_no_session(mode: str) -> None:
    said: list[str] = []
    seen: list[tuple[str, object]] = []

    def say(line: str) -> None:
        # Called while the stack runs: the dashboard it names must answer, in its mode.
        said.append(line)
        with httpx.stream("GET", line.rsplit(" ", 1)[1] + "dashboard/stream", timeout=10) as page:
            kind, data = Stream(page).next()
        seen.append((kind, data["info"]["mode"]))

    report = run_mode(
        mode,
        users=USERS,
        requests=REQUESTS,
        kill=0,
        instances=2,
        balancers=2,
        kill_balancer=True,
        concurrency=8,
        say=say,
    )
    assert len(said) == 2
    assert all(line.startswith(f"{mode}: the balancer's live dashboard is at ") for line in said)
    assert seen == [("hello", mode)] * 2
    assert report["completed"]
    assert report["requests"] == USERS * REQUESTS
    assert report["balancer_killed"] is not None
    # Every user of the killed replica (even indexes) moved to the other one, once.
    assert report["users_switched"] == USERS // 2
    assert report["balancer_switches"] == USERS // 2
    # Only the requests in flight through the killed replica may fail...
    assert report["failed_requests"] <= 8
    # ...and no session is lost: in hybrid by Redis, and in sticky too, since the surviving
    # replica honours the pins the killed one set (the same affinity secret).
    assert report["sessions_lost"] == 0
    assert report["instance_changes"] == 0


def _free_run(length: int) -> int:
    """The first of ``length`` consecutive free ports, below the ephemeral range.

    The stack binds ports it is given after it has made connections of its own (to Redis),
    whose local ports come from the ephemeral range: a run there could be taken meanwhile.
    """
    for _ in range(100):
        first = random.randrange(20000, 32000 - length)
        try:
            for port in range(first, first + length):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise AssertionError(f"no run of {length} free ports found")


def _up_backends(admin: str) -> int:
    try:
        backends = httpx.get(admin + "/backends", timeout=1).json()["backends"]
    except (httpx.HTTPError, ValueError):
        return 0
    return sum(backend["state"] == "up" for backend in backends)


def test_demo_stack_runs_two_balancers_on_one_registry(tmp_path: Path) -> None:
    port, admin_port, base_port = _free_run(2), _free_run(2), _free_run(2)
    argv = [sys.executable, "-m", "demo_app.stack", "--mode", "sticky", "--discover"]
    argv += ["--instances", "2", "--balancers", "2", "--port", str(port)]
    argv += ["--admin-port", str(admin_port), "--base-port", str(base_port)]
    env = {key: value for key, value in os.environ.items() if key != "REDIS_URL"}
    log = tmp_path / "stack.log"
    with log.open("wb") as out:
        stack = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:

        def ready() -> bool:
            assert stack.poll() is None, log.read_text()
            return "Ctrl-C stops everything" in log.read_text()

        try:
            wait_for(ready, 40, "the stack to start")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{log.read_text()}") from None
        balancers = [f"http://127.0.0.1:{port + index}" for index in range(2)]
        admins = [f"http://127.0.0.1:{admin_port + index}" for index in range(2)]
        text = log.read_text()
        for url in balancers + admins:
            assert url in text
        # Both replicas found both instances in the one registry.
        wait_for(lambda: all(_up_backends(admin) == 2 for admin in admins), 15, "discovery")
        with httpx.Client(timeout=5, verify=TLS) as client:
            replies = [client.post(balancers[n % 2] + "/api/counter").json() for n in range(4)]
        assert [reply["count"] for reply in replies] == [1, 2, 3, 4]
        assert len({reply["instance"] for reply in replies}) == 1
    finally:
        # SIGHUP, as when the terminal closes (SIGINT and SIGTERM take the same path).
        stack.send_signal(signal.SIGHUP)
        try:
            code = stack.wait(30)
        except subprocess.TimeoutExpired:
            stack.kill()
            stack.wait()
            raise AssertionError(f"the stack did not stop:\n{log.read_text()}") from None
    assert code == 0, log.read_text()
    # Every process stopped on its own: none had to be killed at the stack's deadline (a
    # balancer with --discover used to hang on a lost cancel; see test_discovery).
    assert "did not stop" not in log.read_text(), log.read_text()
