"""The pin table: which backend holds each session, by the app's session cookie. Pure.

The affinity cookie pins a client, but a client can lose it (a cleared cookie, a replica
with another secret, an expired or forged value) while keeping its session cookie. The
table is what still finds the session's instance then: the router learns `session cookie
value -> backend id` from the app's own Set-Cookie on the response that creates a session,
and again on every re-pin, as HAProxy's and nginx's `learn` do. The lookup order is the
router's: a valid signed pin, then this table, then the hash.

It is in memory, per process, bounded (`max_entries`, oldest learned out first; values over
`key_max` bytes are not kept). `on_learn`, when set, is told of every learned pin (not of a
request merely seen): `balancer.control._pin_store` writes them to Redis for every replica,
and `remote` tells the router that a miss here should be looked up there.

Each entry also records when its session was last seen (`seen`, on the caller's clock),
which gives the pinned sessions of a backend in the last N seconds (the dashboard, the
`balancer_pinned_sessions` gauge, a drain's end) and an operator's list of them. A session
is named outside the process only by its `handle`, a digest: the cookie's value is a
bearer credential, and the admin API must not hand it out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

__all__ = ["DEFAULT_PINS_MAX", "Pin", "PinTable", "handle"]

DEFAULT_PINS_MAX = 65536  # ~100 bytes an entry for a typical session id: ~7 MiB
_KEY_MAX = 256  # bytes of a session cookie value kept; a longer one is not learned


def handle(session: bytes) -> str:
    """The name the admin API gives a session: 16 hex digits of a digest of its value."""
    return hashlib.sha256(b"balancer.pin\0" + session).hexdigest()[:16]


class Pin:
    """One session's entry. `moved` is an operator's order waiting for the session's next
    request: go to the backend of that id (or, when it is "", be placed anew), and re-pin;
    None when there is none."""

    __slots__ = ("backend_id", "moved", "seen", "session")

    def __init__(self, session: bytes, backend_id: str, seen: float) -> None:
        self.session = session
        self.backend_id = backend_id
        self.seen = seen
        self.moved: str | None = None


class PinTable:
    """Session cookie value -> `Pin`, bounded; see the module docstring."""

    def __init__(self, *, max_entries: int = DEFAULT_PINS_MAX, key_max: int = _KEY_MAX) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, not {max_entries!r}")
        self._pins: dict[bytes, Pin] = {}
        self._max = max_entries
        self._key_max = key_max
        # Told of each learned pin: (session, backend id).
        self.on_learn: Callable[[bytes, str], None] | None = None
        # A miss here is looked up in a shared store before the hash decides.
        self.remote = False

    def __len__(self) -> int:
        return len(self._pins)

    @property
    def key_max(self) -> int:
        """Bytes of the longest session cookie value kept: a longer one is never learned."""
        return self._key_max

    def get(self, session: bytes) -> Pin | None:
        return self._pins.get(session)

    def learn(
        self, session: bytes, backend_id: str, now: float, *, share: bool = True
    ) -> Pin | None:
        """Pin `session` to `backend_id`, seen at `now`; tell `on_learn` if `share` and the
        backend changed. Returns the entry, or None for a value too long to keep."""
        if len(session) > self._key_max:
            return None
        pins = self._pins
        pin = pins.get(session)
        if pin is None:
            if len(pins) >= self._max:
                del pins[next(iter(pins))]  # the oldest learned
            pin = pins[session] = Pin(session, backend_id, now)
        elif pin.backend_id == backend_id:
            pin.seen = now
            return pin
        else:
            # Learned again: it moves to the young end, so a busy session outlives idle ones.
            del pins[session]
            pins[session] = pin
            pin.backend_id = backend_id
            pin.seen = now
        if share and self.on_learn is not None:
            self.on_learn(session, backend_id)
        return pin

    def forget(self, session: bytes) -> bool:
        """Drop a session's entry; whether there was one."""
        return self._pins.pop(session, None) is not None

    def find(self, name: str) -> Pin | None:
        """The entry whose `handle` is `name`, or None (a scan: for the admin API)."""
        for session, pin in self._pins.items():
            if handle(session) == name:
                return pin
        return None

    def recent(self, backend_id: str, since: float, limit: int) -> list[Pin]:
        """At most `limit` sessions pinned to `backend_id` and seen at `since` or later,
        most recent first."""
        pins = [p for p in self._pins.values() if p.backend_id == backend_id and p.seen >= since]
        pins.sort(key=_seen, reverse=True)
        return pins[:limit]

    def counts(self, since: float) -> dict[str, int]:
        """Per backend id, its sessions seen at `since` or later."""
        counts: dict[str, int] = {}
        for pin in self._pins.values():
            if pin.seen >= since:
                counts[pin.backend_id] = counts.get(pin.backend_id, 0) + 1
        return counts


def _seen(pin: Pin) -> float:
    return pin.seen
