"""The router: which backend takes a request, and whether to (re)pin its client. Pure.

"Decide, then do": `Router.decide` reads in-memory state only (the pool, the request's
client IP and Cookie header) and returns a Decision; the data path does the I/O. It is
called once per request, and again with `exclude={failed.id}` for a retry.

Stickiness, mode `cookie:NAME`. A backend *keeps* its pinned clients when it is UP, or
DRAINING with `keep_pinned` (a drain that keeps sessions, `_backend`); the lookup order is
a valid signed pin, then the pin table, then the hash:

1. A valid affinity cookie naming a backend that keeps its clients (and not excluded): that
   backend. Bounded load never moves a pinned client: in `sticky` mode that would lose its
   session.
2. A valid pin to a backend that does not keep it (DOWN, DRAINING with `move`, DRAINED) or
   is excluded (a retry): failover to the backend the Maglev table over the UP set gives
   for the client's key (the session cookie's value if present, else the pinned id), the
   same on every replica; repinned, new cookie. With `on_pinned_down="strict"` a pin to a
   DOWN backend is refused instead (`PinnedBackendDown`, a 503 with Retry-After) for
   `strict_window` seconds after it went down, then fails over (Envoy's `strict`, HAProxy's
   `persist`); so is a retry away from a pinned backend that failed the request before its
   health checks marked it DOWN.
3. No valid pin (none, tampered, malformed, a removed backend's id), with a session cookie:
   the backend the pin table names for it, if it keeps its clients; else Maglev of its
   value, which every replica computes alike. Repinned ("lost_pin", or "removed").
4. Neither cookie (the request that may create the session): a random table slot, moving
   forward past backends over their bounded-load capacity; then pin.

An operator's order (`move`, `forget`) comes first of all, once: the session's next request
goes where it was told (or is placed anew), re-pinned ("admin").

Every re-pin has a `reason` (`REPIN_REASONS`): the metrics count them, and a response can
name it. The pin table (`_pins`) learns a session's backend from the response that creates
it (a Decision with `learn` set: the data path hands its head to `learn`) and on every
re-pin; a new session is placed by load, so the hash of its cookie (known only once the app
answers) names its backend for only 1 in N sessions: the table finds the others when their
pin is lost. With a shared store behind it (`PinTable.remote`), a miss here is a Decision
with `lookup` set: the data path asks the store, tells `looked_up`, and decides again.

`fingerprint()` hashes what makes two processes route alike, for an operator to compare.

Mode `ip`: Maglev of the client IP, no cookies. Mode `none`: least in-flight (the default;
ties round robin) or round robin.

The operator's backend options (issue 17, `_backend`): the table is weighted Maglev over the
selectable set (`Pool.selectable`: the UP primaries, or the UP backups when none is), and
bounded load, least in-flight and round robin weigh by `configured_weight` (times the
slow-start ramp). A backend at its `max_conns` (`Backend.full`) is passed over wherever the
choice is free (rule 4, mode `none`; NoBackendAvailable when every one is full: the data
path queues the request); a pinned or hashed client is still sent to its backend, and the
data path makes it wait there (its session is there). A client pinned to a backup keeps it
while the backup is UP, even once a primary is back (HAProxy: "requests coming with a
persistence cookie referencing the server will always be served"): moving it would lose an
in-memory session; drain the backup with `sessions=move` to move them.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, Literal

from .._exceptions import NoBackendAvailable, PinnedBackendDown
from ._affinity import AffinityCookie, Sticky, cookie_value, set_cookie_value
from ._backend import Backend, BackendState
from ._maglev import DEFAULT_TABLE_SIZE, TableCache, key_hash, walk
from ._pins import Pin, PinTable
from ._pool import Pool

__all__ = [
    "DEFAULT_BALANCE",
    "DEFAULT_HASH_BALANCE_FACTOR",
    "DEFAULT_ON_PINNED_DOWN",
    "DEFAULT_STRICT_WINDOW",
    "ON_PINNED_DOWN",
    "REPIN_REASONS",
    "Balance",
    "Decision",
    "OnPinnedDown",
    "Router",
]

Balance = Literal["round-robin", "least-inflight"]
# For --sticky none: least in-flight steers around a hung backend within a request or two
# (issue 13); round robin kept sending it every Nth request until its checks failed.
DEFAULT_BALANCE: Final[Balance] = "least-inflight"
DEFAULT_HASH_BALANCE_FACTOR: Final = 0.25  # epsilon of bounded load; 0 turns it off
OnPinnedDown = Literal["failover", "strict"]
ON_PINNED_DOWN: Final[tuple[OnPinnedDown, ...]] = ("failover", "strict")
DEFAULT_ON_PINNED_DOWN: Final[OnPinnedDown] = "failover"  # today's behaviour: re-pin at once
DEFAULT_STRICT_WINDOW: Final = 30.0  # seconds strict mode refuses before it fails over
# Why a client was re-pinned: its backend was down, drained, failed this request (a retry),
# removed from the pool; it brought a session cookie without a valid pin; an operator
# moved it. (Bounded load never moves a pinned client, so there is no "overload".)
REPIN_REASONS: Final = ("down", "drain", "failed", "removed", "lost_pin", "admin")

_UP = BackendState.UP
_DOWN = BackendState.DOWN
_DRAINING = BackendState.DRAINING
# The decision cache of mode `cookie` (see `Router._decided`): at most this many Cookie
# headers, each at most this long, so a stream of distinct or huge headers bounds it
# (~2 MiB at worst).
_DECIDED_MAX = 4096
_DECIDED_KEY_MAX = 512


@dataclass(frozen=True, slots=True)
class Decision:
    backend: Backend
    set_cookie: bytes | None  # a complete Set-Cookie header VALUE to append, or None
    reason: str | None = None  # why the client was re-pinned (REPIN_REASONS), or None
    learn: bool = False  # no session cookie: pass the response head to Router.learn
    pin: Pin | None = None  # the session's pin table entry: each request marks it seen
    lookup: bytes | None = None  # ask the shared pin store for this session, then decide again

    @property
    def repinned(self) -> bool:
        """The client was moved off a pin (or found again without one): `reason` says why."""
        return self.reason is not None


class Router:
    """Chooses a backend per request; see the module docstring for the rules.

    `affinity` is required in mode `cookie`. `hash_balance_factor` is epsilon of
    "consistent hashing with bounded loads" (HAProxy's hash-balance-factor / 100): an
    unpinned client is not placed on a backend whose in-flight count would exceed
    ceil((1 + epsilon) x mean); 0 turns it off. `pins` is the pin table (a new in-memory
    one by default). `rng` and `clock` are injectable for tests.
    """

    def __init__(
        self,
        pool: Pool,
        *,
        sticky: Sticky,
        affinity: AffinityCookie | None = None,
        balance: Balance = DEFAULT_BALANCE,
        hash_balance_factor: float = DEFAULT_HASH_BALANCE_FACTOR,
        table_size: int = DEFAULT_TABLE_SIZE,
        pins: PinTable | None = None,
        on_pinned_down: OnPinnedDown = DEFAULT_ON_PINNED_DOWN,
        strict_window: float = DEFAULT_STRICT_WINDOW,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if sticky.mode == "cookie" and affinity is None:
            raise ValueError("affinity: cookie stickiness needs an affinity cookie signer")
        if hash_balance_factor < 0 or not math.isfinite(hash_balance_factor):
            raise ValueError(
                f"hash_balance_factor must be a finite number >= 0, not {hash_balance_factor!r}"
            )
        if on_pinned_down not in ON_PINNED_DOWN:
            raise ValueError(f"on_pinned_down must be failover or strict, not {on_pinned_down!r}")
        if not 0 <= strict_window < math.inf:
            raise ValueError(f"strict_window must be a finite number >= 0, not {strict_window!r}")
        self._tables = TableCache(table_size)  # raises ValueError: not a prime
        self._pool = pool
        self._sticky = sticky
        self._affinity = affinity
        self._balance = balance
        self._epsilon = hash_balance_factor
        self._size = table_size
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock
        self._now = clock()  # as of the last `tick`
        # Told of each re-pin decided, with its reason (the metrics' counter). A decision
        # cached by its Cookie header is counted once, when it is made: a client that keeps
        # its new affinity cookie sends another header; one that ignores it (wrk) is not
        # counted again for each request.
        self.on_repin: Callable[[str], None] | None = None
        self._strict = on_pinned_down == "strict"
        self._strict_window = strict_window
        self.pins = pins if pins is not None else PinTable()
        self._session_name = (sticky.cookie or "").encode()
        self._affinity_name = affinity.name_bytes if affinity is not None else b""
        self._generation = -1
        self._up: tuple[Backend, ...] = ()
        self._ids: tuple[str, ...] = ()  # of `_up`
        self._weights: list[float] = []  # of `_up`: configured_weight
        self._weighted = False  # `_up`'s weights differ
        self._capped = False  # some backend in the pool has a max_conns
        self._indexes: list[int] = []  # the Maglev table of `_ids`
        self._table: list[Backend] = []  # the same, resolved: one lookup a request
        self._rr_current: dict[str, float] = {}
        self._rr_next = 0
        # Least in-flight's tie rule: per position in `_up`, when it was last picked.
        self._picked: list[int] = []
        self._picks = 0
        # Per backend id: the decision "stay, no cookie", and its Set-Cookie value.
        self._stay: dict[str, Decision] = {}
        self._set_cookie: dict[str, bytes] = {}
        # Mode `cookie`: the decision by the whole Cookie header, for this generation and no
        # exclusions. `_by_cookie` is a pure function of those (a new client's random
        # placement is not cached), and a client sends the same header on every request: a
        # hit saves two cookie scans, a verify lookup and a hash, most of a decision's cost
        # (docs/architecture.md, "Measured facts"). The key is the whole header, so
        # a tampered value is another key, verified afresh.
        self._decided: dict[bytes, Decision] = {}
        # The same for rule 3 (a session cookie, no valid pin), apart: `decisions` (the
        # dashboard's count of pinned sessions) must not count values nobody signed. A
        # decision cached before `learn` saw its session is no worry: the app sets a new
        # session's cookie before any client can send it. Without this cache a client that
        # keeps no affinity cookie (wrk in benchmarks/proxy.py) cost 3 us more a request.
        self._unpinned_decided: dict[bytes, Decision] = {}
        self._fingerprint_of: tuple[tuple[str, int, bool], ...] | None = None
        self._fingerprint = ""

    @property
    def sticky(self) -> Sticky:
        return self._sticky

    @property
    def decisions(self) -> Mapping[bytes, Decision]:
        """Mode `cookie`'s decisions by whole Cookie header (empty in other modes), for
        reading only. It only grows, in insertion order, until the pool changes (then it is
        another mapping) or it fills (then it is emptied): the dashboard reads just what
        was added since its last look."""
        return self._decided

    def decide(
        self,
        client_ip: str,
        cookie_header: bytes | None,
        exclude: frozenset[str] = frozenset(),
        now: float = -1.0,
    ) -> Decision:
        """The backend for this request; raises NoBackendAvailable when none can take it,
        PinnedBackendDown in strict mode. The data path passes its arguments by position: a
        call by keyword costs it ~120 instructions more a request (mypyc's argument parser).
        `now` is when a session was seen (the pin table):
        when < 0, the time of the last `tick`, which is precise enough for that and costs
        the data path nothing (a float passed in is a boxed object a request)."""
        if self._pool.generation != self._generation:
            self._rebuild()
        mode = self._sticky.mode
        if mode == "cookie":
            if now < 0:
                now = self._now
            if exclude or not cookie_header:
                decided = self._by_cookie(cookie_header, exclude, now)
                if decided is None:
                    decided = self._unpinned(cookie_header, exclude, now, None)
                return decided
            decided = self._decided.get(cookie_header)
            if decided is None:
                decided = self._unpinned_decided.get(cookie_header)
            if decided is None:
                decided = self._by_cookie(cookie_header, exclude, now)
                if decided is not None:
                    if decided.reason != "admin":
                        _remember(self._decided, cookie_header, decided)
                else:
                    decided = self._unpinned(cookie_header, exclude, now, None)
                    if not decided.learn and decided.lookup is None:
                        # rule 3; a new client's placement is random
                        _remember(self._unpinned_decided, cookie_header, decided)
            else:
                pin = decided.pin
                if pin is not None:
                    pin.seen = now
            return decided
        if mode == "ip":
            backend = self._hashed(key_hash(client_ip.encode()), exclude)
            return self._stay_decision(backend)
        return self._stay_decision(self._balanced(exclude))

    def tick(self, now: float) -> None:
        """The clock, read by the caller every fraction of a second (`DrainWatch`): the
        time a request's session is marked seen at, unless `decide` is given one."""
        self._now = now

    def learn(self, head: bytes, backend_id: str) -> None:
        """A response head from `backend_id` to a request whose Decision had `learn` set:
        if it sets the session cookie, pin that session to that backend."""
        session = set_cookie_value(head, self._session_name)
        if session is not None:
            self.pins.learn(session, backend_id, self._clock())

    def looked_up(self, session: bytes, backend_id: str | None) -> None:
        """The shared pin store's answer for `session` (None: it has none): kept in the pin
        table (unshared: it came from the store), so the next decision finds it. A miss is
        kept as an entry naming no backend, so it is not asked again; the hash decides."""
        self.pins.learn(session, backend_id or "", self._clock(), share=False)

    def move(self, name: str, backend_id: str | None) -> Pin:
        """An operator's order for the session whose handle is `name`: its next request goes
        to `backend_id` (None: placed anew) and is re-pinned ("admin"). Raises LookupError
        for an unknown session, UnknownBackend for an unknown backend."""
        pin = self.pins.find(name)
        if pin is None:
            raise LookupError(name)
        if backend_id is not None:
            self._pool[backend_id]  # raises UnknownBackend
        pin.moved = backend_id or ""
        self._decided = {}  # the session's cached decision would ignore the order
        self._unpinned_decided = {}
        return pin

    def sessions(self, since: float) -> dict[str, int]:
        """Per backend id, the sessions seen at `since` or later (the pin table's)."""
        return self.pins.counts(since)

    def fingerprint(self) -> str:
        """12 hex digits that are equal on two processes that route alike: a hash of the
        sorted ids of every backend in the pool (whatever its state) with its weight and
        backup flag when not the defaults, the stickiness, the Maglev table size, and in
        mode `cookie` the affinity cookie's name and the id of its signing secret
        (`AffinityCookie.key_id`, not the secret)."""
        members = tuple(sorted((b.id, b.configured_weight, b.backup) for b in self._pool))
        if members != self._fingerprint_of:
            ids = [
                " ".join([i] + ([f"weight={w}"] if w != 1 else []) + (["backup"] if backup else []))
                for i, w, backup in members
            ]
            affinity = self._affinity
            parts = ["balancer-routing-1", str(self._sticky), str(self._size)]
            if self._sticky.mode == "cookie" and affinity is not None:
                parts += [affinity.name, affinity.key_id]
            text = "\n".join([*parts, "", *ids])
            self._fingerprint = hashlib.sha256(text.encode()).hexdigest()[:12]
            self._fingerprint_of = members
        return self._fingerprint

    # -- cookie stickiness ------------------------------------------------------------------

    def _repinned(self, reason: str) -> None:
        if self.on_repin is not None:
            self.on_repin(reason)

    def _keeps(self, backend: Backend) -> bool:
        """Whether `backend` keeps the clients pinned to it (module docstring)."""
        state = backend.state
        return state is _UP or (state is _DRAINING and backend.keep_pinned)

    def _by_cookie(
        self, cookie_header: bytes | None, exclude: frozenset[str], now: float
    ) -> Decision | None:
        """Rules 1-2 of the module docstring, and an operator's order; None without a valid
        pin (rules 3 and 4, whose decisions depend on more than the Cookie header and the
        pool's generation: the pin table, a random placement)."""
        affinity = self._affinity
        assert affinity is not None  # checked in __init__
        pin = affinity.verify(cookie_value(cookie_header, self._affinity_name))
        if pin is None:
            return None
        # Looked for once per Cookie header (the decision is cached by it).
        session = cookie_value(cookie_header, self._session_name)
        pinned = self._pool.get(pin[0])
        if pinned is None:
            return self._unpinned(cookie_header, exclude, now, "removed")
        entry: Pin | None = None
        if session is not None:
            pins = self.pins
            entry = pins.get(session)
            if entry is not None and entry.moved is not None:
                return self._ordered(entry, exclude, now)
            if entry is None or entry.backend_id != pinned.id:
                # The signed pin comes first; the table follows it (unshared: nothing moved).
                entry = pins.learn(session, pinned.id, now, share=False)
            else:
                entry.seen = now
        if self._keeps(pinned) and pinned.id not in exclude:
            if not pin[1]:
                # Signed by an older secret: re-sign with the newest, same backend.
                return Decision(pinned, self._cookie_for(pinned), None, session is None, entry)
            if session is None:
                return Decision(pinned, None, None, True)
            return Decision(pinned, None, None, False, entry)
        state = pinned.state
        if self._strict and (state is _DOWN or pinned.id in exclude):
            # A backend that failed this request (refused, reset, timed out: this is a
            # retry) is down for its session whether or not the health checks have seen it
            # yet: a move now would restart the session silently. The window starts once
            # it is marked DOWN.
            clock = self._clock()
            left = self._strict_window - (clock - (pinned.down_since if state is _DOWN else clock))
            if left > 0:
                raise PinnedBackendDown(pinned.id, max(1, math.ceil(left)))
        if pinned.id in exclude:
            reason = "failed"
        elif state is _DOWN:
            reason = "down"
        else:
            reason = "drain"
        key = session if session is not None else pinned.id.encode()
        backend = self._hashed(key_hash(key), exclude)
        if session is not None:
            entry = self.pins.learn(session, backend.id, now)
        self._repinned(reason)
        return Decision(backend, self._cookie_for(backend), reason, session is None, entry)

    def _ordered(self, entry: Pin, exclude: frozenset[str], now: float) -> Decision:
        """An operator's order for this session (`move`), carried out once."""
        order, entry.moved = entry.moved, None
        target = self._pool.get(order) if order else None
        if target is None or not self._keeps(target) or target.id in exclude:
            target = self._placed(exclude)
        self.pins.learn(entry.session, target.id, now)
        self._repinned("admin")
        return Decision(target, self._cookie_for(target), "admin", False, entry)

    def _unpinned(
        self, cookie_header: bytes | None, exclude: frozenset[str], now: float, reason: str | None
    ) -> Decision:
        """Rules 3 and 4 of the module docstring: no valid pin (`reason`: "removed" for a
        pin to a backend no longer in the pool, else "lost_pin")."""
        session = cookie_value(cookie_header, self._session_name)
        if session is None:
            backend = self._placed(exclude)
            if reason is not None:
                self._repinned(reason)
            return Decision(backend, self._cookie_for(backend), reason, True)
        pins = self.pins
        entry = pins.get(session)
        if entry is None and pins.remote and not exclude and len(session) <= pins.key_max:
            # The backend is a placeholder: the data path looks the session up first. (A
            # value too long to keep is never looked up: its answer could not be kept, and
            # the same request would ask again.)
            backend = self._hashed(key_hash(session), exclude)
            return Decision(backend, None, None, False, None, session)
        if entry is not None and entry.moved is not None:
            return self._ordered(entry, exclude, now)
        known = self._pool.get(entry.backend_id) if entry is not None and entry.backend_id else None
        if known is None or not self._keeps(known) or known.id in exclude:
            backend = self._hashed(key_hash(session), exclude)
        else:
            backend = known
        entry = pins.learn(session, backend.id, now, share=known is not backend)
        reason = reason or "lost_pin"
        self._repinned(reason)
        return Decision(backend, self._cookie_for(backend), reason, False, entry)

    # -- selection ----------------------------------------------------------------------------

    def _hashed(self, h: int, exclude: frozenset[str]) -> Backend:
        """The table's backend for hash `h`, moving forward past excluded ones."""
        table = self._table
        if not table:
            raise NoBackendAvailable("no backend is up")
        backend = table[h % self._size]
        if not exclude or backend.id not in exclude:
            return backend
        index = walk(self._indexes, self._ids, h, exclude)
        if index < 0:
            raise NoBackendAvailable("every backend that is up was excluded")
        return self._up[index]

    def _placed(self, exclude: frozenset[str]) -> Backend:
        """A new client: a random slot, then forward past backends at their bounded load."""
        table = self._table
        if not table:
            raise NoBackendAvailable("no backend is up")
        if self._capped:
            exclude = self._not_full(exclude)
        up = [b for b in self._up if b.id not in exclude] if exclude else self._up
        if not up:
            raise NoBackendAvailable("every backend that is up was excluded")
        size = self._size
        slot = self._rng.getrandbits(32) % size
        epsilon = self._epsilon
        if epsilon == 0:
            return self._hashed(slot, exclude)
        caps = self._capacities(up, epsilon)
        # Some backend is under its capacity (the capacities sum to more than the load),
        # and each one has ~size/n slots spread over the table: the walk is short.
        while True:
            backend = table[slot]
            cap = caps.get(backend.id)
            if cap is not None and backend.in_flight < cap:
                return backend
            slot = slot + 1 if slot + 1 < size else 0

    def _capacities(
        self, up: tuple[Backend, ...] | list[Backend], epsilon: float
    ) -> dict[str, int]:
        """Per backend id, the in-flight count it may hold before a new request is placed.

        Mirrokni, Thorup and Zadimoghaddam: c = ceil((1 + epsilon) x (load + 1) / n), the
        `+ 1` counting the request being placed, so at least one backend is below its
        capacity. Weights (and slow start's ramp) share it in proportion instead of equally.
        """
        load = sum(b.in_flight for b in up) + 1
        if self._weighted or any(b.ramp_from is not None for b in up):
            now = self._clock()
            weights = [b.configured_weight * b.weight(now) for b in up]
            total = sum(weights)
            return {
                b.id: math.ceil((1 + epsilon) * load * w / total)
                for b, w in zip(up, weights, strict=True)
            }
        cap = math.ceil((1 + epsilon) * load / len(up))
        return {b.id: cap for b in up}

    def _not_full(self, exclude: frozenset[str]) -> frozenset[str]:
        """`exclude` and the selectable backends at their max_conns; raises
        NoBackendAvailable when that leaves none (the data path queues the request)."""
        full = [b.id for b in self._up if b.full]
        if not full:
            return exclude
        exclude = exclude | frozenset(full)
        if self._up and all(b.id in exclude for b in self._up):
            raise NoBackendAvailable("every backend is at its max-conns")
        return exclude

    def _balanced(self, exclude: frozenset[str]) -> Backend:
        if self._capped:
            exclude = self._not_full(exclude)
        if self._balance == "least-inflight":
            return self._least_in_flight(exclude)
        up = [b for b in self._up if b.id not in exclude] if exclude else self._up
        if not up:
            raise NoBackendAvailable("no backend is up" if not self._up else "all excluded")
        ramping = any(b.ramp_from is not None for b in up)
        if not ramping and not self._weighted:
            self._rr_next = (self._rr_next + 1) % len(up)
            return up[self._rr_next]
        return self._weighted_round_robin(up)

    def _least_in_flight(self, exclude: frozenset[str]) -> Backend:
        """The UP backend with the fewest requests in flight per unit of weight (the
        configured weight, times the ramp of slow start); of those tied, the one picked
        least recently.

        A hung backend holds the requests it was sent and answers none, so it stops being
        picked once it holds more than the others (issue 13: round robin sent it every Nth
        request until its health checks failed). The tie rule makes an idle pool round
        robin, and fair around a backend left out: `min` gave every tie to the first one,
        and a rotating start gave the hung one's turns to its successor. One pass over the
        UP backends, no allocation.
        """
        up = self._up
        picked = self._picked
        weighted = self._weighted
        weights = self._weights
        best = -1
        lowest = 0.0
        now = 0.0
        have_now = False
        for i in range(len(up)):
            backend = up[i]
            if exclude and backend.id in exclude:
                continue
            score = backend.in_flight + 1.0
            if backend.ramp_from is not None:
                if not have_now:
                    now, have_now = self._clock(), True
                score /= backend.weight(now)
            if weighted:
                score /= weights[i]
            if best < 0 or score < lowest or (score == lowest and picked[i] < picked[best]):
                best, lowest = i, score
        if best < 0:
            raise NoBackendAvailable("no backend is up" if not up else "all excluded")
        self._picks += 1
        picked[best] = self._picks
        return up[best]

    def _weighted_round_robin(self, up: tuple[Backend, ...] | list[Backend]) -> Backend:
        """nginx's smooth weighted round robin, used when the weights differ or a backend
        ramps up (slow start)."""
        now = self._clock()
        current = self._rr_current
        total = 0.0
        best: Backend | None = None
        for backend in up:
            weight = backend.configured_weight * backend.weight(now)
            total += weight
            value = current.get(backend.id, 0.0) + weight
            current[backend.id] = value
            if best is None or value > current[best.id]:
                best = backend
        assert best is not None  # up is not empty
        current[best.id] -= total
        return best

    # -- caches -------------------------------------------------------------------------------

    def _rebuild(self) -> None:
        up = self._pool.selectable()  # sorted by id: the same table in every process
        self._ids = ids = tuple(b.id for b in up)
        weights = tuple(b.configured_weight for b in up)
        self._weighted = weighted = len(set(weights)) > 1
        self._weights = [float(w) for w in weights]
        self._capped = self._pool.capped
        self._indexes = indexes = self._tables.get(ids, weights if weighted else None)
        self._table = [up[i] for i in indexes]
        self._up = up
        self._rr_current = {}
        self._picked = [0] * len(up)
        live = {b.id for b in self._pool}
        self._stay = {k: v for k, v in self._stay.items() if k in live}
        self._set_cookie = {k: v for k, v in self._set_cookie.items() if k in live}
        self._decided = {}
        self._unpinned_decided = {}
        self._generation = self._pool.generation

    def _stay_decision(self, backend: Backend) -> Decision:
        decision = self._stay.get(backend.id)
        if decision is None or decision.backend is not backend:
            decision = self._stay[backend.id] = Decision(backend, None)
        return decision

    def _cookie_for(self, backend: Backend) -> bytes:
        value = self._set_cookie.get(backend.id)
        if value is None:
            assert self._affinity is not None
            value = self._set_cookie[backend.id] = self._affinity.set_cookie(backend.id)
        return value


def _remember(cache: dict[bytes, Decision], cookie_header: bytes, decided: Decision) -> None:
    """Cache a decision by its Cookie header, within _DECIDED_MAX and _DECIDED_KEY_MAX."""
    if len(cookie_header) <= _DECIDED_KEY_MAX:
        if len(cache) >= _DECIDED_MAX:
            cache.clear()
        cache[cookie_header] = decided
