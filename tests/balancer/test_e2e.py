"""The whole stack as real processes: demo_app instances behind the balancer.

Stickiness from the request that creates the session, two balancers agreeing,
failover in sticky and hybrid modes, drain from the admin API, /metrics.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from redis_plumbing import RedisServer
from tests.helpers import free_port, wait_for
from tests.processes import Process, balancer, demo_app

SECRET = "e2e-affinity-secret-0123456789"
# Cookie stickiness, and health checks quick enough to see a killed instance within a second.
STICKY_FAST_HEALTH = (
    "--sticky",
    "cookie:sid",
    "--health-interval",
    "0.2",
    "--health-timeout",
    "0.2",
)


@contextlib.contextmanager
def instances(count: int, store: str, redis_url: str | None) -> Iterator[list[Process]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(demo_app(f"app{i}", store, redis_url)) for i in range(count)]


def counter(client: httpx.Client, url: str) -> dict[str, object]:
    response = client.post(url + "/api/counter")
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def test_sticky_from_the_creating_request(redis_server: RedisServer) -> None:
    with (
        instances(3, "memory", None) as apps,
        balancer([a.url for a in apps], "--sticky", "cookie:sid") as (lb, _),
    ):
        for _ in range(5):  # five clients, each a fresh session
            with httpx.Client() as client:
                answers = [counter(client, lb.url) for _ in range(8)]
            assert [a["count"] for a in answers] == list(range(1, 9))
            assert len({a["instance"] for a in answers}) == 1


def test_two_balancers_agree_on_every_session(redis_server: RedisServer) -> None:
    with (
        instances(3, "memory", None) as apps,
        balancer([a.url for a in apps], "--sticky", "cookie:sid", "--affinity-secret", SECRET) as (
            one,
            _,
        ),
        balancer([a.url for a in apps], "--sticky", "cookie:sid", "--affinity-secret", SECRET) as (
            two,
            _,
        ),
    ):
        for _ in range(5):
            with httpx.Client() as client:
                answers = [counter(client, (one, two)[i % 2].url) for i in range(8)]
            assert [a["count"] for a in answers] == list(range(1, 9))
            assert len({a["instance"] for a in answers}) == 1


def test_ip_stickiness(redis_server: RedisServer) -> None:
    with (
        instances(3, "memory", None) as apps,
        balancer([a.url for a in apps], "--sticky", "ip") as (lb, _),
        httpx.Client() as client,
    ):
        answers = [counter(client, lb.url) for _ in range(6)]
        assert [a["count"] for a in answers] == list(range(1, 7))


@pytest.mark.parametrize(("store", "kept"), [("memory", False), ("hybrid", True)])
def test_failover_when_the_pinned_instance_dies(
    redis_server: RedisServer, store: str, kept: bool
) -> None:
    with (
        instances(3, store, redis_server.url) as apps,
        balancer([a.url for a in apps], *STICKY_FAST_HEALTH) as (lb, _),
        httpx.Client() as client,
    ):
        first = [counter(client, lb.url) for _ in range(3)]
        pinned = first[-1]["instance"]
        victim = next(a for a in apps if a.args[a.args.index("--instance-id") + 1] == pinned)
        victim.popen.kill()
        victim.popen.wait()
        after = counter(client, lb.url)  # retried on the next instance: never an error
        assert after["instance"] != pinned
        assert after["count"] == (4 if kept else 1)
        again = counter(client, lb.url)  # the pin moved with it
        assert again["instance"] == after["instance"]
        assert again["count"] == after["count"] + 1


def test_a_drain_keeps_pinned_clients_or_moves_them_when_told(redis_server: RedisServer) -> None:
    with (
        instances(2, "hybrid", redis_server.url) as apps,
        balancer([a.url for a in apps], "--sticky", "cookie:sid") as (lb, admin),
        httpx.Client() as client,
    ):
        assert admin is not None
        pinned = counter(client, lb.url)["instance"]
        backends = httpx.get(admin + "/backends").json()["backends"]
        url = next(a.url for a in apps if a.args[a.args.index("--instance-id") + 1] == pinned)
        backend_id = next(b["id"] for b in backends if b["url"] == url)
        response = httpx.post(f"{admin}/backends/{backend_id}/drain")
        assert response.status_code == 200, response.text
        kept = counter(client, lb.url)  # the default keeps the session where it lives
        assert (kept["instance"], kept["count"]) == (pinned, 2)
        assert httpx.post(f"{admin}/backends/{backend_id}/enable").status_code == 200
        response = httpx.post(f"{admin}/backends/{backend_id}/drain?sessions=move")
        assert response.status_code == 200, response.text
        moved = counter(client, lb.url)  # hybrid: it goes on from Redis elsewhere
        assert moved["instance"] != pinned
        assert moved["count"] == 3

        def drained() -> bool:
            backends = httpx.get(admin + "/backends").json()["backends"]
            states: dict[str, str] = {b["id"]: b["state"] for b in backends}
            return states[backend_id] == "drained"

        wait_for(drained, 5, "the moving drain to end once nothing is in flight")


def test_metrics_count_requests_by_backend(redis_server: RedisServer) -> None:
    with (
        instances(2, "memory", None) as apps,
        balancer([a.url for a in apps], "--sticky", "cookie:sid") as (lb, admin),
        httpx.Client() as client,
    ):
        assert admin is not None
        for _ in range(4):
            counter(client, lb.url)

        def counted() -> bool:
            text = httpx.get(admin + "/metrics").text
            return any(
                line.startswith("balancer_requests_total") and line.endswith(" 4.0")
                for line in text.splitlines()
            )

        wait_for(counted, 5, "4 requests in /metrics")


def test_no_backend_is_503(redis_server: RedisServer) -> None:
    with (
        instances(1, "memory", None) as apps,
        # A short queue: each request waits that long for a backend before its answer (a
        # 502 while the dead one is still in the pool, then the 503), 3 s by default.
        balancer([a.url for a in apps], *STICKY_FAST_HEALTH, "--queue-timeout", "0.3") as (lb, _),
    ):
        apps[0].popen.kill()
        apps[0].popen.wait()

        def unavailable() -> bool:
            return httpx.get(lb.url + "/api/session").status_code == 503

        wait_for(unavailable, 10, "503 once the only backend is gone")


def test_bad_flag_exits_2_naming_it() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "balancer", "--backend", "ftp://x", "--listen", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert result.returncode == 2
    assert "--backend" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("flag", ["--admin", "--listen"])
def test_an_address_in_use_exits_1_naming_it_before_serving(flag: str) -> None:
    # Another process holds one of the two ports; the balancer must not start serving on the
    # other (it did: "listening" for the proxy, then a bare "[Errno 98] Address already in
    # use" for the admin port, without the address).
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        busy, other = held.getsockname()[1], free_port()
        listen, admin = (other, busy) if flag == "--admin" else (busy, other)
        addresses = ["--listen", f"127.0.0.1:{listen}", "--admin", f"127.0.0.1:{admin}"]
        # A secret, so that stderr holds no warning that replicas would not agree.
        addresses += ["--affinity-secret", SECRET]
        result = subprocess.run(
            [sys.executable, "-m", "balancer", *addresses, "--backend", "http://127.0.0.1:9"],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "listening" not in output
    assert "Traceback" not in output
    assert result.stderr.strip().splitlines() == [
        f"balancer: error: {flag} 127.0.0.1:{busy}: cannot listen: address already in use"
    ]
