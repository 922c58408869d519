"""``python -m demo_app.compare``: the same workload against the stack in each mode, with a kill.

For each mode: Redis (``REDIS_URL``, else one started here), N demo_app instances with the
mode's store and the balancer with the mode's stickiness, all real processes on free ports
of 127.0.0.1. ``--users`` simulated users (each its own cookie jar, see `demo_app._workload`)
send ``--requests`` requests each, in rounds: in every round each user sends one request,
at most ``--concurrency`` at a time. Halfway through round ``requests // 3``, while requests
are in flight, the ``--kill`` instances that the most users were last served by get SIGKILL;
after round ``2 * requests // 3`` they are started again on the same ports. Then the stack
stops. Every count is bounded, every request has a timeout, and ``--deadline`` bounds a mode.

With ``--balancers N`` the stack has N balancer replicas (the same backends, the same
affinity secret, nothing else shared) and the users are spread over them; with
``--kill-balancer`` the first replica gets SIGKILL halfway through round ``requests // 2``
and stays down. A user whose request cannot connect sends it to the next replica (at most
once per replica; nothing was sent, so it cannot apply twice); a request cut while in
flight is a failed request, as with an instance.

What is measured, per mode:

- ``requests``, ``failed_requests``: sent, and failed (a transport error or a status other
  than 200, after the balancer's own retries).
- ``sessions``, ``sessions_lost``: users, and users whose session a reply showed lost or
  corrupted at least once (a counter that went back, a cart that lost an item).
  ``sessions_on_killed``: users last served by a killed instance when it was killed;
  ``sessions_lost_elsewhere``: lost sessions of the other users.
- ``repins``: the balancer's ``balancer_repins_total`` from its /metrics (pinned clients
  moved to another instance; 0 without pins, in ``shared``). ``instance_changes``: how often
  a user's reply came from another instance than its previous one.
- Redis, from ``INFO commandstats`` after the stack is ready and after the last round
  (Redis counts the commands a Lua script runs in these stats, like any other):
  ``redis_commands`` every command executed, script-internal ones included, but not our own
  INFO nor connection handshakes (HELLO); ``redis_round_trips`` the session store's calls
  (EVALSHA: one per load, save or destroy); ``redis_version_checks`` the load script's runs
  (its one HGET of the version);
  ``redis_reads`` full session loads: HGETALL, which only the load script issues, and only
  when the caller holds no current copy. A hybrid instance on a single Redis serves its
  pinned clients from memory and, while Redis client tracking vouches for its copy, makes no
  round trip for a read; the first read after a write checks the version once, and it reads
  the session in full only after a failover. ``redis_round_trips_per_request``: round trips
  over requests. The /readyz health checks and the tracking connections add PINGs.
- ``reads``: with ``--reads N``, each user reads its session N times after each write (a
  read that shows less than the user wrote is a loss, as for a write).
- ``balancers``, ``balancer_killed``; ``balancer_switches``: requests sent again to another
  replica after a connect error; ``users_switched``: users that moved at least once.
  ``repins`` is then the sum over the replicas still running at the end.
- ``p50_ms``, ``p99_ms``: latency of the successful requests, as the client saw it.
- ``sessions_per_instance``: where each session was created; ``requests_per_instance``.

Output: a table in the terminal (with a progress bar while it runs), ``--json`` for
machines, ``--plot`` a PNG chart. Exits 2 on bad arguments (naming the flag), 1 if a stack
could not start.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import os
import secrets
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx

from redis_plumbing import RedisServerError, free_port, redis_client, running_redis

from ._workload import Step, User
from .stack import MODES, balancer_command, instance_command

__all__ = ["MODES", "main", "parse_args", "run_comparison", "run_mode"]

READY_TIMEOUT = 30.0  # seconds for an instance or the balancer to come up
HEALTH_INTERVAL = "0.5"  # seconds between the balancer's checks: a restart is seen quickly

Report = dict[str, Any]
Advance = Callable[[int], None]
Say = Callable[[str], None]


class StackError(RuntimeError):
    """A process of the stack did not start (its log's tail is in the message)."""


# -- the stack: N instances and a balancer, as child processes -------------------------------


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


class _Child:
    """One process of the stack, its output in a log file."""

    def __init__(
        self, args: list[str], url: str, log: Path, env: dict[str, str] | None = None
    ) -> None:
        self.args, self.url, self.log = args, url, log
        self.env = env
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = None if self.env is None else {**os.environ, **self.env}
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                self.args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env
            )

    def wait_until(self, ready: Callable[[], bool], what: str) -> None:
        """Poll ``ready`` until it holds; raise `StackError` on exit or after READY_TIMEOUT."""
        deadline = time.monotonic() + READY_TIMEOUT
        while not ready():
            assert self.popen is not None
            if self.popen.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-1500:]
                raise StackError(f"{what} did not come up ({self.args[2]}):\n{tail}")
            time.sleep(0.05)  # poll interval of a readiness wait

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait()

    def terminate(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()

    def stop(self) -> None:
        """SIGTERM (unless sent already), then SIGKILL if it is still there after 15 s."""
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.terminate()
        try:
            self.popen.wait(15)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


class Stack:
    """N demo_app instances (``app1``...) and the balancer replicas in front, for one mode.

    `start` returns once every instance answers /readyz and every balancer forwards; `kill`
    SIGKILLs an instance; `restart` starts it again on the same port and returns once every
    running balancer sees it up; `kill_balancer` SIGKILLs a replica; `stop` ends everything.
    Raises `StackError` when a process does not come up within READY_TIMEOUT seconds.
    """

    def __init__(
        self, mode: str, instances: int, redis_url: str, logs: Path, *, balancers: int = 1
    ) -> None:
        self.mode = mode
        self.apps: dict[str, _Child] = {}
        for index in range(1, instances + 1):
            name, port = f"app{index}", free_port()
            args = instance_command(mode, redis_url, host="127.0.0.1", port=port, name=name)
            self.apps[name] = _Child(args, f"http://127.0.0.1:{port}", logs / f"{name}.log")
        # The replicas agree on every pin because they share the affinity secret (in the
        # environment: a command line shows in `ps`); they share nothing else.
        env = {"BALANCER_AFFINITY_SECRETS": secrets.token_urlsafe(32)}
        self.balancers: list[_Child] = []
        self.admin_urls: list[str] = []
        for index in range(1, balancers + 1):
            port, admin_port = free_port(), free_port()
            options = ["--health-interval", HEALTH_INTERVAL, "--health-timeout", HEALTH_INTERVAL]
            # A killed instance is passively ejected (30 s by default): let the restarted
            # one back in as soon as its health checks pass, within the run.
            options += ["--ejection-time", "1"]
            args = balancer_command(
                mode,
                redis_url,
                listen=f"127.0.0.1:{port}",
                admin=f"127.0.0.1:{admin_port}",
                backends=[app.url for app in self.apps.values()],
                options=options,
            )
            log = logs / ("balancer.log" if balancers == 1 else f"balancer{index}.log")
            self.balancers.append(_Child(args, f"http://127.0.0.1:{port}", log, env))
            self.admin_urls.append(f"http://127.0.0.1:{admin_port}")

    @property
    def url(self) -> str:
        """The first balancer replica's URL."""
        return self.balancers[0].url

    @property
    def urls(self) -> list[str]:
        """Every balancer replica's URL, killed ones included."""
        return [balancer.url for balancer in self.balancers]

    def _running(self) -> list[tuple[_Child, str]]:
        return [
            (balancer, admin)
            for balancer, admin in zip(self.balancers, self.admin_urls, strict=True)
            if balancer.popen is not None and balancer.popen.poll() is None
        ]

    def start(self) -> None:
        # All at once (startup is mostly imports): the balancer's own health checks
        # decide when it sees every instance up.
        for app in self.apps.values():
            app.start()
        for balancer in self.balancers:
            balancer.start()
        for name, app in self.apps.items():
            app.wait_until(functools.partial(_answers, app.url + "/readyz"), name)
        for balancer, admin in zip(self.balancers, self.admin_urls, strict=True):
            what = f"the balancer at {balancer.url}"
            balancer.wait_until(functools.partial(_all_up, admin), what)
            balancer.wait_until(functools.partial(_answers, balancer.url + "/healthz"), what)

    def kill(self, name: str) -> None:
        self.apps[name].kill()

    def restart(self, name: str) -> None:
        app = self.apps[name]
        app.start()
        app.wait_until(functools.partial(_answers, app.url + "/readyz"), name)
        for balancer, admin in self._running():
            balancer.wait_until(functools.partial(_all_up, admin, app.url), f"{name} in the pool")

    def kill_balancer(self, index: int) -> None:
        self.balancers[index].kill()

    def repins(self) -> int | None:
        """``balancer_repins_total`` summed over the running replicas, or None if one lacks it."""
        total = 0
        for _, admin in self._running():
            try:
                text = httpx.get(admin + "/metrics", timeout=2.0).text
            except httpx.HTTPError:
                return None
            found = [
                line for line in text.splitlines() if line.startswith("balancer_repins_total ")
            ]
            if not found:
                return None
            total += int(float(found[0].split()[1]))
        return total

    def stop(self) -> None:
        for balancer in self.balancers:
            balancer.stop()  # first: no request reaches an instance that is stopping
        for app in self.apps.values():
            app.terminate()  # all at once: each waits for its own graceful shutdown
        for app in self.apps.values():
            app.stop()


def _all_up(admin_url: str, url: str | None = None) -> bool:
    """Whether a balancer's admin API shows all its backends (or the one at ``url``) up."""
    try:
        backends = httpx.get(admin_url + "/backends", timeout=1.0).json()["backends"]
    except (httpx.HTTPError, ValueError, KeyError):
        return False
    return {b["state"] for b in backends if url is None or b["url"] == url} == {"up"}


# -- Redis counters --------------------------------------------------------------------------


def _commandstats(redis_url: str) -> Counter[str]:
    """INFO commandstats of the Redis at ``redis_url``, through `redis_plumbing.redis_client`
    (any topology; on a cluster, of the one node its INFO reaches)."""

    async def read() -> dict[str, dict[str, Any]]:
        client = redis_client(redis_url)
        try:
            stats: dict[str, dict[str, Any]] = await client.info("commandstats")
            return stats
        finally:
            await client.aclose()

    stats = asyncio.run(read())
    return Counter(
        {name.removeprefix("cmdstat_"): int(entry["calls"]) for name, entry in stats.items()}
    )


def _redis_counts(before: Counter[str], after: Counter[str]) -> dict[str, int]:
    """The Redis measures of the module docstring, from two INFO commandstats snapshots."""
    delta = after - before
    # Our own measuring (INFO), and connection handshakes (HELLO, which redis-py 8 sends on
    # every connect and reconnect, our measuring client's included): not session traffic.
    for command in ("info", "hello"):
        del delta[command]
    return {
        "redis_commands": sum(delta.values()),
        "redis_round_trips": delta["evalsha"] + delta["eval"],
        "redis_version_checks": delta["hget"],
        "redis_reads": delta["hgetall"],
    }


# -- one mode --------------------------------------------------------------------------------


def _percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile; 0.0 for no values."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def _busiest(users: Sequence[User], count: int) -> list[str]:
    """The ``count`` instances that the most users were last served by."""
    served = Counter(user.last_instance for user in users if user.last_instance is not None)
    return [name for name, _ in served.most_common(count)]


def run_mode(
    mode: str,
    *,
    users: int,
    requests: int,
    kill: int,
    instances: int = 3,
    concurrency: int = 16,
    deadline: float = 300.0,
    balancers: int = 1,
    kill_balancer: bool = False,
    reads: int = 0,
    advance: Advance = lambda n: None,
    say: Say = lambda line: None,
) -> Report:
    """Run the workload against a fresh stack in ``mode``; the report of the module docstring.

    ``advance(n)`` is called as requests complete (for a progress bar), ``say(line)`` with
    each balancer's dashboard URL once the stack is up, to watch the run live. Raises `StackError`
    if the stack does not start, `RedisServerError` if no Redis can be started, ValueError
    for ``kill_balancer`` with fewer than two ``balancers``.
    """
    if kill_balancer and balancers < 2:
        raise ValueError("kill_balancer needs at least two balancers: it would leave none")
    with ExitStack() as stack_exit:
        redis_url = stack_exit.enter_context(running_redis())
        logs = Path(stack_exit.enter_context(tempfile.TemporaryDirectory(prefix="compare-")))
        stack = Stack(mode, instances, redis_url, logs, balancers=balancers)
        stack_exit.callback(stack.stop)
        stack.start()
        for admin in stack.admin_urls:
            say(f"{mode}: the balancer's live dashboard is at {admin}/")
        before = _commandstats(redis_url)
        # One TLS context for every client: building one costs ~0.1 s, and none is used.
        tls = ssl.create_default_context()
        people = [User(index, stack.urls, tls=tls) for index in range(users)]
        for user in people:
            stack_exit.callback(user.close)
        steps: list[Step] = []
        killed: list[str] = []
        on_killed: set[int] = set()
        kill_round = requests // 3 if kill else -1
        restart_round = 2 * requests // 3 if kill else -1
        balancer_round = requests // 2 if kill_balancer else -1
        balancer_killed = False
        stop_at = time.monotonic() + deadline
        completed_rounds = 0
        with ThreadPoolExecutor(max_workers=min(concurrency, users)) as pool:
            for n in range(requests):
                if time.monotonic() > stop_at:
                    break
                futures = [pool.submit(_turn, user, n, reads) for user in people]
                for done, future in enumerate(as_completed(futures), start=1):
                    turn = future.result()
                    steps.extend(turn)
                    advance(len(turn))
                    if n == kill_round and not killed and done >= len(futures) // 2:
                        # Mid-round: the other half of this round is in flight or queued.
                        killed = _busiest(people, kill)
                        on_killed = {u.index for u in people if u.last_instance in killed}
                        for name in killed:
                            stack.kill(name)
                    if n == balancer_round and not balancer_killed and done >= len(futures) // 2:
                        balancer_killed = True
                        stack.kill_balancer(0)
                completed_rounds += 1
                if n == restart_round:
                    for name in killed:
                        stack.restart(name)
        after = _commandstats(redis_url)
        repins = stack.repins()
        latencies = sorted(step.latency * 1000 for step in steps if step.ok)
        lost = {user.index for user in people if user.lost}
        redis = _redis_counts(before, after)
        return {
            "requests": len(steps),
            "reads": reads * len(people) * completed_rounds,
            "failed_requests": sum(not step.ok for step in steps),
            "sessions": users,
            "sessions_lost": len(lost),
            "sessions_on_killed": len(on_killed),
            "sessions_lost_elsewhere": len(lost - on_killed),
            "killed": killed,
            "repins": repins if repins is not None else sum(u.instance_changes for u in people),
            "repins_source": "balancer /metrics" if repins is not None else "instance changes",
            "instance_changes": sum(user.instance_changes for user in people),
            "balancers": balancers,
            "balancer_killed": stack.urls[0] if balancer_killed else None,
            "balancer_switches": sum(user.switches for user in people),
            "users_switched": sum(user.switches > 0 for user in people),
            **redis,
            "redis_round_trips_per_request": round(
                redis["redis_round_trips"] / max(len(steps), 1), 3
            ),
            "p50_ms": round(_percentile(latencies, 0.50), 2),
            "p99_ms": round(_percentile(latencies, 0.99), 2),
            "sessions_per_instance": dict(
                sorted(Counter(u.first_instance or "none" for u in people).items())
            ),
            "requests_per_instance": dict(
                sorted(Counter(s.instance for s in steps if s.instance).items())
            ),
            "completed": completed_rounds == requests,
        }


# -- the whole comparison, its table and its chart ---------------------------------------------


@contextmanager
def _progress(enabled: bool) -> Iterator[tuple[Callable[[str, int], Advance], Say]]:
    """A rich progress bar; yields ``(track(mode, total) -> advance, say(line))``, say
    printing above the bar (on stderr, as the bar: stdout keeps only the table)."""
    from rich.console import Console  # noqa: PLC0415 - the compare extra, only when run
    from rich.progress import Progress  # noqa: PLC0415

    if not enabled:
        yield (lambda mode, total: lambda n: None), lambda line: print(line, file=sys.stderr)
        return
    console = Console(stderr=True, highlight=False)
    with Progress(console=console, transient=False) as progress:

        def track(mode: str, total: int) -> Advance:
            task = progress.add_task(f"{mode:<7}", total=total)
            return lambda n: progress.advance(task, n)

        yield track, lambda line: console.print(line, markup=False)


def _turn(user: User, n: int, reads: int) -> list[Step]:
    """One user's turn in round ``n``: its write, then ``reads`` reads of its session."""
    return [user.step(n), *(user.read() for _ in range(reads))]


def run_comparison(args: argparse.Namespace, *, show_progress: bool = True) -> Report:
    """Every mode of ``args.modes`` in turn; ``{"modes": {mode: report}, "settings": ...}``."""
    reports: dict[str, Report] = {}
    with _progress(show_progress) as (track, say):
        for mode in args.modes:
            reports[mode] = run_mode(
                mode,
                users=args.users,
                requests=args.requests,
                kill=args.kill,
                instances=args.instances,
                concurrency=args.concurrency,
                deadline=args.deadline,
                balancers=args.balancers,
                kill_balancer=args.kill_balancer,
                reads=args.reads,
                advance=track(mode, args.users * args.requests * (1 + args.reads)),
                say=say,
            )
    keys = (
        "users", "requests", "reads", "kill", "instances", "concurrency", "balancers",
        "kill_balancer",
    )  # fmt: skip
    settings = {key: getattr(args, key) for key in keys}
    return {"modes": reports, "settings": settings}


_ROWS = (
    ("requests", "requests"),
    ("failed_requests", "failed requests"),
    ("sessions", "sessions"),
    ("sessions_lost", "sessions lost or corrupted"),
    ("sessions_on_killed", "sessions on the killed instance"),
    ("repins", "re-pins"),
    ("balancer_switches", "moves to another balancer"),
    ("redis_commands", "redis commands"),
    ("redis_round_trips", "redis round trips (EVALSHA)"),
    ("redis_round_trips_per_request", "redis round trips a request"),
    ("redis_version_checks", "redis version checks"),
    ("redis_reads", "redis reads (full loads)"),
    ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"),
    ("sessions_per_instance", "sessions per instance"),
)


def print_table(result: Report) -> None:
    from rich.console import Console  # noqa: PLC0415 - the compare extra, only when run
    from rich.table import Table  # noqa: PLC0415

    modes: dict[str, Report] = result["modes"]
    table = Table(title="sticky vs shared vs hybrid")
    table.add_column("")
    for mode in modes:
        table.add_column(mode, justify="right")
    for key, label in _ROWS:
        cells = []
        for report in modes.values():
            value = report[key]
            if isinstance(value, dict):
                value = " ".join(f"{name}:{n}" for name, n in value.items())
            cells.append(str(value))
        table.add_row(label, *cells)
    Console().print(table)


def plot(result: Report, path: Path) -> None:
    """A PNG of the comparison: losses and failures, Redis traffic, latency."""
    import matplotlib  # noqa: PLC0415 - the compare extra, only when --plot is given

    matplotlib.use("Agg")  # no display: render straight to a file
    import matplotlib.pyplot as plt  # noqa: PLC0415

    modes: dict[str, Report] = result["modes"]
    names = list(modes)
    panels = (
        ("sessions and requests", ("sessions_lost", "failed_requests", "repins")),
        ("redis", ("redis_round_trips", "redis_version_checks", "redis_reads")),
        ("latency (ms)", ("p50_ms", "p99_ms")),
    )
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4))
    for axis, (title, keys) in zip(axes, panels, strict=True):
        width = 0.8 / len(keys)
        for offset, key in enumerate(keys):
            positions = [i + offset * width for i in range(len(names))]
            axis.bar(positions, [modes[m][key] for m in names], width, label=key)
        axis.set_xticks([i + width * (len(keys) - 1) / 2 for i in range(len(names))], names)
        axis.set_title(title)
        axis.legend(fontsize="small")
    settings = result["settings"]
    figure.suptitle(
        f"{settings['users']} users x {settings['requests']} requests, "
        f"{settings['kill']} instance(s) killed of {settings['instances']}"
    )
    figure.tight_layout()
    figure.savefig(path, format="png")
    plt.close(figure)


