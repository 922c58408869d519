"""Supervised workers, the pure part: each worker's state machine, when to restart a crashed
one (exponential backoff, crash-loop hold), and the rolling-restart plan.

No I/O and no clock: every method that needs the time takes `now` (seconds on one monotonic
clock that the caller owns). `_supervisor.py` is the I/O shell around it: it spawns and
signals the processes, probes their ready path, moves their backends in the pool, and asks
these objects what to do next.

A worker's life; a restart is a new process of the same worker (same index, new pid):

    STARTING ──ready──> READY ──drain──> DRAINING
        │                 │                 │
        └──── stop ───────┴───── stop ──────┴──> STOPPING
        │                 │                 │        │
        └──── exited ─────┴──── exited ─────┴────────┴──> EXITED ──restart──> STARTING
                                                            │
                                                       crash loop ──> HELD ──restart──> STARTING

A worker that exits without being told to, whatever its exit code, is restarted: a code 0
is no proof of health (`true` as a worker command must not spin). Its restart waits
`backoff` seconds, doubling with each *early* crash in a row (one less than `min_uptime`
seconds after it became ready, or before it ever did), up to `backoff_max`; `max_crashes`
early crashes in a row HOLD it until an operator restarts it. A crash after a stable run
starts the count again. A worker told to stop on purpose (drained, scaled down, replaced)
is `retiring`: its exit is the end of it.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from .._exceptions import InvalidTransition

__all__ = [
    "Exit",
    "RestartPolicy",
    "Rollout",
    "RolloutPhase",
    "RolloutStep",
    "Worker",
    "WorkerState",
    "restart_delay",
]


class WorkerState(enum.Enum):
    STARTING = "starting"  # spawned; probed on its ready path; not in the pool yet
    READY = "ready"  # answered its ready path; in the pool, takes requests
    DRAINING = "draining"  # in the pool as DRAINING: no new requests, finishes its own
    STOPPING = "stopping"  # sent SIGTERM (or SIGKILL) and out of the pool; waiting for its exit
    EXITED = "exited"  # its process is gone; restarted at `restart_at` unless retiring
    HELD = "held"  # a crash loop: not restarted until an operator asks


_STARTING, _READY, _DRAINING = WorkerState.STARTING, WorkerState.READY, WorkerState.DRAINING
_STOPPING, _EXITED, _HELD = WorkerState.STOPPING, WorkerState.EXITED, WorkerState.HELD
_ALIVE = frozenset({_STARTING, _READY, _DRAINING, _STOPPING})
_ALLOWED: Mapping[WorkerState, frozenset[WorkerState]] = {
    _STARTING: frozenset({_READY, _STOPPING, _EXITED, _HELD}),
    _READY: frozenset({_DRAINING, _STOPPING, _EXITED, _HELD}),
    _DRAINING: frozenset({_STOPPING, _EXITED, _HELD}),
    _STOPPING: frozenset({_EXITED, _HELD}),
    _EXITED: frozenset({_STARTING}),
    _HELD: frozenset({_STARTING}),
}


class Exit(enum.Enum):
    """What an exit means, as `Worker.exited` decides it."""

    RETIRED = "retired"  # it was told to stop on purpose: forget it
    RESTART = "restart"  # unasked: restart it at `restart_at`
    HELD = "held"  # unasked, and a crash loop: hold it


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """When a worker that exited unasked is started again (see the module docstring)."""

    backoff: float = 0.1  # seconds before a restart after a stable run or a first crash
    backoff_max: float = 10.0  # seconds: the doubling stops here
    min_uptime: float = 5.0  # seconds ready; a worker that dies sooner crashed early
    max_crashes: int = 5  # early crashes in a row that hold a worker; 0 = never hold

    def __post_init__(self) -> None:
        if self.backoff < 0 or self.backoff_max < self.backoff or self.min_uptime < 0:
            raise ValueError(f"inconsistent restart policy: {self}")
        if self.max_crashes < 0:
            raise ValueError(f"max_crashes must be >= 0, got {self.max_crashes}")


def restart_delay(crashes: int, policy: RestartPolicy) -> float:
    """Seconds before a restart after `crashes` early crashes in a row (0: a stable run).

    `backoff` for 0 and 1, then doubling: backoff x 2^(crashes - 1), at most `backoff_max`.
    """
    exponent = min(max(0, crashes - 1), 64)  # 2**64 x any sane backoff is past any maximum
    return float(min(policy.backoff_max, policy.backoff * 2**exponent))


class Worker:
    """One supervised worker: its number, its current process, its state, its crash record.

    `key` is unique for the life of the supervisor; `index` is the worker's number (the
    `{index}` of the command template), shared by a worker and its rolling replacement.
    Every transition method raises InvalidTransition when the state forbids it.
    """

    __slots__ = (
        "crashes",
        "index",
        "key",
        "killed",
        "last_exit",
        "pid",
        "port",
        "ready_at",
        "restart_at",
        "restarts",
        "retiring",
        "started_at",
        "state",
        "state_since",
        "unhealthy_since",
    )

    def __init__(self, key: int, index: int, port: int, *, now: float) -> None:
        self.key = key
        self.index = index
        self.port = port
        self.pid: int | None = None  # set once the process is spawned
        self.state = _STARTING
        self.state_since = now
        self.started_at = now
        self.ready_at: float | None = None
        self.restart_at: float | None = None  # when EXITED after an unasked exit
        self.unhealthy_since: float | None = None  # first seen failing its health checks
        self.crashes = 0  # early crashes in a row
        self.restarts = 0  # restarts since the supervisor created it
        self.last_exit: int | None = None  # returncode: negative for a signal (-9: SIGKILL)
        self.retiring = False  # told to stop on purpose: its exit is the end of it
        self.killed = False  # sent SIGKILL in this life

    def __repr__(self) -> str:
        return f"<Worker {self.index} key={self.key} pid={self.pid} [{self.state.value}]>"

    @property
    def alive(self) -> bool:
        """Its process may be running (spawned and not yet reaped)."""
        return self.state in _ALIVE

    def _move(self, new: WorkerState, now: float) -> None:
        if new not in _ALLOWED[self.state]:
            raise InvalidTransition(
                f"cannot move worker {self.index} (key {self.key}) "
                f"from {self.state.value} to {new.value}"
            )
        self.state = new
        self.state_since = now

    # -- transitions --------------------------------------------------------------------

    def ready(self, now: float) -> None:
        """Its ready path answered: it joins the pool."""
        self._move(_READY, now)
        self.ready_at = now

    def drain(self, now: float) -> None:
        """Out of rotation on purpose; it stops once idle (or at the drain deadline)."""
        self._move(_DRAINING, now)
        self.retiring = True

    def stop(self, now: float, *, retire: bool, kill: bool = False) -> None:
        """Told to exit: SIGTERM, or SIGKILL with `kill`. `retire`: on purpose, so its exit
        is final; without it (a hung worker, one never ready) the exit counts as a crash."""
        self._move(_STOPPING, now)
        self.retiring = self.retiring or retire
        self.killed = kill

    def escalate(self) -> None:
        """A STOPPING worker outlived its stop timeout and was sent SIGKILL."""
        if self.state is not _STOPPING or self.killed:
            raise InvalidTransition(
                f"cannot kill worker {self.index} (key {self.key}): it is {self.state.value}"
                f"{' and killed already' if self.killed else ''}"
            )
        self.killed = True

    def retire(self) -> None:
        """Never restart it: for a worker already EXITED (or HELD) when it is retired."""
        self.retiring = True

    def exited(self, returncode: int, now: float, policy: RestartPolicy) -> Exit:
        """Its process is gone (reaped, or never spawned: 127); decides what comes next."""
        self.last_exit = returncode
        self.unhealthy_since = None
        if self.retiring:
            self._move(_EXITED, now)
            return Exit.RETIRED
        ready_at = self.ready_at
        early = ready_at is None or now - ready_at < policy.min_uptime
        self.crashes = self.crashes + 1 if early else 0
        if early and policy.max_crashes and self.crashes >= policy.max_crashes:
            self._move(_HELD, now)
            return Exit.HELD
        self._move(_EXITED, now)
        self.restart_at = now + restart_delay(self.crashes, policy)
        return Exit.RESTART

    def restarted(self, port: int, now: float) -> None:
        """A new process of this worker (its pid follows); from HELD, a fresh crash count."""
        if self.retiring:
            raise InvalidTransition(f"cannot restart worker {self.index}: it is retired")
        if self.state is _HELD:
            self.crashes = 0
        self._move(_STARTING, now)
        self.port = port
        self.pid = None
        self.started_at = now
        self.ready_at = None
        self.restart_at = None
        self.killed = False
        self.restarts += 1

    # -- questions the supervisor asks each turn ----------------------------------------

    def restart_due(self, now: float) -> bool:
        """EXITED unasked, and its backoff is over."""
        return (
            self.state is _EXITED
            and not self.retiring
            and self.restart_at is not None
            and now >= self.restart_at
        )

    def ready_overdue(self, now: float, timeout: float) -> bool:
        """STARTING for `timeout` seconds without answering its ready path."""
        return self.state is _STARTING and now - self.started_at >= timeout

    def hung(self, *, healthy: bool, now: float, timeout: float) -> bool:
        """READY and failing its health checks for `timeout` seconds (remembers since when)."""
        if self.state is not _READY or healthy:
            self.unhealthy_since = None
            return False
        if self.unhealthy_since is None:
            self.unhealthy_since = now
        return now - self.unhealthy_since >= timeout

    def drained(self, *, ended: bool, now: float, deadline: float) -> bool:
        """DRAINING, and its backend's drain `ended` (DRAINED: it keeps pinned clients
        until then, `_backend`), or for `deadline` seconds: time to stop it."""
        return self.state is _DRAINING and (ended or now - self.state_since >= deadline)

    def stop_overdue(self, now: float, timeout: float) -> bool:
        """STOPPING after SIGTERM for `timeout` seconds: time for SIGKILL."""
        return self.state is _STOPPING and not self.killed and now - self.state_since >= timeout

    def describe(self, now: float) -> dict[str, object]:
        """The JSON shape of a worker in the admin API."""
        ready_at = self.ready_at
        return {
            "index": self.index,
            "key": self.key,
            "state": self.state.value,
            "pid": self.pid if self.alive else None,
            "port": self.port,
            "url": f"http://127.0.0.1:{self.port}",
            "uptime": None if ready_at is None or not self.alive else now - ready_at,
            "restarts": self.restarts,
            "crashes_in_a_row": self.crashes,
            "last_exit": self.last_exit,
            "restart_in": None if self.restart_at is None else max(0.0, self.restart_at - now),
            "retiring": self.retiring,
        }


# -- the rolling restart -------------------------------------------------------------------


class RolloutPhase(enum.Enum):
    NEXT = "next"  # between workers: the next step starts the next target's replacement
    STARTING = "starting"  # the replacement is starting; the old worker still serves
    RETIRING = "retiring"  # the replacement serves; the old worker drains, then stops
    DONE = "done"  # every target was replaced, or the rollout was aborted


@dataclass(frozen=True, slots=True)
class RolloutStep:
    """What the supervisor does now: spawn a replacement for `old`, retire `old` (drain,
    then stop), wait, or nothing more (done; abort: the replacement never became ready)."""

    action: Literal["spawn", "retire", "wait", "done", "abort"]
    old: int | None = None  # the key of the worker being replaced


class Rollout:
    """A rolling restart: the target workers replaced one at a time, never all at once.

    For each target still serving (STARTING or READY): spawn its replacement; wait until the
    replacement is READY (so in the pool) while the old one keeps serving; retire the old
    one (drain, stop) and wait until it has exited; then the next. A replacement that gets
    HELD, or vanishes, aborts the rollout: the old workers keep serving.

    Drive it with `step(states)` on every turn of the supervisor's loop (`states`: every
    known worker's state by key; a key missing is a worker gone), and after a "spawn" step
    tell it the new worker's key with `spawned(key)`.
    """

    def __init__(self, targets: Sequence[int]) -> None:
        self.targets: deque[int] = deque(targets)
        self.phase = RolloutPhase.NEXT
        self.old: int | None = None
        self.new: int | None = None
        self.replaced = 0

    def __repr__(self) -> str:
        return (
            f"<Rollout [{self.phase.value}] old={self.old} new={self.new} "
            f"replaced={self.replaced} left={len(self.targets)}>"
        )

    @property
    def replacing(self) -> int | None:
        """The key of the worker being replaced now, if any."""
        return self.old if self.phase in (RolloutPhase.STARTING, RolloutPhase.RETIRING) else None

    def spawned(self, key: int) -> None:
        """The replacement asked for by the last "spawn" step exists, with this key."""
        if self.phase is not RolloutPhase.STARTING or self.new is not None:
            raise InvalidTransition(f"a replacement was spawned out of turn: {self!r}")
        self.new = key

    def step(self, states: Mapping[int, WorkerState]) -> RolloutStep:
        """The next thing to do, given every worker's state now."""
        while True:
            phase = self.phase
            if phase is RolloutPhase.NEXT:
                old = self._next_target(states)
                if old is None:
                    self.phase = RolloutPhase.DONE
                    return RolloutStep("done")
                self.old, self.new = old, None
                self.phase = RolloutPhase.STARTING
                return RolloutStep("spawn", old)
            if phase is RolloutPhase.STARTING:
                if self.new is None:
                    raise InvalidTransition(f"step() before spawned() after a spawn: {self!r}")
                new_state = states.get(self.new)
                if new_state is _READY:
                    self.phase = RolloutPhase.RETIRING
                    return RolloutStep("retire", self.old)
                if new_state is None or new_state is _HELD:
                    self.phase = RolloutPhase.DONE
                    return RolloutStep("abort", self.old)
                return RolloutStep("wait", self.old)
            if phase is RolloutPhase.RETIRING:
                assert self.old is not None
                if states.get(self.old) in (None, _EXITED):
                    self.replaced += 1
                    self.phase = RolloutPhase.NEXT
                    continue
                return RolloutStep("wait", self.old)
            return RolloutStep("done")

    def _next_target(self, states: Mapping[int, WorkerState]) -> int | None:
        while self.targets:
            key = self.targets.popleft()
            if states.get(key) in (_STARTING, _READY):
                return key
        return None
