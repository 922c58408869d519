"""`--workers N` behind one admin address (`balancer/control/_cluster.py`).

Real processes: two demo_app instances behind `python -m balancer --workers 2`, whose
balancer processes SO_REUSEPORT spreads new connections over; each request below opens a
connection of its own, so both processes take some. The pure merges are tested by tables.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import psutil
import pytest

from balancer.control._cluster import merge_backends, merge_metrics
from tests.helpers import Stream, wait_for
from tests.processes import Process, balancer, demo_app

REQUESTS = 40  # through the proxy, one connection each: both processes take some


@dataclass
class Cluster:
    parent: Process
    admin: str
    apps: dict[str, str]  # instance name -> URL

    def backends(self, **headers: str) -> dict[str, Any]:
        response = httpx.get(self.admin + "/backends", headers=headers, timeout=5)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def backend_id(self, instance: str) -> str:
        url = self.apps[instance]
        ids = [b["id"] for b in self.backends()["backends"] if b["url"] == url]
        assert len(ids) == 1, ids
        backend_id: str = ids[0]
        return backend_id

    def instances(self, count: int = REQUESTS) -> list[str]:
        """The instance that answered each of `count` requests, one new connection each."""
        served = []
        for _ in range(count):
            with httpx.Client(timeout=5) as client:  # a new connection: SO_REUSEPORT picks
                response = client.get(self.parent.url + "/api/session")
                assert response.status_code == 200, response.text
                served.append(response.json()["instance"])
        return served

    def pids(self) -> dict[int, int]:
        """Each balancer process's pid, by index, as the admin API reports them."""
        return {p["index"]: p["pid"] for p in self.backends()["processes"] if p["answered"]}


def _listening(pid: int, port: int) -> bool:
    try:
        connections = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.NoSuchProcess:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in connections)


def _every_process_listens(parent: Process, count: int) -> bool:
    parent.alive()
    port = int(parent.url.rsplit(":", 1)[1])
    children = psutil.Process(parent.popen.pid).children()
    return len(children) == count and all(_listening(c.pid, port) for c in children)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with demo_app("app1") as app1, demo_app("app2") as app2:
        extra = ("--workers", "2", "--sticky", "none")
        with balancer([app1.url, app2.url], *extra) as (parent, admin):
            assert admin is not None
            wait_for(lambda: _every_process_listens(parent, 2), 15, "2 processes on the port")
            yield Cluster(parent, admin, {"app1": app1.url, "app2": app2.url})


def test_a_drain_sent_to_the_admin_address_reaches_every_balancer_process(
    cluster: Cluster,
) -> None:
    app1 = cluster.backend_id("app1")
    response = httpx.post(f"{cluster.admin}/backends/{app1}/drain", timeout=5)
    assert response.status_code == 200, response.text
    assert [p["status"] for p in response.json()["processes"]] == [200, 200]
    served = cluster.instances()
    # Before: only process 0 drained it; process 1 still sent about half of its share there.
    assert served.count("app1") == 0, served
    backend = next(b for b in cluster.backends()["backends"] if b["id"] == app1)
    assert set(backend["states"].values()) <= {"draining", "drained"}, backend


def test_backends_and_metrics_are_summed_over_the_balancer_processes(cluster: Cluster) -> None:
    served = cluster.instances()
    body = cluster.backends()
    assert sum(b["requests_total"] for b in body["backends"]) == REQUESTS
    by_url = {b["url"]: b["requests_total"] for b in body["backends"]}
    assert by_url == {url: served.count(name) for name, url in cluster.apps.items()}
    assert [p["answered"] for p in body["processes"]] == [True, True]
    text = httpx.get(cluster.admin + "/metrics", timeout=5).text
    total = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("balancer_requests_total{")
    )
    assert total == REQUESTS
    assert text.count("# TYPE balancer_requests_total counter") <= 1  # one family, not two


def test_the_dashboard_shows_every_balancer_process(cluster: Cluster) -> None:
    served = cluster.instances()
    shown = -1
    deadline = time.monotonic() + 10
    with httpx.stream("GET", cluster.admin + "/dashboard/stream", timeout=5) as response:
        assert response.status_code == 200
        stream = Stream(response)
        while shown != REQUESTS and time.monotonic() < deadline:  # a tick a second
            _, snapshot = stream.next()
            shown = sum(row["requests_total"] for row in snapshot["backends"])
    # Before: process 0's share only (about half).
    assert shown == REQUESTS, (shown, served)


