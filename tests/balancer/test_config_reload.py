"""Config reload (issue 17): the `--config` file read again on POST /config/reload and on
SIGHUP (`balancer/control/_reload.py`). The plan, pure: backends added, removed,
reweighted, and the settings that need a restart. Then a real balancer process under a
client loop: a bad file answers 422 and changes nothing; a good one adds a backend and
removes another (drained first) with no failed request and no dropped connection, while a
changed number of processes is named as needing a restart and not applied; SIGHUP reloads
too."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from balancer import load_settings
from balancer.control._reload import plan_reload
from tests.balancer.backends import HttpBackend
from tests.helpers import async_wait_for, async_wait_until
from tests.processes import balancer

pytestmark = pytest.mark.anyio

_CLIENTS = 6  # concurrent keep-alive clients, each with its own cookie jar (its pin)
_PER_CLIENT = 20  # requests on one connection and pin; then a new client comes (no cookie)
_LOAD_LIMIT = 20.0  # seconds the client loop runs at most


def test_the_plan_names_what_changes_and_what_needs_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "balancer.toml"
    path.write_text(
        'listen = "127.0.0.1:8080"\n'
        'backends = ["a=http://127.0.0.1:9001", "b=http://127.0.0.1:9002", '
        '"http://127.0.0.1:9003"]\n'
    )
    current = load_settings(["--config", str(path)], {})
    path.write_text(
        'listen = "127.0.0.1:8081"\nworkers = 2\n'
        'backends = ["b=http://127.0.0.1:9002 weight=3", "http://127.0.0.1:9003", '
        '"c=http://127.0.0.1:9004"]\n'
    )
    plan = plan_reload(current, load_settings(["--config", str(path)], {}))
    assert [spec.name for spec in plan.added] == ["c"]
    assert plan.removed == ("a",)
    assert plan.reweighted == (("b", 3),)
    assert plan.needs_restart == ("listen", "workers")

    # The same name at another URL cannot change in place (its pins would move with it);
    # a flag on the command line keeps its precedence over the file (no change seen).
    path.write_text('listen = "127.0.0.1:9999"\nbackends = ["a=http://127.0.0.1:9009"]\n')
    moved = plan_reload(
        current, load_settings(["--config", str(path), "--listen", "127.0.0.1:8080"], {})
    )
    assert moved.needs_restart == ("backends (a)",)
    assert not moved.added


async def _load(url: str, stop: asyncio.Event, answers: list[str], failures: list[str]) -> None:
    """Clients one after another until `stop`: each sends `_PER_CLIENT` GET / on one
    keep-alive connection, pinned by its affinity cookie; the next comes without one."""
    deadline = time.monotonic() + _LOAD_LIMIT
    while not stop.is_set() and time.monotonic() < deadline:
        async with httpx.AsyncClient(timeout=5) as client:
            for _ in range(_PER_CLIENT):
                try:
                    answer = await client.get(url + "/")
                except httpx.HTTPError as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                if answer.status_code != 200:
                    failures.append(f"{answer.status_code}: {answer.text}")
                else:
                    answers.append(answer.text)


@pytest.fixture
async def three() -> AsyncIterator[tuple[HttpBackend, HttpBackend, HttpBackend]]:
    async with HttpBackend("a") as a, HttpBackend("b") as b, HttpBackend("c") as c:
        yield a, b, c


async def _ids(client: httpx.AsyncClient, admin: str) -> dict[str, str]:
    body = (await client.get(admin + "/backends")).json()
    return {backend["id"]: backend["state"] for backend in body["backends"]}


async def test_a_reload_under_load_adds_and_drains_and_a_bad_file_changes_nothing(
    tmp_path: Path, three: tuple[HttpBackend, HttpBackend, HttpBackend]
) -> None:
    a, b, c = three
    path = tmp_path / "balancer.toml"
    # Drains move pinned clients, so A's ends once nothing is in flight ("empty").
    first = f'drain_sessions = "move"\nbackends = ["a={a.url}", "b={b.url}"]\n'
    path.write_text(first)
    with balancer([], "--config", str(path)) as (lb, admin):
        assert admin is not None
        stop = asyncio.Event()
        answers: list[str] = []
        failures: list[str] = []
        clients = [
            asyncio.create_task(_load(lb.url, stop, answers, failures)) for _ in range(_CLIENTS)
        ]
        try:
            async with httpx.AsyncClient(timeout=5) as control:
                await async_wait_until(
                    lambda: {"hello from a", "hello from b"} <= set(answers),
                    10,
                    "both backends serving",
                )
                # Bad files: 422 with the reason, the pool as it was.
                for bad, named in (
                    ("backends = [", "not valid TOML"),
                    (f'backends = ["a={a.url}", "b=ftp://x"]\n', "--backend"),
                    (f'backends = ["{a.url}"]\nno_such_setting = 1\n', "no_such_setting"),
                ):
                    path.write_text(bad)
                    refused = await control.post(admin + "/config/reload")
                    assert refused.status_code == 422, refused.text
                    assert refused.json()["reason"] == "config_reload_failed"
                    assert named in refused.json()["error"]
                    assert await _ids(control, admin) == {"a": "up", "b": "up"}

                # A good one: C joins, A drains then leaves, B's weight changes; the
                # number of processes changed too: named, not applied (the listen address
                # is the command line's, which the file cannot override).
                path.write_text(
                    'workers = 2\nlisten = "127.0.0.1:1"\ndrain_sessions = "move"\n'
                    f'backends = ["b={b.url} weight=2", "c={c.url}"]\n'
                )
                served_by_a = len(a.seen)
                reloaded = await control.post(admin + "/config/reload")
                assert reloaded.status_code == 200, reloaded.text
                body = reloaded.json()
                assert body["added"] == ["c"]
                assert body["removed"] == ["a"]
                assert body["reweighted"] == {"b": 2}
                assert body["needs_restart"] == ["workers"]

                async def a_gone() -> bool:
                    return set(await _ids(control, admin)) == {"b", "c"}

                await async_wait_for(a_gone, 10, "A drained and removed")
                await async_wait_until(lambda: len(c.seen) >= 50, 10, "C serving its share")
                after_removal = len(a.seen)
                seen_b = len(b.seen)
                await async_wait_until(lambda: len(b.seen) >= seen_b + 50, 10, "more load")
                assert len(a.seen) == after_removal, "a removed backend got requests"
                assert after_removal >= served_by_a

                # SIGHUP reloads too: A back.
                path.write_text(first.replace('"b=', f'"c={c.url}", "b='))
                lb.popen.send_signal(signal.SIGHUP)

                async def a_back() -> bool:
                    return set(await _ids(control, admin)) == {"a", "b", "c"}

                await async_wait_for(a_back, 10, "A added by SIGHUP")
                assert lb.alive()
        finally:
            stop.set()
            await asyncio.gather(*clients)
    assert failures == [], failures[:5]
    # All of it on the first address, by one process.
    assert len(answers) > 200


async def test_with_workers_both_signal_and_endpoint_reach_every_process(
    tmp_path: Path, three: tuple[HttpBackend, HttpBackend, HttpBackend]
) -> None:
    a, b, c = three
    path = tmp_path / "balancer.toml"
    path.write_text(f'backends = ["a={a.url}"]\n')
    with balancer([], "--config", str(path), "--workers", "2") as (lb, admin):
        assert admin is not None
        async with httpx.AsyncClient(timeout=5) as control:

            async def states(backend: str) -> dict[str, str]:
                body = (await control.get(admin + "/backends")).json()
                rows = {row["id"]: row for row in body["backends"]}
                return dict(rows[backend]["states"]) if backend in rows else {}

            async def both_up(backend: str) -> bool:
                return await states(backend) == {"0": "up", "1": "up"}

            await async_wait_for(lambda: both_up("a"), 10, "both processes up")
            # SIGHUP to the parent: passed on to each process (before: it killed them all).
            path.write_text(f'backends = ["a={a.url}", "b={b.url}"]\n')
            lb.popen.send_signal(signal.SIGHUP)
            await async_wait_for(lambda: both_up("b"), 10, "b in both processes")
            # The endpoint through the one admin address: every process reloads.
            path.write_text(f'backends = ["a={a.url}", "b={b.url}", "c={c.url}"]\n')
            answer = await control.post(admin + "/config/reload")
            assert answer.status_code == 200, answer.text
            assert answer.json()["added"] == ["c"]
            assert [p["status"] for p in answer.json()["processes"]] == [200, 200]
            assert await both_up("c")
            assert lb.alive()
