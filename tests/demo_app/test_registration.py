"""demo_app in the service registry: registered once ready, gone first on SIGTERM, expired
when killed; and the lifespan helper on its own."""

from __future__ import annotations

import asyncio
import secrets
import signal
import sys
from collections.abc import AsyncIterator

import httpx
import pytest

from demo_app.__main__ import parse_args
from demo_app._registration import Registration
from demo_app.caller import call
from demo_app.caller import parse_args as caller_args
from redis_plumbing import RedisServer
from service_registry import Registry
from tests.helpers import async_wait_for, async_wait_until, free_port
from tests.processes import Process

pytestmark = pytest.mark.anyio


@pytest.fixture
async def registry(redis_server: RedisServer) -> AsyncIterator[Registry]:
    registry = Registry.from_url(redis_server.url, f"svc-{secrets.token_hex(4)}")
    try:
        yield registry
    finally:
        await registry.aclose()


def start(registry: Registry, redis_url: str, name: str, *extra: str) -> Process:
    port = free_port()
    args = [sys.executable, "-m", "demo_app", "--port", str(port), "--instance-id", name]
    args += ["--log-level", "warning", "--registry", redis_url, "--service", registry.service]
    return Process([*args, *extra], f"http://127.0.0.1:{port}")


async def ids(registry: Registry) -> list[str]:
    return [i.id for i in (await registry.read()).instances]


async def answers(url: str) -> bool:
    try:
        async with httpx.AsyncClient() as client:
            return (await client.get(url + "/healthz", timeout=0.5)).status_code == 200
    except httpx.HTTPError:
        return False


async def test_registers_when_ready_and_leaves_before_it_stops_listening(
    registry: Registry, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    app = start(registry, redis_server.url, "r1")
    try:

        async def registered() -> bool:
            app.alive()
            return await ids(registry) == ["r1"]

        await async_wait_for(registered, within=15, what="r1 to register")
        # Registered only once ready: it answers as soon as it is listed.
        assert await answers(app.url)
        (instance,) = (await registry.read()).instances
        assert instance.address == app.url
        assert instance.metadata["store"] == "memory"
        # The peer-to-peer caller finds it through the registry.
        caller = ["--registry", redis_server.url, "--service", registry.service]
        assert await call(caller_args([*caller, "--requests", "3"])) == 0
        assert "answered by: r1 3; failed: 0" in capsys.readouterr().out

        app.popen.send_signal(signal.SIGTERM)

        async def deregistered() -> bool:
            return await ids(registry) == []

        await async_wait_for(deregistered, within=5, what="r1 to deregister")
        # Deregistered first: it still serves for a refresh interval, then exits cleanly.
        assert await answers(app.url)
        assert await asyncio.to_thread(app.popen.wait, 10) == 0
    finally:
        app.terminate()


async def test_a_killed_instance_expires_with_its_ttl(
    registry: Registry, redis_server: RedisServer
) -> None:
    app = start(registry, redis_server.url, "k1", "--registry-ttl", "0.5")
    try:

        async def registered() -> bool:
            app.alive()
            return await ids(registry) == ["k1"]

        await async_wait_for(registered, within=15, what="k1 to register")
        app.popen.kill()
        await asyncio.to_thread(app.popen.wait)

        async def expired() -> bool:
            return await ids(registry) == []

        await async_wait_for(expired, within=3, what="k1's ttl to run out")
    finally:
        app.terminate()


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--advertise", "http://h:1"], "--advertise: needs --registry"),
        (
            ["--registry", "http://127.0.0.1:6379"],
            "--registry: 'http://127.0.0.1:6379': expected redis://",
        ),
        (["--registry", "redis://h:1/0", "--service", "a b"], "--service:"),
        (["--registry", "redis://h:1/0", "--advertise", "ftp://h:1"], "--advertise:"),
        (["--registry", "redis://h:1/0", "--registry-ttl", "0"], "--registry-ttl:"),
    ],
)
def test_bad_registry_flags_exit_2_naming_the_flag(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(["--port", "1", "--instance-id", "x", *argv])
    assert info.value.code == 2
    assert flag in capsys.readouterr().err


def test_advertise_defaults_to_the_listening_address() -> None:
    args = parse_args(["--port", "9005", "--instance-id", "x", "--registry", "redis://h:1/0"])
    assert args.advertise == "http://127.0.0.1:9005"


async def test_the_lifespan_heartbeats_back_after_redis_lost_the_record(
    registry: Registry,
) -> None:
    registration = Registration(
        "redis://unused",
        service=registry.service,
        advertise="http://127.0.0.1:9999",
        instance_id="h1",
        ttl=0.3,
        ready_path=None,
        handle_signals=False,
        registry=registry,
    )
    async with registration.lifespan():
        await async_wait_until(registration.registered.is_set, within=5, what="registration")
        assert await ids(registry) == ["h1"]
        # As after a Redis restart: the record is gone; the next heartbeat writes it again.
        await registry.client.delete(registry.instance_prefix + "h1", registry.heartbeats_key)

        async def back() -> bool:
            return await ids(registry) == ["h1"]

        await async_wait_for(back, within=2, what="the heartbeat to re-register")
        await registration.leave(wait=False)
        assert await ids(registry) == []
    assert await ids(registry) == []  # and the lifespan's exit does not register it again
