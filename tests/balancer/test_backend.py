from __future__ import annotations

import hashlib
import re
from collections.abc import Callable

import pytest

from balancer import (
    Backend,
    BackendPolicy,
    BackendSpec,
    BackendState,
    ConfigError,
    DrainPolicy,
    InvalidTransition,
)

URL = "http://127.0.0.1:9001"
UP, DRAINING, DOWN = BackendState.UP, BackendState.DRAINING, BackendState.DOWN


def test_id_is_stable_and_repr_shows_state() -> None:
    backend = Backend(URL)
    assert backend.id == hashlib.sha256(URL.encode()).hexdigest()[:12]
    assert backend.id == Backend(URL + "/").id
    assert repr(backend) == f"<Backend {backend.id} {URL} [up, in-flight: 0]>"


@pytest.mark.parametrize(
    ("url", "normalized", "host", "port"),
    [
        ("http://127.0.0.1:9001", "http://127.0.0.1:9001", "127.0.0.1", 9001),
        ("http://127.0.0.1:9001/", "http://127.0.0.1:9001", "127.0.0.1", 9001),
        ("http://localhost", "http://localhost:80", "localhost", 80),
        ("http://[::1]:8000", "http://[::1]:8000", "::1", 8000),
        ("https://app.internal", "https://app.internal:443", "app.internal", 443),
        ("https://127.0.0.1:8443/", "https://127.0.0.1:8443", "127.0.0.1", 8443),
    ],
)
def test_urls_are_normalized(url: str, normalized: str, host: str, port: int) -> None:
    backend = Backend(url)
    assert (backend.url, backend.host, backend.port) == (normalized, host, port)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://127.0.0.1:9001", "only http:// and https://"),
        ("127.0.0.1:9001", "only http://"),
        ("http://", "no host"),
        ("http://127.0.0.1:99999", "not a valid URL"),
        ("http://127.0.0.1:0", "port 0"),
        ("http://127.0.0.1:9001/app", "without a path"),
        ("http://127.0.0.1:9001/?q=1", "without a path"),
        ("http://user:pw@127.0.0.1:9001", "credentials"),
    ],
)
def test_bad_urls_raise_value_error_naming_the_url(url: str, why: str) -> None:
    # A library error; balancer._config names the flag (--backend), the admin API answers 400.
    with pytest.raises(ValueError, match=f"^{re.escape(repr(url))}.*{why}") as info:
        Backend(url)
    assert not isinstance(info.value, ConfigError)


# Each row: the transitions applied in order, then the expected state.
Step = Callable[[Backend], object]
TRANSITIONS: list[tuple[str, list[Step], BackendState]] = [
    ("new", [], UP),
    ("drain", [lambda b: b.drain(0.0)], DRAINING),
    ("drain, enable", [lambda b: b.drain(0.0), lambda b: b.enable()], UP),
    ("down", [lambda b: b.mark_down("timeout", 0.0)], DOWN),
    ("down, up", [lambda b: b.mark_down("timeout", 0.0), lambda b: b.mark_up(1.0)], UP),
    ("drain, down", [lambda b: b.drain(0.0), lambda b: b.mark_down("x", 0.0)], DOWN),
    (
        "drain, down, up: stays drained",
        [lambda b: b.drain(0.0), lambda b: b.mark_down("x", 0.0), lambda b: b.mark_up(1.0)],
        DRAINING,
    ),
    (
        "down, drain, enable: still down",
        [lambda b: b.mark_down("x", 0.0), lambda b: b.drain(0.0), lambda b: b.enable()],
        DOWN,
    ),
]


@pytest.mark.parametrize(
    ("name", "steps", "expected"), TRANSITIONS, ids=[t[0] for t in TRANSITIONS]
)
def test_transitions(name: str, steps: list[Step], expected: BackendState) -> None:
    backend = Backend(URL)
    for step in steps:
        step(backend)
    assert backend.state is expected


INVALID: list[tuple[str, list[Step], Step, str]] = [
    ("enable an UP backend", [], lambda b: b.enable(), "cannot enable backend {id}: it is not"),
    (
        "drain twice",
        [lambda b: b.drain(0.0)],
        lambda b: b.drain(0.0),
        "cannot drain backend {id}: it is already draining",
    ),
    ("up when up", [], lambda b: b.mark_up(0.0), "cannot mark backend {id} up: it is not down"),
    (
        "down twice",
        [lambda b: b.mark_down("refused", 0.0)],
        lambda b: b.mark_down("timeout", 1.0),
        "cannot mark backend {id} down: it is already down (refused)",
    ),
    (
        "finish with none in flight",
        [],
        lambda b: b.request_finished(failed=False, now=0.0),
        "request_finished on backend {id} with no request in flight",
    ),
]


