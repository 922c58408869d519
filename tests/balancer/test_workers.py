"""The pure part of the supervisor: the worker state machine, backoff, crash loops, rollouts."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from balancer import InvalidTransition
from balancer.supervisors._workers import (
    Exit,
    RestartPolicy,
    Rollout,
    RolloutPhase,
    RolloutStep,
    Worker,
    WorkerState,
    restart_delay,
)
from tests.helpers import FakeClock

S = WorkerState
POLICY = RestartPolicy(backoff=0.1, backoff_max=10.0, min_uptime=5.0, max_crashes=3)


def _worker(clock: FakeClock, state: WorkerState = S.STARTING) -> Worker:
    """A worker brought to `state` through allowed transitions."""
    worker = Worker(0, 0, 9000, now=clock())
    worker.pid = 100

    def drain(w: Worker) -> None:
        w.ready(clock())
        w.drain(clock())

    path: dict[WorkerState, Callable[[Worker], object]] = {
        S.STARTING: lambda w: None,
        S.READY: lambda w: w.ready(clock()),
        S.DRAINING: drain,
        S.STOPPING: lambda w: w.stop(clock(), retire=False),
        S.EXITED: lambda w: w.exited(1, clock(), POLICY),
        S.HELD: lambda w: w.exited(1, clock(), RestartPolicy(max_crashes=1)),
    }
    path[state](worker)
    assert worker.state is state
    return worker


# Every (from, transition) pair: whether the machine allows it.
TRANSITIONS: list[tuple[WorkerState, str, bool]] = [
    (S.STARTING, "ready", True),
    (S.STARTING, "drain", False),
    (S.STARTING, "stop", True),
    (S.STARTING, "exited", True),
    (S.STARTING, "restarted", False),
    (S.READY, "ready", False),
    (S.READY, "drain", True),
    (S.READY, "stop", True),
    (S.READY, "exited", True),
    (S.READY, "restarted", False),
    (S.DRAINING, "ready", False),
    (S.DRAINING, "drain", False),
    (S.DRAINING, "stop", True),
    (S.DRAINING, "exited", True),
    (S.STOPPING, "ready", False),
    (S.STOPPING, "stop", False),
    (S.STOPPING, "exited", True),
    (S.STOPPING, "restarted", False),
    (S.EXITED, "ready", False),
    (S.EXITED, "stop", False),
    (S.EXITED, "exited", False),
    (S.EXITED, "restarted", True),
    (S.HELD, "ready", False),
    (S.HELD, "drain", False),
    (S.HELD, "restarted", True),
]

_DO: dict[str, Callable[[Worker, float], object]] = {
    "ready": lambda w, now: w.ready(now),
    "drain": lambda w, now: w.drain(now),
    "stop": lambda w, now: w.stop(now, retire=False),
    "exited": lambda w, now: w.exited(0, now, POLICY),
    "restarted": lambda w, now: w.restarted(9001, now),
}


@pytest.mark.parametrize(("state", "transition", "allowed"), TRANSITIONS)
def test_transitions(state: WorkerState, transition: str, allowed: bool) -> None:
    clock = FakeClock()
    worker = _worker(clock, state)
    if allowed:
        _DO[transition](worker, clock())
        return
    with pytest.raises(InvalidTransition, match=rf"worker 0 \(key 0\) from {state.value} to"):
        _DO[transition](worker, clock())


@pytest.mark.parametrize(
    ("crashes", "delay"),
    [(0, 0.1), (1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (7, 6.4), (8, 10.0), (10_000, 10.0)],
)
def test_restart_delay_doubles_up_to_the_maximum(crashes: int, delay: float) -> None:
    assert restart_delay(crashes, POLICY) == pytest.approx(delay)


@pytest.mark.parametrize(
    "policy",
    [
        {"backoff": -1.0},
        {"backoff": 2.0, "backoff_max": 1.0},
        {"min_uptime": -1.0},
        {"max_crashes": -1},
    ],
)
def test_inconsistent_policies_are_refused(policy: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"restart policy|max_crashes"):
        RestartPolicy(**policy)  # type: ignore[arg-type]


# One worker's life, step by step: (seconds ready before it dies or None: never ready,
# the exit it gets, the early crashes in a row after it, the restart delay or None).
LIVES: list[tuple[str, list[tuple[float | None, Exit, int, float | None]]]] = [
    ("stable runs restart after the base backoff, forever",
     [(60.0, Exit.RESTART, 0, 0.1), (60.0, Exit.RESTART, 0, 0.1), (5.0, Exit.RESTART, 0, 0.1)]),
    ("early crashes double the backoff, then hold",
     [(1.0, Exit.RESTART, 1, 0.1), (None, Exit.RESTART, 2, 0.2), (4.9, Exit.HELD, 3, None)]),
    ("a stable run in between starts the count again",
     [(1.0, Exit.RESTART, 1, 0.1), (0.5, Exit.RESTART, 2, 0.2), (30.0, Exit.RESTART, 0, 0.1),
      (1.0, Exit.RESTART, 1, 0.1), (1.0, Exit.RESTART, 2, 0.2)]),
]  # fmt: skip


@pytest.mark.parametrize(("name", "life"), LIVES, ids=[name for name, _ in LIVES])
def test_unasked_exits_restart_with_backoff_and_crash_loops_hold(
    name: str, life: list[tuple[float | None, Exit, int, float | None]]
) -> None:
    clock = FakeClock()
    worker = Worker(0, 3, 9000, now=clock())
    for uptime, outcome, crashes, delay in life:
        if uptime is not None:
            clock.advance(0.5)
            worker.ready(clock())
            clock.advance(uptime)
        assert worker.exited(1, clock(), POLICY) is outcome
        assert worker.crashes == crashes
        if delay is None:
            assert worker.state is S.HELD
            assert not worker.restart_due(clock.now + 1e9)
            break
        assert worker.state is S.EXITED
        assert not worker.restart_due(clock() + delay - 0.001)
        clock.advance(delay)
        assert worker.restart_due(clock())
        worker.restarted(9000 + worker.restarts + 1, clock())
        assert (worker.state, worker.pid, worker.ready_at) == (S.STARTING, None, None)


def test_max_crashes_zero_never_holds() -> None:
    clock = FakeClock()
    worker = Worker(0, 0, 9000, now=clock())
    policy = RestartPolicy(max_crashes=0)
    for _ in range(50):
        assert worker.exited(1, clock(), policy) is Exit.RESTART
        worker.restarted(9000, clock())
    assert worker.crashes == 50


def test_an_operator_restart_of_a_held_worker_clears_its_count() -> None:
    clock = FakeClock()
    worker = _worker(clock, S.HELD)
    worker.restarted(9001, clock())
    assert (worker.state, worker.crashes, worker.restarts) == (S.STARTING, 0, 1)


@pytest.mark.parametrize(
    ("retire", "outcome"), [(True, Exit.RETIRED), (False, Exit.RESTART)], ids=["retire", "kill"]
)
def test_a_stop_on_purpose_is_final_a_kill_is_a_crash(retire: bool, outcome: Exit) -> None:
    clock = FakeClock()
    worker = _worker(clock, S.READY)
    worker.stop(clock(), retire=retire, kill=not retire)
    assert worker.killed is not retire
    assert worker.exited(-9, clock(), POLICY) is outcome
    assert worker.last_exit == -9


def test_a_drained_worker_is_retiring_and_a_retired_one_never_restarts() -> None:
    clock = FakeClock()
    worker = _worker(clock, S.DRAINING)
    assert worker.retiring
    assert worker.exited(0, clock(), POLICY) is Exit.RETIRED
    crashed = _worker(clock, S.EXITED)
    crashed.retire()
    assert not crashed.restart_due(clock.now + 100)
    with pytest.raises(InvalidTransition, match="retired"):
        crashed.restarted(9001, clock())


def test_ready_overdue() -> None:
    clock = FakeClock()
    worker = _worker(clock)
    clock.advance(29.9)
    assert not worker.ready_overdue(clock(), 30.0)
    clock.advance(0.1)
    assert worker.ready_overdue(clock(), 30.0)
    worker.ready(clock())
    assert not worker.ready_overdue(clock(), 30.0)


def test_hung_counts_from_the_first_failed_check_and_a_pass_resets_it() -> None:
    clock = FakeClock()
    worker = _worker(clock, S.READY)
    assert not worker.hung(healthy=False, now=clock(), timeout=10)
    clock.advance(9)
    assert not worker.hung(healthy=False, now=clock(), timeout=10)
    assert not worker.hung(healthy=True, now=clock(), timeout=10)  # it recovered
    clock.advance(5)
    assert not worker.hung(healthy=False, now=clock(), timeout=10)
    clock.advance(10)
    assert worker.hung(healthy=False, now=clock(), timeout=10)
    assert not _worker(clock, S.DRAINING).hung(healthy=False, now=clock.now + 99, timeout=1)


@pytest.mark.parametrize(
    ("ended", "after", "drained"), [(True, 0.0, True), (False, 29.0, False), (False, 30.0, True)]
)
def test_drained_when_its_drain_ended_or_at_the_deadline(
    ended: bool, after: float, drained: bool
) -> None:
    clock = FakeClock()
    worker = _worker(clock, S.DRAINING)
    clock.advance(after)
    assert worker.drained(ended=ended, now=clock(), deadline=30.0) is drained


def test_stop_overdue_then_escalate_once() -> None:
    clock = FakeClock()
    worker = _worker(clock, S.STOPPING)
    clock.advance(14)
    assert not worker.stop_overdue(clock(), 15)
    clock.advance(1)
    assert worker.stop_overdue(clock(), 15)
    worker.escalate()
    assert not worker.stop_overdue(clock(), 15)
    with pytest.raises(InvalidTransition, match="killed already"):
        worker.escalate()


def test_describe() -> None:
    clock = FakeClock()
    worker = _worker(clock, S.READY)
    clock.advance(2)
    described = worker.describe(clock())
    assert described["state"] == "ready"
    assert described["pid"] == 100
    assert described["uptime"] == 2
    assert described["url"] == "http://127.0.0.1:9000"
    assert "ready" in repr(worker)


# -- the rolling restart ---------------------------------------------------------------------

A, B, NEW_A, NEW_B = 1, 2, 11, 12


def test_rollout_replaces_one_at_a_time_behind_readiness() -> None:
    rollout = Rollout([A, B])
    states = {A: S.READY, B: S.READY}
    assert rollout.step(states) == RolloutStep("spawn", A)
    rollout.spawned(NEW_A)
    states[NEW_A] = S.STARTING
    assert rollout.step(states) == RolloutStep("wait", A)  # the old one keeps serving
    states[NEW_A] = S.EXITED  # the replacement crashed: it is restarted, the rollout waits
    assert rollout.step(states) == RolloutStep("wait", A)
    states[NEW_A] = S.READY
    assert rollout.step(states) == RolloutStep("retire", A)
    states[A] = S.DRAINING
    assert rollout.step(states) == RolloutStep("wait", A)
    states[A] = S.STOPPING
    assert rollout.step(states) == RolloutStep("wait", A)
    del states[A]  # exited and forgotten
    assert rollout.step(states) == RolloutStep("spawn", B)
    assert rollout.replacing == B
    rollout.spawned(NEW_B)
    states[NEW_B] = S.READY
    assert rollout.step(states) == RolloutStep("retire", B)
    states[B] = S.EXITED
    assert rollout.step(states) == RolloutStep("done")
    assert (rollout.phase, rollout.replaced) == (RolloutPhase.DONE, 2)
    assert rollout.replacing is None


@pytest.mark.parametrize("new_state", [S.HELD, None])
def test_rollout_aborts_when_a_replacement_never_gets_ready(new_state: WorkerState | None) -> None:
    rollout = Rollout([A, B])
    assert rollout.step({A: S.READY, B: S.READY}).action == "spawn"
    rollout.spawned(NEW_A)
    states = {A: S.READY, B: S.READY}
    if new_state is not None:
        states[NEW_A] = new_state
    assert rollout.step(states) == RolloutStep("abort", A)
    assert rollout.step(states) == RolloutStep("done")


def test_rollout_skips_targets_gone_or_retiring() -> None:
    rollout = Rollout([A, B, 3])
    states = {A: S.DRAINING, 3: S.STARTING}
    assert rollout.step(states) == RolloutStep("spawn", 3)


def test_rollout_misuse_raises() -> None:
    rollout = Rollout([A])
    with pytest.raises(InvalidTransition, match="out of turn"):
        rollout.spawned(NEW_A)
    rollout.step({A: S.READY})
    with pytest.raises(InvalidTransition, match="before spawned"):
        rollout.step({A: S.READY})
    assert "starting" in repr(rollout)
