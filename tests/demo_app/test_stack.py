"""``python -m demo_app.stack``: the command lines it (and the compare tool) builds, read
back by the balancer's and demo_app's own parsers; as a real process, what it says when it
cannot start."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from balancer import Address, Sticky, load_settings
from demo_app.__main__ import parse_args as parse_demo_app_args
from demo_app.stack import (
    MODES,
    STICKY_OF_MODE,
    STORE_OF_MODE,
    autoscale_options,
    balancer_command,
    discover_url,
    instance_command,
    parse_args,
)
from tests.helpers import free_port

REDIS = "redis://127.0.0.1:6399/0"


@pytest.mark.parametrize("mode", MODES)
def test_the_commands_carry_the_modes_store_and_stickiness(mode: str) -> None:
    instance = instance_command(mode, REDIS, host="127.0.0.1", port=9001, name="app1")
    assert instance[:3] == [sys.executable, "-m", "demo_app"]
    args = parse_demo_app_args(instance[3:])
    assert (args.store, args.port, args.instance_id) == (STORE_OF_MODE[mode], 9001, "app1")
    assert args.registry is None

    backends = ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]
    command = balancer_command(
        mode,
        REDIS,
        listen="127.0.0.1:8080",
        admin="127.0.0.1:8081",
        backends=backends,
        options=["--ejection-time", "1"],
    )
    assert command[:3] == [sys.executable, "-m", "balancer"]
    settings = load_settings(command[3:], environ={})
    assert settings.sticky == Sticky.parse(STICKY_OF_MODE[mode])
    assert (settings.listen, settings.admin) == (
        Address("127.0.0.1", 8080),
        Address("127.0.0.1", 8081),
    )
    assert settings.backends == tuple(backends)
    assert settings.discover is None
    assert (settings.health_path, settings.ejection_time) == ("/readyz", 1.0)
    assert (settings.dashboard_mode, settings.dashboard_redis) == (mode, REDIS)


def test_with_discover_the_instances_register_where_the_balancer_looks() -> None:
    instance = instance_command(
        "hybrid", REDIS, host="127.0.0.1", port=9001, name="app1", discover=True
    )
    args = parse_demo_app_args(instance[3:])
    command = balancer_command(
        "hybrid", REDIS, listen="127.0.0.1:8080", admin="127.0.0.1:8081", discover=True
    )
    settings = load_settings(command[3:], environ={})
    assert settings.backends == ()
    assert settings.discover is not None
    assert discover_url(args.registry, args.service) == discover_url(REDIS)
    assert (settings.discover.redis_url, settings.discover.service) == (REDIS, args.service)


@pytest.mark.parametrize("mode", MODES)
def test_with_autoscale_the_balancer_spawns_the_instances_one_to_n(mode: str) -> None:
    # A Redis URL with braces: the template must not take them for {port} or {index}.
    redis = "redis://:p{w}d@127.0.0.1:6399/0"
    options = autoscale_options(mode, redis, host="127.0.0.1", most=3)
    command = balancer_command(mode, redis, listen="127.0.0.1:8080", admin="127.0.0.1:8081")
    settings = load_settings([*command[3:], *options], environ={})
    assert settings.spawn == (1, 3)
    assert settings.backends == ()
    argv = [part.format(port=9001, index=0) for part in settings.worker_command()]
    assert argv[:3] == [sys.executable, "-m", "demo_app"]
    args = parse_demo_app_args(argv[3:])
    assert (args.store, args.port, args.instance_id) == (STORE_OF_MODE[mode], 9001, "app0")
    assert args.redis_url == redis


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--autoscale", "--discover"], "--autoscale: one balancer spawns the instances"),
        (["--autoscale", "--balancers", "2"], "not with --balancers"),
        (["--autoscale", "--instances", "1"], "--instances is the most instances, at least 2"),
    ],
)
def test_autoscale_refuses_what_it_cannot_do(
    argv: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args([*argv, "--port", str(free_port()), "--admin-port", str(free_port())])
    assert info.value.code == 2
    assert words in capsys.readouterr().err


def test_an_unreachable_redis_url_fails_fast_naming_redis_and_the_url() -> None:
    # Nothing listens on this port: the stack used to start the instances, wait 20 s for
    # them, then say only "http://127.0.0.1:9001: not ready within 20.0 s".
    dead = free_port()
    env = {**os.environ, "REDIS_URL": f"redis://:hunter2@127.0.0.1:{dead}/0"}
    argv = [sys.executable, "-m", "demo_app.stack", "--mode", "hybrid", "--instances", "1"]
    argv += ["--base-port", str(free_port()), "--port", str(free_port())]
    argv += ["--admin-port", str(free_port())]
    started = time.monotonic()
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stdout + result.stderr
    assert elapsed < 8, f"{elapsed:.1f} s to fail"
    assert f"Redis at REDIS_URL=redis://127.0.0.1:{dead}/0" in result.stderr, result.stderr
    assert "hunter2" not in result.stdout + result.stderr  # the password is redacted
    assert "Traceback" not in result.stderr
