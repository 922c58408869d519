"""The local cluster supervisor, the I/O shell: spawn workers, watch them, restart, roll, scale.

    python -m balancer --spawn 3 --worker-cmd 'python -m demo_app --port {port} ...'

Every decision is made by the pure objects of `_workers.py`; this module does the I/O they
ask for. It runs in the balancer's event loop, on the balancer's pool, so draining is exact:
a worker leaves the rotation before it is told to stop, and the supervisor sees its
in-flight count reach zero.

Signal handlers and the admin app only enqueue a command (`enqueue`, `scale`) and wake the
loop; one loop does everything else, in the order `_turn` reads. A worker's exit and its
first 200 on the ready path are noticed by one small task per process, which also only
records what happened and wakes the loop.

Workers run in their own session (a Ctrl-C in the terminal reaches the supervisor only, which
stops them in order) and, on Linux, with PR_SET_PDEATHSIG: if the supervisor dies, even by
SIGKILL, the kernel sends each worker SIGTERM, so none outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from redis_plumbing import free_port, parent_death_hook

from .._exceptions import InvalidTransition
from ..control._events import (
    AUTOSCALE_AT_MAX,
    AUTOSCALE_DOWN,
    AUTOSCALE_UP,
    DRAIN_DEADLINE,
    ROLLING_RESTART_ABORTED,
    ROLLING_RESTART_DONE,
    ROLLING_RESTART_STARTED,
    SCALE_REFUSED,
    WORKER_ADDED,
    WORKER_CRASHED,
    WORKER_DRAINING,
    WORKER_EXITED,
    WORKER_HELD,
    WORKER_HUNG,
    WORKER_KILLED,
    WORKER_NOT_READY,
    WORKER_READY,
    WORKER_REMOVING,
    WORKER_REPLACING,
    WORKER_RESTARTED,
    WORKER_SPAWN_FAILED,
    WORKERS_KILLED,
    WORKERS_SCALED,
    WORKERS_STOPPED,
    WORKERS_STOPPING,
)
from ..control._log import log_event
from ..datapath._backend import DrainPolicy, backend_id
from ..datapath._pool import Pool
from ._autoscale import Action, AutoscalePolicy, Autoscaler
from ._workers import Exit, RestartPolicy, Rollout, Worker, WorkerState

__all__ = ["Command", "Supervisor", "SupervisorOptions", "worker_argv"]

logger = logging.getLogger("balancer")

_TICK = 0.05  # seconds between turns when nothing wakes the loop (drains poll in-flight counts)
_PROBE_INTERVAL = 0.05  # seconds between ready-path probes of a starting worker
_PROBE_TIMEOUT = 1.0  # seconds for one probe
_KILL_WAIT = 5.0  # seconds to wait for a SIGKILLed process to be reaped at shutdown
_NOT_SPAWNED = 127  # the returncode recorded for a command that could not be executed
_DRAIN_BACKSTOP = 1.0  # seconds past drain_deadline the supervisor stops a worker anyway

_STARTING, _READY, _DRAINING = WorkerState.STARTING, WorkerState.READY, WorkerState.DRAINING
_STOPPING, _EXITED, _HELD = WorkerState.STOPPING, WorkerState.EXITED, WorkerState.HELD


class Command(enum.Enum):
    RESTART = "restart"  # a rolling restart of every worker (SIGHUP, SIGUSR2, the admin API)
    SCALE_UP = "scale-up"  # one more worker (SIGTTIN)
    SCALE_DOWN = "scale-down"  # one fewer: the newest drains and stops (SIGTTOU)


@dataclass(frozen=True, slots=True)
class SupervisorOptions:
    """What to run and the supervisor's timeouts (all in seconds)."""

    command: tuple[str, ...]  # argv template: each part formatted with {port} and {index}
    count: int  # workers to start with (with `autoscale`: its minimum)
    ready_path: str = "/readyz"  # a starting worker joins the pool once this answers 2xx
    ready_timeout: float = 30.0  # a worker not ready by then is killed (a crash)
    hang_timeout: float = 10.0  # a ready worker failing its health checks this long is killed
    # A retired worker's drain (`DrainPolicy`) ends by this, whatever comes; its pinned
    # clients stay until then (or until none has made a request for the drain's idle time).
    drain_deadline: float = DrainPolicy().deadline
    stop_timeout: float = 15.0  # after SIGTERM, then SIGKILL
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    host: str = "127.0.0.1"  # where the workers listen
    # With a policy, the count follows the load between its minimum and maximum
    # (`_autoscale.py`); manual scaling stays within them too.
    autoscale: AutoscalePolicy | None = None


