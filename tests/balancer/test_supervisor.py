"""The supervisor with real processes: `python -m balancer --spawn N` and its workers.

The helpers at the top (`cluster`, `stub_command`, `demo_app_command`) serve test_chaos too.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.helpers import free_port, wait_for

# A worker that starts in ~30 ms, for the tests of the supervisor itself: `port mode`.
# serve: 200 on every path; exit: exit 3 at once; unready: 503 on /readyz;
# exit-if:PATH: exit 3 at once if PATH exists, else serve. In every mode that serves,
# GET /sleep/MS answers after MS milliseconds (at most 2000): a request that stays in flight.
STUB_WORKER = r"""
import http.server, os, sys, time
port, mode = int(sys.argv[1]), sys.argv[2]
if mode == "exit" or mode.startswith("exit-if:") and os.path.exists(mode[8:]):
    sys.exit(3)
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path.startswith("/sleep/"):
            time.sleep(min(int(self.path[7:]), 2000) / 1000)
        status = 503 if mode == "unready" and self.path == "/readyz" else 200
        body = str(os.getpid()).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


def stub_command(mode: str = "serve") -> str:
    """A --worker-cmd running STUB_WORKER."""
    script = STUB_WORKER.replace("'", "'\"'\"'")
    return f"{sys.executable} -c '{script}' {{port}} {mode}"


def demo_app_command(store: str = "memory", redis_url: str | None = None, *extra: str) -> str:
    """A --worker-cmd running demo_app as worker w{index}."""
    command = f"{sys.executable} -m demo_app --port {{port}} --instance-id w{{index}}"
    command += f" --store {store} --log-level warning"
    if redis_url is not None:
        command += f" --redis-url {redis_url}"
    return " ".join([command, *extra])


