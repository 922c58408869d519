"""Whether a failed attempt is tried again (`_retry.after_failure`, a table of cases) and the
retry budget that bounds retries across requests."""

from __future__ import annotations

from typing import NamedTuple

import pytest

from balancer.datapath._retry import (
    CUT,
    FAILOVER,
    IDEMPOTENT,
    REPLY,
    STALE_RETRY,
    RetryBudget,
    after_failure,
)
from tests.helpers import FakeClock


class Failure(NamedTuple):
    """One failed attempt; by default a GET's first of three, its head sent, and the
    backend's connection closed before any response (not a timeout)."""

    idempotent: bool = True
    replayable: bool = True
    sent: bool = True
    stale: bool = False
    stale_retried: bool = False
    refused: bool = False
    timed_out: bool = False
    too_late: bool = False
    attempts: int = 1
    max_attempts: int = 3


# (case, the failure, what to do, the backend failed, the attempts that count)
CASES = [
    ("get-closed-failover", Failure(), FAILOVER, True, 1),
    ("post-sent-reply", Failure(idempotent=False), REPLY, True, 1),
    ("post-not-sent-failover", Failure(idempotent=False, sent=False), FAILOVER, True, 1),
    ("get-timed-out-reply", Failure(timed_out=True), REPLY, True, 1),
    ("timeout-before-sent-failover", Failure(timed_out=True, sent=False), FAILOVER, True, 1),
    ("body-too-big-to-replay", Failure(replayable=False, sent=False), REPLY, True, 1),
    ("last-attempt-reply", Failure(attempts=3), REPLY, True, 3),
    ("one-attempt-only", Failure(max_attempts=1), REPLY, True, 1),
    # A refused connect is not an attempt: the backend never saw the request.
    ("refused-not-counted", Failure(sent=False, refused=True, attempts=3), FAILOVER, True, 2),
    ("refused-post", Failure(idempotent=False, sent=False, refused=True), FAILOVER, True, 0),
    ("refused-4-of-3", Failure(sent=False, refused=True, attempts=4), REPLY, True, 3),
    # The keep-alive race: once per request, on a fresh connection, not the backend's fault.
    ("stale-retried-fresh", Failure(stale=True, attempts=3), STALE_RETRY, False, 2),
    ("stale-twice-failover", Failure(stale=True, stale_retried=True), FAILOVER, True, 1),
    ("stale-post-reply", Failure(stale=True, idempotent=False), REPLY, True, 1),
    ("stale-unreplayable-reply", Failure(stale=True, replayable=False), REPLY, True, 1),
    # Too late: the response began, or the client left. The race still spares the backend.
    ("response-started-cut", Failure(too_late=True), CUT, True, 1),
    ("too-late-stale-cut", Failure(too_late=True, stale=True), CUT, False, 1),
    ("too-late-refused-cut", Failure(too_late=True, refused=True, sent=False), CUT, True, 1),
]


@pytest.mark.parametrize(
    ("failure", "action", "backend_failed", "counted"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_after_failure(failure: Failure, action: int, backend_failed: bool, counted: int) -> None:
    assert after_failure(**failure._asdict()) == (action, backend_failed, counted)


def test_idempotent_methods_are_rfc_9110s() -> None:
    assert {b"GET", b"HEAD", b"PUT", b"DELETE"} <= IDEMPOTENT
    assert not {b"POST", b"PATCH", b"CONNECT"} & IDEMPOTENT


def test_retry_budget_allows_a_share_of_requests_plus_a_floor() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, floor=2.0, clock=clock)
    assert [budget.withdraw() for _ in range(3)] == [True, True, False]  # the floor's start
    budget.requests += 10  # ten requests earn two retries
    assert [budget.withdraw() for _ in range(3)] == [True, True, False]
    clock.advance(1.0)  # a second earns the floor
    assert [budget.withdraw() for _ in range(3)] == [True, True, False]
    clock.advance(3600)  # capped: ten seconds of the floor at most
    assert sum(budget.withdraw() for _ in range(100)) == 20
