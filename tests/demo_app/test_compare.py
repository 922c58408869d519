"""`python -m demo_app.compare`: a small real run of every mode, and its checks of sessions.

One run (20 users x 6 requests, one instance killed, per mode) through `main`, shared by the
tests of this module; it starts real Redis, demo_app and balancer processes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from demo_app._workload import _Ledger
from demo_app.compare import main

USERS, REQUESTS = 20, 6


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """The JSON report of one small comparison, and the PNG chart it drew."""
    out = tmp_path_factory.mktemp("compare")
    argv = ["--modes", "sticky,shared,hybrid", "--users", str(USERS)]
    argv += ["--requests", str(REQUESTS), "--kill", "1", "--concurrency", "8"]
    argv += ["--json", str(out / "out.json"), "--plot", str(out / "out.png")]
    main(argv)
    return json.loads((out / "out.json").read_text()), out / "out.png"


def test_every_mode_ran_the_whole_workload(run: tuple[dict[str, Any], Path]) -> None:
    modes = run[0]["modes"]
    assert list(modes) == ["sticky", "shared", "hybrid"]
    for mode, report in modes.items():
        assert report["requests"] == USERS * REQUESTS, mode
        assert report["completed"], mode
        assert report["sessions"] == USERS, mode
        assert sum(report["sessions_per_instance"].values()) == USERS, mode
        assert len(report["killed"]) == 1, mode
        assert 0 < report["p50_ms"] <= report["p99_ms"], mode
        # Only requests in flight at the kill may fail, never most of a round.
        assert report["failed_requests"] < USERS // 2, mode


def test_sticky_loses_exactly_the_sessions_of_the_killed_instance(
    run: tuple[dict[str, Any], Path],
) -> None:
    sticky = run[0]["modes"]["sticky"]
    assert sticky["sessions_on_killed"] > 0
    assert sticky["sessions_lost"] == sticky["sessions_on_killed"]
    assert sticky["sessions_lost_elsewhere"] == 0
    assert sticky["redis_commands"] == 0  # sessions live in instance memory only


@pytest.mark.parametrize("mode", ["shared", "hybrid"])
def test_redis_backed_modes_lose_nothing(run: tuple[dict[str, Any], Path], mode: str) -> None:
    report = run[0]["modes"][mode]
    assert report["sessions_on_killed"] > 0
    assert report["sessions_lost"] == 0


def test_hybrid_reads_far_fewer_sessions_from_redis(run: tuple[dict[str, Any], Path]) -> None:
    shared, hybrid = run[0]["modes"]["shared"], run[0]["modes"]["hybrid"]
    # shared loads the whole session on every request that carries a cookie.
    assert shared["redis_reads"] >= USERS * (REQUESTS - 1) - 2 * shared["failed_requests"]
    # hybrid only after a failover: about one load per moved session.
    assert hybrid["redis_reads"] * 3 <= shared["redis_reads"]
    # Both check the session's version in Redis on every such request (see compare's docstring).
    assert hybrid["redis_version_checks"] > 0


def test_chart_is_a_png(run: tuple[dict[str, Any], Path]) -> None:
    assert run[1].read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--modes", "sticky,round-robin"], "--modes"),
        (["--modes", "shared,shared"], "--modes"),
        (["--users", "0"], "--users"),
        (["--requests", "two"], "--requests"),
        (["--requests", "500"], "--requests"),
        (["--kill", "3"], "--kill"),
        (["--concurrency", "-1"], "--concurrency"),
        (["--json", "/nonexistent-dir/out.json"], "--json"),
        (["--plot", "/nonexistent-dir/out.png"], "--plot"),
        (["--balancers", "9"], "--balancers"),
        (["--kill-balancer"], "--kill-balancer"),  # one balancer: it would leave none
        (["--reads", "-1"], "--reads"),
    ],
)
def test_bad_arguments_exit_2_naming_the_flag(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize(
    ("count", "unsure", "got", "intact", "after"),
    [
        (3, 0, 4, True, 4),  # the next value
        (3, 0, 1, False, 1),  # a fresh session: lost
        (3, 0, 3, False, 3),  # went back
        (3, 1, 4, True, 4),  # a failed increment that did not apply
        (3, 1, 5, True, 5),  # a failed increment that did
        (3, 1, 6, False, 6),  # more than could have happened
    ],
)
def test_ledger_checks_the_counter(
    count: int, unsure: int, got: int, intact: bool, after: int
) -> None:
    ledger = _Ledger(count=count, unsure_increments=unsure)
    assert ledger.check_count(got) is intact
    assert (ledger.count, ledger.unsure_increments) == (after, 0)


@pytest.mark.parametrize(
    ("cart", "unsure", "got", "intact"),
    [
        (["a"], set(), ["a", "b"], True),
        (["a"], set(), ["b"], False),  # lost "a"
        (["a"], {"x"}, ["a", "x", "b"], True),  # a failed add that applied
        (["a"], {"x"}, ["a", "b"], True),  # a failed add that did not
        (["a"], set(), ["a", "y", "b"], False),  # an item from nowhere
        (["a"], set(), ["a"], False),  # the new item is missing
    ],
)
def test_ledger_checks_the_cart(
    cart: list[str], unsure: set[str], got: list[str], intact: bool
) -> None:
    ledger = _Ledger(cart=list(cart), unsure_items=set(unsure))
    assert ledger.check_cart(got, "b") is intact
    assert ledger.cart == got


def test_round_trips_per_request_is_counted_over_every_request(
    run: tuple[dict[str, Any], Path],
) -> None:
    for report in run[0]["modes"].values():
        per_request = report["redis_round_trips"] / report["requests"]
        assert report["redis_round_trips_per_request"] == round(per_request, 3)
        assert report["reads"] == 0  # no --reads: every request writes


@pytest.mark.parametrize(
    ("session", "intact"),
    [
        ({"count": 3, "cart": ["a"]}, True),  # what was written
        ({"count": 4, "cart": ["a", "x"]}, True),  # a failed write that applied after all
        ({"count": 2, "cart": ["a"]}, False),  # the counter went back: a stale copy
        ({"count": 3, "cart": []}, False),  # a sure item missing
        ({}, False),  # a fresh session
        ({"count": "3", "cart": ["a"]}, False),  # corrupted
    ],
)
def test_ledger_checks_a_read(session: dict[str, Any], intact: bool) -> None:
    ledger = _Ledger(count=3, cart=["a"], unsure_increments=0)
    assert ledger.holds(session) is intact
    assert (ledger.count, ledger.cart) == (3, ["a"])  # a read changes nothing
