"""Session-aware operations (issue 15) with real processes, in sticky mode.

demo_app instances keep their sessions in memory (`--store memory`), the balancer pins on
the demo's session cookie (`--sticky cookie:sid`): a client moved to another instance starts
over (its counter falls back to 1). Each client is its own `httpx.AsyncClient`, so its own
cookie jar, POSTing /api/counter every 100 ms; a counter that does not grow by one from one
answer to the next is a lost session.

- A drain under load keeps the sessions pinned to the drained instance while they keep
  coming (before issue 15 they moved at once: their counters fell back to 1), and the drain
  ends by itself, DRAINED, within --drain-idle + 1 s of the last pinned request once they
  stop, with a `backend_drained` line saying why ("idle") and how many were still pinned.
- A rolling restart (`--spawn 2`, SIGHUP) loses no session of a client that finishes within
  its worker's drain (before: each worker's clients fell back to 1 as it was drained).
- `--on-pinned-down strict`: a client pinned to a killed instance gets 503 with Retry-After
  for --strict-window seconds, then is failed over, its response naming the reason `down`
  in the --repin-header.
- The re-pin reasons after a kill (`down`), a drain with `?sessions=move` (`drain`) and a
  lost affinity cookie (`lost_pin`), in the --repin-header and balancer_repins_total.

The figures (sessions lost, when the drain ended, the strict window's answers) are printed
on every run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.balancer.test_hung_backend import instances
from tests.balancer.test_supervisor import cluster, demo_app_command
from tests.helpers import async_wait_for, wait_for
from tests.processes import balancer

PERIOD = 0.1  # seconds between the starts of one client's requests (the load)
MAX_STEPS = 200  # per client: a bound on requests whatever the machine's speed
SLACK = 1.0  # seconds: a loaded 2-core machine's scheduling
AFFINITY = "lb_affinity"
REPIN = "X-Repin"
STICKY = ("--sticky", "cookie:sid", "--repin-header", REPIN)
FAST_HEALTH = (
    "--health-path", "/healthz", "--health-interval", "0.2", "--health-timeout", "0.2",
    "--health-fall", "2", "--health-rise", "2",
)  # fmt: skip


@dataclass(frozen=True)
class Answer:
    client: int
    started: float  # monotonic seconds
    ended: float
    status: int  # 0: no response
    instance: str  # the instance that answered ("" for none)
    pid: int  # its process (0 for none)
    count: int  # the session's counter after this request (0 for none)
    repin: str  # the --repin-header's value ("" for none)
    retry_after: str  # the Retry-After header's value ("" for none)


async def post_counter(index: int, client: httpx.AsyncClient) -> Answer:
    started = time.monotonic()
    status, instance, pid, count, repin, retry_after = 0, "", 0, 0, "", ""
    try:
        response = await client.post("/api/counter")
        status = response.status_code
        repin = response.headers.get(REPIN, "")
        retry_after = response.headers.get("retry-after", "")
        if status == 200:
            body = response.json()
            instance, pid, count = body["instance"], body["pid"], body["count"]
    except httpx.HTTPError:
        pass
    ended = time.monotonic()
    return Answer(index, started, ended, status, instance, pid, count, repin, retry_after)


async def client_loop(index: int, url: str, answers: list[Answer], stop: asyncio.Event) -> None:
    """One client: a POST every PERIOD seconds until `stop` is set."""
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        for _ in range(MAX_STEPS):
            if stop.is_set():
                return
            answer = await post_counter(index, client)
            answers.append(answer)
            # The load's schedule (the clients), not a wait for a condition.
            await asyncio.sleep(max(0.0, answer.started + PERIOD - time.monotonic()))


def lost_sessions(answers: list[Answer]) -> dict[int, str]:
    """Per client whose counter ever fell back: where it first did ("15 -> 1")."""
    last: dict[int, int] = {}
    lost: dict[int, str] = {}
    for answer in sorted(answers, key=lambda a: a.started):
        if answer.status != 200:
            continue
        before = last.get(answer.client, 0)
        if answer.count != before + 1 and answer.client not in lost:
            lost[answer.client] = f"{before} -> {answer.count}"
        last[answer.client] = answer.count
    return lost


async def get_backends(admin: str) -> list[dict[str, object]]:
    async with httpx.AsyncClient(timeout=2) as client:
        backends: list[dict[str, object]] = (await client.get(admin + "/backends")).json()[
            "backends"
        ]
    return backends


def log_fields(output: str, event: str) -> list[dict[str, str]]:
    """The key=value fields of every `event` line of a balancer's plain log."""
    lines = [line for line in output.splitlines() if f" {event} " in f" {line} "]
    return [dict(re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line)) for line in lines]


