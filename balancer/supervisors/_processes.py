"""`--workers N`: N balancer processes on one port, and the parent that supervises them.

    python -m balancer --workers 4 --listen 127.0.0.1:8080 --backend ...

Each balancer process is a whole balancer, forked from the parent after the settings are
loaded (same backends, same affinity secret, so they agree on every pin), accepting on the
same port (SO_REUSEPORT). With `--admin`, the parent also reserves the sockets of the one
admin address (`control._cluster.reserve`: the public one, and a loopback one a process)
before the first fork, so a process restarted as i serves the same ones.

The decisions are those of `--spawn`'s app workers, made by the same pure objects
(`_workers.Worker`, `RestartPolicy`): a balancer process that exits unasked is restarted as
the same number i after `--restart-backoff` seconds, doubling up to `--restart-backoff-max`;
`--max-crashes` early crashes in a row (within `--min-uptime` seconds) hold it. What differs
is the I/O, and that is all this module does: a balancer process is forked, not executed;
it has no ready path, so it counts as ready once forked; it is stopped by the signal the
parent got (SIGTERM or SIGINT), and killed if it is still running `stop_timeout` seconds
later. One that cannot serve at all (its addresses cannot be bound: a user's mistake, not a
crash) exits with `CANNOT_SERVE` and is not restarted.

Like `Supervisor`, the signal handlers only record the signal (and wake the loop through
`signal.set_wakeup_fd`); one loop does the rest, in the order `_turn` reads. The parent
runs no event loop and no thread, so that a fork copies nothing half done.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable

from redis_plumbing import die_with_parent

from ..control._events import (
    BALANCER_PROCESS_CRASHED,
    BALANCER_PROCESS_EXITED,
    BALANCER_PROCESS_FORK_FAILED,
    BALANCER_PROCESS_HELD,
    BALANCER_PROCESS_KILLED,
    BALANCER_PROCESS_RESTARTED,
    BALANCER_PROCESSES_GONE,
    BALANCER_PROCESSES_STARTED,
    BALANCER_PROCESSES_STOPPING,
)
from ..control._log import log_event
from ._workers import Exit, RestartPolicy, Worker, WorkerState

__all__ = ["CANNOT_SERVE", "BalancerProcesses"]

CANNOT_SERVE = 3  # a balancer process's exit code: it could not bind; restarting is no use
_WAKE_MAX = 1.0  # seconds the loop sleeps at most when no signal and no deadline wakes it
# SIGUSR1 (reload the TLS certificates) and SIGHUP (the --config file) are passed on to
# every process.
_PASSED_ON = (signal.SIGUSR1, signal.SIGHUP)
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, *_PASSED_ON)


class BalancerProcesses:
    """Runs `count` balancer processes, each `serve(index, restarts)` in a forked child,
    until told to stop; `run()` returns the parent's exit code.

    `serve(index, restarts)` is the child's whole life (`restarts`: how many times process
    `index` was restarted before this one; 0 at the first start) and returns its exit code
    (`CANNOT_SERVE`: do not restart it). `run()` returns 0 when SIGTERM or SIGINT stopped
    every process and each exited 0; 1 when one of them did not, could not serve, or when
    none is left running (every one held or unable to serve).
    """

    def __init__(
        self,
        count: int,
        serve: Callable[[int, int], int],
        *,
        policy: RestartPolicy,
        stop_timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.count = count
        self.policy = policy
        self.stop_timeout = stop_timeout  # seconds after the stop signal, then SIGKILL
        self._serve = serve
        self._clock = clock
        self._processes: list[Worker] = []
        self._signals: deque[int] = deque()
        self._stopping: int | None = None  # the signal that asked to stop, once one has
        self._status = 0
        self._wake_r = self._wake_w = -1

    def __repr__(self) -> str:
        states = ", ".join(f"{w.index}: {w.state.value}" for w in self._processes)
        return f"<BalancerProcesses [{states}]>"

    # -- life -------------------------------------------------------------------------------

    def run(self) -> int:
        """Fork the balancer processes and supervise them until they are all gone."""
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        handlers = {signum: signal.signal(signum, self._on_signal) for signum in _SIGNALS}
        wakeup_fd = signal.set_wakeup_fd(self._wake_w)
        try:
            now = self._clock()
            for index in range(self.count):
                worker = Worker(index, index, 0, now=now)  # port 0: they all share --listen
                self._processes.append(worker)
                self._fork(worker, now)
            log_event(BALANCER_PROCESSES_STARTED, pids=[w.pid for w in self._processes])
            while not self._done():
                self._sleep()
                self._turn(self._clock())
            return self._status
        finally:
            signal.set_wakeup_fd(wakeup_fd)
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)  # only recorded: the loop acts on it

    # -- the loop ---------------------------------------------------------------------------

    def _turn(self, now: float) -> None:
        """One turn of the loop: the table of contents of the parent."""
        self._take_signals(now)  # SIGTERM or SIGINT: pass it on to every process, once
        self._reap(now)  # exited processes: restart later, hold, or forget
        self._escalate(now)  # ignored the stop signal for too long: SIGKILL
        self._restart_due(now)  # crashed and backoff over: fork it again

    def _take_signals(self, now: float) -> None:
        while self._signals:
            signum = self._signals.popleft()
            if signum == signal.SIGCHLD or self._stopping is not None:
                continue
            if signum in _PASSED_ON:
                for worker in self._processes:
                    if worker.alive:
                        self._kill(worker, signum)
                continue
            self._stopping = signum
            log_event(BALANCER_PROCESSES_STOPPING, signal=signal.Signals(signum).name)
            for worker in self._processes:
                if worker.alive:
                    worker.stop(now, retire=True)
                    self._kill(worker, signum)
                else:
                    worker.retire()  # crashed or held: not restarted any more

    def _reap(self, now: float) -> None:
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = next((w for w in self._processes if w.alive and w.pid == pid), None)
            if worker is not None:
                self._exited(worker, os.waitstatus_to_exitcode(wait_status), now)

    def _escalate(self, now: float) -> None:
        for worker in self._processes:
            if worker.stop_overdue(now, self.stop_timeout):
                log_event(
                    BALANCER_PROCESS_KILLED,
                    level=logging.WARNING,
                    index=worker.index,
                    pid=worker.pid,
                    timeout=self.stop_timeout,
                )
                worker.escalate()
                self._kill(worker, signal.SIGKILL)

    def _restart_due(self, now: float) -> None:
        for worker in self._processes:
            if worker.restart_due(now):
                worker.restarted(0, now)
                self._fork(worker, now)
                if worker.pid is None:
                    continue  # the fork failed: logged, and counted as a crash
                log_event(
                    BALANCER_PROCESS_RESTARTED,
                    index=worker.index,
                    pid=worker.pid,
                    restarts=worker.restarts,
                )

    def _done(self) -> bool:
        """Every process is gone for good: stopped on request, or none can run again."""
        if any(w.alive for w in self._processes):
            return False
        if self._stopping is not None:
            return True
        if any(w.restart_at is not None and not w.retiring for w in self._processes):
            return False
        log_event(
            BALANCER_PROCESSES_GONE,
            level=logging.ERROR,
            reason="every balancer process is held (a crash loop) or could not serve",
        )
        self._status = 1
        return True

    # -- doing --------------------------------------------------------------------------------

    def _exited(self, worker: Worker, code: int, now: float) -> None:
        fields: dict[str, object] = {"index": worker.index, "pid": worker.pid, "code": code}
        if code == CANNOT_SERVE and self._stopping is None:
            worker.retire()
            self._status = 1
        outcome = worker.exited(code, now, self.policy)
        if outcome is Exit.RETIRED:
            if code != 0:
                self._status = 1
            level = logging.INFO if code == 0 else logging.WARNING
            log_event(BALANCER_PROCESS_EXITED, level=level, **fields)
        elif outcome is Exit.HELD:
            log_event(
                BALANCER_PROCESS_HELD,
                level=logging.ERROR,
                crashes=worker.crashes,
                hint="the others still serve; fix the cause, then restart the balancer",
                **fields,
            )
        else:
            assert worker.restart_at is not None
            log_event(
                BALANCER_PROCESS_CRASHED,
                level=logging.WARNING,
                restart_in=round(worker.restart_at - now, 3),
                crashes=worker.crashes,
                **fields,
            )

    def _fork(self, worker: Worker, now: float) -> None:
        parent = os.getpid()
        # Blocked across the fork: a stop signal that lands in the child before its own
        # handlers are set then takes the default action (it ends), not this class's.
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
            log_event(BALANCER_PROCESS_FORK_FAILED, level=logging.ERROR, error=str(exc))
            self._exited(worker, -1, now)  # an early crash: retried after the backoff
            return
        if pid == 0:
            self._child(worker.index, worker.restarts, parent)  # never returns
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        worker.pid = pid
        worker.ready(now)  # no ready path: --min-uptime counts from the fork

    def _child(self, index: int, restarts: int, parent: int) -> None:
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for signum in _SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            os.close(self._wake_r)
            os.close(self._wake_w)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
            die_with_parent(parent)
            code = self._serve(index, restarts)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # whatever happens, the child must not return into the loop
            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)

    def _kill(self, worker: Worker, signum: int) -> None:
        if worker.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signum)

    def _sleep(self) -> None:
        """Until a signal arrives (the wakeup fd) or the next deadline, at most `_WAKE_MAX`."""
        now = self._clock()
        deadlines = [_WAKE_MAX + now]
        for worker in self._processes:
            if worker.restart_at is not None and not worker.retiring:
                deadlines.append(worker.restart_at)
            if worker.state is WorkerState.STOPPING and not worker.killed:
                deadlines.append(worker.state_since + self.stop_timeout)
        timeout = min(deadlines) - now
        if self._signals:
            timeout = 0.0
        with contextlib.suppress(InterruptedError):
            select.select([self._wake_r], [], [], max(0.0, timeout))
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 512):
                pass
