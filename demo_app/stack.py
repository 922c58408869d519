"""``python -m demo_app.stack``: Redis, N demo_app instances and the balancer, one command.

The mode picks each instance's session store and the balancer's stickiness:
``sticky`` keeps sessions in instance memory behind a cookie-pinning balancer,
``shared`` keeps them in Redis behind a balancer with no affinity, ``hybrid``
keeps them in both, pinned. Redis is the one ``REDIS_URL`` names, or one the
stack starts itself. Ctrl-C (or SIGTERM, or SIGHUP when the terminal closes) stops the
balancer, the instances, then Redis: STOP_TIMEOUT seconds for all, then SIGKILL.

With ``--discover`` the instances announce themselves in the service registry (in the
same Redis) and the balancer finds them there (``--discover``) rather than from a list:
start one more instance by hand (the command is printed) and it gets traffic within a
second; stop one and it leaves the pool.

With ``--balancers N`` it starts N balancer replicas on consecutive ports from ``--port``
(admin APIs from ``--admin-port``), all with the same backend list (or the same registry)
and the same affinity secret, and nothing else shared: a session created through one is
pinned to the same instance by every other (docs/architecture.md, "Stickiness from the
first request").

With ``--autoscale`` the balancer starts the instances itself (``--spawn 1:N``, N from
``--instances``) and follows the load: more requests in flight per instance than
AUTOSCALE_TARGET for AUTOSCALE_WINDOW seconds add instances, a quiet spell drains and stops
them, one at a time (README.md, "Autoscaling"; docs/balancer.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType
from urllib.parse import urlsplit, urlunsplit

import httpx

from redis_plumbing import (
    UNAVAILABLE_ERRORS,
    RedisServerError,
    RedisURLError,
    cancellable,
    redact_url,
    redis_client,
    running_redis,
)

__all__ = [
    "MODES",
    "STICKY_OF_MODE",
    "STORE_OF_MODE",
    "autoscale_options",
    "balancer_command",
    "instance_command",
    "load_command",
    "main",
    "worker_template",
]

# The one table of modes (docs/architecture.md, "The three modes"): each instance's session
# store, and the balancer's stickiness. The compare tool uses it; compose's MODE=<mode>.env
# files and the Kubernetes overlays follow it, and tests/test_containers.py checks they agree.
STORE_OF_MODE = {"sticky": "memory", "shared": "redis", "hybrid": "hybrid"}
STICKY_OF_MODE = {"sticky": "cookie:sid", "shared": "none", "hybrid": "cookie:sid"}
MODES = tuple(STORE_OF_MODE)  # sticky, shared, hybrid: the order compare runs and shows them
READY_TIMEOUT = 20.0  # seconds for an instance to answer /readyz
# Seconds for the Redis that REDIS_URL names to answer PING, before anything starts.
REDIS_TIMEOUT = 3.0
STOP_TIMEOUT = 15.0  # seconds for every process together to stop gracefully, then SIGKILL
SERVICE = "demo"  # the service name in the registry, with --discover
# --autoscale: short enough to watch (the balancer's defaults are 4, 10 s and 30 s).
AUTOSCALE_TARGET = 4  # requests in flight per instance above which one is added
AUTOSCALE_WINDOW = 3.0  # seconds the load is averaged over
AUTOSCALE_COOLDOWN = 5.0  # seconds between two changes
AUTOSCALE_DRAIN_IDLE = 2.0  # seconds without a pinned client's request end a drain


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= value <= 64:
        raise argparse.ArgumentTypeError(f"must be between 1 and 64, not {value}")
    return value


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m demo_app.stack", description=__doc__)
    parser.add_argument("--mode", choices=sorted(MODES), default="hybrid")
    parser.add_argument("--instances", type=_positive, default=3, help="how many (3)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--base-port", type=int, default=9001, help="first instance's port")
    parser.add_argument("--port", type=int, default=8080, help="the balancer's port (8080)")
    parser.add_argument(
        "--admin-port",
        type=int,
        help="its admin API (default: the port after the balancers', 8081 for one)",
    )
    parser.add_argument(
        "--balancers",
        type=_positive,
        default=1,
        help="balancer replicas, on consecutive ports from --port and --admin-port (1)",
    )
    parser.add_argument(
        "--discover",
        action="store_true",
        help="the instances register in the service registry and the balancer discovers "
        "them: start or stop instances by hand while it runs",
    )
    parser.add_argument(
        "--autoscale",
        action="store_true",
        help="the balancer starts the instances itself, 1 to --instances of them, and adds "
        "or drains them as the load goes up and down (--spawn 1:N)",
    )
    args = parser.parse_args(argv)
    if args.autoscale:
        if args.discover or args.balancers > 1:
            flag = "--discover" if args.discover else "--balancers"
            parser.error(f"--autoscale: one balancer spawns the instances; not with {flag}")
        if args.instances < 2:
            parser.error("--autoscale: --instances is the most instances, at least 2")
    if args.admin_port is None:
        args.admin_port = args.port + args.balancers
    # With --autoscale the balancer picks free ports for the instances it starts.
    ports = range(args.base_port, args.base_port + (0 if args.autoscale else args.instances))
    if ports and (ports[0] < 1024 or ports[-1] > 65535):
        parser.error(f"--base-port: ports {ports[0]}-{ports[-1]} are out of 1024-65535")
    busy = [port for port in ports if not _port_free(args.host, port)]
    if busy:
        parser.error(f"--base-port: port(s) {busy} already in use; pick another --base-port")
    taken = set(ports)
    for flag, first in (("--port", args.port), ("--admin-port", args.admin_port)):
        for port in range(first, first + args.balancers):
            if port in taken or not 1024 <= port <= 65535 or not _port_free(args.host, port):
                parser.error(f"{flag}: port {port} is not free (or is an instance's)")
            taken.add(port)
    return args


class _Stop:
    """Set by SIGINT, SIGTERM or SIGHUP; the main loop reads it.

    The handler only stores a flag. It must take no lock: `threading.Event.set` from a
    handler deadlocks when the signal lands while the main thread holds the Event's own
    lock inside `Event.wait` (seen: a SIGTERM that never stopped the stack).
    """

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds`` (a poll interval); whether a stop was requested."""
        if not self.requested:
            time.sleep(seconds)
        return self.requested