@pytest.mark.parametrize(("name", "setup", "step", "message"), INVALID, ids=[i[0] for i in INVALID])
def test_invalid_transitions_raise_a_sentence(
    name: str, setup: list[Step], step: Step, message: str
) -> None:
    backend = Backend(URL)
    for s in setup:
        s(backend)
    before = backend.state
    with pytest.raises(InvalidTransition) as info:
        step(backend)
    assert str(info.value).startswith(message.format(id=backend.id))
    assert backend.state is before


def test_passive_ejection_after_consecutive_failures_then_release() -> None:
    backend = Backend(URL, policy=BackendPolicy(eject_after=3, ejection_time=30.0))
    # Two failures, a success (resets the run), then three failures in a row.
    for failed in (True, True, False, True, True):
        backend.request_started()
        backend.request_finished(failed=failed, now=100.0)
        assert backend.state is UP
    backend.request_started()
    backend.request_finished(failed=True, now=100.0)
    assert backend.state is DOWN
    assert backend.ejected_until == 130.0
    assert (backend.requests_total, backend.failures_total, backend.ejections_total) == (6, 5, 1)
    assert backend.release(129.9) is False
    assert backend.state is DOWN
    assert backend.release(130.0) is True
    assert backend.state is UP
    assert backend.release(200.0) is False


def test_release_after_ejection_keeps_a_failed_active_check() -> None:
    backend = Backend(URL, policy=BackendPolicy(eject_after=1, ejection_time=5.0))
    backend.request_started()
    backend.request_finished(failed=True, now=0.0)
    backend.mark_down("status 500", 1.0)
    assert backend.release(5.0) is True
    assert backend.state is DOWN
    assert backend.down_reason == "status 500"


def _fail(backend: Backend, now: float = 0.0) -> None:
    backend.request_started()
    backend.request_finished(failed=True, now=now)


# Passive ejection and active checks together (issue 13: a hung backend, once resumed, sat out
# the rest of its ejection while its checks passed). Each row: the steps, then the state and
# whether an ejection is still running. eject_after=2, ejection_time=30.
EJECTION: list[tuple[str, list[Step], BackendState, bool]] = [
    ("ejected, checks pass all along: out", [_fail, _fail], DOWN, True),
    ("ejected, time over: back", [_fail, _fail, lambda b: b.release(30.0)], UP, False),
    (
        "ejected, checks fail then pass: back at once",
        [_fail, _fail, lambda b: b.mark_down("timeout", 1.0), lambda b: b.mark_up(2.0)],
        UP,
        False,
    ),
    (
        "checks fail, its requests time out (ejected), checks pass: back",
        [lambda b: b.mark_down("timeout", 0.0), _fail, _fail, lambda b: b.mark_up(2.0)],
        UP,
        False,
    ),
    (
        "ejected, drained, checks fail then pass: drained, not ejected",
        [
            _fail,
            _fail,
            lambda b: b.drain(0.0),
            lambda b: b.mark_down("x", 1.0),
            lambda b: b.mark_up(2.0),
        ],
        DRAINING,
        False,
    ),
    (
        "a failure before checks fail and pass is forgotten",
        [_fail, lambda b: b.mark_down("x", 1.0), lambda b: b.mark_up(2.0), _fail],
        UP,
        False,
    ),
    (
        "back by its checks, then failing again: ejected again",
        [
            _fail,
            _fail,
            lambda b: b.mark_down("x", 1.0),
            lambda b: b.mark_up(2.0),
            _fail,
            _fail,
        ],
        DOWN,
        True,
    ),
]


@pytest.mark.parametrize(
    ("name", "steps", "expected", "ejected"), EJECTION, ids=[e[0] for e in EJECTION]
)
def test_ejection_and_active_checks(
    name: str, steps: list[Step], expected: BackendState, ejected: bool
) -> None:
    backend = Backend(URL, policy=BackendPolicy(eject_after=2, ejection_time=30.0))
    for step in steps:
        step(backend)
    assert backend.state is expected
    assert (backend.ejected_until is not None) is ejected


def test_ejection_off_when_eject_after_is_zero() -> None:
    backend = Backend(URL, policy=BackendPolicy(eject_after=0))
    for _ in range(100):
        backend.request_started()
        backend.request_finished(failed=True, now=0.0)
    assert backend.state is UP
    assert backend.in_flight == 0


