"""One backend and its state machine: UP, DRAINING, DRAINED, DOWN. Pure: no I/O, no clock.

Two independent causes feed the state, as in HAProxy (administrative and operational state)
and Envoy (health checks and outlier detection):

- the operator drains and enables a backend (`drain`, `enable`);
- health: active checks mark it down and up (`mark_down`, `mark_up`), and passive ejection
  takes it out for `ejection_time` seconds after `eject_after` consecutive failed requests
  (`request_finished(failed=True)`: refused, reset, a bad response, or no response within
  the response timeout), until `release(now)` sees the time is over, or until the active
  checks mark it up again (Envoy's `successful_active_health_check_uneject_host`): checks
  that saw the fault and then its end know better than a fixed time. An ejection of a
  backend whose checks never failed (it answers them, not the requests) runs its full time.

`state` is derived from them: DOWN if unhealthy or ejected, else DRAINED if its drain has
ended, else DRAINING if it is draining, else UP. Keeping the causes apart means a backend
drained by the operator stays drained when it fails and recovers, and an ejection ending
does not undo a failed active check.

A drain ends by itself (issue 15; HAProxy's and nginx's never do). A DRAINING backend takes
no new clients; with `keep_pinned` (the default, `DrainPolicy.sessions == "keep"`) the
clients pinned to it keep reaching it while it is healthy, so their sessions live on. The
drain ends, and the backend is DRAINED (safe to remove: nothing reaches it any more), when
nothing is in flight and no request has reached it for `idle` seconds ("idle"; without
`keep_pinned`, as soon as nothing is in flight: "empty"), or `deadline` seconds after it
began ("deadline"), or when the operator says so ("now"). `drain_tick(now)` is how the
caller's clock reaches it: it compares `requests_total` with what it saw last, so the data
path pays nothing for the idle timer.

Times are seconds on one monotonic clock that the caller owns and passes in (`now`).

How an operator describes a backend beyond its URL (HAProxy's `server` line options, issue
17): `configured_weight` (1..256, its share of new clients and of the hash table against
the others'), `backup` (takes traffic only while no primary is UP), `max_conns` (at most
that many requests in flight to it; 0: no cap). `BackendSpec` parses and prints the
operator's text, `NAME=URL weight=N backup max-conns=N`.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal
from urllib.parse import urlsplit

from .._exceptions import InvalidTransition

__all__ = [
    "DRAIN_SESSIONS",
    "MAX_WEIGHT",
    "Backend",
    "BackendPolicy",
    "BackendSpec",
    "BackendState",
    "DrainPolicy",
    "DrainSessions",
    "backend_id",
    "check_backend_name",
]


class BackendState(enum.Enum):
    UP = "up"  # selectable
    DRAINING = "draining"  # no new clients; its pinned clients stay (keep_pinned)
    DRAINED = "drained"  # its drain ended: gets nothing, safe to remove
    DOWN = "down"  # failed active checks or passively ejected; gets nothing


DrainSessions = Literal["keep", "move"]
DRAIN_SESSIONS: Final[tuple[DrainSessions, ...]] = ("keep", "move")


@dataclass(frozen=True, slots=True)
class DrainPolicy:
    """How a drain treats pinned clients and when it ends (module docstring). Raises
    ValueError, naming the field, for a time that is negative or not finite."""

    # "keep": pinned clients stay until the drain ends; "move": they are re-pinned at their
    # next request. Keep is the default in every mode: the balancer cannot tell whether an
    # app keeps its sessions in Redis (hybrid, shared) or in memory (sticky), and keeping
    # costs only time, bounded by `deadline`, where moving loses in-memory sessions.
    sessions: DrainSessions = "keep"
    idle: float = 10.0  # seconds with no request to the backend that end a drain
    deadline: float = 60.0  # seconds after which a drain ends whatever comes

    def __post_init__(self) -> None:
        for name in ("idle", "deadline"):
            value = getattr(self, name)
            if not 0 <= value < float("inf"):
                raise ValueError(f"{name} must be a finite number of seconds >= 0, not {value!r}")
        if self.sessions not in DRAIN_SESSIONS:
            raise ValueError(f"sessions must be 'keep' or 'move', not {self.sessions!r}")


@dataclass(frozen=True, slots=True)
class BackendPolicy:
    """How a backend reacts to failures and recoveries; shared by the pool's backends."""

    eject_after: int = 5  # consecutive failed requests; 0 turns passive ejection off
    ejection_time: float = 30.0  # seconds out after an ejection
    slow_start: float = 0.0  # seconds of weight ramp after coming back UP; 0 = none
    # Envoy's max_ejection_percent: passive ejection never takes out more than this share
    # of the pool (but always allows one), so that a fault shared by every backend (their
    # database is down) does not eject them all and turn every answer into a 503.
    max_ejection_percent: float = 50.0
    # Envoy's min_weight_percent: a returning backend takes at least this share at once,
    # so that it gets some traffic to prove itself.
    min_weight: float = 0.1
    drain: DrainPolicy = DrainPolicy()