# -- a drain under load ------------------------------------------------------------------------

DRAIN_CLIENTS = 9
DRAIN_IDLE = 1.0  # seconds: --drain-idle
DRAIN_DEADLINE = 8.0  # seconds: --drain-deadline
WARM = 1.5  # seconds of load before the drain
KEEP_GOING = 3.0  # seconds the pinned clients go on after the drain began


@pytest.mark.anyio
async def test_a_drain_keeps_pinned_sessions_then_ends_when_they_stop(
    capsys: pytest.CaptureFixture[str],
) -> None:
    drain_flags = ("--drain-idle", str(DRAIN_IDLE), "--drain-deadline", str(DRAIN_DEADLINE))
    with (
        instances(["a", "b", "c"]) as apps,
        balancer([a.url for a in apps], *STICKY, *drain_flags) as (lb, admin),
    ):
        assert admin is not None
        answers: list[Answer] = []
        stops = [asyncio.Event() for _ in range(DRAIN_CLIENTS)]
        load = [
            asyncio.create_task(client_loop(i, lb.url, answers, stops[i]))
            for i in range(DRAIN_CLIENTS)
        ]
        try:
            await asyncio.sleep(WARM)  # the scenario's schedule; the asserts check the load ran
            last = {a.client: a.instance for a in sorted(answers, key=lambda a: a.started)}
            names = [a for a in "abc" if a in last.values()]
            target = max(names, key=lambda n: sum(v == n for v in last.values()))
            pinned = {c for c, n in last.items() if n == target}
            url = apps["abc".index(target)].url
            backend = next(b for b in await get_backends(admin) if b["url"] == url)
            async with httpx.AsyncClient(timeout=5) as client:
                drained = await client.post(f"{admin}/backends/{backend['id']}/drain")
            assert drained.status_code == 200, drained.text
            drain_at = time.monotonic()
            await asyncio.sleep(KEEP_GOING)
            for client_index in pinned:
                stops[client_index].set()
            await asyncio.wait([load[i] for i in pinned], timeout=10)
            last_pinned = max(a.ended for a in answers if a.client in pinned)
            within = DRAIN_IDLE + 1.0 + SLACK

            async def is_drained() -> bool:
                found = next(b for b in await get_backends(admin) if b["id"] == backend["id"])
                return found["state"] == "drained"

            drained_at: float | None = None
            with contextlib.suppress(AssertionError):  # reported below, with the figures
                await async_wait_for(is_drained, within, "the drain to end")
                drained_at = time.monotonic()
            state = next(b for b in await get_backends(admin) if b["id"] == backend["id"])
        finally:
            for stop in stops:
                stop.set()
            done, _ = await asyncio.wait(load, timeout=15)
            assert len(done) == DRAIN_CLIENTS, "a client did not finish"
        for task in done:
            task.result()
        lb.popen.send_signal(signal.SIGTERM)  # to read its log
        lb.popen.wait(15)
        ended = log_fields(lb.output(), "backend_drained")

    lost = lost_sessions(answers)
    during = [a for a in answers if a.client in pinned and a.started >= drain_at]
    took = "never" if drained_at is None else f"{drained_at - last_pinned:.2f} s"
    with capsys.disabled():  # the figures belong in every run's output
        print(
            f"\ndrain under load, sticky: {len(pinned)} of {DRAIN_CLIENTS} clients pinned to "
            f"{target}, {len(during)} requests of theirs during the drain; sessions lost "
            f"{len(lost)} ({sorted(lost.values())}); DRAINED {took} after "
            f"the last pinned request, state {state['state']} reason "
            f"{state.get('drained_reason')}; log {ended}"
        )
    assert pinned, "nothing was pinned to the drained instance: nothing tested"
    assert during, "no pinned request during the drain: nothing tested"
    assert all(a.instance == target for a in during), "a pinned client was moved"
    assert not lost, lost
    assert drained_at is not None, f"not DRAINED within {within} s: {state}"
    assert state["drained_reason"] == "idle"
    assert len(ended) == 1
    assert ended[0]["reason"] == "idle"
    assert int(ended[0]["pinned"]) == len(pinned)