def worker_argv(command: Sequence[str], *, port: int, index: int) -> list[str]:
    """The command template filled in; each part is formatted alone, so no quoting is needed."""
    return [part.format(port=port, index=index) for part in command]


class Supervisor:
    """Keeps `options.count` workers (changed by `scale`, and with `options.autoscale` by
    the load) running and in `pool`.

    `start(client)` spawns the workers and runs the loop (`client` probes ready paths);
    `started` is set once every worker is ready, or after `ready_timeout` seconds anyway.
    `shutdown()` stops everything in phases: the loop, SIGTERM to every worker (waiting up
    to `stop_timeout`), SIGKILL to the rest. Commands come through `enqueue` (signal
    handlers) and `scale` / `enqueue` (the admin API).
    """

    def __init__(
        self,
        pool: Pool,
        options: SupervisorOptions,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.options = options
        self.desired = options.count
        self.started = asyncio.Event()
        self.rollout: Rollout | None = None
        self._clock = clock
        self._workers: dict[int, Worker] = {}
        self._next_key = 0
        self._processes: dict[int, asyncio.subprocess.Process] = {}
        self._watchers: dict[int, asyncio.Task[None]] = {}
        self._probes: dict[int, asyncio.Task[None]] = {}
        self._exits: deque[tuple[int, int]] = deque()  # (key, returncode), from the watchers
        self._ready: deque[int] = deque()  # keys whose ready path answered, from the probes
        self._commands: deque[Command] = deque()
        self._restart_requested = False
        self._wake = asyncio.Event()
        self._closing = False
        self._loop_task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None
        self._began = 0.0
        policy = options.autoscale
        self.autoscaler = None if policy is None else Autoscaler(policy, now=clock())

    def __repr__(self) -> str:
        counts: dict[str, int] = {}
        for worker in self._workers.values():
            counts[worker.state.value] = counts.get(worker.state.value, 0) + 1
        inner = ", ".join(f"{state}: {n}" for state, n in sorted(counts.items()))
        return f"<Supervisor desired={self.desired} [{inner}]>"

    @property
    def workers(self) -> list[Worker]:
        """Every worker known, by index then age."""
        return sorted(self._workers.values(), key=lambda w: (w.index, w.key))

    # -- commands: callable from signal handlers and the admin app (same thread) -----------

    def enqueue(self, command: Command) -> None:
        """Record a command for the loop's next turn; does nothing else (signal-safe)."""
        self._commands.append(command)
        self._wake.set()

    def request_restart(self) -> None:
        """Ask for a rolling restart (the admin API); as `enqueue(Command.RESTART)`."""
        self.enqueue(Command.RESTART)

    def scale(self, delta: int) -> int:
        """Change the desired count by `delta`; returns it. The loop converges to it (after
        a rolling restart in progress). Raises InvalidTransition below one worker, and
        when autoscaling, outside its minimum..maximum; an operator's change starts the
        autoscaler's cooldown, as its own would."""
        wanted = self.desired + delta
        autoscaler = self.autoscaler
        if autoscaler is not None:
            policy = autoscaler.policy
            if policy.clamp(wanted) != wanted:
                raise InvalidTransition(
                    f"cannot scale to {wanted} workers: autoscaling keeps "
                    f"{policy.minimum} to {policy.maximum}"
                )
            autoscaler.changed(self._clock())
        elif wanted < 1:
            raise InvalidTransition(f"cannot scale to {wanted} workers: at least 1 must run")
        self.desired = wanted
        log_event(WORKERS_SCALED, desired=self.desired, delta=delta)
        self._wake.set()
        return self.desired

    def describe(self) -> dict[str, object]:
        """The JSON shape of the workers in the admin API."""
        now = self._clock()
        rollout = self.rollout
        return {
            "desired": self.desired,
            "autoscale": self._describe_autoscale(),
            "rolling_restart": None
            if rollout is None
            else {"phase": rollout.phase.value, "replaced": rollout.replaced},
            "workers": [worker.describe(now) for worker in self.workers],
        }

    def _describe_autoscale(self) -> dict[str, object] | None:
        autoscaler = self.autoscaler
        if autoscaler is None:
            return None
        policy, last, load = autoscaler.policy, autoscaler.last, autoscaler.load()
        return {
            "min": policy.minimum,
            "max": policy.maximum,
            "target": policy.target,
            "window": policy.window,
            "cooldown": policy.cooldown,
            "load": None if load is None else round(load, 3),
            "last": None
            if last is None
            else {"action": last.action.value, "desired": last.desired, "reason": last.reason},
        }

    # -- life -------------------------------------------------------------------------------

    async def start(self, client: httpx.AsyncClient) -> None:
        """Spawn the workers and run the loop as a task; returns at once."""
        self._client = client
        self._began = self._clock()
        for _ in range(self.desired):
            await self._spawn_new(self._free_index(), self._began)
        self._loop_task = asyncio.create_task(self._run(), name="supervisor")

    @property
    def loop_task(self) -> asyncio.Task[None] | None:
        """The loop's task (for its owner to notice if it ever fails)."""
        return self._loop_task

    async def shutdown(self) -> None:
        """Stop supervising, then stop every worker: SIGTERM, `stop_timeout`, SIGKILL."""
        self._closing = True
        self._wake.set()
        if self._loop_task is not None:
            # asyncio.wait, not await: a loop that died of a bug (its owner logged it) must
            # not keep the workers from being stopped.
            await asyncio.wait([self._loop_task])
        for probe in list(self._probes.values()):
            probe.cancel()
        log_event(WORKERS_STOPPING, workers=len(self._processes))
        # Phase 1: SIGTERM, and wait for graceful exits.
        for key in list(self._processes):
            self._signal(key, signal.SIGTERM)
        await self._wait_exits(self.options.stop_timeout)
        # Phase 2: SIGKILL whatever ignored it.
        if self._processes:
            log_event(WORKERS_KILLED, level=logging.WARNING, pids=self._pids())
            for key in list(self._processes):
                self._signal(key, signal.SIGKILL)
            await self._wait_exits(_KILL_WAIT)
        for worker in self._workers.values():
            self._leave_pool(worker)
        log_event(WORKERS_STOPPED)

    # -- the loop ---------------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_TICK):
                    await self._wake.wait()
            self._wake.clear()
            if self._closing:
                return
            await self._turn(self._clock())

    async def _turn(self, now: float) -> None:
        """One turn of the loop: the table of contents of the supervisor."""
        self._reap(now)  # exited processes: out of the pool; restart, hold or forget
        self._admit(now)  # ready ones join the pool; ones never ready are killed
        self._kill_hung(now)  # failing health checks too long: SIGKILL (then restarted)
        self._take_commands()  # what signals and the admin API asked for
        await self._advance_rollout(now)  # the rolling restart, one worker at a time
        self._autoscale(now)  # with --spawn MIN:MAX: the load sets the desired count
        await self._converge(now)  # scale up or down to the desired count
        self._stop_drained(now)  # drained (or out of time): SIGTERM
        self._escalate(now)  # ignored SIGTERM for too long: SIGKILL
        await self._restart_due(now)  # crashed and backoff over: a new process
        self._check_started(now)

    def _reap(self, now: float) -> None:
        while self._exits:
            key, returncode = self._exits.popleft()
            worker = self._workers[key]
            self._cancel_probe(key)
            self._leave_pool(worker)
            rollout = self.rollout
            if rollout is not None and rollout.replacing == key:
                worker.retire()  # its replacement is on the way: do not start a second one
            was = worker.state
            outcome = worker.exited(returncode, now, self.options.restart)
            fields: dict[str, Any] = {"index": worker.index, "pid": worker.pid}
            fields |= {"code": returncode, "was": was.value, "outcome": outcome.value}
            if outcome is Exit.RETIRED:
                del self._workers[key]
                log_event(WORKER_EXITED, **fields)
            elif outcome is Exit.HELD:
                # Reported, not retried: a worker that cannot stay up needs a person.
                log_event(
                    WORKER_HELD,
                    level=logging.ERROR,
                    crashes=worker.crashes,
                    hint="fix the worker, then SIGHUP or POST /workers/restart",
                    **fields,
                )
            else:
                assert worker.restart_at is not None
                log_event(
                    WORKER_CRASHED,
                    level=logging.WARNING,
                    restart_in=round(worker.restart_at - now, 3),
                    crashes=worker.crashes,
                    **fields,
                )

    def _admit(self, now: float) -> None:
        while self._ready:
            worker = self._workers.get(self._ready.popleft())
            if worker is None or worker.state is not _STARTING:
                continue  # it exited or was stopped after answering
            worker.ready(now)
            self._probes.pop(worker.key, None)
            url = self._url(worker)
            if backend_id(url) not in self.pool:
                self.pool.add(url)
            log_event(WORKER_READY, index=worker.index, pid=worker.pid, url=url)
        for worker in self._live(_STARTING):
            if worker.ready_overdue(now, self.options.ready_timeout):
                log_event(
                    WORKER_NOT_READY,
                    level=logging.WARNING,
                    index=worker.index,
                    pid=worker.pid,
                    timeout=self.options.ready_timeout,
                )
                self._cancel_probe(worker.key)
                worker.stop(now, retire=False, kill=True)
                self._signal(worker.key, signal.SIGKILL)

    def _kill_hung(self, now: float) -> None:
        for worker in self._live(_READY):
            backend = self.pool.get(backend_id(self._url(worker)))
            healthy = backend is None or backend.healthy
            if worker.hung(healthy=healthy, now=now, timeout=self.options.hang_timeout):
                log_event(
                    WORKER_HUNG,
                    level=logging.WARNING,
                    index=worker.index,
                    pid=worker.pid,
                    reason=None if backend is None else backend.down_reason,
                )
                self._leave_pool(worker)
                worker.stop(now, retire=False, kill=True)
                self._signal(worker.key, signal.SIGKILL)

    def _take_commands(self) -> None:
        while self._commands:
            command = self._commands.popleft()
            if command is Command.RESTART:
                self._restart_requested = True
                continue
            try:
                self.scale(1 if command is Command.SCALE_UP else -1)
            except InvalidTransition as exc:
                log_event(SCALE_REFUSED, level=logging.WARNING, reason=str(exc))

    async def _advance_rollout(self, now: float) -> None:
        if self.rollout is None:
            if not self._restart_requested:
                return
            self._restart_requested = False
            await self._start_rollout(now)
        rollout = self.rollout
        assert rollout is not None
        while True:
            step = rollout.step({key: w.state for key, w in self._workers.items()})
            old = None if step.old is None else self._workers.get(step.old)
            if step.action == "spawn":
                assert old is not None
                new = await self._spawn_new(old.index, now)
                rollout.spawned(new.key)
                log_event(WORKER_REPLACING, index=old.index, old_pid=old.pid, new_pid=new.pid)
                return
            if step.action == "retire":
                if old is not None:
                    self._retire(old, now)
                continue
            if step.action == "wait":
                return
            if step.action == "abort":
                replacement = None if rollout.new is None else self._workers.get(rollout.new)
                if replacement is not None:
                    self._retire(replacement, now)  # held, never served: not an extra worker
                log_event(
                    ROLLING_RESTART_ABORTED,
                    level=logging.ERROR,
                    index=None if old is None else old.index,
                    replaced=rollout.replaced,
                    reason="the replacement never became ready; the old worker still serves",
                )
            else:
                log_event(ROLLING_RESTART_DONE, replaced=rollout.replaced)
            self.rollout = None
            return

    async def _start_rollout(self, now: float) -> None:
        serving = [w for w in self.workers if not w.retiring]
        targets = [w.key for w in serving if w.state in (_STARTING, _READY)]
        log_event(ROLLING_RESTART_STARTED, workers=len(targets))
        self.rollout = Rollout(targets)
        for worker in serving:
            if worker.state is _HELD:
                await self._restart(worker, now)  # a restart is how an operator retries it

    def _autoscale(self, now: float) -> None:
        autoscaler = self.autoscaler
        if autoscaler is None:
            return
        serving = [w for w in self._workers.values() if not w.retiring]
        ready = [w for w in serving if w.state is _READY]
        in_flight = 0
        for worker in ready:
            backend = self.pool.get(backend_id(self._url(worker)))
            in_flight += 0 if backend is None else backend.in_flight
        settled = (
            self.rollout is None
            and not self._restart_requested
            and len(serving) == self.desired
            and all(w.state in (_READY, _HELD) for w in serving)
        )
        decision = autoscaler.sample(
            now, in_flight=in_flight, ready=len(ready), desired=self.desired, settled=settled
        )
        if decision.action is Action.HOLD:
            return
        policy = autoscaler.policy
        fields: dict[str, Any] = {"workers": self.desired, "desired": decision.desired}
        fields |= {"load": round(decision.load or 0.0, 2), "target": policy.target}
        fields |= {"window": policy.window, "reason": decision.reason}
        if decision.action is Action.AT_MAX:
            log_event(AUTOSCALE_AT_MAX, level=logging.WARNING, **fields)
            return
        if decision.action is Action.UP:
            log_event(AUTOSCALE_UP, **fields)
        else:
            log_event(AUTOSCALE_DOWN, **fields)
        # _converge, next in this turn, spawns the new workers or retires the newest one
        # (drained, then stopped), as for an operator's scale.
        self.desired = decision.desired

    async def _converge(self, now: float) -> None:
        if self.rollout is not None:
            return  # one change at a time: scaling waits for the rolling restart
        serving = [w for w in self.workers if not w.retiring]
        for _ in range(self.desired - len(serving)):
            worker = await self._spawn_new(self._free_index(), now)
            log_event(WORKER_ADDED, index=worker.index, pid=worker.pid)
        if len(serving) > self.desired:
            # Those not serving go first (held, crashed, starting), then the newest: the
            # highest indices, so `{index}` stays 0..N-1.
            ranked = sorted(serving, key=lambda w: (w.state is not _READY, w.index, w.key))
            for worker in ranked[self.desired :]:
                log_event(WORKER_REMOVING, index=worker.index, pid=worker.pid)
                self._retire(worker, now)

    def _stop_drained(self, now: float) -> None:
        for worker in self._live(_DRAINING):
            backend = self.pool.get(backend_id(self._url(worker)))
            in_flight = 0 if backend is None else backend.in_flight
            # The pool's drain (`control._drains`) ends it: idle, empty or at its deadline;
            # the supervisor's own deadline, a little later, is the backstop.
            ended = backend is None or backend.drained_reason is not None
            deadline = self.options.drain_deadline + _DRAIN_BACKSTOP
            if worker.drained(ended=ended, now=now, deadline=deadline):
                if in_flight:
                    log_event(
                        DRAIN_DEADLINE,
                        level=logging.WARNING,
                        index=worker.index,
                        in_flight=in_flight,
                    )
                self._leave_pool(worker)
                worker.stop(now, retire=True)
                self._signal(worker.key, signal.SIGTERM)

    def _escalate(self, now: float) -> None:
        for worker in self._live(_STOPPING):
            if worker.stop_overdue(now, self.options.stop_timeout):
                log_event(WORKER_KILLED, level=logging.WARNING, index=worker.index)
                worker.escalate()
                self._signal(worker.key, signal.SIGKILL)

    async def _restart_due(self, now: float) -> None:
        for worker in self.workers:
            if worker.restart_due(now):
                await self._restart(worker, now)

    def _check_started(self, now: float) -> None:
        if self.started.is_set():
            return
        # Started: every worker serves or is held (no use waiting for those), or it is late.
        settled = all(w.state in (_READY, _HELD) for w in self._workers.values() if not w.retiring)
        if settled or now - self._began >= self.options.ready_timeout:
            self.started.set()

    # -- doing --------------------------------------------------------------------------------

    def _retire(self, worker: Worker, now: float) -> None:
        """Take a worker out on purpose: drain it if it serves, stop it if it starts."""
        state = worker.state
        if state is _READY:
            backend = self.pool.get(backend_id(self._url(worker)))
            if backend is not None and not backend.draining:
                backend.drain(now)
            worker.drain(now)
            log_event(WORKER_DRAINING, index=worker.index, pid=worker.pid)
        elif state is _STARTING:
            self._cancel_probe(worker.key)
            worker.stop(now, retire=True)
            self._signal(worker.key, signal.SIGTERM)
        elif state in (_EXITED, _HELD):
            worker.retire()
            del self._workers[worker.key]
        # DRAINING and STOPPING are on their way out already.

    async def _restart(self, worker: Worker, now: float) -> None:
        # The port may be taken between this and the worker's bind: the worker then exits,
        # and its restart gets another port.
        worker.restarted(free_port(self.options.host), now)
        await self._spawn(worker)
        log_event(WORKER_RESTARTED, index=worker.index, pid=worker.pid, restarts=worker.restarts)

    async def _spawn_new(self, index: int, now: float) -> Worker:
        worker = Worker(self._next_key, index, free_port(self.options.host), now=now)
        self._next_key += 1
        self._workers[worker.key] = worker
        await self._spawn(worker)
        return worker

    async def _spawn(self, worker: Worker) -> None:
        argv = worker_argv(self.options.command, port=worker.port, index=worker.index)
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=subprocess.DEVNULL,
                # Its own session: a terminal's Ctrl-C reaches the supervisor only.
                start_new_session=True,
                # SIGTERM if the balancer dies; the kernel watches the thread that forks,
                # so workers are spawned from the loop's thread.
                preexec_fn=parent_death_hook(),
            )
        except OSError as exc:
            log_event(WORKER_SPAWN_FAILED, level=logging.ERROR, index=worker.index, error=exc)
            self._exits.append((worker.key, _NOT_SPAWNED))
            self._wake.set()
            return
        worker.pid = process.pid
        self._processes[worker.key] = process
        self._watchers[worker.key] = asyncio.create_task(
            self._watch(worker.key, process), name=f"watch-worker-{worker.index}"
        )
        self._probes[worker.key] = asyncio.create_task(
            self._probe(worker.key, self._url(worker) + self.options.ready_path),
            name=f"probe-worker-{worker.index}",
        )

    async def _watch(self, key: int, process: asyncio.subprocess.Process) -> None:
        """Wait for the process to exit; record it for the loop (and the shutdown)."""
        returncode = await process.wait()
        self._processes.pop(key, None)
        self._watchers.pop(key, None)
        self._exits.append((key, returncode))
        self._wake.set()

    async def _probe(self, key: int, url: str) -> None:
        """GET the ready path until it answers 2xx; record it for the loop."""
        client = self._client
        assert client is not None
        while True:
            try:
                response = await client.get(url, timeout=_PROBE_TIMEOUT)
            except httpx.HTTPError:
                pass  # not listening yet, or too slow: the ready timeout decides
            else:
                if 200 <= response.status_code < 300:
                    self._ready.append(key)
                    self._wake.set()
                    return
            await asyncio.sleep(_PROBE_INTERVAL)  # the probe's poll interval

    def _cancel_probe(self, key: int) -> None:
        probe = self._probes.pop(key, None)
        if probe is not None:
            probe.cancel()

    def _signal(self, key: int, signum: int) -> None:
        process = self._processes.get(key)
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)

    def _leave_pool(self, worker: Worker) -> None:
        """Out of the pool at once, so the router stops choosing it (in-flight ones finish)."""
        url_id = backend_id(self._url(worker))
        if url_id in self.pool:
            self.pool.remove(url_id)

    async def _wait_exits(self, within: float) -> None:
        watchers = list(self._watchers.values())
        if watchers:
            await asyncio.wait(watchers, timeout=within)

    # -- reading ------------------------------------------------------------------------------

    def _url(self, worker: Worker) -> str:
        host = self.options.host
        return f"http://[{host}]:{worker.port}" if ":" in host else f"http://{host}:{worker.port}"

    def _live(self, state: WorkerState) -> list[Worker]:
        return [w for w in self.workers if w.state is state]

    def _free_index(self) -> int:
        used = {w.index for w in self._workers.values() if not w.retiring}
        index = 0
        while index in used:
            index += 1
        return index

    def _pids(self) -> list[int]:
        return sorted(p.pid for p in self._processes.values())