def _wait_ready(process: subprocess.Popen[bytes], url: str, path: str = "/readyz") -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: exited with {process.returncode}")
        try:
            if httpx.get(url + path, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)  # poll interval of a readiness wait
    raise RuntimeError(f"{url}: not ready within {READY_TIMEOUT} s")


def redis_problem(url: str, within: float = REDIS_TIMEOUT) -> str | None:
    """Why the Redis at ``url`` cannot be used (no answer to PING within ``within`` seconds,
    or a URL that is not one); None when it answers. Retried until then: a Redis that is
    still starting or loading its data is waited for."""

    async def ping() -> str | None:
        try:
            client = redis_client(url, timeout=min(1.0, within))
        except RedisURLError as exc:
            return f"is not a Redis URL: {exc}"
        last = "no reply"
        try:
            async with asyncio.timeout(within):
                while True:
                    try:
                        await cancellable(client.ping())
                        return None
                    except UNAVAILABLE_ERRORS as exc:
                        last = str(exc)
                    await asyncio.sleep(0.2)  # poll interval of a readiness wait
        except TimeoutError:
            return (
                f"did not answer within {within:g} s ({last}): start it, or unset REDIS_URL "
                "and the stack starts its own"
            )
        finally:
            await client.aclose()

    return asyncio.run(ping())


def _stop_all(processes: Sequence[subprocess.Popen[bytes]], urls: Sequence[str]) -> None:
    """SIGTERM every process at once, give them STOP_TIMEOUT seconds in all (one deadline,
    not one each), then SIGKILL the late ones and say which."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + STOP_TIMEOUT
    for process, url in zip(processes, urls, strict=True):
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"{url}: did not stop within {STOP_TIMEOUT:g} s; killed", file=sys.stderr)
            process.kill()
            process.wait()


def discover_url(redis_url: str, service: str = SERVICE) -> str:
    """`redis://HOST:PORT/DB/SERVICE` for the balancer's --discover, from a Redis URL."""
    parts = urlsplit(redis_url)
    db = parts.path.strip("/") or "0"
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}/{service}", parts.query, ""))


