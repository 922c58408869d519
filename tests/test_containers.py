"""compose.yaml, the Dockerfile and deploy/k8s/, checked without a Docker engine or a cluster.

compose.yaml is interpolated as Compose does it (and, where Debian's `docker-compose` is
installed, checked against its own `config` output), then its services' exact commands run
here as local processes: service host names become 127.0.0.1, each container port a free
local port, and the `redis` service a real Redis started by the test. A broken entry point,
flag or MODE mapping in compose.yaml fails these tests. The Kubernetes manifests are parsed,
and their container arguments go through the real command-line parsers.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from balancer._config import load_settings
from demo_app import AppSettings, create_app
from demo_app.__main__ import parse_args as parse_demo_app_args
from session_store import RedisServer
from tests.helpers import free_port, wait_for
from tests.processes import Process

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
K8S = ROOT / "deploy" / "k8s"
MODES = ("sticky", "shared", "hybrid")
ADMIN_TOKEN = "test-admin-token-0123456789"

# -- Compose's variable interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err},
# ${VAR?err}, $VAR, and $$ for a literal $ (the Compose specification, "Interpolation") ----

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """``text`` with Compose variables substituted from ``env``; raises on ``${VAR:?err}``."""

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["plain"]
        value = env.get(name)
        op, arg = match["op"], match["arg"] or ""
        unset = value is None or (op is not None and op.startswith(":") and value == "")
        if op in (":-", "-") and unset:
            return arg
        if op in (":?", "?") and unset:
            raise ValueError(f"compose needs ${name}: {arg}")
        return value or ""

    return _VARIABLE.sub(substitute, text)


def _map_strings(node: Any, change: Callable[[str], str]) -> Any:
    if isinstance(node, str):
        return change(node)
    if isinstance(node, list):
        return [_map_strings(item, change) for item in node]
    if isinstance(node, dict):
        return {key: _map_strings(value, change) for key, value in node.items()}
    return node


@functools.cache
def _raw_compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def compose_services(env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """compose.yaml's services as Compose resolves them for the variables in ``env``."""
    services: dict[str, dict[str, Any]] = _raw_compose()["services"]
    return {
        name: _map_strings(service, lambda text: interpolate(text, env))
        for name, service in services.items()
    }


def _as_argv(command: str | list[str]) -> list[str]:
    # Compose splits a string command like a shell would, without running one.
    return shlex.split(command) if isinstance(command, str) else list(command)


def _container_ports(service: Mapping[str, Any]) -> set[int]:
    ports = {int(str(port)) for port in service.get("expose", [])}
    # "HOST_IP:HOST_PORT:CONTAINER_PORT" or "HOST_PORT:CONTAINER_PORT": the last part.
    ports.update(int(str(spec).rsplit(":", 1)[-1]) for spec in service.get("ports", []))
    return ports


class LocalNetwork:
    """Where each (service, container port) of the compose network lives on 127.0.0.1."""

    def __init__(self, ports: dict[tuple[str, int], int]) -> None:
        self.ports = ports

    def rewrite(self, text: str, service: str) -> str:
        """``text`` of ``service`` with every service address turned into a local one."""
        for (name, port), local in self.ports.items():
            text = re.sub(rf"(?<![\w.-]){re.escape(name)}:{port}\b", f"127.0.0.1:{local}", text)
        for (name, port), local in self.ports.items():
            if name == service:
                # What the service binds or probes inside its own container.
                own = rf"(?<![\w.])((?:0\.0\.0\.0|127\.0\.0\.1|localhost):|--port[ =]){port}\b"
                text = re.sub(own, rf"\g<1>{local}", text)
        return text


def _environment(service: Mapping[str, Any]) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):  # the KEY=VALUE list form
        environment = dict(item.split("=", 1) for item in environment)
    return {key: "" if value is None else str(value) for key, value in environment.items()}


def _local_env(service: Mapping[str, Any], name: str, network: LocalNetwork) -> dict[str, str]:
    env = {key: network.rewrite(value, name) for key, value in _environment(service).items()}
    # `python` in the image is the project's interpreter; here it is this virtualenv's.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return env