def test_a_restarted_balancer_process_gets_the_drains_made_before(cluster: Cluster) -> None:
    app1 = cluster.backend_id("app1")
    assert httpx.post(f"{cluster.admin}/backends/{app1}/drain", timeout=5).status_code == 200
    for index in (1, 0):  # a peer, then the one that owns the admin address
        before = cluster.pids()
        os.kill(before[index], signal.SIGKILL)

        def replaced(index: int = index, old: int = before[index]) -> bool:
            try:
                pids = cluster.pids()
            except (httpx.HTTPError, AssertionError):
                return False
            return pids.get(index) not in (None, old) and len(pids) == 2

        wait_for(replaced, 15, f"balancer process {index} to be replaced")
        wait_for(lambda: _every_process_listens(cluster.parent, 2), 15, "both on the port")
        served = cluster.instances()
        assert served.count("app1") == 0, (index, served)
        backend = next(b for b in cluster.backends()["backends"] if b["id"] == app1)
        assert set(backend["states"].values()) <= {"draining", "drained"}, (index, backend)


def test_a_process_that_does_not_answer_is_named_and_nothing_hangs(cluster: Cluster) -> None:
    pids = cluster.pids()
    os.kill(pids[1], signal.SIGSTOP)
    try:
        began = time.monotonic()
        body = cluster.backends()
        took = time.monotonic() - began
        missing = [p for p in body["processes"] if not p["answered"]]
        assert [p["index"] for p in missing] == [1]
        assert "error" in missing[0]
        assert took < 3.0  # the peers' timeout (1 s), not a hang
        app2 = cluster.backend_id("app2")
        response = httpx.post(f"{cluster.admin}/backends/{app2}/drain", timeout=5)
        assert response.status_code == 200  # process 0's answer
        assert [p["answered"] for p in response.json()["processes"]] == [True, False]
    finally:
        os.kill(pids[1], signal.SIGCONT)


def test_the_token_guards_the_internal_endpoints_too() -> None:
    token = "t" * 20
    with demo_app("app1") as app1:
        extra = ("--workers", "2", "--admin-token", token)
        with balancer([app1.url], *extra) as (parent, admin):
            assert admin is not None
            wait_for(lambda: _every_process_listens(parent, 2), 15, "2 processes on the port")
            auth = {"Authorization": f"Bearer {token}"}
            assert httpx.get(admin + "/backends", timeout=5).status_code == 401
            body = httpx.get(admin + "/backends", headers=auth, timeout=5).json()
            assert [p["answered"] for p in body["processes"]] == [True, True]
            for process in body["processes"]:
                internal = f"http://{process['address']}/backends"
                assert httpx.get(internal, timeout=5).status_code == 401
                assert httpx.get(internal, headers=auth, timeout=5).status_code == 200


# -- the merges, pure ----------------------------------------------------------------------


def _row(state: str, requests: int, in_flight: int = 0) -> dict[str, object]:
    return {
        "id": "b1",
        "url": "http://127.0.0.1:9",
        "state": state,
        "in_flight": in_flight,
        "requests_total": requests,
        "failures_total": 1,
        "healthy": state != "down",
        "draining": state == "draining",
    }


@pytest.mark.parametrize(
    ("states", "merged"),
    [
        (("up", "up"), "up"),
        (("up", "draining"), "draining"),
        (("draining", "drained"), "drained"),
        (("up", "down"), "down"),
        (("drained", "down"), "down"),
    ],
)
def test_merged_backends_sum_the_counters_and_take_the_worst_state(
    states: tuple[str, str], merged: str
) -> None:
    bodies = {
        index: {"pool": "<Pool>", "fingerprint": "f", "backends": [_row(state, 3 + index, 1)]}
        for index, state in enumerate(states)
    }
    rows = merge_backends(bodies)
    assert len(rows) == 1
    row = rows[0]
    assert row["state"] == merged
    assert row["states"] == {"0": states[0], "1": states[1]}
    assert (row["requests_total"], row["failures_total"], row["in_flight"]) == (7, 2, 2)
    assert row["healthy"] is (merged != "down")


def test_a_backend_one_process_lacks_is_listed_as_absent_there() -> None:
    bodies: dict[int, dict[str, Any]] = {
        0: {"backends": [_row("up", 1)]},
        1: {"backends": []},
    }
    (row,) = merge_backends(bodies)
    assert row["states"] == {"0": "up", "1": "absent"}
    assert row["state"] == "absent"


def test_merged_metrics_sum_every_sample_with_the_same_labels() -> None:
    one = (
        "# HELP balancer_requests_total Requests answered.\n"
        "# TYPE balancer_requests_total counter\n"
        'balancer_requests_total{backend="b1",status="200"} 3.0\n'
        "# HELP balancer_connections_active Open now.\n"
        "# TYPE balancer_connections_active gauge\n"
        "balancer_connections_active 2.0\n"
    )
    two = one.replace(" 3.0", " 4.0").replace("active 2.0", "active 1.0")
    two += 'balancer_requests_total{backend="b2",status="200"} 5.0\n'
    text = merge_metrics([one, two]).decode()
    assert 'balancer_requests_total{backend="b1",status="200"} 7.0' in text
    assert 'balancer_requests_total{backend="b2",status="200"} 5.0' in text
    assert "balancer_connections_active 3.0" in text
    assert text.count("# TYPE balancer_requests_total counter") == 1