def instance_command(
    mode: str, redis_url: str, *, host: str, port: int, name: str, discover: bool = False
) -> list[str]:
    """The command line of demo_app instance ``name`` on ``host``:``port`` in ``mode`` (its
    session store), with Redis at ``redis_url``; with ``discover`` it registers there."""
    command = [sys.executable, "-m", "demo_app", "--host", host, "--port", str(port)]
    command += ["--instance-id", name, "--store", STORE_OF_MODE[mode]]
    command += ["--redis-url", redis_url, "--log-level", "warning"]
    if discover:
        command += ["--registry", redis_url, "--service", SERVICE]
    return command


def worker_template(mode: str, redis_url: str, *, host: str) -> str:
    """The balancer's --worker-cmd for ``--spawn``: `instance_command` with ``{port}`` and
    ``app{index}`` left for the balancer to fill in (anything else's braces doubled)."""
    parts = instance_command(mode, redis_url, host=host, port=1, name="app")
    parts = [part.replace("{", "{{").replace("}", "}}") for part in parts]
    parts[parts.index("--port") + 1] = "{port}"
    parts[parts.index("--instance-id") + 1] = "app{index}"
    return shlex.join(parts)


def autoscale_options(mode: str, redis_url: str, *, host: str, most: int) -> list[str]:
    """The balancer's flags to start 1 to ``most`` instances and scale them with the load."""
    return [
        *("--spawn", f"1:{most}", "--worker-cmd", worker_template(mode, redis_url, host=host)),
        *("--autoscale-target", str(AUTOSCALE_TARGET)),
        *("--autoscale-window", str(AUTOSCALE_WINDOW)),
        *("--autoscale-cooldown", str(AUTOSCALE_COOLDOWN)),
        *("--drain-idle", str(AUTOSCALE_DRAIN_IDLE)),
    ]


def balancer_command(
    mode: str,
    redis_url: str,
    *,
    listen: str,
    admin: str,
    backends: Sequence[str] = (),
    discover: bool = False,
    options: Sequence[str] = (),
) -> list[str]:
    """The command line of a balancer in ``mode`` (its stickiness) on ``listen``, its admin
    API on ``admin`` (both ``HOST:PORT``), checking /readyz: in front of ``backends`` (URLs)
    or, with ``discover``, of the instances registered in ``redis_url``. ``options`` (more
    balancer flags) go last. Replicas differ only in ``listen`` and ``admin``."""
    command = [sys.executable, "-m", "balancer", "--listen", listen]
    command += ["--sticky", STICKY_OF_MODE[mode], "--health-path", "/readyz"]
    command += ["--admin", admin]
    # What the dashboard cannot know by itself: the mode, and the Redis to watch.
    command += ["--dashboard-mode", mode, "--dashboard-redis", redis_url]
    if discover:
        command += ["--discover", discover_url(redis_url), "--slow-start", "2"]
    if mode == "hybrid":
        # Sessions are in Redis too: a drained instance's clients may move at once (the
        # balancer's default, keep, is for state that lives only in the instance).
        command += ["--drain-sessions", "move"]
    for backend in backends:
        command += ["--backend", backend]
    return [*command, *options]


def load_command(url: str, clients: int = 12, seconds: int = 40) -> str:
    """A shell command: ``clients`` curl loops asking for a 200 ms request for ``seconds``,
    then a count of the answers by status (every one 200 when nothing failed)."""
    loop = (
        "end=$(($(date +%s)+" + str(seconds) + ")); while [ $(date +%s) -lt $end ]; do "
        f'curl -s -o /dev/null -w "%{{http_code}}\\n" "{url}/work?wait_ms=200"; done'
    )
    return f"seq {clients} | xargs -P{clients} -I{{}} sh -c '{loop}' | sort | uniq -c"