# -- the command line ----------------------------------------------------------------------------


def _bounded(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, not {value}")
        return value

    return parse


def _modes(text: str) -> list[str]:
    modes = [mode.strip() for mode in text.split(",") if mode.strip()]
    unknown = [mode for mode in modes if mode not in MODES]
    if not modes or unknown:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(MODES)}, got {text!r}"
        )
    if len(set(modes)) != len(modes):
        raise argparse.ArgumentTypeError(f"a mode is listed twice: {text!r}")
    return modes


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"must be between 1 and 3600 seconds, not {value}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m demo_app.compare",
        description="Run one workload against the stack in each mode, kill an instance, "
        "and count what was lost.",
    )
    parser.add_argument("--modes", type=_modes, default=list(MODES), help="(all three)")
    parser.add_argument("--users", type=_bounded(1, 5000), default=200, help="(200)")
    # Half the requests add to the cart, which the app caps at 100 items.
    parser.add_argument("--requests", type=_bounded(3, 200), default=20, help="per user (20)")
    parser.add_argument("--kill", type=_bounded(0, 63), default=1, help="instances to kill (1)")
    parser.add_argument("--instances", type=_bounded(1, 64), default=3, help="(3)")
    parser.add_argument(
        "--concurrency", type=_bounded(1, 256), default=16, help="requests in flight (16)"
    )
    parser.add_argument(
        "--balancers", type=_bounded(1, 8), default=1, help="balancer replicas, users spread (1)"
    )
    parser.add_argument(
        "--kill-balancer",
        action="store_true",
        help="SIGKILL the first balancer replica halfway through (needs --balancers 2+)",
    )
    parser.add_argument(
        "--reads",
        type=_bounded(0, 50),
        default=0,
        help="reads of its session each user sends after each write (0)",
    )
    parser.add_argument("--deadline", type=_seconds, default=300.0, help="per mode (300 s)")
    parser.add_argument("--json", type=Path, help="write the report there")
    parser.add_argument("--plot", type=Path, help="draw a PNG chart there")
    args = parser.parse_args(argv)
    if args.kill >= args.instances:
        parser.error(f"--kill: {args.kill} of {args.instances} instances would leave none")
    if args.kill_balancer and args.balancers < 2:
        parser.error("--kill-balancer: needs --balancers 2 or more (it would leave none)")
    for flag in ("json", "plot"):
        path: Path | None = getattr(args, flag)
        if path is not None and not path.parent.is_dir():
            parser.error(f"--{flag}: directory {path.parent} does not exist")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        result = run_comparison(args, show_progress=sys.stderr.isatty())
    except (StackError, RedisServerError) as exc:
        print(f"compare: {exc}", file=sys.stderr)
        sys.exit(1)
    print_table(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.plot is not None:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