# -- strict or failover --------------------------------------------------------------------------

STRICT_WINDOW = 2.0  # seconds: --strict-window
QUEUE_TIMEOUT = 0.3  # seconds: --queue-timeout, the wait before each 503


async def wait_state(admin: str, url: str, state: str, within: float) -> None:
    async def reached() -> bool:
        return any(b["url"] == url and b["state"] == state for b in await get_backends(admin))

    await async_wait_for(reached, within, f"{url} {state}")


@pytest.mark.anyio
async def test_strict_answers_503_for_the_window_then_fails_over(
    capsys: pytest.CaptureFixture[str],
) -> None:
    strict = ("--on-pinned-down", "strict", "--strict-window", str(STRICT_WINDOW))
    extra = (*STICKY, *FAST_HEALTH, *strict, "--queue-timeout", str(QUEUE_TIMEOUT))
    with (
        instances(["a", "b"]) as apps,
        balancer([a.url for a in apps], *extra) as (lb, admin),
    ):
        assert admin is not None
        async with httpx.AsyncClient(base_url=lb.url, timeout=10) as client:
            first = [await post_counter(0, client) for _ in range(3)]
            assert [a.count for a in first] == [1, 2, 3], first
            pinned = apps["ab".index(first[0].instance)]
            pinned.popen.kill()
            await wait_state(admin, pinned.url, "down", 5)
            down_at = time.monotonic()
            answers: list[Answer] = []
            for _ in range(MAX_STEPS):  # until failed over, within the window and some slack
                if time.monotonic() > down_at + STRICT_WINDOW + QUEUE_TIMEOUT + 2 * SLACK:
                    break
                answer = await post_counter(0, client)
                answers.append(answer)
                if answer.status == 200:
                    break
                # The client's schedule, not a wait for a condition.
                await asyncio.sleep(max(0.0, answer.started + PERIOD - time.monotonic()))

    refused = [a for a in answers if a.status == 503]
    served = [a for a in answers if a.status == 200]
    with capsys.disabled():
        print(
            f"\nstrict, window {STRICT_WINDOW} s: {len(refused)} x 503 "
            f"(Retry-After {sorted({a.retry_after for a in refused})}) from 0 to "
            f"{max((a.ended - down_at for a in refused), default=0):.2f} s after DOWN, then "
            + (
                f"200 from {served[0].instance} at {served[0].ended - down_at:.2f} s, "
                f"{REPIN}: {served[0].repin!r}, count {served[0].count}"
                if served
                else "no 200"
            )
            + f"; other answers {[a.status for a in answers if a.status not in (200, 503)]}"
        )
    assert refused, answers
    assert len(refused) + 1 == len(answers), answers
    assert all(1 <= int(a.retry_after) <= STRICT_WINDOW for a in refused), refused
    # Refused until the window is over (counted from DOWN, which the poll saw a little late).
    assert refused[-1].started >= down_at + STRICT_WINDOW - QUEUE_TIMEOUT - 0.5
    assert served, "never failed over"
    assert served[0].ended - down_at <= STRICT_WINDOW + QUEUE_TIMEOUT + SLACK
    assert served[0].instance != pinned.args[pinned.args.index("--instance-id") + 1]
    assert served[0].repin == "down"


