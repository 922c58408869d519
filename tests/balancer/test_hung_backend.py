"""One hung instance must not stall every client (issue 13, part 2), as real processes.

Three demo_app instances behind `python -m balancer`, 20 clients (each its own connection
and cookie jar) POSTing /api/counter every 100 ms, about 190 requests a second. One instance
gets SIGSTOP for a few seconds: it keeps accepting connections (the kernel does) and answers
nothing, the worst kind of failure for a balancer, since nothing is refused or reset.

Default balancing (`--balance` not given) is what is under test; only the clocks are shorter
than the defaults, so that the test takes seconds: health checks every 0.5 s (3 failures to
mark it DOWN, 2 passes to mark it UP again), a 2 s response timeout, and `--eject-after 1` so
that the first 504 certainly ejects it (the ejection time stays at its default, 30 s).

- `--sticky none` (the demo's shared mode): the stopped instance holds a few requests and then
  gets no more; every 1-second window from 1 s after the STOP serves at least half the
  requests that a second served before it; the requests that were stuck on it end with 504 at
  the response timeout; no request waits longer than that. After SIGCONT it is back in
  rotation as soon as its health checks pass (rise x interval, plus slack), not 30 s later.
- `--sticky cookie:sid` (sticky mode): what docs/balancer.md says a client pinned to the
  hung instance sees: its request in flight gets 504 at the response timeout, and its next
  request is re-pinned to another instance (200 and a new affinity cookie); the other
  clients see nothing.

The figures (rate per window, 504s, longest wait, time back) are printed on every run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.helpers import async_wait_for, free_port
from tests.processes import Process, balancer, demo_app_args

CLIENTS = 20
PERIOD = 0.1  # seconds between the starts of one client's requests (the load)
RESPONSE_TIMEOUT = 2.0  # seconds: --upstream-response-timeout
HEALTH_INTERVAL = 0.5  # seconds
HEALTH_RISE = 2
WARM = 1.5  # seconds of load before the STOP
STOPPED = 4.0  # seconds the instance stays stopped
AFTER = 1.0  # seconds of load once it is back
SLACK = 1.0  # seconds: a loaded 2-core machine's scheduling, a check's own timeout
MAX_STEPS = 400  # per client: a bound on requests whatever the machine's speed
FLAGS = (
    "--health-path", "/healthz", "--health-interval", str(HEALTH_INTERVAL),
    "--health-timeout", "0.4", "--health-fall", "3", "--health-rise", str(HEALTH_RISE),
    "--upstream-response-timeout", str(RESPONSE_TIMEOUT), "--eject-after", "1",
)  # fmt: skip
AFFINITY = "lb_affinity"


@dataclass(frozen=True)
class Answer:
    client: int
    started: float  # monotonic seconds
    ended: float
    status: int  # 0: no response (the client's own timeout, a connection error)
    instance: str  # the demo_app instance that answered, "" for none
    repinned: bool  # the response set a new affinity cookie
    error: str = ""  # with status 0: the client's exception, for the failure message


@contextlib.contextmanager
def instances(names: list[str]) -> Iterator[list[Process]]:
    """demo_app instances (memory store), started at once, then waited for."""
    with contextlib.ExitStack() as stack:
        apps = []
        for name in names:
            port = free_port()
            app = Process(demo_app_args(port, name), f"http://127.0.0.1:{port}")
            stack.callback(app.terminate)
            apps.append(app)
        for app in apps:
            app.wait_ready()
        yield apps


async def client_loop(index: int, url: str, end: float, answers: list[Answer]) -> None:
    """One client: a POST every PERIOD seconds (or at once after a slow one) until `end`."""
    async with httpx.AsyncClient(base_url=url, timeout=RESPONSE_TIMEOUT * 5) as client:
        for _ in range(MAX_STEPS):
            started = time.monotonic()
            if started >= end:
                return
            status, instance, repinned, error = 0, "", False, ""
            try:
                response = await client.post("/api/counter")
                status = response.status_code
                repinned = AFFINITY in response.headers.get("set-cookie", "")
                if status == 200:
                    instance = response.json()["instance"]
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
            ended = time.monotonic()
            answers.append(Answer(index, started, ended, status, instance, repinned, error))
            # The load's schedule (the clients), not a wait for a condition.
            await asyncio.sleep(max(0.0, started + PERIOD - time.monotonic()))


async def backend_state(admin: str, url: str) -> dict[str, object]:
    async with httpx.AsyncClient(timeout=2) as client:
        backends = (await client.get(admin + "/backends")).json()["backends"]
    found: dict[str, object] = next(b for b in backends if b["url"] == url)
    return found


def rate(answers: list[Answer], start: float, seconds: float = 1.0) -> float:
    """Successful requests a second that ended in [start, start + seconds)."""
    done = sum(1 for a in answers if a.status == 200 and start <= a.ended < start + seconds)
    return done / seconds


@pytest.mark.anyio
@pytest.mark.parametrize("sticky", ["none", "cookie:sid"])
async def test_a_hung_instance_does_not_stall_the_others(
    sticky: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with (
        instances(["a", "b", "c"]) as apps,
        balancer([a.url for a in apps], "--sticky", sticky, *FLAGS) as (lb, admin),
    ):
        assert admin is not None
        hung = apps[2]
        answers: list[Answer] = []
        began = time.monotonic()
        end = began + WARM + STOPPED + RESPONSE_TIMEOUT + SLACK + AFTER
        load = [asyncio.create_task(client_loop(i, lb.url, end, answers)) for i in range(CLIENTS)]
        try:
            # The scenario's schedule (load, STOP, CONT), not a wait for a condition: the
            # assertions below check that the load did run.
            await asyncio.sleep(WARM)
            stopped_at = time.monotonic()
            os.kill(hung.popen.pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(STOPPED)
            finally:
                os.kill(hung.popen.pid, signal.SIGCONT)
            resumed_at = time.monotonic()
            back_within = HEALTH_RISE * HEALTH_INTERVAL + SLACK
            back_at = None
            with contextlib.suppress(AssertionError):
                await async_wait_for(
                    lambda: _is_up(admin, hung.url), back_within, "the instance back UP"
                )
                back_at = time.monotonic()
            state = await backend_state(admin, hung.url)
        finally:
            done, _ = await asyncio.wait(load, timeout=end - time.monotonic() + 15)
            assert len(done) == CLIENTS, "a client did not finish"
        for task in done:
            task.result()
        lb.popen.send_signal(signal.SIGTERM)  # to read its log: what each error was
        lb.popen.wait(15)
        errors = [line for line in lb.output().splitlines() if " for POST " in line]

    before = rate(answers, stopped_at - 1.0)
    windows = [rate(answers, stopped_at + 1.0 + i) for i in range(int(STOPPED) - 1)]
    timeouts = [a for a in answers if a.status == 504]
    others = [a for a in answers if a.status not in (200, 504)]
    longest = max(a.ended - a.started for a in answers)
    back = None if back_at is None else back_at - resumed_at
    after_back = [a for a in answers if back_at is not None and a.started >= back_at]
    with capsys.disabled():  # the figures belong in every run's output
        print(
            f"\nhung instance, --sticky {sticky}: {before:.0f} req/s before the STOP, "
            f"then per second from 1 s after it {[round(w) for w in windows]}; "
            f"{len(timeouts)} x 504 (took {[round(a.ended - a.started, 2) for a in timeouts]} s), "
            f"other failures {[a.status for a in others]}, longest wait {longest:.2f} s; back UP "
            f"{'never' if back is None else f'{back:.2f} s'} after SIGCONT "
            f"(state {state['state']}, ejections {state['ejections_total']}, "
            f"ejected for {state['ejected_for']})"
        )
    assert before >= CLIENTS / PERIOD / 2, "the load did not run"
    assert not others, (others[:5], errors)
    # Each request stuck on it ended with 504 at the response timeout, not later.
    assert timeouts, "no request reached the stopped instance: nothing was tested"
    for answer in timeouts:
        assert RESPONSE_TIMEOUT <= answer.ended - answer.started <= RESPONSE_TIMEOUT + SLACK
    assert longest <= RESPONSE_TIMEOUT + SLACK
    assert state["ejections_total"] == 1, "a response timeout counts as a failed request"
    assert back is not None, f"still {state['state']} {back_within} s after SIGCONT: {state}"
    if sticky == "none":
        # The others took its share at once: no window below half the rate before.
        assert min(windows) >= before / 2, windows
        assert len(timeouts) <= CLIENTS // 4, "it kept receiving new requests"
        from_hung = sum(1 for a in after_back if a.instance == "c")
        assert from_hung >= len(after_back) / 10, "back UP, but not in rotation"
    else:
        by_client: dict[int, list[Answer]] = {}
        for answer in answers:
            by_client.setdefault(answer.client, []).append(answer)
        pinned = {a.client for a in timeouts}
        for client, seen in by_client.items():
            if client not in pinned:
                assert all(a.status == 200 for a in seen)
                continue
            # One 504 (the request it had on the hung instance), then re-pinned elsewhere.
            first = next(i for i, a in enumerate(seen) if a.status == 504)
            assert [a.status for a in seen].count(504) == 1, seen
            assert seen[first - 1].instance == "c"
            assert seen[first + 1].repinned, seen[first + 1]
            assert all(a.instance in ("a", "b") for a in seen[first + 1 :])


async def _is_up(admin: str, url: str) -> bool:
    return (await backend_state(admin, url))["state"] == "up"