@pytest.mark.parametrize(
    ("elapsed", "weight"),
    [(0.0, 0.1), (1.0, 0.1), (5.0, 0.5), (9.0, 0.9), (10.0, 1.0), (50.0, 1.0)],
)
def test_slow_start_ramps_weight_after_down(elapsed: float, weight: float) -> None:
    backend = Backend(URL, policy=BackendPolicy(slow_start=10.0))
    assert backend.weight(0.0) == 1.0
    backend.mark_down("refused", 0.0)
    backend.mark_up(100.0)
    assert backend.weight(100.0 + elapsed) == pytest.approx(weight)


def test_no_slow_start_after_drain() -> None:
    backend = Backend(URL, policy=BackendPolicy(slow_start=10.0))
    backend.drain(0.0)
    backend.enable()
    assert backend.weight(0.0) == 1.0


def test_on_change_sees_old_and_new_state() -> None:
    seen: list[tuple[BackendState, BackendState]] = []
    backend = Backend(URL)
    backend.on_change = lambda b, old: seen.append((old, b.state))
    backend.drain(0.0)
    backend.mark_down("x", 0.0)
    backend.mark_up(1.0)
    backend.enable()
    assert seen == [(UP, DRAINING), (DRAINING, DOWN), (DOWN, DRAINING), (DRAINING, UP)]


# -- a drain that keeps sessions and ends (issue 15) ----------------------------------------


def _draining(sessions: str = "keep", idle: float = 10.0, deadline: float = 60.0) -> Backend:
    policy = BackendPolicy(drain=DrainPolicy(sessions=sessions, idle=idle, deadline=deadline))  # type: ignore[arg-type]
    backend = Backend("http://127.0.0.1:9001", policy=policy)
    backend.drain(100.0)
    return backend


def test_a_kept_drain_ends_idle_seconds_after_the_last_request() -> None:
    backend = _draining()
    assert backend.keep_pinned
    assert backend.state is DRAINING
    backend.request_started()
    assert backend.drain_tick(105.0) is None  # a request came: the idle time starts again
    backend.request_finished(failed=False, now=106.0)
    assert backend.drain_tick(114.9) is None  # 9.9 s since the request was seen
    assert backend.drain_tick(115.0) == "idle"
    assert backend.state is BackendState.DRAINED
    assert not backend.keep_pinned
    assert backend.drained_reason == "idle"
    assert backend.drain_tick(200.0) is None  # ended once


def test_a_kept_drain_never_ends_idle_with_a_request_in_flight() -> None:
    backend = _draining()
    backend.request_started()
    assert backend.drain_tick(150.0) is None
    assert backend.drain_tick(160.0) == "deadline"  # 60 s after it began, whatever comes


def test_a_moving_drain_ends_when_nothing_is_in_flight() -> None:
    backend = _draining(sessions="move")
    assert not backend.keep_pinned
    backend.request_started()
    assert backend.drain_tick(101.0) is None
    backend.request_finished(failed=False, now=101.5)
    assert backend.drain_tick(101.5) == "empty"


def test_an_operator_ends_a_drain_now_and_enable_undoes_it() -> None:
    backend = _draining()
    backend.finish_drain("now")
    assert (backend.state, backend.drained_reason) == (BackendState.DRAINED, "now")
    backend.enable()
    assert backend.state is UP
    assert backend.drained_reason is None
    assert not backend.draining
    with pytest.raises(InvalidTransition, match="it is not draining"):
        backend.finish_drain("now")


def test_a_drained_backend_that_fails_is_down_and_drained_again_when_it_recovers() -> None:
    backend = _draining(idle=0.0)
    assert backend.drain_tick(100.0) == "idle"
    backend.mark_down("refused", 101.0)
    assert backend.state is DOWN
    assert backend.down_since == 101.0
    backend.mark_up(102.0)
    assert backend.state is BackendState.DRAINED


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("idle", -1.0, "idle must be a finite number of seconds >= 0"),
        ("deadline", float("inf"), "deadline must be a finite number of seconds >= 0"),
        ("sessions", "drop", "sessions must be 'keep' or 'move'"),
    ],
)
def test_a_bad_drain_policy_names_its_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DrainPolicy(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("http://a:1", "http://a:1"),
        ("http://a:1/ weight=1", "http://a:1"),
        ("app=http://a weight=7", "app=http://a:80 weight=7"),
        ("http://a:1 max-conns=5 backup", "http://a:1 backup max-conns=5"),
        ("  x=http://[::1]:9  backup  ", "x=http://[::1]:9 backup"),
        ("http://a:1?x=1 weight=2", None),
    ],
)
def test_a_backend_spec_reads_back_as_itself(text: str, normalized: str | None) -> None:
    if normalized is None:
        with pytest.raises(ValueError, match="without a path"):
            BackendSpec.parse(text)
        return
    spec = BackendSpec.parse(text)
    assert str(spec) == normalized
    assert BackendSpec.parse(str(spec)) == spec
