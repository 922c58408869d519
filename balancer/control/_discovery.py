"""The balancer's registry watcher: `--discover redis://HOST:PORT[/DB]/SERVICE`.

Any Redis URL form works, with the service at the end of its path (Sentinel, Cluster, TLS:
`parse_registry_url`); the registry's client comes from `redis_plumbing.redis_client`.

It keeps the pool's discovered backends equal to the live instances of one service
(protocol: `service_registry/_registry.py`). Two inputs, one rule:

- a full read of the registry every `interval` seconds: the source of truth, so a lost
  notice, a dead instance whose TTL ran out, and a Redis restart all heal by themselves;
- the pub/sub notices, on their own task: each one only makes the next read happen now, so
  a new instance gets traffic within milliseconds and a deregistered one leaves at once.

Discovered backends are ordinary pool members: the health checks see them, slow start ramps
a new one (`--slow-start`), and Maglev moves only the keys the change must move.

Leaving and dying are told apart (issue 15). An instance that deregisters (a graceful stop,
a Kubernetes `preStop`) announces "down" on the registry's channel: its backend is drained
(`Pool.drain`, the `--drain-*` policy: its pinned clients keep reaching it while it serves)
and removed from the pool only once the drain has ended (DRAINED; the balancer's drain
watcher ends it), at the first read after that. An instance that vanishes without a word (its
TTL ran out: it died) is removed at once. A read tells them apart by itself: the registry
keeps a deregistration for a minute (`Snapshot.left`), so a lost "down" notice, or a read
that runs before the notice arrives, still drains. An instance that registers again while its
backend drains is enabled again. Backends
given with `--backend` (or spawned) are never removed by discovery, even if they register.
When Redis is unreachable the pool keeps its last known set; the watcher logs once, retries
each interval, and logs again when it recovers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from service_registry import (
    Changes,
    Instance,
    Membership,
    Registry,
    RegistryError,
    RegistryUnavailable,
)

from .._exceptions import InvalidTransition
from ..datapath._backend import Backend
from ..datapath._pool import Pool
from ._events import (
    BACKEND_DISCOVERED,
    BACKEND_DRAINING,
    BACKEND_ENABLED,
    BACKEND_UNDISCOVERED,
    REGISTRY_BAD_ADDRESS,
    REGISTRY_ERROR,
    REGISTRY_RECOVERED,
    REGISTRY_UNREACHABLE,
)
from ._log import log_event

__all__ = ["DEFAULT_DISCOVER_INTERVAL", "Discovery"]

DEFAULT_DISCOVER_INTERVAL = 0.5  # seconds between full reads


class Discovery:
    """Watch one service in `registry` and mirror its live instances into `pool`.

    Run `run()` as a task for the life of the balancer and cancel it to stop; `refresh()`
    does one read and applies it (tests, and the first read at startup). The registry is
    the caller's: created in its lifespan and closed by it, after this task ends.
    """

    def __init__(
        self,
        pool: Pool,
        registry: Registry,
        *,
        interval: float = DEFAULT_DISCOVER_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.registry = registry
        self.interval = interval
        self._clock = clock
        self.membership = Membership()
        self._mine: dict[str, str] = {}  # instance id -> backend id, of backends we added
        # Of those, the ones that deregistered: draining, removed once DRAINED.
        self._leaving: dict[str, tuple[Instance, str]] = {}  # instance id -> (it, backend id)
        self._wake = asyncio.Event()
        self._gone: set[str] = set()  # ids that announced "down" since the last read
        self._unreachable = False
        self.synced = asyncio.Event()  # set after the first successful read

    def __repr__(self) -> str:
        return f"<Discovery {self.registry.service!r} [instances: {len(self._mine)}]>"

    async def run(self) -> None:
        """Read every `interval` seconds, or at once after a notice; cancel to stop."""
        listener = asyncio.create_task(self._listen(), name="discovery-notices")
        try:
            while True:
                await self.refresh()
                # The interval is the schedule of the reads; a notice cuts it short.
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a cancel
                # that lands as the wake-up comes (see redis_plumbing.cancellable).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.interval):
                        await self._wake.wait()
                self._wake.clear()
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    async def refresh(self) -> Changes:
        """One full read, applied to the pool; on an unreachable Redis, changes nothing."""
        gone, self._gone = self._gone, set()
        try:
            snapshot = await self.registry.read()
        except RegistryUnavailable as exc:
            self._gone |= gone
            self.membership.unreachable()
            if not self._unreachable:
                self._unreachable = True
                log_event(
                    REGISTRY_UNREACHABLE,
                    level=logging.WARNING,
                    service=self.registry.service,
                    error=str(exc),
                    keeping=len(self._mine),
                )
            return Changes()
        except RegistryError as exc:
            log_event(REGISTRY_ERROR, level=logging.ERROR, error=str(exc))
            return Changes()
        if self._unreachable:
            self._unreachable = False
            log_event(REGISTRY_RECOVERED, service=self.registry.service)
        changes = self.membership.update(snapshot, self._clock(), gone)
        self._apply(changes, gone | snapshot.left)
        self._remove_drained()
        self.synced.set()
        return changes

    def _apply(self, changes: Changes, gone: set[str]) -> None:
        added = {i.id: i for i in changes.added}
        for instance in changes.removed:
            backend_id = self._mine.pop(instance.id, None)
            if backend_id is None or backend_id not in self.pool:
                continue
            again = added.get(instance.id)
            if again is not None and again.address == instance.address:
                self._mine[instance.id] = backend_id  # its record changed, not its address
            elif instance.id in gone and again is None:
                self._leave(instance, backend_id)
            else:
                self._remove(instance, backend_id, None)
        for instance in changes.added:
            if instance.id not in self._mine:
                self._add(instance)

    def _leave(self, instance: Instance, backend_id: str) -> None:
        """A deregistered instance: drain it; `_remove_drained` removes it once DRAINED."""
        self._leaving[instance.id] = (instance, backend_id)
        backend = self.pool[backend_id]
        if backend.draining:
            return  # the operator drained it already: that drain goes on
        self.pool.drain(backend_id, self._clock())
        log_event(
            BACKEND_DRAINING,
            backend=backend_id,
            instance=instance.id,
            reason="deregistered",
            in_flight=backend.in_flight,
            sessions="keep" if backend.keep_pinned else "move",
        )

    def _remove_drained(self) -> None:
        for instance_id, (instance, backend_id) in list(self._leaving.items()):
            backend = self.pool.get(backend_id)
            if backend is None:  # removed by the operator meanwhile
                del self._leaving[instance_id]
            elif backend.drained_reason is not None:
                del self._leaving[instance_id]
                self._remove(instance, backend_id, backend.drained_reason)

    def _remove(self, instance: Instance, backend_id: str, drained: str | None) -> None:
        self.pool.remove(backend_id)
        log_event(
            BACKEND_UNDISCOVERED,
            instance=instance.id,
            url=instance.address,
            how="died" if drained is None else "deregistered",
            drained=drained,
        )

    def _add(self, instance: Instance) -> None:
        leaving = self._leaving.pop(instance.id, None)
        if leaving is not None:
            backend = self.pool.get(leaving[1])
            if backend is not None and _same(backend, instance.address):
                # Back before its drain was over (a preStop that was cancelled): serve again.
                self._mine[instance.id] = backend.id
                with contextlib.suppress(InvalidTransition):  # the operator enabled it
                    self.pool.enable(backend.id)
                    log_event(BACKEND_ENABLED, backend=backend.id, instance=instance.id)
                return
            if backend is not None:  # back at another address: the old one is dead
                self._remove(leaving[0], backend.id, None)
        try:
            if self.pool.find(instance.address) is not None:
                return  # configured (or spawned) already: not ours to add, nor to remove
            backend = self.pool.add(instance.address)
        except ValueError as exc:  # a bad address, or BackendExists
            log_event(
                REGISTRY_BAD_ADDRESS,
                level=logging.WARNING,
                instance=instance.id,
                error=str(exc),
            )
            return
        self._mine[instance.id] = backend.id
        if self.pool.policy.slow_start > 0:
            # A new instance starts cold (empty caches, a JIT-less warm-up of its imports):
            # ramp its share as for a backend that comes back UP.
            backend.ramp_from = self._clock()
        log_event(BACKEND_DISCOVERED, instance=instance.id, url=backend.url, id=backend.id)

    async def _listen(self) -> None:
        """Wake the reader on every notice; resubscribe after a failure, forever."""
        while True:
            try:
                async with self.registry.notices() as next_notice:
                    # Subscribed: a notice sent while we were not is covered by this read.
                    self._wake.set()
                    while True:
                        notice = await next_notice(self.interval)
                        if notice is None:
                            continue
                        if notice.event == "down":
                            self._gone.add(notice.id)
                        self._wake.set()
            except RegistryError:
                # The reads log the outage; here only wait and subscribe again.
                await asyncio.sleep(self.interval)


def _same(backend: Backend, address: str) -> bool:
    """Whether `address` is `backend`'s URL (normalized as Backend does)."""
    try:
        return Backend(address).url == backend.url
    except ValueError:
        return False
