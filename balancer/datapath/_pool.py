"""The backend pool: the set of backends, changed at runtime, with a generation counter.

The generation changes whenever the pool's membership or a backend's state changes (a
backend added, removed, drained, down, reweighted...), so the router rebuilds its lookup table and
drops its cached decisions lazily, only then: a decision that keeps a client on a DRAINING
backend must not outlive the drain.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from .._exceptions import BackendExists, UnknownBackend
from ._backend import MAX_WEIGHT, Backend, BackendPolicy, BackendState, DrainSessions

__all__ = ["Pool", "StateListener"]

# Told of every state change: (backend, old state); backend.state is the new one.
StateListener = Callable[[Backend, BackendState], None]


class Pool:
    """The backends, by id, in the order they were added. Pure: no I/O, no clock."""

    def __init__(
        self,
        urls: Iterable[str] = (),
        *,
        policy: BackendPolicy | None = None,
        on_change: StateListener | None = None,
    ) -> None:
        self.policy = policy if policy is not None else BackendPolicy()
        self.generation = 0
        self._on_change = on_change
        # Called after a backend is added or removed (not on state changes): the balancer
        # logs the routing table's fingerprint then.
        self.on_members: Callable[[], None] | None = None
        self._backends: dict[str, Backend] = {}
        self._selectable: tuple[Backend, ...] = ()
        self._selectable_generation = -1
        # Whether some backend has a max_conns: the data path looks at caps only then.
        self.capped = False
        for url in urls:
            self.add(url)

    def __repr__(self) -> str:
        counts = dict.fromkeys(BackendState, 0)
        for backend in self._backends.values():
            counts[backend.state] += 1
        inner = ", ".join(f"{state.value}: {count}" for state, count in counts.items())
        return f"<Pool [{inner}]>"

    def __len__(self) -> int:
        return len(self._backends)

    def __iter__(self) -> Iterator[Backend]:
        return iter(list(self._backends.values()))

    def __contains__(self, backend_id: object) -> bool:
        return backend_id in self._backends

    def __getitem__(self, backend_id: str) -> Backend:
        """The backend with this id; raises UnknownBackend."""
        try:
            return self._backends[backend_id]
        except KeyError:
            raise UnknownBackend(backend_id) from None

    def get(self, backend_id: str) -> Backend | None:
        return self._backends.get(backend_id)

    def add(
        self,
        url: str,
        *,
        name: str | None = None,
        weight: int = 1,
        backup: bool = False,
        max_conns: int = 0,
    ) -> Backend:
        """Add a backend, UP, its id `name` if given, with the operator's options
        (`Backend`); raises ValueError for a bad URL, name or option, BackendExists for a
        known id or URL."""
        backend = Backend(
            url, name=name, policy=self.policy, weight=weight, backup=backup, max_conns=max_conns
        )
        if backend.id in self._backends:
            raise BackendExists(backend.url, backend.id)
        same = self.find(backend.url)
        if same is not None:  # the same server under another name
            raise BackendExists(backend.url, same.id)
        backend.on_change = self._changed
        backend.may_eject = self._may_eject
        self._backends[backend.id] = backend
        self.capped = self.capped or max_conns > 0
        self.generation += 1
        if self.on_members is not None:
            self.on_members()
        return backend

    def set_weight(self, backend_id: str, weight: int) -> Backend:
        """Change a backend's weight (the router rebuilds its table: a new generation);
        raises UnknownBackend, or ValueError for a weight outside 1..MAX_WEIGHT."""
        backend = self[backend_id]
        if not 1 <= weight <= MAX_WEIGHT:
            raise ValueError(f"weight must be an integer from 1 to {MAX_WEIGHT}, not {weight!r}")
        if weight != backend.configured_weight:
            backend.configured_weight = weight
            self.generation += 1
            if self.on_members is not None:
                self.on_members()  # the routing fingerprint changed
        return backend

    def remove(self, backend_id: str) -> Backend:
        """Take a backend out; its in-flight requests finish on the object the caller holds."""
        backend = self[backend_id]
        del self._backends[backend_id]
        self.capped = any(b.max_conns for b in self._backends.values())
        backend.on_change = None
        backend.may_eject = None
        self.generation += 1
        if self.on_members is not None:
            self.on_members()
        return backend

    def find(self, url: str) -> Backend | None:
        """The backend for a URL (normalized as Backend does), named or not, or None."""
        normalized = Backend(url).url
        for backend in self._backends.values():
            if backend.url == normalized:
                return backend
        return None

    def drain(
        self, backend_id: str, now: float, *, sessions: DrainSessions | None = None
    ) -> Backend:
        backend = self[backend_id]
        backend.drain(now, sessions=sessions)
        return backend

    def drain_tick(self, now: float) -> list[tuple[Backend, str]]:
        """End the drains whose time has come (`Backend.drain_tick`); those that ended,
        each with its reason."""
        ended = []
        for backend in list(self._backends.values()):
            reason = backend.drain_tick(now)
            if reason is not None:
                ended.append((backend, reason))
        return ended

    def enable(self, backend_id: str) -> Backend:
        backend = self[backend_id]
        backend.enable()
        return backend

    def release(self, now: float) -> list[Backend]:
        """End the passive ejections that are over; the backends that came back."""
        return [b for b in list(self._backends.values()) if b.release(now)]

    def selectable(self) -> tuple[Backend, ...]:
        """The UP primary backends, ordered by id (the same order in every process); when
        none is UP, the UP backups (HAProxy's `backup`: all of them, not the first)."""
        if self._selectable_generation != self.generation:
            up = [b for b in self._backends.values() if b.state is BackendState.UP]
            primaries = [b for b in up if not b.backup]
            self._selectable = tuple(sorted(primaries or up, key=lambda b: b.id))
            self._selectable_generation = self.generation
        return self._selectable

    def _may_eject(self) -> bool:
        ejected = sum(1 for b in self._backends.values() if b.ejected_until is not None)
        limit = int(len(self._backends) * self.policy.max_ejection_percent / 100)
        return ejected < max(1, limit)

    def _changed(self, backend: Backend, old: BackendState) -> None:
        self.generation += 1
        if self._on_change is not None:
            self._on_change(backend, old)