@pytest.mark.anyio
async def test_strict_moves_no_session_before_the_health_checks_mark_its_backend_down(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Slow checks (DOWN after 2 failures 1 s apart): the requests right after the kill find
    # the pinned backend refusing connections while it is still UP. A retry elsewhere would
    # restart the session without a word, what strict exists to prevent.
    slow_health = ("--health-path", "/healthz", "--health-interval", "1", "--health-fall", "2")
    strict = ("--on-pinned-down", "strict", "--strict-window", str(STRICT_WINDOW))
    extra = (*STICKY, *slow_health, *strict, "--queue-timeout", str(QUEUE_TIMEOUT))
    with (
        instances(["a", "b"]) as apps,
        balancer([a.url for a in apps], *extra) as (lb, admin),
    ):
        assert admin is not None
        async with httpx.AsyncClient(base_url=lb.url, timeout=10) as client:
            first = [await post_counter(0, client) for _ in range(3)]
            assert [a.count for a in first] == [1, 2, 3], first
            pinned = apps["ab".index(first[0].instance)]
            pinned.popen.kill()
            pinned.popen.wait()
            killed_at = time.monotonic()
            after = [await post_counter(0, client) for _ in range(2)]
            took = time.monotonic() - killed_at
            state = next(b for b in await get_backends(admin) if b["url"] == pinned.url)
    with capsys.disabled():
        print(
            f"\nstrict, before DOWN: (status, instance, count, repin, Retry-After) "
            f"{[(a.status, a.instance, a.count, a.repin, a.retry_after) for a in after]} "
            f"within {took:.2f} s of the kill (backend {state['state']})"
        )
    assert [a.status for a in after] == [503, 503], after
    assert all(1 <= int(a.retry_after) <= STRICT_WINDOW for a in after), after


# -- re-pin reasons ------------------------------------------------------------------------------


def repins(metrics: str) -> dict[str, float]:
    """balancer_repins_total by reason, from a /metrics page."""
    found = re.findall(r'^balancer_repins_total\{reason="(\w+)"\} (\S+)$', metrics, re.M)
    return {reason: float(value) for reason, value in found}


@pytest.mark.anyio
async def test_repin_reasons_after_a_kill_a_drain_and_a_lost_affinity_cookie(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with (
        instances(["a", "b", "c"]) as apps,
        balancer([a.url for a in apps], *STICKY, *FAST_HEALTH) as (lb, admin),
    ):
        assert admin is not None
        async with contextlib.AsyncExitStack() as stack:
            # One client pinned to each instance: new clients until each has one (placement is
            # random), a bounded number of them.
            by_instance: dict[str, tuple[httpx.AsyncClient, Answer]] = {}
            for _ in range(60):
                if len(by_instance) == len(apps):
                    break
                client = await stack.enter_async_context(
                    httpx.AsyncClient(base_url=lb.url, timeout=10)
                )
                answer = await post_counter(0, client)
                assert (answer.status, answer.count, answer.repin) == (200, 1, ""), answer
                by_instance.setdefault(answer.instance, (client, answer))
            assert sorted(by_instance) == ["a", "b", "c"]
            (killed, _), (drained, _), (lost, _) = (by_instance[name] for name in "abc")
            backends = {b["url"]: b["id"] for b in await get_backends(admin)}

            apps[0].popen.kill()
            await wait_state(admin, apps[0].url, "down", 5)
            after_kill = await post_counter(0, killed)

            async with httpx.AsyncClient(timeout=5) as admin_client:
                response = await admin_client.post(
                    f"{admin}/backends/{backends[apps[1].url]}/drain?sessions=move"
                )
                assert response.status_code == 200, response.text
            after_drain = await post_counter(0, drained)

            lost.cookies.delete(AFFINITY)
            after_loss = await post_counter(0, lost)
            again = await post_counter(0, lost)  # re-pinned: signed again, no reason any more

            async with httpx.AsyncClient(timeout=5) as admin_client:
                counted = repins((await admin_client.get(admin + "/metrics")).text)

    with capsys.disabled():
        print(
            f"\nre-pins: {REPIN} after a kill {after_kill.repin!r} ({after_kill.instance}), "
            f"a drain with move {after_drain.repin!r} ({after_drain.instance}), a lost "
            f"affinity cookie {after_loss.repin!r} ({after_loss.instance}, count "
            f"{after_loss.count}); balancer_repins_total {counted}"
        )
    assert (after_kill.status, after_kill.repin) == (200, "down")
    assert after_kill.instance in ("b", "c")
    assert (after_drain.status, after_drain.repin) == (200, "drain")
    assert after_drain.instance == "c"  # a and b are out
    # The pin table still knows the session's instance: the session goes on.
    assert (after_loss.status, after_loss.repin, after_loss.instance) == (200, "lost_pin", "c")
    assert after_loss.count == 2
    assert (again.repin, again.count) == ("", 3)
    assert counted["down"] == counted["drain"] == counted["lost_pin"] == 1, counted


# -- a rolling restart under load ----------------------------------------------------------------

ROLLING_CLIENTS = 8
IN_DRAIN = 1.5  # seconds a client goes on after its worker's drain began, then finishes


@pytest.mark.anyio
async def test_a_rolling_restart_loses_no_session_of_a_client_that_finishes_within_the_drain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    drain_flags = ("--drain-idle", str(DRAIN_IDLE), "--drain-deadline", "10")
    with cluster(tmp_path, 2, demo_app_command(), *STICKY, *drain_flags) as running:
        answers: list[Answer] = []
        stops = [asyncio.Event() for _ in range(ROLLING_CLIENTS)]
        load = [
            asyncio.create_task(client_loop(i, running.url, answers, stops[i]))
            for i in range(ROLLING_CLIENTS)
        ]
        left: dict[str, float] = {}  # worker URL -> when its drain began (or it left the pool)
        try:
            await asyncio.sleep(WARM)  # the scenario's schedule; the asserts check the load ran
            first: dict[int, str] = {}  # client -> the worker URL that served it first
            async with httpx.AsyncClient(timeout=5) as admin:
                urls = {
                    w["pid"]: w["url"]
                    for w in (await admin.get(running.admin + "/workers")).json()["workers"]
                }
                for answer in sorted(answers, key=lambda a: a.started):
                    first.setdefault(answer.client, urls[answer.pid])
                assert len(first) == ROLLING_CLIENTS
                os.kill(running.popen.pid, signal.SIGHUP)
                restart_at = time.monotonic()
                # Watch the pool every 0.1 s: a client finishes IN_DRAIN s after the drain of
                # the worker that served it first began; bounded by the drain deadline.
                while not all(stop.is_set() for stop in stops):
                    now = time.monotonic()
                    assert now - restart_at < 30, f"the rolling restart stalled: {left}"
                    backends = (await admin.get(running.admin + "/backends")).json()["backends"]
                    serving = {b["url"] for b in backends if b["state"] == "up"}
                    for url in set(first.values()) - serving:
                        left.setdefault(url, now)
                    for client, url in first.items():
                        if url in left and now - left[url] >= IN_DRAIN:
                            stops[client].set()
                    await asyncio.sleep(0.1)  # the watch's period, not a synchronisation
        finally:
            for stop in stops:
                stop.set()
            done, _ = await asyncio.wait(load, timeout=15)
            assert len(done) == ROLLING_CLIENTS, "a client did not finish"
        for task in done:
            task.result()
        wait_for(lambda: "rolling_restart_done" in running.output(), 20, "the restart's end")
        ended = log_fields(running.output(), "backend_drained")

    lost = lost_sessions(answers)
    after = [a for a in answers if a.started >= left.get(first[a.client], float("inf"))]
    with capsys.disabled():
        print(
            f"\nrolling restart, sticky, --spawn 2: {ROLLING_CLIENTS} clients, "
            f"{len(after)} requests during their worker's drain; sessions lost {len(lost)} "
            f"({sorted(lost.values())}); drains ended "
            f"{[(e.get('reason'), e.get('after'), e.get('pinned')) for e in ended]}"
        )
    assert after, "no request came during a drain: nothing tested"
    assert not lost, lost
    assert [e["reason"] for e in ended] == ["idle", "idle"]
