"""The drain watcher: ends the drains whose time has come, and says so.

A drain is decided by the backend's state machine (`Backend.drain_tick`, pure); this is the
clock that ticks it, every `_TICK` seconds, and the log line and event that report the end:
why it ended and how many sessions were still pinned to the backend (seen in the last
`PINNED_WINDOW` seconds): in `sticky` mode those sessions are lost, in `hybrid` and
`shared` they go on from Redis on the backend they are re-pinned to.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio

from ..datapath._backend import Backend
from ..datapath._pins import PinTable, handle
from ..datapath._pool import Pool
from ._events import BACKEND_DRAINED
from ._log import log_event

__all__ = ["PINNED_WINDOW", "DrainWatch", "report_drained"]

# A session counts as pinned to a backend when a request of it was seen in the last this
# many seconds (the dashboard, `balancer_pinned_sessions`, a drain's report).
PINNED_WINDOW = 300.0
_TICK = 0.25  # seconds between looks: a drain ends at most this late
_NAMED = 5  # sessions named (by handle) in a drain's report


def report_drained(backend: Backend, pins: PinTable | None, now: float) -> None:
    """Log the `backend_drained` event of `backend`, whose drain just ended."""
    still = [] if pins is None else pins.recent(backend.id, now - PINNED_WINDOW, 1 << 30)
    log_event(
        BACKEND_DRAINED,
        backend=backend.id,
        reason=backend.drained_reason,
        after=round(now - backend.drain_since, 3),
        in_flight=backend.in_flight,
        pinned=len(still),
        sessions=[handle(pin.session) for pin in still[:_NAMED]],
    )


class DrainWatch:
    """Ticks the pool's drains; run `run()` as a task and cancel it to stop. `on_tick` is
    told the time at each look (`Router.tick`: the router's clock for pins seen)."""

    def __init__(
        self,
        pool: Pool,
        pins: PinTable | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_drained: Callable[[Backend, str], None] | None = None,
        on_tick: Callable[[float], None] | None = None,
    ) -> None:
        self._pool = pool
        self._on_tick = on_tick
        self._pins = pins
        self._clock = clock
        self.on_drained = on_drained

    def tick(self) -> list[Backend]:
        """One look: the backends whose drain ended now (each reported)."""
        now = self._clock()
        if self._on_tick is not None:
            self._on_tick(now)
        ended = []
        for backend, reason in self._pool.drain_tick(now):
            report_drained(backend, self._pins, now)
            if self.on_drained is not None:
                self.on_drained(backend, reason)
            ended.append(backend)
        return ended

    async def run(self) -> None:
        while True:
            self.tick()
            await anyio.sleep(_TICK)  # the schedule of the looks, not a wait for a condition