def _healthy(service: Mapping[str, Any], name: str, network: LocalNetwork) -> bool:
    test = _as_argv(service["healthcheck"]["test"])
    assert test[0] == "CMD", f"{name}: healthcheck must be exec form (CMD), got {test[0]}"
    argv = [network.rewrite(arg, name) for arg in test[1:]]
    env = _local_env(service, name, network)
    try:
        done = subprocess.run(argv, env=env, capture_output=True, timeout=5, check=False)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


def _start_levels(services: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    """Services in waves: each wave depends only on the waves before it (as Compose starts them)."""
    levels: list[list[str]] = []
    placed: set[str] = set()
    while len(placed) < len(services):
        wave = [
            name
            for name, service in services.items()
            if name not in placed and set(service.get("depends_on", {})) <= placed
        ]
        assert wave, f"depends_on has a cycle among {set(services) - placed}"
        levels.append(wave)
        placed.update(wave)
    return levels


@pytest.fixture
def compose_redis() -> Iterator[RedisServer]:
    """A fresh Redis for one run of the stack, so its keys tell which stores wrote."""
    with RedisServer() as server:
        yield server


def _compose_env(mode: str) -> dict[str, str]:
    return {"MODE": mode, "ADMIN_TOKEN": ADMIN_TOKEN}


# -- compose.yaml: static checks ------------------------------------------------------------


def test_compose_declares_the_stack() -> None:
    services = compose_services({})
    assert set(services) == {"redis", "app1", "app2", "app3", "demo"}
    assert services["redis"]["image"].startswith("redis:")
    assert "healthcheck" in services["redis"]
    for app in ("app1", "app2", "app3"):
        env = _environment(services[app])
        assert env["MODE"] == "hybrid"  # the default mode
        assert env["REDIS_URL"] == "redis://redis:6379/0"
        assert env["INSTANCE_ID"] == app
        assert services[app]["depends_on"] == {"redis": {"condition": "service_healthy"}}
    demo = services["demo"]
    assert demo["depends_on"] == {
        app: {"condition": "service_healthy"} for app in ("app1", "app2", "app3")
    }
    # The app on 8080, the admin API on the host's loopback only.
    assert sorted(demo["ports"]) == ["127.0.0.1:8081:8081", "8080:8080"]
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert "healthcheck" in services[dependency], f"{name} waits on {dependency}"


def test_compose_interpolation_follows_compose() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("$$MODE ${SET} $SET ${UNSET:-d} ${EMPTY:-d} ${EMPTY-d}", env) == (
        "$MODE x x d d "
    )
    with pytest.raises(ValueError, match="NEEDED"):
        interpolate("${NEEDED:?set it}", env)


@pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="Debian's docker-compose is not installed (apt-get install docker-compose): "
    "compose.yaml is still parsed and run by the other tests, only not validated by it",
)
@pytest.mark.parametrize("mode", MODES)
def test_docker_compose_config_validates_and_agrees(mode: str) -> None:
    done = subprocess.run(
        ["docker-compose", "--file", str(COMPOSE), "config"],
        env={**os.environ, **_compose_env(mode)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    # `config` prints the file interpolated but with $$ still escaped.
    theirs = yaml.safe_load(done.stdout)["services"]
    ours = compose_services(_compose_env(mode))
    assert set(theirs) == set(ours)
    for name, service in theirs.items():
        resolved = _map_strings(service, lambda text: text.replace("$$", "$"))
        for key in ("command", "environment", "healthcheck", "depends_on"):
            if key == "healthcheck":
                assert resolved[key]["test"] == ours[name][key]["test"], name
            elif key in ours[name]:
                assert resolved[key] == ours[name][key], (name, key)


# -- compose.yaml: its exact commands, run here ---------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_compose_stack_keeps_a_session(mode: str, compose_redis: RedisServer) -> None:
    services = compose_services(_compose_env(mode))
    ports = {
        (name, port): free_port() for name, s in services.items() for port in _container_ports(s)
    }
    ports[("redis", 6379)] = compose_redis.port
    network = LocalNetwork(ports)
    processes: dict[str, Process] = {}
    try:
        for wave in _start_levels(services):
            # The test's own RedisServer stands in for the redis service.
            for name in (name for name in wave if name != "redis"):
                service = services[name]
                argv = [network.rewrite(arg, name) for arg in _as_argv(service["command"])]
                processes[name] = Process(argv, "", env=_local_env(service, name, network))
            for name in (name for name in wave if name != "redis"):

                def started(name: str = name) -> bool:
                    process = processes[name]
                    if process.popen.poll() is not None:
                        raise AssertionError(f"{name} exited:\n{process.output()}")
                    return _healthy(services[name], name, network)

                wait_for(started, 30, f"{name}'s compose healthcheck")

        demo = f"http://127.0.0.1:{ports[('demo', 8080)]}"
        with httpx.Client(base_url=demo, timeout=5) as client:
            instances = set()
            for expected in range(1, 5):
                reply = client.post("/api/counter")
                assert reply.status_code == 200, reply.text
                assert reply.json()["count"] == expected
                instances.add(reply.json()["instance"])
            assert client.post("/api/cart", json={"item": "book"}).json()["cart"] == ["book"]
            assert client.get("/api/session").json()["session"] == {"count": 4, "cart": ["book"]}
        if mode == "shared":
            assert len(instances) > 1, "--sticky none should spread one client's requests"
        else:
            assert len(instances) == 1, f"{mode}: one client should stay on one instance"
        # Only the stores that need Redis write to it.
        with redis.Redis.from_url(compose_redis.url) as client_redis:
            keys = client_redis.dbsize()
        assert (keys > 0) == (mode != "sticky"), f"{mode}: {keys} keys in redis"

        admin = f"http://127.0.0.1:{ports[('demo', 8081)]}"
        assert httpx.get(admin + "/backends", timeout=5).status_code == 401
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

        apps = sorted(f"http://127.0.0.1:{ports[(app, 8000)]}" for app in ("app1", "app2", "app3"))

        def all_up() -> bool:
            backends = httpx.get(admin + "/backends", headers=auth, timeout=5).json()["backends"]
            assert sorted(backend["url"] for backend in backends) == apps
            return [backend["state"] for backend in backends] == ["up", "up", "up"]

        wait_for(all_up, 15, "the balancer to see app1..app3 up")
    finally:
        for process in reversed(processes.values()):
            process.terminate()


@pytest.mark.parametrize("service", ["app1", "demo"])
def test_compose_rejects_an_unknown_mode(service: str) -> None:
    services = compose_services({"MODE": "round-robin"})
    network = LocalNetwork({})
    done = subprocess.run(
        _as_argv(services[service]["command"]),
        env=_local_env(services[service], service, network),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "MODE must be sticky, shared or hybrid, not 'round-robin'" in done.stderr


# -- Dockerfile -------------------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, argument) pairs, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def test_dockerfile_is_small_non_root_and_runs_the_entry_points() -> None:
    instructions = _dockerfile()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    users = [argument for instruction, argument in instructions if instruction == "USER"]
    assert users, "the image must not run as root"
    assert users[-1] not in ("root", "0")
    cmd = json.loads(
        next(argument for instruction, argument in instructions if instruction == "CMD")
    )
    assert cmd[:3] == ["python", "-m", "demo_app"]
    assert parse_demo_app_args(cmd[3:]).host == "0.0.0.0"
    # Every service of compose.yaml runs this image's python on our modules.
    commands = " ".join(
        " ".join(_as_argv(service["command"]))
        for name, service in compose_services({}).items()
        if name != "redis"
    )
    assert "python -m demo_app " in commands
    assert "python -m balancer " in commands
    # No secret baked into a layer: keys and tokens come from the environment at run time.
    for instruction, argument in instructions:
        if instruction in ("ENV", "ARG"):
            assert not re.search(r"SECRET|TOKEN|PASSWORD|KEY", argument, re.I), argument
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignored)


# -- Kubernetes manifests ----------------------------------------------------------------------


def _manifests() -> list[dict[str, Any]]:
    documents: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        documents.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return documents


def _by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in _manifests() if doc["kind"] == kind}


def _workloads() -> dict[str, dict[str, Any]]:
    return {**_by_kind("Deployment"), **_by_kind("StatefulSet")}


def _container(workload: Mapping[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _container_ports_by_name(container: Mapping[str, Any]) -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in container.get("ports", [])}


def _argv(container: Mapping[str, Any]) -> list[str]:
    return [*container.get("command", []), *container.get("args", [])]


def _env(container: Mapping[str, Any]) -> dict[str, str]:
    # A value from a Secret is unknown here: a placeholder of a valid length stands in.
    return {
        item["name"]: item.get("value", "placeholder-from-a-secret-0123")
        for item in container.get("env", [])
    }


def _port_of(port: int | str, container: Mapping[str, Any]) -> int:
    return _container_ports_by_name(container)[port] if isinstance(port, str) else port


def test_k8s_has_every_piece() -> None:
    kinds = {(doc["kind"], doc["metadata"]["name"]) for doc in _manifests()}
    assert {
        ("Deployment", "redis"),
        ("Service", "redis"),
        ("StatefulSet", "app"),
        ("Service", "app"),
        ("Service", "app-pods"),
        ("Deployment", "balancer"),
        ("Service", "balancer"),
    } <= kinds
    for doc in _manifests():
        assert doc["apiVersion"] in ("v1", "apps/v1"), doc["metadata"]["name"]


def test_k8s_selectors_match_their_pods() -> None:
    workloads = _workloads()
    for name, workload in workloads.items():
        selector = workload["spec"]["selector"]["matchLabels"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), name
    for name, service in _by_kind("Service").items():
        selector = service["spec"]["selector"]
        selected = [
            workload
            for workload in workloads.values()
            if selector.items() <= workload["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(selected) == 1, f"Service {name} selects {len(selected)} workloads"
        container = _container(selected[0])
        exposed = set(_container_ports_by_name(container).values())
        for port in service["spec"]["ports"]:
            assert _port_of(port.get("targetPort", port["port"]), container) in exposed, name


def test_k8s_probes_exist_in_the_app() -> None:
    app = _container(_workloads()["app"])
    routes = {
        getattr(route, "path", None) for route in create_app(AppSettings(instance_id="t")).routes
    }
    assert app["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert app["livenessProbe"]["httpGet"]["path"] == "/healthz"
    ports = set(_container_ports_by_name(app).values())
    for probe in ("readinessProbe", "livenessProbe"):
        assert app[probe]["httpGet"]["path"] in routes
        assert _port_of(app[probe]["httpGet"]["port"], app) in ports
    balancer = _container(_workloads()["balancer"])
    for probe in ("readinessProbe", "livenessProbe"):
        assert probe in balancer
        action = balancer[probe].get("httpGet") or balancer[probe]["tcpSocket"]
        assert _port_of(action["port"], balancer) in set(
            _container_ports_by_name(balancer).values()
        )


def test_k8s_args_parse_and_ports_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    workloads = _workloads()
    app_set = workloads["app"]
    app = _container(app_set)
    argv = _argv(app)
    assert argv[:3] == ["python", "-m", "demo_app"]
    # Kubernetes expands $(VAR) in args only for variables the container defines.
    for workload in workloads.values():
        container = _container(workload)
        for name in re.findall(r"\$\((\w+)\)", " ".join(_argv(container))):
            assert name in _env(container), f"{container['name']}: $({name}) is not defined"
    for key, value in _env(app).items():
        monkeypatch.setenv(key, value)  # parse_args reads REDIS_URL and its keys from there
    app_args = parse_demo_app_args(argv[3:])
    assert app_args.host == "0.0.0.0"
    assert app_args.store == "hybrid"
    assert _container_ports_by_name(app)["http"] == app_args.port
    assert app_args.redis_url == "redis://redis:6379/0"
    redis_port = _by_kind("Service")["redis"]["spec"]["ports"][0]["port"]
    assert app_args.redis_url.endswith(f":{redis_port}/0")

    balancer = _container(workloads["balancer"])
    argv = _argv(balancer)
    assert argv[:3] == ["python", "-m", "balancer"]
    settings = load_settings(argv[3:], environ=_env(balancer))
    assert _container_ports_by_name(balancer)["http"] == settings.listen.port
    assert settings.health_path == "/readyz"
    assert settings.sticky.cookie == "sid"
    # One backend per app pod, by the stable DNS name the headless Service gives a
    # StatefulSet's pods: <pod>.<service>.
    headless = app_set["spec"]["serviceName"]
    assert _by_kind("Service")[headless]["spec"]["clusterIP"] == "None"
    replicas = app_set["spec"]["replicas"]
    expected = tuple(f"http://app-{index}.{headless}:{app_args.port}" for index in range(replicas))
    assert settings.backends == expected
