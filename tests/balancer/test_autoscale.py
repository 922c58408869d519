"""The autoscaler's rules, table-tested without processes or a clock: samples in, decisions out.

Each case feeds `Autoscaler.sample` a load (requests in flight on the ready workers) every
`STEP` seconds, applies each UP or DOWN to the count as the supervisor does (the new
workers ready at once), and compares the counts it went through, and when, with the
rule spelled out in `balancer/supervisors/_autoscale.py`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest

from balancer.supervisors._autoscale import Action, AutoscalePolicy, Autoscaler, ScaleDecision

STEP = 0.1  # seconds between samples, as the supervisor's loop gives them (at least)
POLICY = AutoscalePolicy(minimum=1, maximum=3, target=4.0, window=1.0, cooldown=2.0)

# The load, total in flight, as a function of the time and of the ready workers.
Load = Callable[[float, int], int]


def run(load: Load, seconds: float, policy: AutoscalePolicy = POLICY) -> list[tuple[float, int]]:
    """`(time, count)` at each change of the count, from `policy.minimum` at time 0."""
    scaler = Autoscaler(policy, now=0.0)
    count = policy.minimum
    changes = []
    for step in range(round(seconds / STEP) + 1):
        now = round(step * STEP, 6)
        decision = scaler.sample(
            now, in_flight=load(now, count), ready=count, desired=count, settled=True
        )
        assert policy.minimum <= decision.desired <= policy.maximum
        if decision.action in (Action.UP, Action.DOWN):
            assert decision.desired != count
            count = decision.desired
            changes.append((now, count))
    return changes


def test_a_load_above_the_target_grows_after_the_window_and_the_cooldown() -> None:
    # 6 in flight on 1 worker: 6 > 4, so ceil(1 x 6 / 4) = 2 workers once the cooldown of
    # the start (2 s) is over; then 3 each, within the band: nothing more.
    assert run(lambda now, n: 6, 10) == [(2.0, 2)]


def test_a_large_load_grows_in_proportion_within_the_maximum() -> None:
    assert run(lambda now, n: 11, 10) == [(2.0, 3)]  # ceil(11 / 4) = 3
    assert run(lambda now, n: 40, 10) == [(2.0, 3)]  # 10 would be wanted: 3 is the maximum


def test_no_load_never_goes_below_the_minimum() -> None:
    policy = AutoscalePolicy(minimum=2, maximum=3, target=4.0, window=1.0, cooldown=2.0)
    assert run(lambda now, n: 0, 10, policy) == []


def test_a_load_oscillating_around_the_target_does_not_flap() -> None:
    # In flight swings between 2 and 5 every sample, about the target 4 of one worker: the
    # mean over the window is 3.5, not above it: nothing changes, however long.
    def swinging(now: float, n: int) -> int:
        return 2 if round(now / STEP) % 2 else 5

    assert run(swinging, 30) == []

    # Between 3 and 6 (4.5 on average): one more worker, 2.25 each; and never back to one,
    # which would carry 4.5 again (with a single threshold, 4.5 on one worker is above it
    # and 2.25 on two below it: up, down, up, ...).
    def higher(now: float, n: int) -> int:
        return 3 if round(now / STEP) % 2 else 6

    assert run(higher, 60) == [(2.0, 2)]

    # A slow wave between 2 and 6 in flight (period 4 s, longer than the window): its
    # crests ask for two workers, its troughs (2 in flight, 2 on one worker) never for
    # one again.
    def wave(now: float, n: int) -> int:
        return round(4 + 2 * math.sin(now * math.pi / 2))

    assert run(wave, 60) == [(2.0, 2)]


def test_a_load_that_swings_wider_than_the_band_changes_at_most_once_a_cooldown() -> None:
    # Between 0 and 8 in flight: the count follows it, but never faster than the cooldown.
    def wave(now: float, n: int) -> int:
        return round(4 + 4 * math.sin(now * math.pi / 2))

    changes = run(wave, 60)
    assert len(changes) > 2  # it does follow
    times = [now for now, _ in changes]
    assert min(b - a for a, b in itertools.pairwise(times)) >= POLICY.cooldown


def test_a_load_just_over_the_target_grows_once_and_stays() -> None:
    # 5 in flight on one worker: up to 2 (2.5 each); one worker fewer would carry 5, not
    # below 2, so it never comes down while the load lasts, however long.
    assert run(lambda now, n: 5, 60) == [(2.0, 2)]


def test_within_the_band_between_the_thresholds_nothing_changes() -> None:
    # 3 workers carrying 1.5 each: 2 would carry 2.25, not below 0.5 x 4 = 2: hold.
    policy = AutoscalePolicy(minimum=3, maximum=4, target=4.0, window=1.0, cooldown=0.0)
    scaler = Autoscaler(policy, now=0.0)
    decisions = [
        scaler.sample(t / 10, in_flight=4, ready=3, desired=3, settled=True) for t in range(50)
    ]
    assert {d.action for d in decisions} == {Action.HOLD}
    assert decisions[-1].reason == "within the target's band"


def test_a_ramp_grows_then_shrinks_one_at_a_time_a_cooldown_apart() -> None:
    # 12 in flight for 5 s, then nothing: up to 3 at 2 s (ceil(12 / 4)); after the load
    # ends at 5 s, down to 2 once the mean over the last second (4 each for 0.3 s, then 0)
    # is 1.2, so that 2 workers would carry 1.8 < 2; then to 1 a cooldown (2 s) later.
    changes = run(lambda now, n: 12 if now < 5 else 0, 20)
    assert changes == [(2.0, 3), (5.6, 2), (7.6, 1)]


def test_the_cooldown_holds_after_an_operators_change() -> None:
    scaler = Autoscaler(POLICY, now=0.0)
    for step in range(30):
        scaler.sample(step * STEP, in_flight=0, ready=1, desired=1, settled=True)
    scaler.changed(3.0)  # an operator scaled to 2 at 3 s
    held = [
        scaler.sample(3.0 + step * STEP, in_flight=0, ready=2, desired=2, settled=True)
        for step in range(20)
    ]
    assert {d.action for d in held} == {Action.HOLD}
    assert held[-1].reason == "cooldown after the last change"
    after = scaler.sample(5.0, in_flight=0, ready=2, desired=2, settled=True)
    assert (after.action, after.desired) == (Action.DOWN, 1)


def test_the_window_starts_over_while_the_workers_are_not_settled() -> None:
    scaler = Autoscaler(POLICY, now=-10.0)  # no cooldown left
    for step in range(20):
        scaler.sample(step * STEP, in_flight=20, ready=1, desired=2, settled=False)
    first = scaler.sample(2.0, in_flight=20, ready=2, desired=2, settled=True)
    assert (first.action, first.reason) == (Action.HOLD, "the window is not full yet")
    later = [
        scaler.sample(2.0 + step * STEP, in_flight=20, ready=2, desired=2, settled=True)
        for step in range(1, 11)
    ]
    assert [d.action for d in later] == [Action.HOLD] * 9 + [Action.UP]
    assert later[-1].desired == 3


def test_at_the_maximum_an_overload_is_reported_once_until_it_falls() -> None:
    policy = AutoscalePolicy(minimum=1, maximum=2, target=4.0, window=1.0, cooldown=0.0)
    scaler = Autoscaler(policy, now=0.0)

    def feed(load: int, start: float) -> list[ScaleDecision]:
        return [
            scaler.sample(start + step * STEP, in_flight=load, ready=2, desired=2, settled=True)
            for step in range(30)
        ]

    over = feed(20, 0.0)
    assert [d.action for d in over].count(Action.AT_MAX) == 1
    assert "20.00 in flight per worker" not in over[-1].reason  # per worker: 10
    reported = next(d for d in over if d.action is Action.AT_MAX)
    assert reported.reason == "10.00 in flight per worker over 1 s > target 4, but 2 is the maximum"
    feed(12, 3.0)  # 6 each: still over, not reported again
    assert scaler.last is reported
    feed(6, 6.0)  # 3 each: within the band, the report is re-armed
    again = feed(20, 9.0)
    assert [d.action for d in again].count(Action.AT_MAX) == 1


def test_a_decision_says_the_load_the_target_and_the_window() -> None:
    scaler = Autoscaler(POLICY, now=-10.0)
    decisions = [
        scaler.sample(step * STEP, in_flight=10, ready=1, desired=1, settled=True)
        for step in range(11)
    ]
    up = decisions[-1]
    assert (up.action, up.desired, up.load) == (Action.UP, 3, 10.0)
    assert up.reason == "10.00 in flight per worker over 1 s > target 4: 1 -> 3 workers"
    assert scaler.last is up


def test_samples_closer_than_the_interval_are_dropped() -> None:
    # A burst of wake-ups (workers exiting, probes answering) must not outweigh the rest:
    # one sample per interval counts.
    scaler = Autoscaler(POLICY, now=0.0)
    scaler.sample(0.0, in_flight=0, ready=1, desired=1, settled=True)
    for i in range(1, 50):
        scaler.sample(i / 1000, in_flight=100, ready=1, desired=1, settled=True)
    assert scaler.load() == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"minimum": 0, "maximum": 2}, "1 <= minimum < maximum"),
        ({"minimum": 2, "maximum": 2}, "1 <= minimum < maximum"),
        ({"minimum": 1, "maximum": 2, "target": 0}, "target must be"),
        ({"minimum": 1, "maximum": 2, "window": 0}, "window must be"),
        ({"minimum": 1, "maximum": 2, "window": 3601}, "window must be"),
        ({"minimum": 1, "maximum": 2, "cooldown": -1}, "cooldown must be"),
        ({"minimum": 1, "maximum": 2, "scale_down_at": 1}, "scale_down_at must be"),
        ({"minimum": 1, "maximum": 2, "window": 0.05}, "interval must be"),
    ],
)
def test_an_inconsistent_policy_is_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AutoscalePolicy(**kwargs)  # type: ignore[arg-type]
