"""Active health checks, like HAProxy's: a GET of a path, with rise and fall thresholds.

Decide, then do: `HealthTracker` is pure (results in, transitions out) and `apply_result`
moves the backend's state machine; `HealthChecker` only does the HTTP, with one
`httpx.AsyncClient` that the caller creates in its lifespan and closes with `aclose()`.
Each round also ends the passive ejections whose time is over (`Pool.release`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import httpx

from ..datapath._backend import Backend
from ..datapath._pool import Pool

__all__ = ["CheckResult", "HealthChecker", "HealthPolicy", "HealthTracker", "apply_result"]


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    path: str = "/healthz"
    interval: float = 2.0  # seconds between rounds
    timeout: float = 1.0  # seconds for one check, connect to last byte
    rise: int = 2  # passed checks in a row to mark a DOWN backend UP
    fall: int = 3  # failed checks in a row to mark an UP backend DOWN


@dataclass(frozen=True, slots=True)
class CheckResult:
    ok: bool
    detail: str  # "status 200", "status 503", "timeout", "connect error: ..."


class HealthTracker:
    """Counts one backend's results in a row; says when it crosses rise or fall. Pure."""

    __slots__ = ("_in_a_row", "fall", "healthy", "rise")

    def __init__(self, *, rise: int, fall: int, healthy: bool = True) -> None:
        if rise < 1 or fall < 1:
            raise ValueError(f"rise and fall must be at least 1, got {rise} and {fall}")
        self.rise = rise
        self.fall = fall
        self.healthy = healthy
        self._in_a_row = 0  # results in a row that disagree with `healthy`

    def observe(self, ok: bool) -> bool | None:
        """Record a result; returns the new health when it changes (True up, False down)."""
        if ok == self.healthy:
            self._in_a_row = 0
            return None
        self._in_a_row += 1
        if self._in_a_row < (self.rise if ok else self.fall):
            return None
        self.healthy = ok
        self._in_a_row = 0
        return ok


def apply_result(backend: Backend, tracker: HealthTracker, result: CheckResult, now: float) -> bool:
    """Feed one result to the tracker and the backend; returns whether the health changed."""
    change = tracker.observe(result.ok)
    if change is None:
        return False
    if change:
        backend.mark_up(now)
    else:
        backend.mark_down(result.detail, now)
    return True


class HealthChecker:
    """Checks every backend of the pool each `interval` seconds with the injected client.

    Run `run()` as a task for the life of the balancer; `check_once()` does one round (for
    tests, and the first round at startup).
    """

    def __init__(
        self,
        pool: Pool,
        client: httpx.AsyncClient,
        policy: HealthPolicy | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._client = client
        self.policy = policy if policy is not None else HealthPolicy()
        self._clock = clock
        self._trackers: dict[str, HealthTracker] = {}

    async def run(self) -> None:
        """Check forever, a round every `interval` seconds; cancel to stop."""
        while True:
            started = self._clock()
            await self.check_once()
            # The interval is the schedule of the checks, not a wait for some condition.
            await anyio.sleep(max(0.0, self.policy.interval - (self._clock() - started)))

    async def check_once(self) -> dict[str, CheckResult]:
        """One round: check every backend at once, apply the results; returns them by id."""
        backends = list(self._pool)
        results: dict[str, CheckResult] = {}

        async def check(backend: Backend) -> None:
            results[backend.id] = await self.check(backend)

        async with anyio.create_task_group() as group:
            for backend in backends:
                group.start_soon(check, backend)
        now = self._clock()
        live = {b.id for b in backends}
        for stale in self._trackers.keys() - live:
            del self._trackers[stale]
        for backend in backends:
            if backend.id not in self._pool:
                continue  # removed while it was being checked
            tracker = self._trackers.get(backend.id)
            if tracker is None:
                tracker = self._trackers[backend.id] = HealthTracker(
                    rise=self.policy.rise, fall=self.policy.fall, healthy=backend.healthy
                )
            apply_result(backend, tracker, results[backend.id], now)
        self._pool.release(now)
        return results

    async def check(self, backend: Backend) -> CheckResult:
        """GET the health path: a 2xx or 3xx passes (HAProxy's httpchk rule)."""
        url = backend.url + self.policy.path
        timeout = self.policy.timeout
        # httpx errors end here, translated into a result; nothing above sees them.
        try:
            with anyio.fail_after(timeout):
                response = await self._client.get(url, timeout=timeout)
        except (TimeoutError, httpx.TimeoutException):
            return CheckResult(False, f"timeout after {timeout} s")
        except httpx.ConnectError as exc:
            return CheckResult(False, f"connect error: {exc}" if str(exc) else "connect error")
        except httpx.HTTPError as exc:
            return CheckResult(False, f"{type(exc).__name__}: {exc}")
        return CheckResult(200 <= response.status_code < 400, f"status {response.status_code}")
