"""`python -m balancer --workers N`: N balancer processes on one port, supervised by their
parent with the same restart rules as `--spawn`'s app workers
(`balancer/supervisors/_processes.py`).

Real processes: a demo_app instance behind the balancer; the balancer processes are found
as the children of the parent with psutil.
"""

from __future__ import annotations

import functools
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from balancer import ConfigError, load_settings
from balancer.supervisors._processes import CANNOT_SERVE, BalancerProcesses
from balancer.supervisors._workers import RestartPolicy
from tests.helpers import free_port, wait_for
from tests.processes import Process, balancer, demo_app


def balancer_processes(parent: Process) -> set[int]:
    """The pids of the parent's balancer processes still running (zombies excluded)."""
    children = psutil.Process(parent.popen.pid).children()
    return {child.pid for child in children if _running(child)}


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def both_answer(admin: str) -> bool:
    """The admin address's `GET /backends` heard from both balancer processes."""
    try:
        processes = httpx.get(admin + "/backends", timeout=5).json()["processes"]
    except (httpx.HTTPError, ValueError, KeyError):
        return False
    return [p["answered"] for p in processes] == [True, True]


@pytest.fixture
def two_processes() -> Iterator[tuple[Process, str]]:
    """`--workers 2` in front of one demo_app; yields the parent and its admin URL."""
    admin = f"http://127.0.0.1:{free_port()}"
    extra = ("--workers", "2", "--admin", admin.removeprefix("http://"))
    with demo_app("app1") as app, balancer([app.url], *extra, admin=False) as (parent, _):
        parent.wait_ready_url(admin + "/healthz")
        wait_for(lambda: len(balancer_processes(parent)) == 2, 15, "two balancer processes")
        yield parent, admin


def test_a_killed_balancer_process_is_replaced_and_the_proxy_keeps_answering(
    two_processes: tuple[Process, str],
) -> None:
    parent, admin = two_processes
    before = balancer_processes(parent)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    failed = 0

    def replaced() -> bool:
        nonlocal failed
        parent.alive()
        # The survivor takes every connection meanwhile (SO_REUSEPORT sends new ones to
        # listening sockets only).
        failed += not answers(parent.url + "/api/session")
        now = balancer_processes(parent)
        return len(now) == 2 and victim not in now

    wait_for(replaced, 10, "a new balancer process in place of the killed one")
    assert failed == 0
    # The replacement is the same process number: the one admin address hears from both.
    wait_for(functools.partial(both_answer, admin), 10, "both processes to answer the admin")
    assert all(answers(parent.url + "/api/session") for _ in range(20))


def test_sigterm_stops_every_balancer_process_and_exits_0(
    two_processes: tuple[Process, str],
) -> None:
    parent, _ = two_processes
    pids = balancer_processes(parent)
    assert parent.terminate() == 0
    assert not any(_alive(pid) for pid in pids)


def test_sigkill_of_the_parent_leaves_no_balancer_process(
    two_processes: tuple[Process, str],
) -> None:
    parent, _ = two_processes
    pids = balancer_processes(parent)
    parent.popen.kill()
    parent.popen.wait(5)
    # PR_SET_PDEATHSIG: the kernel sends each balancer process SIGTERM when its parent dies.
    wait_for(lambda: not any(_alive(pid) for pid in pids), 15, "the balancer processes to exit")


def _alive(pid: int) -> bool:
    try:
        return _running(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return False


# -- the parent's rules, with real forks of the test process -----------------------------------

QUICK = RestartPolicy(backoff=0.01, backoff_max=0.04, min_uptime=5.0, max_crashes=3)


def exiting_with(code: int, starts: Path) -> Callable[[int, int], int]:
    """A `serve` for BalancerProcesses: note the start in `starts`, exit `code` at once."""

    def serve(index: int, restarts: int) -> int:
        with starts.open("a") as out:
            out.write(f"{index}\n")
        return code

    return serve


def starts_by_index(starts: Path) -> dict[int, int]:
    counts: dict[int, int] = {}
    for line in starts.read_text().split():
        counts[int(line)] = counts.get(int(line), 0) + 1
    return counts


def test_a_crash_loop_is_held_after_max_crashes_and_the_parent_exits_1(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    processes = BalancerProcesses(2, exiting_with(0, starts), policy=QUICK, stop_timeout=5)
    assert processes.run() == 1  # an exit 0 unasked is a crash too
    # A first start and two restarts each (0.01 s, then 0.02 s later): the third early
    # crash in a row holds it.
    assert starts_by_index(starts) == {0: 3, 1: 3}


def test_a_balancer_process_that_cannot_serve_is_not_restarted(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    serve = exiting_with(CANNOT_SERVE, starts)
    processes = BalancerProcesses(2, serve, policy=QUICK, stop_timeout=5)
    assert processes.run() == 1
    assert starts_by_index(starts) == {0: 1, 1: 1}


def test_an_inconsistent_restart_policy_is_refused_with_workers_too() -> None:
    # It was checked with --spawn only: with --workers it reached RestartPolicy's ValueError.
    argv = ["--backend", "http://127.0.0.1:9", "--workers", "2"]
    argv += ["--restart-backoff", "1", "--restart-backoff-max", "0.5"]
    with pytest.raises(ConfigError, match=r"^--restart-backoff-max: 0.5 s is less than"):
        load_settings(argv, {})