class Cluster:
    """`python -m balancer --spawn N ...` on free ports; its log goes to a file, not a pipe
    (nobody reads a pipe during the test, and a full one would block the workers)."""

    def __init__(
        self, log: Path, spawn: int, worker_cmd: str, *extra: str, env: dict[str, str] | None
    ) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        self.log = log
        args = [sys.executable, "-m", "balancer", "--listen", f"127.0.0.1:{self.port}"]
        args += ["--admin", f"127.0.0.1:{self.admin_port}", "--spawn", str(spawn)]
        # An --app VALUE instead of a command: the uvicorn shorthand.
        args += (
            worker_cmd.split(" ", 1)
            if worker_cmd.startswith("--app ")
            else ["--worker-cmd", worker_cmd]
        )
        args += extra
        with log.open("wb") as out:
            self.popen = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )
        self._seen: set[int] = set()

    def workers(self) -> list[dict[str, Any]]:
        state: dict[str, Any] = httpx.get(self.admin + "/workers", timeout=5).json()
        workers: list[dict[str, Any]] = state["workers"]
        self._seen |= {w["pid"] for w in workers if w["pid"]}
        return workers

    def wait_workers(
        self, condition: Callable[[list[dict[str, Any]]], bool], what: str, within: float = 20
    ) -> list[dict[str, Any]]:
        """Poll GET /workers until `condition` holds; returns the workers then."""
        result: list[list[dict[str, Any]]] = []

        def check() -> bool:
            self.check_alive()
            workers = self.workers()
            result[:] = [workers]
            return condition(workers)

        wait_for(check, within, what)
        return result[0]

    def wait_ready(self, count: int, within: float = 20) -> list[dict[str, Any]]:
        return self.wait_workers(
            lambda ws: sum(w["state"] == "ready" for w in ws) == count == len(ws),
            f"{count} ready workers",
            within,
        )

    def post(self, path: str, body: object = None) -> httpx.Response:
        return httpx.post(self.admin + path, content=json.dumps(body), timeout=5)

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise AssertionError(f"the balancer exited {self.popen.returncode}:\n{self.output()}")

    def seen_pids(self) -> set[int]:
        """Every worker pid GET /workers ever showed."""
        return set(self._seen)

    def stop(self, within: float = 30) -> int:
        """SIGTERM, wait; SIGKILL (and the workers, if any are left) after `within` s."""
        if self.popen.poll() is None:
            children = _children(self.popen.pid)
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(within)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
            for child in children:
                with contextlib.suppress(psutil.Error):
                    child.kill()
        return self.popen.returncode


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def gone(pid: int) -> bool:
    """The process has exited (a zombie counts: it runs nothing, and init reaps it)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@contextlib.contextmanager
def cluster(
    tmp_path: Path,
    spawn: int,
    worker_cmd: str,
    *extra: str,
    ready: bool = True,
    env: dict[str, str] | None = None,
) -> Iterator[Cluster]:
    """A running Cluster (all `spawn` workers ready unless `ready=False`), stopped after.
    `worker_cmd` is a --worker-cmd template, or "--app MODULE:ATTR"."""
    log = tmp_path / f"balancer-{os.urandom(3).hex()}.log"
    running = Cluster(log, spawn, worker_cmd, *extra, env=env)
    try:
        wait_for(lambda: _answers(running), 20, "the balancer's admin API")
        if ready:
            running.wait_ready(spawn)
        yield running
    finally:
        running.stop()


def _answers(running: Cluster) -> bool:
    running.check_alive()
    try:
        return httpx.get(running.admin + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


# -- the tests ---------------------------------------------------------------------------------

FAST_HEALTH = ("--health-interval", "0.2", "--health-timeout", "0.2", "--health-fall", "2")


def test_spawns_ready_workers_balances_over_them_and_stops_cleanly(tmp_path: Path) -> None:
    with cluster(tmp_path, 2, demo_app_command(), "--sticky", "none") as running:
        workers = running.workers()
        pids = [w["pid"] for w in workers]
        assert [w["index"] for w in workers] == [0, 1]
        # Their own sessions: a terminal's Ctrl-C (SIGINT to the foreground group) reaches
        # the supervisor only, which stops them in order.
        assert all(os.getsid(pid) == pid for pid in pids)
        backends = httpx.get(running.admin + "/backends", timeout=5).json()["backends"]
        assert sorted(b["url"] for b in backends) == sorted(w["url"] for w in workers)
        instances = {httpx.get(running.url + "/api/session").json()["instance"] for _ in range(8)}
        assert instances == {"w0", "w1"}
        assert running.stop() == 0
    assert all(gone(pid) for pid in pids)
    log = running.output()
    assert log.index("workers_stopping") < log.index("workers_stopped")
    assert "workers_killed" not in log  # they all left on SIGTERM


def test_a_crashed_worker_leaves_the_pool_at_once_and_is_restarted(tmp_path: Path) -> None:
    with cluster(tmp_path, 2, stub_command(), "--sticky", "none") as running:
        first = running.workers()[0]
        os.kill(first["pid"], signal.SIGKILL)
        workers = running.wait_workers(
            lambda ws: ws[0]["restarts"] == 1 and ws[0]["state"] == "ready", "the restart"
        )
        assert workers[0]["pid"] != first["pid"]
        assert workers[0]["last_exit"] == -signal.SIGKILL
        backends = httpx.get(running.admin + "/backends", timeout=5).json()["backends"]
        assert first["url"] not in {b["url"] for b in backends}
        assert len(backends) == 2
    assert "worker_crashed" in running.output()


def test_a_crash_loop_is_held_reported_and_retried_on_request(tmp_path: Path) -> None:
    extra = ("--max-crashes", "3", "--restart-backoff", "0.05")
    with cluster(tmp_path, 1, stub_command("exit"), *extra, ready=False) as running:
        held = running.wait_workers(lambda ws: ws[0]["state"] == "held", "the hold")[0]
        assert (held["restarts"], held["crashes_in_a_row"], held["last_exit"]) == (2, 3, 3)
        assert "worker_held" in running.output()
        # Held means held: while a second worker goes through its own crash loop (many
        # turns of the supervisor's loop), the first is not restarted.
        assert running.post("/workers/scale", {"delta": 1}).status_code == 202
        workers = running.wait_workers(
            lambda ws: len(ws) == 2 and all(w["state"] == "held" for w in ws), "both held"
        )
        assert [w["restarts"] for w in workers] == [2, 2]
        assert running.post("/workers/restart").status_code == 202  # an operator retries them
        again = running.wait_workers(
            lambda ws: all(w["state"] == "held" and w["restarts"] == 5 for w in ws),
            "the second hold",
        )
        assert [w["crashes_in_a_row"] for w in again] == [3, 3]


def test_a_worker_never_ready_is_killed_and_counts_as_an_early_crash(tmp_path: Path) -> None:
    extra = ("--worker-ready-timeout", "0.5", "--max-crashes", "2")
    with cluster(tmp_path, 1, stub_command("unready"), *extra, ready=False) as running:
        held = running.wait_workers(lambda ws: ws[0]["state"] == "held", "the hold")[0]
        assert held["last_exit"] == -signal.SIGKILL
    assert "worker_not_ready" in running.output()


def test_a_hung_worker_is_killed_and_replaced(tmp_path: Path) -> None:
    extra = (*FAST_HEALTH, "--worker-hang-timeout", "0.3")
    with cluster(tmp_path, 1, stub_command(), "--sticky", "none", *extra) as running:
        hung = running.workers()[0]
        os.kill(hung["pid"], signal.SIGSTOP)
        workers = running.wait_workers(
            lambda ws: ws[0]["restarts"] == 1 and ws[0]["state"] == "ready", "the replacement"
        )
        assert workers[0]["last_exit"] == -signal.SIGKILL
        assert gone(hung["pid"])
        assert httpx.get(running.url + "/").text == str(workers[0]["pid"])
    assert "worker_hung" in running.output()


def test_scale_up_and_down_by_signal_and_admin_api(tmp_path: Path) -> None:
    with cluster(tmp_path, 1, stub_command(), "--sticky", "none") as running:
        running.signal(signal.SIGTTIN)
        running.wait_ready(2)
        response = running.post("/workers/scale", {"delta": 1})
        assert (response.status_code, response.json()) == (202, {"desired": 3})
        workers = running.wait_ready(3)
        assert [w["index"] for w in workers] == [0, 1, 2]
        newest = workers[2]
        running.signal(signal.SIGTTOU)  # the newest drains, then stops
        workers = running.wait_ready(2)
        assert [w["index"] for w in workers] == [0, 1]
        wait_for(lambda: gone(newest["pid"]), 10, "the newest worker to exit")
        assert running.post("/workers/scale", {"delta": -1}).status_code == 202
        running.wait_ready(1)
        refused = running.post("/workers/scale", {"delta": -1})
        assert (refused.status_code, refused.json()["reason"]) == (409, "invalid_transition")
        assert running.post("/workers/scale", {"delta": 2}).status_code == 400
        assert running.post("/workers/scale", "x").status_code == 400
        backends = httpx.get(running.admin + "/backends", timeout=5).json()["backends"]
        assert len(backends) == 1
    log = running.output()
    assert "worker_draining" in log
    assert "outcome=retired" in log
    assert "outcome=restart" not in log  # nothing scaled down was restarted


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGUSR2])
def test_a_rolling_restart_replaces_every_worker_one_at_a_time(tmp_path: Path, signum: int) -> None:
    with cluster(tmp_path, 3, stub_command(), "--sticky", "none") as running:
        before = running.workers()
        running.signal(signum)
        after = running.wait_workers(
            lambda ws: (
                len(ws) == 3
                and all(w["state"] == "ready" for w in ws)
                and not {w["pid"] for w in ws} & {w["pid"] for w in before}
            ),
            "every worker replaced",
        )
        assert [w["index"] for w in after] == [0, 1, 2]
        wait_for(lambda: "rolling_restart_done" in running.output(), 10, "the end of it")
    lines = [line.split()[2] for line in running.output().splitlines() if "worker_" in line]
    rollout = lines[lines.index("worker_replacing") :]
    # One at a time: each old worker drains and exits before the next replacement starts.
    one = ["worker_replacing", "worker_ready", "worker_draining", "worker_exited"]
    assert rollout[:12] == one * 3


def test_app_shorthand_runs_an_asgi_app_under_uvicorn(tmp_path: Path) -> None:
    (tmp_path / "tiny_asgi.py").write_text(
        "async def app(scope, receive, send):\n"
        "    if scope['type'] != 'http':\n"
        "        return\n"
        "    await send({'type': 'http.response.start', 'status': 200, 'headers': []})\n"
        "    await send({'type': 'http.response.body', 'body': b'tiny'})\n"
    )
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with cluster(tmp_path, 2, "--app tiny_asgi:app", "--sticky", "none", env=env) as running:
        assert httpx.get(running.url + "/anything").text == "tiny"


def test_a_rolling_restart_never_stops_a_worker_before_its_replacement_is_ready(
    tmp_path: Path,
) -> None:
    broken = tmp_path / "broken"  # a bad deploy: new workers exit at once
    extra = ("--sticky", "none", "--max-crashes", "2", "--restart-backoff", "0.05")
    with cluster(tmp_path, 2, stub_command(f"exit-if:{broken}"), *extra) as running:
        before = running.workers()
        broken.touch()
        running.signal(signal.SIGHUP)
        wait_for(lambda: "rolling_restart_aborted" in running.output(), 20, "the abort")
        # The old workers still serve; the held replacement was let go, not kept as a third.
        after = running.wait_workers(lambda ws: len(ws) == 2, "the replacement gone")
        assert [(w["pid"], w["state"]) for w in after] == [(w["pid"], "ready") for w in before]
        assert all(httpx.get(running.url + "/").status_code == 200 for _ in range(4))
        broken.unlink()  # the deploy is fixed: the next rolling restart goes through
        running.signal(signal.SIGHUP)
        running.wait_workers(
            lambda ws: (
                len(ws) == 2
                and all(w["state"] == "ready" for w in ws)
                and not {w["pid"] for w in ws} & {w["pid"] for w in before}
            ),
            "every worker replaced",
        )


def test_sigkill_of_the_supervisor_leaves_no_orphan(tmp_path: Path) -> None:
    with cluster(tmp_path, 2, demo_app_command()) as running:
        pids = [w["pid"] for w in running.workers()]
        running.signal(signal.SIGKILL)
        # PR_SET_PDEATHSIG: the kernel sends each worker SIGTERM when its parent dies.
        wait_for(lambda: all(gone(pid) for pid in pids), 15, "the workers to exit")


def test_sigint_stops_everything_and_exits_0(tmp_path: Path) -> None:
    with cluster(tmp_path, 1, stub_command()) as running:
        pid = running.workers()[0]["pid"]
        running.signal(signal.SIGINT)
        assert running.popen.wait(30) == 0
        assert gone(pid)


class _Load:
    """Closed-loop clients on threads, each sending GET `url` again as soon as it has its
    answer, counting answers and failures (an exception or a status other than 200)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ok = 0
        self.failed = 0
        self._lock = threading.Lock()
        self._clients: list[tuple[threading.Thread, threading.Event]] = []

    @property
    def clients(self) -> int:
        return len(self._clients)

    def add(self) -> None:
        stop = threading.Event()
        thread = threading.Thread(target=self._client, args=(stop,), daemon=True)
        thread.start()
        self._clients.append((thread, stop))

    def remove(self) -> None:
        thread, stop = self._clients.pop()
        stop.set()
        thread.join(10)

    def _client(self, stop: threading.Event) -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                try:
                    ok = client.get(self.url).status_code == 200
                except httpx.HTTPError:
                    ok = False
                with self._lock:
                    if ok:
                        self.ok += 1
                    else:
                        self.failed += 1


