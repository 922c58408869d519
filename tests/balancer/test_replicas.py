"""Replicas and pins that must agree, or say they do not (issue 13, part 3).

Real processes: demo_app instances keeping sessions in their own memory, behind balancer
processes on free ports of 127.0.0.1. A session is lost when its counter starts again at 1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from urllib.parse import urlsplit

import httpx
import pytest

from tests.helpers import free_port
from tests.processes import Process, balancer, demo_app

SECRET = "replicas-affinity-secret-0123456789"
CLIENTS = 30
COUNTS = 4  # requests per client


@contextlib.contextmanager
def instances(count: int) -> Iterator[list[Process]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(demo_app(f"app{i}")) for i in range(1, count + 1)]


def lost_sessions(urls: Sequence[str], *, drop_pin: str | None = None) -> int:
    """Sessions of CLIENTS clients (each its own cookie jar) whose counter restarted.

    Each client sends COUNTS counter POSTs, alternating over `urls` (cookies are scoped by
    host, not port, so the replicas see one jar). With `drop_pin` ("drop" or "tamper"),
    the balancer's affinity cookie is removed or spoiled before every request but the
    first, while the app's session cookie stays valid.
    """
    lost = 0
    for index in range(CLIENTS):
        with httpx.Client(timeout=5) as client:
            for count in range(1, COUNTS + 1):
                if count > 1 and drop_pin == "drop":
                    client.cookies.delete("lb_affinity")
                elif count > 1 and drop_pin == "tamper":
                    client.cookies.set("lb_affinity", "app1.forged-signature", "127.0.0.1")
                reply = client.post(urls[(index + count) % len(urls)] + "/api/counter")
                assert reply.status_code == 200, reply.text
                if reply.json()["count"] != count:
                    lost += 1
                    break
    return lost


def fingerprint(admin: str | None) -> str:
    assert admin is not None
    body = httpx.get(admin + "/backends", timeout=5).json()
    value = body["fingerprint"]
    assert isinstance(value, str)
    assert len(value) == 12
    return value


def stopped_output(process: Process) -> list[str]:
    """Stop `process` (SIGTERM) and return its output's lines."""
    process.popen.terminate()
    process.popen.wait(15)
    return process.output().splitlines()


@pytest.mark.parametrize(
    ("extra", "warnings"),
    [
        ((), 1),
        (("--workers", "2"), 1),  # the parent warns, not each worker
        (("--affinity-secret", SECRET), 0),
        (("--sticky", "ip"), 0),  # no affinity cookie: nothing to agree on
    ],
    ids=["no-secret", "no-secret-2-workers", "secret", "ip"],
)
def test_a_balancer_without_a_secret_warns_once(extra: tuple[str, ...], warnings: int) -> None:
    backend = f"http://127.0.0.1:{free_port()}"  # nothing needs to answer
    with balancer([backend], *extra, admin=False) as (lb, _):
        lines = stopped_output(lb)
    named = [line for line in lines if "--affinity-secret" in line]
    assert len(named) == warnings, lines
    if warnings:
        assert "WARNING" in named[0], named
        assert "replicas will not agree" in named[0], named


def test_named_backends_agree_however_their_urls_are_spelled() -> None:
    with instances(3) as apps:
        port = urlsplit(apps[1].url).port
        spelled = [apps[0].url, f"http://localhost:{port}", apps[2].url]
        one = [f"app{i}={url}" for i, url in enumerate(spelled, 1)]
        two = [f"app{i}={a.url}" for i, a in enumerate(apps, 1)]
        options = ("--sticky", "cookie:sid", "--affinity-secret", SECRET)
        with (
            balancer(one, *options) as (first, admin1),
            balancer(two, *options) as (
                second,
                admin2,
            ),
        ):
            assert fingerprint(admin1) == fingerprint(admin2)
            assert lost_sessions([first.url, second.url]) == 0


def test_unnamed_backends_spelled_differently_show_different_fingerprints() -> None:
    """Without names the replicas disagree (the ids hash the spelling); the fingerprint
    in /backends is how an operator sees it."""
    with instances(2) as apps:
        port = urlsplit(apps[1].url).port
        one = [apps[0].url, f"http://localhost:{port}"]
        options = ("--sticky", "cookie:sid", "--affinity-secret", SECRET)
        with (
            balancer(one, *options) as (_, admin1),
            balancer([a.url for a in apps], *options) as (_, admin2),
        ):
            assert fingerprint(admin1) != fingerprint(admin2)


def test_replicas_with_other_secrets_show_different_fingerprints() -> None:
    backends = [f"http://127.0.0.1:{free_port()}"]
    with (
        balancer(backends, "--affinity-secret", SECRET) as (_, admin1),
        balancer(backends, "--affinity-secret", SECRET[::-1]) as (_, admin2),
    ):
        assert fingerprint(admin1) != fingerprint(admin2)


@pytest.mark.parametrize("drop_pin", ["drop", "tamper"])
def test_a_lost_pin_with_a_valid_session_cookie_finds_its_instance(drop_pin: str) -> None:
    with (
        instances(3) as apps,
        balancer([a.url for a in apps], "--sticky", "cookie:sid") as (lb, _),
    ):
        assert lost_sessions([lb.url], drop_pin=drop_pin) == 0
