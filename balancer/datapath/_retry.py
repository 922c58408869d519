"""Whether a failed attempt at a request is tried again, and where: the decision as a pure
function of plain values (`after_failure`), and the budget that bounds retries across
requests (`RetryBudget`). `_proxy` decides with them, then does what they say.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

__all__ = [
    "CUT",
    "FAILOVER",
    "IDEMPOTENT",
    "REPLY",
    "STALE_RETRY",
    "RetryBudget",
    "after_failure",
]

# Methods a request may be sent twice with (RFC 9110 section 9.2.2).
IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})

# What to do about a failed attempt (`after_failure`'s answer).
CUT: Final = 0  # too late for another answer: close the client connection
REPLY: Final = 1  # answer the error (502, or 504 for a timeout)
STALE_RETRY: Final = 2  # the keep-alive race: again, on a fresh connection to the same backend
FAILOVER: Final = 3  # again on another backend, if the retry budget has a retry


def after_failure(
    *,
    idempotent: bool,
    replayable: bool,
    sent: bool,
    stale: bool,
    stale_retried: bool,
    refused: bool,
    timed_out: bool,
    too_late: bool,
    attempts: int,
    max_attempts: int,
) -> tuple[int, bool, int]:
    """What to do after an attempt failed, whether the backend is to blame for it, and how
    many attempts count against `max_attempts` now.

    `idempotent`: the method may be sent twice. `replayable`: the request's body is still
    held (at most the held limit). `sent`: the head went out to the backend. `stale`: a
    reused keep-alive connection closed with nothing received (see `_upstream`), and
    `stale_retried`: that was already retried once for this request. `refused`: the
    connection could not be opened (the backend never saw the request). `timed_out`: the
    backend stayed silent past the response timeout. `too_late`: the response has begun, or
    the client is gone. `attempts`: made so far, this one included; `max_attempts`: allowed.

    Returns (one of CUT, REPLY, STALE_RETRY, FAILOVER; the backend failed; the attempts
    that count). The keep-alive race and a refused connect do not count: the backend never
    saw the request.
    """
    # The keep-alive race: the backend closed an idle connection as we reused it. Not a
    # failure of the backend's; retried once, on a fresh connection to it.
    race = stale and not stale_retried and replayable and idempotent
    if too_late:
        return CUT, not race, attempts
    if race:
        # Not one of max_attempts: spending an attempt here left a GET one try short when
        # workers were crashing.
        return STALE_RETRY, False, attempts - 1
    if refused:
        # Refused: the backend never saw it, so not one of max_attempts (nginx, too, tries
        # every server on an error). Bounded all the same: the caller excludes the backend.
        # Counted, three crashed workers not yet reaped took a GET's three attempts, and it
        # got a 502 that the queue would have spared it.
        attempts -= 1
    # Once sent, only an idempotent request is sent again, and not after a timeout: the
    # backend may still be working on it.
    if replayable and attempts < max_attempts and (not sent or (idempotent and not timed_out)):
        return FAILOVER, True, attempts
    return REPLY, True, attempts


class RetryBudget:
    """Finagle's retry budget: each request earns `ratio` of a retry and each second earns
    `floor` retries; a retry spends one. A dead cluster so sees at most `ratio` extra load
    plus the floor, not a multiple of its load."""

    __slots__ = ("_balance", "_cap", "_clock", "_counted", "_floor", "_last", "_ratio", "requests")

    def __init__(self, ratio: float, floor: float, clock: Callable[[], float]) -> None:
        self._ratio = ratio
        self._floor = floor
        self._clock = clock
        # A burst of failures can spend at most ten seconds of the floor (100 by default).
        self._cap = max(1.0, 10 * floor)
        self._balance = floor
        self._last = clock()
        # Requests made: the data path only counts (`budget.requests += 1`); the deposit
        # for them is made when a retry asks, which is rare.
        self.requests = 0
        self._counted = 0

    def withdraw(self) -> bool:
        """Spend one retry if the budget has it."""
        now = self._clock()
        earned = (self.requests - self._counted) * self._ratio + (now - self._last) * self._floor
        self._balance = min(self._cap, self._balance + earned)
        self._counted = self.requests
        self._last = now
        if self._balance >= 1:
            self._balance -= 1
            return True
        return False