def backend_id(url: str) -> str:
    """The id every process derives from the same (normalized) URL: sha256 hex, 12 chars."""
    return hashlib.sha256(url.encode()).hexdigest()[:12]


# A backend's name (`--backend NAME=URL`) is its id: in pins, the Maglev table, the admin
# API's paths and metrics labels, so it is kept to characters safe in all of them.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def check_backend_name(name: str) -> str:
    """`name` if it may name a backend; raises ValueError otherwise."""
    if _NAME.fullmatch(name) is None:
        raise ValueError(
            f"{name!r} is not a backend name (1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit)",
        )
    return name


# HAProxy's range for a server's weight; a backend's table share is weight / sum(weights),
# so 256 keeps the lightest at >= 1/256 of the heaviest's slots.
MAX_WEIGHT: Final = 256


def _check_options(weight: int, max_conns: int) -> None:
    if not 1 <= weight <= MAX_WEIGHT:
        raise ValueError(f"weight must be an integer from 1 to {MAX_WEIGHT}, not {weight!r}")
    if max_conns < 0:
        raise ValueError(f"max-conns must be an integer >= 0 (0: no cap), not {max_conns!r}")


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """A backend as the operator describes it: `[NAME=]URL [weight=N] [backup]
    [max-conns=N]`, options separated by spaces after the URL, in any order (HAProxy's
    `server` line). `parse` raises ValueError naming the bad token; `str()` is the
    normalized text (the URL normalized, default options left out), which `parse` reads
    back as the same spec."""

    url: str
    name: str | None = None
    weight: int = 1
    backup: bool = False
    max_conns: int = 0  # 0: no cap

    def __post_init__(self) -> None:
        _check_options(self.weight, self.max_conns)

    @classmethod
    def parse(cls, text: str) -> BackendSpec:
        tokens = text.split()
        if not tokens:
            raise ValueError("a backend is needed: [NAME=]URL [weight=N] [backup] [max-conns=N]")
        first = tokens[0]
        head, sep, _ = text.strip().partition("=")
        if sep and " " in head and "://" not in head:
            check_backend_name(head)  # "a b=http://...": a name with a space; raises
        name: str | None = None
        url = first
        key, sep, value = first.partition("=")
        if first == "backup" or (sep and key in ("weight", "max-conns")):
            raise ValueError(f"{first!r}: the URL comes first, then the options")
        if sep and not any(c in key for c in ":/"):  # an "=" after the scheme is the URL's
            name, url = check_backend_name(key), value
        weight = 1
        backup = False
        max_conns = 0
        for token in tokens[1:]:
            key, sep, value = token.partition("=")
            if token == "backup":
                backup = True
            elif sep and key in ("weight", "max-conns"):
                if not value.isdigit():
                    raise ValueError(f"{token!r}: {key} takes an integer")
                if key == "weight":
                    weight = int(value)
                else:
                    max_conns = int(value)
            else:
                raise ValueError(
                    f"{token!r} is not a backend option (weight=N, backup, max-conns=N)"
                )
        url = _normalize(url)[0]
        return cls(url, name, weight, backup, max_conns)

    def __str__(self) -> str:
        parts = [self.url if self.name is None else f"{self.name}={self.url}"]
        if self.weight != 1:
            parts.append(f"weight={self.weight}")
        if self.backup:
            parts.append("backup")
        if self.max_conns:
            parts.append(f"max-conns={self.max_conns}")
        return " ".join(parts)


