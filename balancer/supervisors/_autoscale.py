"""Autoscaling, the pure part: how many app workers the load asks for (`--spawn MIN:MAX`).

No I/O and no clock: every method takes `now` (seconds on one monotonic clock that the
caller owns). The supervisor (`_supervisor.py`) feeds `Autoscaler.sample` one figure per
turn of its loop and carries out the decision through its usual paths: a scale-up spawns
workers, a scale-down retires the newest one (drained, then stopped).

The load signal is the number of requests in flight per ready worker, read from the
balancer's own pool. The balancer counts them exactly and for free on every request; by
Little's law (in flight = arrival rate x time in the worker) the figure grows both with
the traffic and with a worker that slows down or saturates, whatever the cause (CPU, a
database, a lock); and it needs no sampling of another process's CPU, which is neither
cheap nor exact, and misses a worker that waits rather than computes.

The rules, with `n` the desired count, `load` the mean of the samples over the window:

- grow when `load > target`: to `ceil(n x load / target)` workers (at least n + 1), at
  most `maximum`; at `maximum` already, say so once (AT_MAX), until the load falls back;
- shrink by one when the workers left would still carry less than `scale_down_at x target`
  each: `load x n / (n - 1) < scale_down_at x target`, never below `minimum`;
- otherwise hold. Between the two thresholds nothing happens (the hysteresis): a count
  just made for the load is neither grown nor shrunk by the same load.

A decision is taken only on a full window: `window` seconds of samples taken while the
workers were settled (none starting, no rolling restart, the count the desired one).
After any change (this object's or an operator's, `changed(now)`), nothing changes again
for `cooldown` seconds, and the window starts over once the workers have settled, so the
load measured on the old count never decides for the new one.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass

__all__ = ["MAX_WINDOW", "Action", "AutoscalePolicy", "Autoscaler", "ScaleDecision"]

MAX_WINDOW = 3600.0  # seconds: the longest window (it holds window / interval samples)


@dataclass(frozen=True, slots=True)
class AutoscalePolicy:
    """The bounds and the rule of autoscaling (times in seconds)."""

    minimum: int  # workers, at least 1
    maximum: int  # workers, more than `minimum`
    target: float = 4.0  # requests in flight per ready worker above which it grows
    window: float = 10.0  # seconds the load is averaged over before any decision
    cooldown: float = 30.0  # seconds after a change before the next one
    # It shrinks when one worker fewer would carry less than this share of `target` each.
    scale_down_at: float = 0.5
    interval: float = 0.1  # seconds between two samples kept (the rest are dropped)

    def __post_init__(self) -> None:
        if not 1 <= self.minimum < self.maximum:
            raise ValueError(
                f"minimum and maximum must be 1 <= minimum < maximum, "
                f"got {self.minimum} and {self.maximum}"
            )
        if not self.target > 0 or not math.isfinite(self.target):
            raise ValueError(f"target must be a number > 0, got {self.target}")
        if not 0 < self.window <= MAX_WINDOW:
            raise ValueError(f"window must be > 0 and <= {MAX_WINDOW:g}, got {self.window}")
        if not 0 <= self.cooldown < math.inf:
            raise ValueError(f"cooldown must be a number >= 0, got {self.cooldown}")
        if not 0 < self.scale_down_at < 1:
            raise ValueError(f"scale_down_at must be between 0 and 1, got {self.scale_down_at}")
        if not 0 < self.interval <= self.window:
            raise ValueError(f"interval must be > 0 and <= window, got {self.interval}")

    def clamp(self, count: int) -> int:
        """`count` within `minimum`..`maximum`."""
        return max(self.minimum, min(self.maximum, count))


class Action(enum.Enum):
    HOLD = "hold"  # nothing to do (the reason says why)
    UP = "up"  # grow to `desired`
    DOWN = "down"  # shrink to `desired` (one fewer)
    AT_MAX = "at_max"  # the load asks for more than `maximum`: reported once, nothing done


@dataclass(frozen=True, slots=True)
class ScaleDecision:
    """What `Autoscaler.sample` decided: the action, the count wanted, and why."""

    action: Action
    desired: int  # the count after the action (unchanged but for UP and DOWN)
    reason: str  # one line, with the figures that decided it
    load: float | None = None  # mean in-flight requests per ready worker over the window


class Autoscaler:
    """Decides from samples of the load; see the module docstring for the rules.

    Call `sample(now, ...)` once per turn of the supervisor's loop; it returns what to do.
    An UP or DOWN decision counts as a change by itself (cooldown, window start over);
    tell it of an operator's change with `changed(now)`.
    """

    def __init__(self, policy: AutoscalePolicy, *, now: float) -> None:
        self.policy = policy
        self._samples: deque[float] = deque()  # load per ready worker, oldest first
        self._times: deque[float] = deque()  # when each was taken
        self._since: float | None = None  # when the current window began (settled)
        self._changed_at = now  # the last change of the count (the start counts)
        self._reported_at_max = False
        self.last: ScaleDecision | None = None  # the last decision other than a plain hold

    def __repr__(self) -> str:
        policy = self.policy
        return f"<Autoscaler {policy.minimum}..{policy.maximum} samples={len(self._samples)}>"

    def changed(self, now: float) -> None:
        """The count changed (here or by an operator): cooldown from now, a new window."""
        self._changed_at = now
        self._restart_window(None)

    def load(self) -> float | None:
        """The mean load per ready worker over the samples kept; None without one."""
        return sum(self._samples) / len(self._samples) if self._samples else None

    def sample(
        self, now: float, *, in_flight: int, ready: int, desired: int, settled: bool
    ) -> ScaleDecision:
        """Record one sample and decide.

        `in_flight`: requests in flight on the ready workers together; `ready`: how many
        serve (not starting, not draining); `desired`: the count the supervisor keeps;
        `settled`: no worker starting, no rolling restart, `desired` workers serving or
        held. Unsettled, the window starts over.
        """
        policy = self.policy
        if not settled or ready == 0:
            self._restart_window(None)
            return ScaleDecision(Action.HOLD, desired, "settling: the workers are changing")
        if self._since is None:
            self._since = now
        # (1e-9: a clock in steps of `interval` is not held back by a rounding error.)
        if not self._times or now - self._times[-1] >= policy.interval - 1e-9:
            self._samples.append(in_flight / ready)
            self._times.append(now)
        while self._times[0] <= now - policy.window:  # the last `window` seconds
            self._times.popleft()
            self._samples.popleft()
        load = self.load()
        assert load is not None  # a sample was just kept, or one within interval is
        if now - self._changed_at < policy.cooldown:
            return ScaleDecision(Action.HOLD, desired, "cooldown after the last change", load)
        if now - self._since < policy.window:
            return ScaleDecision(Action.HOLD, desired, "the window is not full yet", load)
        figures = f"{load:.2f} in flight per worker over {policy.window:g} s"
        if load > policy.target:
            if desired >= policy.maximum:
                if self._reported_at_max:
                    return ScaleDecision(Action.HOLD, desired, "at the maximum", load)
                self._reported_at_max = True
                return self._decided(
                    ScaleDecision(
                        Action.AT_MAX,
                        desired,
                        f"{figures} > target {policy.target:g}, but {desired} is the maximum",
                        load,
                    )
                )
            wanted = policy.clamp(max(desired + 1, math.ceil(desired * load / policy.target)))
            return self._change(
                now,
                ScaleDecision(
                    Action.UP,
                    wanted,
                    f"{figures} > target {policy.target:g}: {desired} -> {wanted} workers",
                    load,
                ),
            )
        self._reported_at_max = False
        if desired > policy.minimum:
            after = load * desired / (desired - 1)
            floor = policy.scale_down_at * policy.target
            if after < floor:
                return self._change(
                    now,
                    ScaleDecision(
                        Action.DOWN,
                        desired - 1,
                        f"{figures}; {desired - 1} worker(s) would carry {after:.2f} each "
                        f"< {floor:g} ({policy.scale_down_at:g} x target {policy.target:g})",
                        load,
                    ),
                )
        return ScaleDecision(Action.HOLD, desired, "within the target's band", load)

    def _change(self, now: float, decision: ScaleDecision) -> ScaleDecision:
        self.changed(now)
        return self._decided(decision)

    def _decided(self, decision: ScaleDecision) -> ScaleDecision:
        self.last = decision
        return decision

    def _restart_window(self, since: float | None) -> None:
        self._samples.clear()
        self._times.clear()
        self._since = since