def run(args: argparse.Namespace, redis_url: str, stop: _Stop) -> int:
    store = STORE_OF_MODE[args.mode]
    processes: list[subprocess.Popen[bytes]] = []
    urls: list[str] = []
    try:
        for index in range(0 if args.autoscale else args.instances):
            port = args.base_port + index
            command = instance_command(
                args.mode,
                redis_url,
                host=args.host,
                port=port,
                name=f"app{index + 1}",
                discover=args.discover,
            )
            processes.append(subprocess.Popen(command, start_new_session=True))
            urls.append(f"http://{args.host}:{port}")
        backends = [] if args.discover else list(urls)
        for process, url in zip(processes, urls, strict=True):
            _wait_ready(process, url)
        # Every replica signs its affinity cookie with the same secret (in the environment,
        # not on a command line that `ps` shows), so each accepts the others' pins.
        env = {**os.environ, "BALANCER_AFFINITY_SECRETS": secrets.token_urlsafe(32)}
        balancer_urls = [f"http://{args.host}:{args.port + i}" for i in range(args.balancers)]
        admin_urls = [f"http://{args.host}:{args.admin_port + i}" for i in range(args.balancers)]
        options = (
            autoscale_options(args.mode, redis_url, host=args.host, most=args.instances)
            if args.autoscale
            else []
        )
        for index in reversed(range(args.balancers)):
            command = balancer_command(
                args.mode,
                redis_url,
                listen=f"{args.host}:{args.port + index}",
                admin=f"{args.host}:{args.admin_port + index}",
                backends=backends,
                discover=args.discover,
                options=options,
            )
            # The balancers are stopped first (they are first in the list): no request
            # meets a stopped instance.
            processes.insert(0, subprocess.Popen(command, start_new_session=True, env=env))
            urls.insert(0, balancer_urls[index])
        for process, admin_url in zip(processes, admin_urls, strict=False):
            _wait_ready(process, admin_url, path="/healthz")
        print(f"\ndashboard         {admin_urls[0]}/   <- open it: the cluster, live")
        print(f"\nmode {args.mode}: sessions in {store}; redis at {redis_url}")
        for balancer_url, admin_url in zip(balancer_urls, admin_urls, strict=True):
            print(f"  app (balancer)  {balancer_url}/")
            print(f"  dashboard       {admin_url}/")
            print(f"  admin API       {admin_url}/backends")
            print(f"  metrics         {admin_url}/metrics")
        for url in urls[args.balancers :]:
            print(f"  instance        {url}/")
        if args.discover:
            port = args.base_port + args.instances
            name = f"app{args.instances + 1}"
            more = instance_command(
                args.mode, redis_url, host=args.host, port=port, name=name, discover=True
            )
            more[0] = ".venv/bin/python" if more[0] == sys.executable else more[0]
            print(f"  registry        {discover_url(redis_url)}")
            print("\none more instance, by hand (it gets traffic within a second; Ctrl-C it and")
            print("it leaves the pool):")
            print("  " + " ".join(more))
        if args.autoscale:
            print(f"  instances       1 to {args.instances}, started by the balancer")
            print(
                f"\nautoscaling: more than {AUTOSCALE_TARGET} requests in flight per instance "
                f"for {AUTOSCALE_WINDOW:g} s adds instances, {AUTOSCALE_COOLDOWN:g} s apart; "
                'a quiet spell drains and stops them. Load it (README.md, "Autoscaling"):'
            )
            print(f"  {load_command(balancer_urls[0])}")
        print(f"\ntry:  curl -c jar -b jar -X POST {balancer_urls[0]}/api/counter")
        if args.balancers > 1:
            print(
                f"then: curl -c jar -b jar -X POST {balancer_urls[-1]}/api/counter  (same instance)"
            )
        print("Ctrl-C stops everything.\n", flush=True)
        while not stop.wait(0.2):
            for process, url in zip(processes, urls, strict=True):
                if process.poll() is not None:
                    print(f"{url}: exited with {process.returncode}", file=sys.stderr)
                    return 1
        return 0
    except RuntimeError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    finally:
        _stop_all(processes, urls)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    given = os.environ.get("REDIS_URL")
    # Checked before any process starts: an instance waiting on a Redis that is not there
    # only says "not ready" when READY_TIMEOUT is over, naming neither Redis nor the URL.
    problem = redis_problem(given) if given else None
    if given and problem:
        print(f"demo: Redis at REDIS_URL={redact_url(given)} {problem}", file=sys.stderr)
        sys.exit(1)
    print(f"dashboard: http://{args.host}:{args.admin_port}/ (up in a few seconds)", flush=True)
    stop = _Stop()
    # SIGHUP too: the processes it starts are in sessions of their own, so a terminal that
    # closes would reach only this one, and kill it without a word to them.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)
    try:
        with running_redis() as redis_url:
            if not os.environ.get("REDIS_URL"):
                print(f"started redis at {redis_url}")
            code = run(args, redis_url, stop)
    except RedisServerError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        code = 1
    print("stopped.")
    sys.exit(code)


if __name__ == "__main__":
    main()