def test_autoscaling_follows_a_load_ramp_up_and_down_and_fails_no_request(
    tmp_path: Path,
) -> None:
    # 1 to 3 workers; more than 2 requests in flight per worker over 1 s grows them, and
    # 1 s between changes. Each request stays 100 ms in the worker: in flight = clients.
    autoscale = ("--spawn", "1:3", "--autoscale-target", "2", "--autoscale-window", "1")
    extra = (*autoscale, "--autoscale-cooldown", "1", "--drain-idle", "0.5")
    with cluster(tmp_path, 1, stub_command(), "--sticky", "none", *extra) as running:
        load = _Load(running.url + "/sleep/100")
        began = time.monotonic()
        timeline: list[tuple[float, int, int, float | None, int, int]] = []

        def sample() -> tuple[int, int]:
            """One line of the timeline; returns the ready workers and all of them."""
            state = httpx.get(running.admin + "/workers", timeout=5).json()
            backends = httpx.get(running.admin + "/backends", timeout=5).json()["backends"]
            ready: int = sum(w["state"] == "ready" for w in state["workers"])
            in_flight = sum(b["in_flight"] for b in backends)
            moment = round(time.monotonic() - began, 2)
            line = (moment, load.clients, in_flight, state["autoscale"]["load"], ready)
            timeline.append((*line, load.failed))
            return ready, len(state["workers"])

        def watch(seconds: float, until: Callable[[tuple[int, int]], bool] | None = None) -> None:
            """Sample every 0.25 s for `seconds`; with `until` (of `sample()`), until it
            holds, failing after `seconds`."""
            deadline = time.monotonic() + seconds
            while not (until is not None and until(sample())):
                if time.monotonic() >= deadline:
                    assert until is None, f"{until} did not hold within {seconds} s"
                    return
                threading.Event().wait(0.25)  # the timeline's period, not a synchronisation
                if until is None:
                    sample()

        try:
            for _ in range(8):  # ramp up: one more client every 0.5 s
                load.add()
                watch(0.5)
            watch(15, until=lambda workers: workers[0] == 3)
            grown = max(line[4] for line in timeline)
            while load.clients:  # ramp down: one client fewer every 0.25 s
                load.remove()
                watch(0.25)
            # Down one at a time, each drained then stopped: back to the minimum.
            watch(20, until=lambda workers: workers == (1, 1))
            workers = running.workers()
            # An operator's scale stays within MIN..MAX too.
            refused = running.post("/workers/scale", {"delta": -1})
            assert refused.status_code == 409
            assert "autoscaling keeps 1 to 3" in refused.json()["error"]
        finally:
            while load.clients:
                load.remove()
        print("\n  time  clients  in_flight  load/worker  ready  failed")
        for moment, clients, in_flight, per_worker, ready, failed in timeline:
            shown = "-" if per_worker is None else f"{per_worker:.2f}"
            print(f"{moment:6.2f}  {clients:7}  {in_flight:9}  {shown:>11}  {ready:5}  {failed:6}")
        print(f"requests: {load.ok} answered, {load.failed} failed")
        assert grown == 3
        assert workers[0]["index"] == 0  # the newest ones went
        assert load.failed == 0
        assert load.ok > 100
    log = running.output()
    decisions = [line for line in log.splitlines() if "autoscale_" in line]
    assert [line.split()[2] for line in decisions[:1]] == ["autoscale_up"]
    assert [line.split()[2] for line in decisions[-2:]] == ["autoscale_down"] * 2
    assert all("target=2.0" in line and "window=1.0" in line for line in decisions)  # why
    assert log.count("worker_draining") >= 2  # each scale-down drained its worker
    assert log.count("outcome=retired") >= 2