def _normalize(url: str) -> tuple[str, str, int]:
    """`(url, host, port)` for an `http://host[:port][/]` or `https://host[:port][/]` URL
    (ports 80 and 443 by default); raises ValueError otherwise."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{url!r} is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{url!r}: only http:// and https:// backends are supported")
    host = parts.hostname
    if not host:
        raise ValueError(f"{url!r} has no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{url!r}: credentials in the URL are not supported")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{url!r}: a backend is an origin, without a path")
    if port == 0:
        raise ValueError(f"{url!r}: port 0 is not a port")
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    try:
        netloc = f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        netloc = host
    return f"{parts.scheme}://{netloc}:{port}", host, port


class Backend:
    """A backend server and its state; the router reads it, the data path counts on it.

    Its `id` is `name` when given, else `backend_id(url)`. Raises ValueError, naming the
    value, for a URL that is not `http://host[:port]`, a name that is not valid, a weight
    outside 1..MAX_WEIGHT or a negative max_conns (module docstring).
    Every transition method raises InvalidTransition when the state forbids it.
    """

    __slots__ = (
        "_draining",
        "_unhealthy",
        "backup",
        "configured_weight",
        "down_reason",
        "down_since",
        "drain_active",
        "drain_seen",
        "drain_since",
        "drained_reason",
        "ejected_until",
        "ejections_total",
        "failures_in_a_row",
        "failures_total",
        "host",
        "id",
        "in_flight",
        "keep_pinned",
        "max_conns",
        "may_eject",
        "on_change",
        "policy",
        "port",
        "ramp_from",
        "requests_total",
        "state",
        "url",
    )

    def __init__(
        self,
        url: str,
        *,
        name: str | None = None,
        policy: BackendPolicy | None = None,
        weight: int = 1,
        backup: bool = False,
        max_conns: int = 0,
    ) -> None:
        self.url, self.host, self.port = _normalize(url)
        # Named, the id is the name, so replicas agree however they spell the URL.
        self.id = backend_id(self.url) if name is None else check_backend_name(name)
        _check_options(weight, max_conns)
        # The operator's weight (the pool's `set_weight` changes it); `weight(now)` is the
        # slow-start ramp's share of it.
        self.configured_weight = weight
        self.backup = backup
        self.max_conns = max_conns  # requests in flight at most; 0: no cap
        self.policy = policy if policy is not None else BackendPolicy()
        self.state = BackendState.UP
        self.in_flight = 0
        self.requests_total = 0
        self.failures_total = 0
        self.ejections_total = 0
        self.failures_in_a_row = 0
        self.down_reason: str | None = None
        self.down_since = 0.0  # when it last became DOWN
        self.ejected_until: float | None = None
        # The drain (module docstring): when it began, the last time a request was seen to
        # reach the backend, requests_total then, and why it ended (None while it runs).
        self.drain_since = 0.0
        self.drain_active = 0.0
        self.drain_seen = 0
        self.drained_reason: str | None = None
        self.keep_pinned = False  # while DRAINING: its pinned clients still reach it
        # When the slow-start ramp began (the backend came back UP), or None: full weight.
        self.ramp_from: float | None = None
        # Called with (backend, old_state) after every change of `state`; the pool sets it.
        self.on_change: Callable[[Backend, BackendState], None] | None = None
        # Asked before a passive ejection; the pool sets it to enforce max_ejection_percent.
        self.may_eject: Callable[[], bool] | None = None
        self._draining = False
        self._unhealthy = False

    def __repr__(self) -> str:
        return f"<Backend {self.id} {self.url} [{self.state.value}, in-flight: {self.in_flight}]>"

    @property
    def draining(self) -> bool:
        """Drained by the operator (whatever its health)."""
        return self._draining

    @property
    def healthy(self) -> bool:
        """Passing active health checks (whatever the operator or ejection says)."""
        return not self._unhealthy

    # -- the data path ------------------------------------------------------------------

    def request_started(self) -> None:
        """A request was sent to this backend."""
        self.in_flight += 1
        self.requests_total += 1

    def request_finished(self, *, failed: bool, now: float) -> None:
        """A request ended; `failed` for a connect error, a timeout or a broken upstream.

        `eject_after` failures in a row eject the backend (DOWN) for `ejection_time`
        seconds, as Envoy's outlier detection does with consecutive 5xx, unless `may_eject`
        says no (too many ejected already): then the next failure asks again.
        """
        if self.in_flight == 0:
            raise InvalidTransition(
                f"request_finished on backend {self.id} with no request in flight"
            )
        self.in_flight -= 1
        if not failed:
            self.failures_in_a_row = 0
            return
        self.failures_total += 1
        self.failures_in_a_row += 1
        eject_after = self.policy.eject_after
        if (
            eject_after
            and self.failures_in_a_row >= eject_after
            and self.ejected_until is None
            and (self.may_eject is None or self.may_eject())
        ):
            self.ejected_until = now + self.policy.ejection_time
            self.ejections_total += 1
            self.failures_in_a_row = 0
            self._update(now)

    # -- the operator ---------------------------------------------------------------------

    def drain(self, now: float, *, sessions: DrainSessions | None = None) -> None:
        """Stop sending new clients; pinned ones stay or move by `sessions` (default: the
        policy's); the drain ends as the module docstring says."""
        if self._draining:
            raise InvalidTransition(f"cannot drain backend {self.id}: it is already draining")
        self._draining = True
        self.drained_reason = None
        self.keep_pinned = (sessions or self.policy.drain.sessions) == "keep"
        self.drain_since = self.drain_active = now
        self.drain_seen = self.requests_total
        self._update(None)

    def drain_tick(self, now: float) -> str | None:
        """End the drain if its time has come; returns the reason it ended ("idle",
        "empty", "deadline"), or None while it goes on (or no drain runs)."""
        if not self._draining or self.drained_reason is not None:
            return None
        if self.requests_total != self.drain_seen:
            self.drain_seen = self.requests_total
            self.drain_active = now
        policy = self.policy.drain
        reason: str | None = None
        if now - self.drain_since >= policy.deadline:
            reason = "deadline"
        elif self.in_flight == 0:
            if not self.keep_pinned:
                reason = "empty"
            elif now - self.drain_active >= policy.idle:
                reason = "idle"
        if reason is not None:
            self.finish_drain(reason)
        return reason

    def finish_drain(self, reason: str) -> None:
        """End the drain now (the operator's `?now=1`: "now"): DRAINED."""
        if not self._draining:
            raise InvalidTransition(
                f"cannot end the drain of backend {self.id}: it is not draining"
            )
        if self.drained_reason is None:
            self.drained_reason = reason
            self.keep_pinned = False
            self._update(None)

    def enable(self) -> None:
        """Undo `drain`, whether it runs or has ended."""
        if not self._draining:
            raise InvalidTransition(f"cannot enable backend {self.id}: it is not draining")
        self._draining = False
        self.drained_reason = None
        self.keep_pinned = False
        self._update(None)

    # -- health ---------------------------------------------------------------------------

    def mark_down(self, reason: str, now: float) -> None:
        """Active checks failed (`fall` in a row); `reason` says how, for the logs."""
        if self._unhealthy:
            raise InvalidTransition(
                f"cannot mark backend {self.id} down: it is already down ({self.down_reason})"
            )
        self._unhealthy = True
        self.down_reason = reason
        self._update(now)

    def mark_up(self, now: float) -> None:
        """Active checks passed again (`rise` in a row); this also ends a passive ejection."""
        if not self._unhealthy:
            raise InvalidTransition(f"cannot mark backend {self.id} up: it is not down")
        self._unhealthy = False
        self.down_reason = None
        # The checks failed since (or before) the ejection, and pass again: the fault the
        # requests saw is over (a hung process resumed), so it is back now, not after the
        # rest of `ejection_time` (issue 13: 30 s more of a healthy backend out).
        self.ejected_until = None
        self.failures_in_a_row = 0
        self._update(now)

    def release(self, now: float) -> bool:
        """End an ejection whose time is over; returns whether one ended."""
        if self.ejected_until is None or now < self.ejected_until:
            return False
        self.ejected_until = None
        self._update(now)
        return True

    # -- derived --------------------------------------------------------------------------

    @property
    def full(self) -> bool:
        """At its `max_conns` (never without a cap)."""
        return 0 < self.max_conns <= self.in_flight

    def weight(self, now: float) -> float:
        """Share of a full backend's load to give it, in [min_weight, 1]: slow start. The
        router multiplies it by `configured_weight`."""
        ramp_from = self.ramp_from
        if ramp_from is None:
            return 1.0
        window = self.policy.slow_start
        elapsed = now - ramp_from
        if elapsed >= window:
            self.ramp_from = None
            return 1.0
        return max(self.policy.min_weight, elapsed / window)

    def _update(self, now: float | None) -> None:
        old = self.state
        if self._unhealthy or self.ejected_until is not None:
            new = BackendState.DOWN
        elif self.drained_reason is not None:
            new = BackendState.DRAINED
        elif self._draining:
            new = BackendState.DRAINING
        else:
            new = BackendState.UP
        if new is old:
            return
        self.state = new
        if old is BackendState.DOWN and now is not None and self.policy.slow_start > 0:
            # Slow start only after being DOWN: a drained backend was never cold.
            self.ramp_from = now
        elif new is BackendState.DOWN:
            self.ramp_from = None
        if new is BackendState.DOWN and now is not None:
            self.down_since = now
        if self.on_change is not None:
            self.on_change(self, old)
