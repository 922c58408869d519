"""compose.yaml, the Dockerfile and deploy/k8s/, checked without a Docker engine or a cluster.

compose.yaml is interpolated as Compose does it (and, where Debian's `docker-compose` is
installed, checked against its own `config` output), then its services' exact commands run
here as local processes: service host names become 127.0.0.1, each container port a free
local port, and the `redis` service a real Redis started by the test. A broken entry point,
flag or MODE mapping in compose.yaml fails these tests. The Kubernetes overlays are rendered
here (a small kustomize for the features they use), validated against the Kubernetes schemas
(kubernetes-validate, strict), cross-checked (selectors, ports, probes, the Sentinel URL),
and their container arguments go through the real command-line parsers; the Redis pods'
start scripts and the app's preStop hook are run for real.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import redis
import yaml

from balancer import Settings, Sticky, load_settings
from demo_app import AppSettings, create_app
from demo_app.__main__ import parse_args as parse_demo_app_args
from demo_app.stack import MODES, STICKY_OF_MODE, STORE_OF_MODE, discover_url
from redis_plumbing import RedisServer
from tests.helpers import free_port, wait_for
from tests.processes import Process
from tests.processes import balancer as balancer_process

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
K8S = ROOT / "deploy" / "k8s"
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


def _env_file(path: str) -> dict[str, str]:
    """A Compose env file (relative to compose.yaml): KEY=VALUE lines, blank lines and
    ``#`` comments skipped; a missing file is refused, as Compose refuses it."""
    file = ROOT / path
    if not file.is_file():
        raise ValueError(f"Couldn't find env file: {file}")
    lines = [line.strip() for line in file.read_text().splitlines()]
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def compose_services(env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """compose.yaml's services as Compose resolves them for the variables in ``env``: each
    ``env_file`` read into ``environment`` (whose own entries win), as `config` prints it."""
    services: dict[str, dict[str, Any]] = _raw_compose()["services"]
    resolved = {
        name: _map_strings(service, lambda text: interpolate(text, env))
        for name, service in services.items()
    }
    for service in resolved.values():
        files = service.pop("env_file", [])
        from_files: dict[str, str] = {}
        for path in [files] if isinstance(files, str) else files:
            from_files.update(_env_file(path))
        if from_files:
            service["environment"] = {**from_files, **_environment(service)}
    return resolved


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
    # Both on the host's loopback by default (the demo key signs the cookies); the app on
    # another address only when asked. The admin API always on loopback only.
    assert sorted(demo["ports"]) == ["127.0.0.1:8080:8080", "127.0.0.1:8081:8081"]
    wide = compose_services({"PUBLISH_ADDRESS": "0.0.0.0"})["demo"]
    assert sorted(wide["ports"]) == ["0.0.0.0:8080:8080", "127.0.0.1:8081:8081"]
    # A crash restarts a container, a bounded number of times; the daemon does not bring a
    # stack left running back (unless-stopped did).
    for name in ("app1", "app2", "app3", "demo"):
        assert services[name]["restart"] == "on-failure:5", name
    assert "restart" not in services["redis"]
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
    reason="Debian's docker-compose is not installed (scripts/install installs it as root): "
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


@pytest.mark.parametrize("mode", MODES)
def test_compose_mode_files_agree_with_the_demo_stack(mode: str) -> None:
    # MODE turns into STORE and STICKY through deploy/compose/MODE=<mode>.env, as
    # `python -m demo_app.stack --mode` turns it into --store and --sticky.
    services = compose_services({"MODE": mode})
    for name in ("app1", "app2", "app3", "demo"):
        env = _environment(services[name])
        assert (env["MODE"], env["STORE"], env["STICKY"]) == (
            mode,
            STORE_OF_MODE[mode],
            STICKY_OF_MODE[mode],
        )
    assert sorted(p.name for p in (ROOT / "deploy" / "compose").glob("MODE=*.env")) == sorted(
        f"MODE={mode}.env" for mode in MODES
    )


def test_compose_refuses_an_unknown_mode_before_starting_anything() -> None:
    # An unknown MODE used to reach the containers, whose message went to their logs while
    # `docker compose up demo` showed only "Container ... is unhealthy": now Compose itself
    # stops, naming the value.
    with pytest.raises(ValueError, match=r"Couldn't find env file: .*/MODE=round-robin\.env"):
        compose_services({"MODE": "round-robin"})


@pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="Debian's docker-compose is not installed (scripts/install installs it as root)",
)
def test_docker_compose_refuses_an_unknown_mode() -> None:
    done = subprocess.run(
        ["docker-compose", "--file", str(COMPOSE), "config"],
        env={**os.environ, **_compose_env("round-robin")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "MODE=round-robin.env" in done.stderr, done.stderr


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
    stages = [i for i, (instruction, _) in enumerate(instructions) if instruction == "FROM"]
    assert [instructions[i][1] for i in stages] == ["python:3.11-slim AS build", "python:3.11-slim"]
    build, final = instructions[: stages[1]], instructions[stages[1] :]
    # The data path is compiled in the build stage, whose C compiler stays there; the image
    # checks at build time that it runs the compiled modules.
    assert any("scripts/build-fast" in arg for instruction, arg in build if instruction == "RUN")
    assert not any("gcc" in arg for instruction, arg in final if instruction == "RUN")
    assert any("compiled(p)" in arg for instruction, arg in final if instruction == "RUN")
    assert ("COPY", "--from=build /app/balancer ./balancer") in final
    # Every package the wheel holds goes into both stages (the build installs the project).
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = [pattern.rstrip("*") for pattern in find["packages"]["find"]["include"]]
    assert "redis_plumbing" in packages
    for stage in (build, final):
        copied = {arg.split()[-1] for instruction, arg in stage if instruction == "COPY"}
        assert {f"./{package}" for package in packages} <= copied
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
    assert {".git", ".venv", "tests", "**/*.so", "!scripts/build-fast"} <= set(ignored)
    # Both stages install the versions the tests passed with, not whatever is newest.
    installs = [arg for instruction, arg in instructions if "pip install" in arg]
    assert len(installs) == 2
    assert all("-c constraints.txt" in arg for arg in installs), installs
    for stage in (build, final):
        assert any(i == "COPY" and "constraints.txt" in arg.split() for i, arg in stage)


def test_the_tests_run_on_the_pinned_versions() -> None:
    # scripts/install installs constraints.txt's versions; a venv that drifted from them
    # (a package upgraded by hand) would test another set than CI and the image install.
    pins = [
        line.split("==")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert len(pins) > 20
    installed = {name: importlib.metadata.version(name) for name, _ in pins}
    assert installed == dict(pins)
    requirements = importlib.metadata.requires("sticky-sessions") or []
    pinned = {name.lower().replace("_", "-") for name, _ in pins}
    for requirement in requirements:
        name = re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0]
        if name != "sticky-sessions":
            assert name.lower().replace("_", "-") in pinned, f"{name} has no pin"


def test_dockerfile_exposes_the_ports_compose_and_kubernetes_use() -> None:
    exposed = {
        int(port)
        for instruction, argument in _dockerfile()
        if instruction == "EXPOSE"
        for port in argument.split()
    }
    compose = compose_services({})
    used = {port for name in ("app1", "demo") for port in _container_ports(compose[name])}
    for name in ("app", "balancer"):
        for container in _containers(_workloads()[name]).values():
            used |= set(_container_ports_by_name(container).values())
    assert used <= exposed, f"EXPOSE {sorted(exposed)} lacks {sorted(used - exposed)}"


# -- Kubernetes manifests ----------------------------------------------------------------------
#
# deploy/k8s/base holds the stack (hybrid); deploy/k8s/overlays/<mode> changes only what the
# mode changes. There is no kubectl here, so `render` below builds an overlay the way
# `kubectl kustomize` does for the features these files use (resources, and strategic-merge
# patches by file), and refuses any other: a feature it does not know fails the test rather
# than being skipped. Every rendered object is validated against the Kubernetes schemas
# (kubernetes-validate ships them; strict: an unknown field is an error).

K8S_VERSION = "1.31"  # the schemas of kubernetes-validate used; the oldest supported release
_KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "patches"}
# Where kubelet takes what `fieldRef` names: stand-ins of the right shape.
_FIELD_REFS = {"metadata.name": "app-5d8f7c9b6-x2f4q", "status.podIP": "10.1.2.3"}
_SECRET = "placeholder-from-a-secret-0123"  # a value from a Secret is unknown here


def _identity(doc: Mapping[str, Any]) -> tuple[str, str, str]:
    return doc["apiVersion"], doc["kind"], doc["metadata"]["name"]


def _merge(base: Any, patch: Any) -> Any:
    """A strategic merge patch, for what the overlays use: maps merge key by key, lists of
    objects with a ``name`` merge by name (containers, env), other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        assert not any(str(key).startswith("$") for key in patch), "no $patch directives"
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = _merge(base[key], value) if key in base else value
        return merged
    named = isinstance(base, list) and isinstance(patch, list)
    named = named and all(isinstance(item, dict) and "name" in item for item in [*base, *patch])
    if named:
        merged_list = list(base)
        names = [item["name"] for item in base]
        for item in patch:
            if item["name"] in names:
                index = names.index(item["name"])
                merged_list[index] = _merge(merged_list[index], item)
            else:
                merged_list.append(item)
        return merged_list
    return patch


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize directory` prints, for the features used here."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - _KUSTOMIZATION_KEYS
    assert not unknown, f"{directory}: the test's renderer does not know {unknown}"
    assert kustomization["kind"] == "Kustomization"
    documents: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = (directory / resource).resolve()
        if path.is_dir():
            documents += render(path)
        else:
            documents += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    identities = [_identity(doc) for doc in documents]
    assert len(set(identities)) == len(identities), f"{directory}: an object twice"
    for entry in kustomization.get("patches", []):
        assert set(entry) == {"path"}, f"{directory}: only patches by path are rendered here"
        for patch in yaml.safe_load_all((directory / entry["path"]).read_text()):
            target = identities.index(_identity(patch))  # a patch of nothing fails
            documents[target] = _merge(documents[target], patch)
    return documents


def _overlay(mode: str) -> Path:
    return K8S / "overlays" / mode


@functools.cache
def _rendered(mode: str) -> list[dict[str, Any]]:
    return render(_overlay(mode))


def _manifests(mode: str = "hybrid") -> list[dict[str, Any]]:
    """The overlay of ``mode``, rendered (a copy: tests may change it)."""
    return copy.deepcopy(_rendered(mode))


def _by_kind(kind: str, mode: str = "hybrid") -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in _manifests(mode) if doc["kind"] == kind}


def _workloads(mode: str = "hybrid") -> dict[str, dict[str, Any]]:
    return {**_by_kind("Deployment", mode), **_by_kind("StatefulSet", mode)}


def _containers(workload: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    containers: list[dict[str, Any]] = workload["spec"]["template"]["spec"]["containers"]
    return {container["name"]: container for container in containers}


def _container_ports_by_name(container: Mapping[str, Any]) -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in container.get("ports", [])}


def _env(container: Mapping[str, Any]) -> dict[str, str]:
    """The container's environment as kubelet builds it (fieldRefs and Secrets stood in)."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        source = item.get("valueFrom", {})
        if "value" in item:
            env[item["name"]] = _expand(item["value"], env)  # earlier variables only
        elif "fieldRef" in source:
            env[item["name"]] = _FIELD_REFS[source["fieldRef"]["fieldPath"]]
        else:
            assert "secretKeyRef" in source, item
            env[item["name"]] = _SECRET
    return env


def _expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: a defined variable is replaced, $$ is a literal $."""

    def substitute(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        return env.get(match[1], match[0])

    return re.sub(r"\$\$|\$\((\w+)\)", substitute, text)


def _argv(container: Mapping[str, Any]) -> list[str]:
    env = _env(container)
    for word in [*container.get("command", []), *container.get("args", [])]:
        for name in re.findall(r"\$\((\w+)\)", word):
            assert name in env, f"{container['name']}: $({name}) is not defined, kept as is"
    return [_expand(word, env) for word in [*container.get("command", []), *container["args"]]]


def _port_of(port: int | str, container: Mapping[str, Any]) -> int:
    return _container_ports_by_name(container)[port] if isinstance(port, str) else port


def _app_settings(mode: str, monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    app = _containers(_workloads(mode)["app"])["app"]
    argv = _argv(app)
    assert argv[:3] == ["python", "-m", "demo_app"]
    for key, value in _env(app).items():
        monkeypatch.setenv(key, value)  # parse_args reads REDIS_URL and the keys from there
    return parse_demo_app_args(argv[3:])


def _balancer_settings(mode: str) -> Settings:
    balancer = _containers(_workloads(mode)["balancer"])["balancer"]
    argv = _argv(balancer)
    assert argv[:3] == ["python", "-m", "balancer"]
    return load_settings(argv[3:], environ=_env(balancer))


def test_k8s_has_every_piece() -> None:
    kinds = {(doc["kind"], doc["metadata"]["name"]) for doc in _manifests()}
    assert kinds == {
        ("ConfigMap", "redis-scripts"),
        ("StatefulSet", "redis"),
        ("Service", "redis"),
        ("NetworkPolicy", "redis"),
        ("PodDisruptionBudget", "redis"),
        ("Deployment", "app"),
        ("HorizontalPodAutoscaler", "app"),
        ("PodDisruptionBudget", "app"),
        ("Service", "app"),
        ("Deployment", "balancer"),
        ("Service", "balancer"),
        ("PodDisruptionBudget", "balancer"),
    }
    assert _workloads()["balancer"]["spec"]["replicas"] == 2
    # The HorizontalPodAutoscaler owns the app's count: an apply must not reset it.
    assert "replicas" not in _workloads()["app"]["spec"]


@pytest.mark.parametrize("where", ["base", "overlays/sticky", "overlays/shared", "overlays/hybrid"])
def test_k8s_manifests_validate_against_the_schemas(where: str) -> None:
    documents = render(K8S / where)
    assert documents
    for doc in documents:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{where}: {'/'.join(_identity(doc))}: {exc.message}") from None


def test_k8s_schema_validation_catches_a_wrong_field() -> None:
    """The check above can fail: a typo in a field is an error under strict schemas."""
    app = copy.deepcopy(_workloads()["app"])
    app["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(app, K8S_VERSION, strict=True)


def _without_mode(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The documents with the values a mode sets blanked out."""
    documents = copy.deepcopy(documents)
    for doc in documents:
        if doc["kind"] == "Deployment":
            for container in doc["spec"]["template"]["spec"]["containers"]:
                for item in container.get("env", []):
                    if item["name"] in ("STORE", "MIN_REPLICAS_ACK", "BALANCER_STICKY"):
                        item["value"] = "(mode)"
    return documents


def test_k8s_overlays_change_only_the_mode() -> None:
    base = render(K8S / "base")
    assert _manifests("hybrid") == base
    for mode in MODES:
        assert _without_mode(_manifests(mode)) == _without_mode(base), mode


def test_k8s_selectors_match_their_pods() -> None:
    workloads = _workloads()
    for name, workload in workloads.items():
        selector = workload["spec"]["selector"]["matchLabels"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), name

    def selected(selector: Mapping[str, str]) -> list[dict[str, Any]]:
        return [
            workload
            for workload in workloads.values()
            if selector.items() <= workload["spec"]["template"]["metadata"]["labels"].items()
        ]

    for name, service in _by_kind("Service").items():
        pods = selected(service["spec"]["selector"])
        assert len(pods) == 1, f"Service {name} selects {len(pods)} workloads"
        named = {
            name: number
            for container in _containers(pods[0]).values()
            for name, number in _container_ports_by_name(container).items()
        }
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if isinstance(target, str):
                assert target in named, f"Service {name}: no container port named {target}"
            else:
                assert target in named.values(), f"Service {name}: no container port {target}"
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for name, doc in _by_kind(kind).items():
            field = "selector" if kind == "PodDisruptionBudget" else "podSelector"
            assert len(selected(doc["spec"][field]["matchLabels"])) == 1, (kind, name)
    # The Redis network policy lets in every pod of the stack: the apps and the balancers.
    policy = _by_kind("NetworkPolicy")["redis"]["spec"]["ingress"][0]["from"][0]["podSelector"]
    for workload in workloads.values():
        assert (
            policy["matchLabels"].items()
            <= workload["spec"]["template"]["metadata"]["labels"].items()
        )
    target = _by_kind("HorizontalPodAutoscaler")["app"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "app")
    assert "cpu" in _containers(workloads["app"])["app"]["resources"]["requests"]


def test_k8s_probes_exist_in_the_app() -> None:
    app = _containers(_workloads()["app"])["app"]
    routes = {
        getattr(route, "path", None) for route in create_app(AppSettings(instance_id="t")).routes
    }
    assert app["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert app["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for workload in _workloads().values():
        for container in _containers(workload).values():
            ports = set(_container_ports_by_name(container).values())
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe not in container:
                    continue
                action = container[probe]
                if "httpGet" in action and container is app:
                    assert action["httpGet"]["path"] in routes
                for kind in ("httpGet", "tcpSocket"):
                    if kind in action:
                        assert _port_of(action[kind]["port"], container) in ports, probe
            assert "readinessProbe" in container
            assert "livenessProbe" in container


@pytest.mark.parametrize("mode", MODES)
def test_k8s_args_parse_and_ports_agree(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    workloads = _workloads(mode)
    app = _containers(workloads["app"])["app"]
    args = _app_settings(mode, monkeypatch)
    assert args.host == "0.0.0.0"
    assert args.store == STORE_OF_MODE[mode]
    assert _container_ports_by_name(app)["http"] == args.port
    # It registers where the balancers look, at an address they can reach: its pod IP.
    assert args.registry == args.redis_url == _env(app)["REDIS_URL"]
    assert args.advertise == f"http://{_FIELD_REFS['status.podIP']}:{args.port}"
    assert args.instance_id == _FIELD_REFS["metadata.name"]
    # Session writes wait for a replica wherever sessions are in Redis.
    assert args.min_replicas_ack == (0 if mode == "sticky" else 1)
    assert args.min_replicas_ack < workloads["redis"]["spec"]["replicas"]

    balancer = _containers(workloads["balancer"])["balancer"]
    settings = _balancer_settings(mode)
    assert _container_ports_by_name(balancer)["http"] == settings.listen.port
    assert settings.admin is not None
    assert settings.admin.is_loopback
    assert settings.health_path == "/readyz"
    assert settings.sticky == Sticky.parse(STICKY_OF_MODE[mode])
    assert settings.affinity_secrets == (_SECRET,)  # from the Secret, the same in each replica
    assert settings.backends == ()
    assert settings.discover is not None
    assert settings.discover.redis_url == args.registry
    assert settings.discover.service == args.service

    # The Sentinel URL names every sentinel of the Redis StatefulSet by its stable DNS name
    # <pod>.<headless service>, on the sentinel port, and the master the sentinels monitor.
    redis_set = workloads["redis"]
    headless = _by_kind("Service", mode)[redis_set["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    sentinel = _containers(redis_set)["sentinel"]
    sentinel_port = _container_ports_by_name(sentinel)["sentinel"]
    assert sentinel_port in {port["port"] for port in headless["spec"]["ports"]}
    hosts = ",".join(
        f"redis-{n}.{headless['metadata']['name']}:{sentinel_port}"
        for n in range(redis_set["spec"]["replicas"])
    )
    assert args.redis_url == f"redis+sentinel://{hosts}/mymaster/0"
    scripts = _by_kind("ConfigMap", mode)["redis-scripts"]["data"]
    assert f"port {sentinel_port}\n" in scripts["sentinel.sh"]
    assert "sentinel monitor mymaster ${primary:-redis-0.redis} 6379 2" in scripts["sentinel.sh"]
    assert _container_ports_by_name(_containers(redis_set)["redis"])["redis"] == 6379


def test_k8s_redis_scripts_are_valid_shell() -> None:
    scripts = _by_kind("ConfigMap")["redis-scripts"]["data"]
    for name, script in scripts.items():
        done = subprocess.run(
            ["sh", "-n"], input=script, capture_output=True, text=True, timeout=10, check=False
        )
        assert done.returncode == 0, f"{name}: {done.stderr}"
    mounted = {
        name: container["command"] for name, container in _containers(_workloads()["redis"]).items()
    }
    assert mounted == {
        "redis": ["sh", "/scripts/redis.sh"],
        "sentinel": ["sh", "/scripts/sentinel.sh"],
    }


def _pre_stop(container: Mapping[str, Any]) -> list[str]:
    command: list[str] = container["lifecycle"]["preStop"]["exec"]["command"]
    return command


def test_k8s_shutdown_fits_in_the_grace_period(monkeypatch: pytest.MonkeyPatch) -> None:
    workloads = _workloads()
    balancer_pod = workloads["balancer"]["spec"]["template"]["spec"]
    settings = _balancer_settings("hybrid")
    sleep = float(_pre_stop(_containers(workloads["balancer"])["balancer"])[1])
    assert sleep + settings.shutdown_deadline < balancer_pod["terminationGracePeriodSeconds"]
    # The app's preStop waits for the balancers to see it leave (a registry read) and to
    # end its drain (--drain-deadline at the latest, ended at a drain watch's tick: 0.25 s),
    # then SIGTERM makes uvicorn finish in at most 10 s (demo_app.__main__:
    # timeout_graceful_shutdown).
    app_pod = workloads["app"]["spec"]["template"]["spec"]
    command = _pre_stop(_containers(workloads["app"])["app"])
    assert command[:2] == ["sh", "-c"]
    leave = re.fullmatch(r"kill -USR1 1 && sleep (\d+)", command[2])
    assert leave is not None, command
    wait = float(leave[1])
    assert wait >= settings.discover_interval + settings.drain_deadline + 1
    assert wait + 10 < app_pod["terminationGracePeriodSeconds"]
    # SIGUSR1 is handled only by the registration: the app must register.
    assert _app_settings("hybrid", monkeypatch).registry


def test_k8s_app_pre_stop_leaves_before_sigterm_stops(redis_server: RedisServer) -> None:
    """The app's preStop command, run for real: the balancer stops routing to the app while
    it still serves; then SIGTERM stops it cleanly."""
    app_port = free_port()
    service = f"prestop{app_port}"
    argv = [sys.executable, "-m", "demo_app", "--port", str(app_port), "--instance-id", "a1"]
    argv += ["--registry", redis_server.url, "--service", service, "--log-level", "warning"]
    app = Process(argv, f"http://127.0.0.1:{app_port}")
    discover = discover_url(redis_server.url, service)
    try:
        # The app starts while the balancer does; it registers once ready. The hook's wait
        # is the manifest's --drain-deadline + 2; here the drain lasts 1 s at most.
        drain = ("--drain-idle", "1", "--drain-deadline", "1")
        flags = ("--discover", discover, "--discover-interval", "0.5", *drain)
        with balancer_process([], *flags) as running:
            admin = running[1]
            assert admin is not None
            app.wait_ready("/readyz")

            def backends() -> list[str]:
                listed = httpx.get(admin + "/backends", timeout=2).json()["backends"]
                return [backend["url"] for backend in listed]

            wait_for(lambda: backends() == [app.url], 15, "the balancer to discover the app")
            command = _pre_stop(_containers(_workloads()["app"])["app"])
            # `1` is the app's PID in its container; here it is this process's child.
            script = command[2].replace("kill -USR1 1 ", f"kill -USR1 {app.popen.pid} ")
            script = re.sub(r"sleep \d+$", "sleep 3", script)
            subprocess.run([*command[:2], script], check=True, timeout=30)
            assert backends() == [], "the balancer still routes to the app after its preStop"
            assert httpx.get(app.url + "/healthz", timeout=2).status_code == 200
            assert app.terminate() == 0
    finally:
        app.terminate()


# The Redis pods' start scripts, run here by the image's shell with stand-ins for redis-cli
# (it answers what a test says the sentinels know), redis-server (it records its arguments)
# and sleep: the role each pod takes, and what its Sentinel monitors.
_STUB_REDIS_CLI = """#!/bin/sh
n=$(cat "$STUB/calls" 2>/dev/null || echo 0); n=$((n + 1)); echo "$n" > "$STUB/calls"
answer=$(sed -n "${n}p" "$STUB/answers")
if [ -z "$answer" ] || [ "$answer" = "-" ]; then exit 1; fi
printf '%s\\n6379\\n' "$answer"
"""
_STUB_REDIS_SERVER = """#!/bin/sh
printf '%s\\n' "$@" > "$STUB/server-args"
"""


def _run_redis_script(name: str, pod: str, answers: list[str], tmp_path: Path) -> list[str]:
    """Run the ConfigMap's script ``name`` as pod ``pod``; the redis-server arguments.

    ``answers``: what each successive sentinel query returns ("-": no sentinel answered).
    """
    stub = tmp_path / "stub"
    stub.mkdir()
    for program, text in (
        ("redis-cli", _STUB_REDIS_CLI),
        ("redis-server", _STUB_REDIS_SERVER),
        ("sleep", "#!/bin/sh\n"),
    ):
        (stub / program).write_text(text)
        (stub / program).chmod(0o755)
    (stub / "answers").write_text("".join(f"{answer}\n" for answer in answers))
    scripts = _by_kind("ConfigMap")["redis-scripts"]["data"]
    for script_name, script in scripts.items():
        # The pod's mounts (/scripts, /sentinel) are directories of this test.
        local = script.replace("/scripts/", f"{tmp_path}/").replace("/sentinel/", f"{tmp_path}/")
        (tmp_path / script_name).write_text(local)
    env = {"PATH": f"{stub}{os.pathsep}{os.environ['PATH']}", "POD_NAME": pod, "STUB": str(stub)}
    done = subprocess.run(
        ["sh", str(tmp_path / name)],
        env=env,
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return (stub / "server-args").read_text().splitlines()


@pytest.mark.parametrize(
    ("pod", "answers", "primary"),
    [
        ("redis-0", ["-", "-", "-"], None),  # first start: redis-0 is the primary
        ("redis-1", ["-", "-", "-"], "redis-0.redis"),  # ... and the others its replicas
        ("redis-0", ["-", "redis-2.redis"], "redis-2.redis"),  # after a failover
        # A restarted primary that the sentinels still name waits for their failover.
        ("redis-0", ["redis-0.redis", "redis-0.redis", "redis-1.redis"], "redis-1.redis"),
    ],
)
def test_k8s_redis_pod_takes_its_role(
    pod: str, answers: list[str], primary: str | None, tmp_path: Path
) -> None:
    args = _run_redis_script("redis.sh", pod, answers, tmp_path)
    assert args[:7] == ["--port", "6379", "--save", "", "--appendonly", "no", "--dir"]
    assert args[args.index("--replica-announce-ip") + 1] == f"{pod}.redis"
    if primary is None:
        assert "--replicaof" not in args
    else:
        assert args[args.index("--replicaof") :] == ["--replicaof", primary, "6379"]


@pytest.mark.parametrize(
    ("answers", "monitored"),
    [(["-", "-", "-"], "redis-0.redis"), (["redis-1.redis"], "redis-1.redis")],
)
def test_k8s_sentinel_monitors_the_current_primary(
    answers: list[str], monitored: str, tmp_path: Path
) -> None:
    args = _run_redis_script("sentinel.sh", "redis-2", answers, tmp_path)
    assert args == [str(tmp_path / "sentinel.conf"), "--sentinel"]
    config = (tmp_path / "sentinel.conf").read_text().splitlines()
    assert f"sentinel monitor mymaster {monitored} 6379 2" in config
    assert "sentinel announce-ip redis-2.redis" in config
    assert "port 26379" in config
