"""Benchmark the balancer's data path against nginx and HAProxy, in one run.

    .venv/bin/python benchmarks/proxy.py [--duration 10] [--connections 64]
    .venv/bin/python benchmarks/proxy.py --one-backend --quick    # 64 clients, one hot backend
    .venv/bin/python benchmarks/proxy.py --quick --tls --http2 --features   # issue 17's tables

Backends: one nginx worker serving a short body on two ports. Each proxy runs on one core
(pinned with taskset when there is one to spare) with sticky routing by the `sid` cookie
and keep-alive to the backends; wrk (64 connections, a varied `Cookie: sid=...` per
request) loads it for a fixed time. Printed: requests/s, p50 and p99 latency, and each
ratio to nginx. Targets (docs/architecture.md, "Measured facts"): throughput >= 0.67x nginx,
p99 <= 1.5x nginx. Each round also prints every proxy's CPU time a request, user and kernel
apart: the ratios move with the machine's cost of a system call, which the kernel column
shows.

The dashboard's cost: the whole `python -m balancer --admin ...` is measured twice in one
process, once with no page open and once with a client reading the dashboard's event stream
for the whole run (warm-up included), in turn; both rows are printed, with the ticks the page
received. Compare their CPU us/req: on a shared machine it moves less than requests/s.

The shared pin table's cost: the same `python -m balancer --admin ...` with `--pin-store`
(a Redis of the benchmark's own) is measured in the same round, page closed, its order
against the process without one alternating by round. wrk sends no affinity cookie, so each
of its 1000 `sid` values is looked up in Redis once (in the warm-up), then found in the
table, as a signed pin would be: the steady state never reaches Redis. Target (issue 15):
`--pin-store` within 10% of without.

The upstream keep-alive pool: the balancer rows run with its default pool (sized by recent
demand, `--upstream-keepalive` its cap) unless `--upstream-keepalive N` is given; with
`--one-backend` every proxy has only the first backend, so all the clients' requests are
busy on one backend at once (issue 17: a fixed idle bound of 32 gave 0.51x nginx there).
`--quick` measures only the backend, nginx, HAProxy and `balancer 1 worker`.

TLS (`--tls`, issue 17), in the same run after the rounds above: nginx, HAProxy and
`python -m balancer` each terminating TLS on one core (one self-signed P-256 certificate,
TLS 1.2 and 1.3, the balancer's cipher list for TLS 1.2, keep-alive to the backends), and
`python -m balancer` without TLS for the cost of TLS on ours. Two loads each: keep-alive
requests/s (wrk over https, each connection's handshake once) and new handshakes/s (the
same with `Connection: close`: wrk opens a connection, a full handshake, for every
request; it resumes no session). Printed with the ratios to nginx and each proxy's CPU time
a request. Targets (issue 17): keep-alive >= 0.8x nginx, handshakes >= 0.7x.

HTTP/2 (`--http2`, issue 17), after: the same three proxies with the same certificate and
backends, h2 offered by ALPN (nginx `http2`, HAProxy `alpn h2,http/1.1`, the balancer's own
ALPN), loaded by h2load (Debian's nghttp2-client: `--h2-clients` 16 connections of
`--h2-streams` 10 concurrent streams, one thread, one `sid` cookie for all). Printed: the
protocol h2load negotiated (a proxy that offers no h2 gets `http/1.1`, pipelined, and no
ratio), req/s and the ratio to nginx, h2load's mean and max time a request (it prints no
percentiles) and CPU us a request.

Features (`--features`), last: `python -m balancer` alone (`--sticky cookie:sid`, two
backends) and then with one feature on a row, in the same run: `--sticky none`, TLS
keep-alive, HTTP/2 (h2load), `--access-log --log-format json` (the log to a file), weights
3 and 1, `--pin-store` (the benchmark's Redis), and behind HAProxy in `mode tcp` without and
with `send-proxy-v2` (`--proxy-protocol`; compare those two rows). Printed: req/s, the
balancer process's CPU us a request, and both against the plain row. `--quick` keeps each
`--http2` and `--features` row to at most 5 s.
Everything listens on 127.0.0.1; processes and temporary files are cleaned up.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import psutil
import redis

import balancer.datapath._proxy
from balancer._build import compiled
from redis_plumbing import RedisServer, free_port

_WRK_LUA = """
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", "/", {["Cookie"] = "sid=s" .. (n % 1000)})
end
"""

# The balancer's data path in a process of its own: argv = port, backend URLs. The real
# Router (cookie:sid, signed affinity cookie) and Metrics of `balancer`, without the admin
# app, health checks and signal handling of `python -m balancer` (measured after it). (A
# stand-in router and no-op metrics, once measured here to show the data path alone, are
# interpreted Python and cost more than the compiled real ones: benchmarks/data_path.py
# measures the data path alone, without sockets.)
_BALANCER = """
import asyncio, sys
import uvloop
from balancer import AffinityCookie, Metrics, Pool, ProxyOptions, ProxyServer, Router, Sticky
from balancer.datapath._proxy import tune_gc

async def main() -> None:
    keepalive = sys.argv[2]  # --upstream-keepalive, or "default"
    pool = Pool(sys.argv[3:])
    router = Router(pool, sticky=Sticky("cookie", "sid"),
                    affinity=AffinityCookie(secrets=["bench"]))
    kept = {} if keepalive == "default" else {"keepalive_per_backend": int(keepalive)}
    server = ProxyServer(router, Metrics(pool), ProxyOptions(**kept))
    await server.start("127.0.0.1", int(sys.argv[1]))
    tune_gc()  # as `python -m balancer` does
    await asyncio.Event().wait()

uvloop.run(main())
"""


@dataclass
class Result:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    errors: str
    requests: int = 0  # answered in the run
    cpu_us: float = float("nan")  # the proxy's CPU time per request (user + system)


R = TypeVar("R", bound=Result)

# The same with a new connection, hence a full TLS handshake, for every request.
_WRK_CLOSE_LUA = _WRK_LUA.replace(
    '"sid=s" .. (n % 1000)}', '"sid=s" .. (n % 1000), ["Connection"] = "close"}'
)


def wait_listening(port: int, process: subprocess.Popen[bytes], within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {within}s")


class Cluster:
    """The processes of one run; all are stopped on exit."""

    def __init__(self, tmp: Path, cpus: list[int]) -> None:
        self.tmp = tmp
        self.cpus = cpus
        self.processes: list[subprocess.Popen[bytes]] = []

    def pinned(self, args: list[str], cpu: int | None) -> list[str]:
        if cpu is None or shutil.which("taskset") is None:
            return args
        return ["taskset", "-c", str(cpu), *args]

    def start(
        self, args: list[str], port: int, cpu: int | None, *, log: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """`args` started (on `cpu`), returned once `port` accepts; its stderr to `log`."""
        with open(log, "ab") if log is not None else contextlib.nullcontext() as stderr:
            process = subprocess.Popen(
                self.pinned(args, cpu),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL if stderr is None else stderr,
                start_new_session=True,
            )
        self.processes.append(process)
        wait_listening(port, process)
        return process

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            self.stop(process)

    def write(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.write_text(textwrap.dedent(text))
        return path


def nginx_common(tmp: Path) -> str:
    return f"""
        daemon off;
        worker_processes 1;
        pid {tmp}/nginx-%s.pid;
        error_log {tmp}/nginx-%s-error.log warn;
        events {{ worker_connections 4096; }}
        http {{
            access_log off;
            client_body_temp_path {tmp}/body-%s;
            proxy_temp_path {tmp}/proxy-%s;
            fastcgi_temp_path {tmp}/fastcgi-%s;
            uwsgi_temp_path {tmp}/uwsgi-%s;
            scgi_temp_path {tmp}/scgi-%s;
            keepalive_requests 1000000;
    """


def backend_config(tmp: Path, ports: list[int]) -> str:
    servers = "".join(
        f"""
            server {{
                listen 127.0.0.1:{port} reuseport backlog=4096;
                location / {{ default_type text/plain; return 200 "hello from {port}\\n"; }}
            }}
        """
        for port in ports
    )
    return nginx_common(tmp).replace("%s", "backend") + servers + "}\n"


def nginx_proxy_config(tmp: Path, port: int, backends: list[int]) -> str:
    upstreams = "".join(f"server 127.0.0.1:{p};" for p in backends)
    return (
        nginx_common(tmp).replace("%s", "proxy")
        + f"""
            upstream app {{ hash $cookie_sid consistent; {upstreams} keepalive 64; }}
            server {{
                listen 127.0.0.1:{port} backlog=4096;
                location / {{
                    proxy_pass http://app;
                    proxy_http_version 1.1;
                    proxy_set_header Connection "";
                    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
                }}
            }}
        }}
        """
    )


def haproxy_config(port: int, backends: list[int]) -> str:
    servers = "\n".join(f"    server b{i} 127.0.0.1:{p}" for i, p in enumerate(backends))
    return f"""global
    nbthread 1
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
    option forwardfor
    http-reuse always
frontend in
    bind 127.0.0.1:{port}
    default_backend app
backend app
    balance hash req.cook(sid)
    hash-type consistent
{servers}
"""


def run_wrk(
    port: int,
    duration: float,
    connections: int,
    lua: Path,
    *,
    cpu: int | None,
    name: str,
    scheme: str = "http",
) -> Result:
    seconds = max(1, round(duration))  # wrk takes whole seconds
    args = [
        "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(lua),
        f"{scheme}://127.0.0.1:{port}/",
    ]  # fmt: skip
    if cpu is not None and shutil.which("taskset"):
        args = ["taskset", "-c", str(cpu), *args]
    out = subprocess.run(
        args, capture_output=True, text=True, timeout=duration + 30, check=True
    ).stdout
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if found is None:
        raise RuntimeError(f"wrk printed no Requests/sec:\n{out}")
    rps = float(found.group(1))
    errors = ""
    if match := re.search(r"Socket errors:.*|Non-2xx or 3xx responses: \d+", out):
        errors = match.group(0)
    total = re.search(r"(\d+) requests in", out)
    return Result(
        name,
        rps,
        _percentile(out, "50"),
        _percentile(out, "99"),
        errors,
        requests=int(total.group(1)) if total else 0,
    )


def _percentile(out: str, which: str) -> float:
    match = re.search(rf"^\s+{which}%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
    if match is None:
        return float("nan")
    value, unit = float(match.group(1)), match.group(2)
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def cpu_plan() -> tuple[int | None, int | None]:
    """(the proxy's core, the core of wrk and the backends), or None where not pinned."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return cpus[0], cpus[1]


@contextlib.contextmanager
def cluster() -> Iterator[Cluster]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    c = Cluster(tmp, sorted(os.sched_getaffinity(0)))
    try:
        yield c
    finally:
        c.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def cpu_seconds(process: subprocess.Popen[bytes] | None) -> tuple[float, float]:
    """(user, system) CPU seconds of `process` and its children so far (0 for None)."""
    if process is None:
        return 0.0, 0.0
    try:
        root = psutil.Process(process.pid)
        user = system = 0.0
        for proc in (root, *root.children(recursive=True)):
            times = proc.cpu_times()
            user += times.user
            system += times.system
    except psutil.Error:
        return float("nan"), float("nan")
    return user, system


class PageOpen:
    """A dashboard page, as far as the balancer can tell: a client reading its event stream
    (GET /dashboard/stream) in a thread, from `__enter__` to `__exit__`."""

    def __init__(self, admin: str) -> None:
        self.url = admin + "/dashboard/stream"
        self.ticks = 0
        self.bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)

    def _read(self) -> None:
        with httpx.stream("GET", self.url, timeout=10) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                self.bytes += len(line) + 1
                if line == "event: tick":
                    self.ticks += 1
                if self._stop.is_set():
                    return

    def __enter__(self) -> PageOpen:
        self._thread.start()
        deadline = time.monotonic() + 5
        while self.ticks == 0 and time.monotonic() < deadline:
            time.sleep(0.05)  # the first tick: the page is open
        if self.ticks == 0:
            raise RuntimeError(f"no tick from {self.url} within 5 s")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per proxy")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before each run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--rounds", type=int, default=1, help="measure every target this many times, keep the best"
    )
    parser.add_argument(
        "--upstream-keepalive", type=int, help="the balancer's cap (default: its own default)"
    )
    parser.add_argument(
        "--one-backend", action="store_true", help="every proxy gets only the first backend"
    )
    parser.add_argument(
        "--quick", action="store_true", help="only the backend, nginx, HAProxy, balancer 1 worker"
    )
    parser.add_argument(
        "--tls", action="store_true", help="then nginx, HAProxy and the balancer terminating TLS"
    )
    parser.add_argument(
        "--http2", action="store_true", help="then nginx, HAProxy and the balancer over HTTP/2"
    )
    parser.add_argument(
        "--features", action="store_true", help="then the balancer with each feature on, one a row"
    )
    parser.add_argument("--h2-clients", type=int, default=16, help="h2load's connections")
    parser.add_argument(
        "--h2-streams", type=int, default=10, help="h2load's concurrent streams a connection"
    )
    args = parser.parse_args()
    if args.upstream_keepalive is not None and args.upstream_keepalive < 0:
        parser.error("--upstream-keepalive must be at least 0")
    for flag in ("duration", "connections", "rounds", "h2_clients", "h2_streams"):
        if not getattr(args, flag) >= 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    keepalive = "default" if args.upstream_keepalive is None else str(args.upstream_keepalive)
    for tool in ("nginx", "haproxy", "wrk"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"{tool} is not installed", file=sys.stderr)
            return 2
    if args.http2 and shutil.which("h2load") is None:
        print("h2load is not installed (Debian: apt-get install nghttp2-client)", file=sys.stderr)
        return 2
    proxy_cpu, load_cpu = cpu_plan()
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    best: dict[str, Result] = {}
    redis_calls: list[str] = []  # per round: the --pin-store process's commands to Redis
    with cluster() as c, RedisServer() as pin_store:
        lua = c.write("cookies.lua", _WRK_LUA)
        backends = [free_port(), free_port()]
        conf = c.write("backend.conf", backend_config(c.tmp, backends))
        c.start([nginx, "-c", str(conf), "-p", str(c.tmp), "-e", "stderr"], backends[0], load_cpu)
        wait_listening(backends[1], c.processes[-1])
        if args.one_backend:
            backends = backends[:1]
        urls = [f"http://127.0.0.1:{p}" for p in backends]
        script = c.write("balancer_main.py", _BALANCER)

        def measure(
            name: str, port: int, proxy: subprocess.Popen[bytes] | None, admin: str | None = None
        ) -> None:
            page = PageOpen(admin) if admin else None
            with page if page is not None else contextlib.nullcontext():
                run_wrk(port, args.warmup, args.connections, lua, cpu=load_cpu, name=name)
                before = cpu_seconds(proxy)
                result = run_wrk(
                    port, args.duration, args.connections, lua, cpu=load_cpu, name=name
                )
                after = cpu_seconds(proxy)
            if page is not None:
                note = f"the page got {page.ticks} ticks, {page.bytes / 1024:,.0f} KiB"
                result.errors = "; ".join(filter(None, [result.errors, note]))
            user_us = system_us = float("nan")
            if proxy is not None and result.requests:
                # The run's CPU time over its requests: robust to a busy machine.
                user_us = (after[0] - before[0]) / result.requests * 1e6
                system_us = (after[1] - before[1]) / result.requests * 1e6
                result.cpu_us = user_us + system_us
            print(
                f"  {name}: {result.rps:,.0f} req/s, {result.cpu_us:.1f} CPU us/req "
                f"(user {user_us:.1f}, kernel {system_us:.1f})",
                file=sys.stderr,
                flush=True,
            )
            if name not in best or result.rps > best[name].rps:
                best[name] = result

        for round_ in range(args.rounds):
            measure("direct (backend)", backends[0], None)

            port = free_port()
            conf = c.write("proxy.conf", nginx_proxy_config(c.tmp, port, backends))
            nginx_args = [nginx, "-c", str(conf), "-p", str(c.tmp), "-e", "stderr"]
            p = c.start(nginx_args, port, proxy_cpu)
            measure("nginx 1 worker", port, p)
            c.stop(p)

            port = free_port()
            conf = c.write("haproxy.cfg", haproxy_config(port, backends))
            p = c.start([haproxy, "-f", str(conf)], port, proxy_cpu)
            measure("haproxy 1 thread", port, p)
            c.stop(p)

            port = free_port()
            p = c.start([sys.executable, str(script), str(port), keepalive, *urls], port, proxy_cpu)
            measure("balancer 1 worker", port, p)
            c.stop(p)
            if args.quick:
                continue

            # The whole balancer with its admin app: one process, measured with the dashboard
            # closed and open, in turn; and one with --pin-store (the order alternates by
            # round, so a drift in the machine's load does not always favour one).
            def whole(store: str | None, round_: int) -> None:
                port, admin_port = free_port(), free_port()
                command = [sys.executable, "-m", "balancer", "--listen", f"127.0.0.1:{port}"]
                command += ["--sticky", "cookie:sid"]
                if args.upstream_keepalive is not None:
                    command += ["--upstream-keepalive", str(args.upstream_keepalive)]
                command += ["--admin", f"127.0.0.1:{admin_port}"]
                if store is not None:
                    command += ["--pin-store", store]
                for url in urls:
                    command += ["--backend", url]
                p = c.start(command, port, proxy_cpu)
                admin = f"http://127.0.0.1:{admin_port}"
                wait_listening(admin_port, p)
                if store is not None:
                    measure("--pin-store", port, p)
                    with redis.Redis.from_url(store) as client:
                        stats = client.info("commandstats")
                    calls = {
                        n: stats.get(f"cmdstat_{n}", {}).get("calls", 0) for n in ("get", "set")
                    }
                    redis_calls.append(f"GET {calls['get']:,}, SET {calls['set']:,}")
                else:
                    cases = [("--admin, page closed", None), ("--admin, page open", admin)]
                    for name, page_admin in cases if round_ % 2 == 0 else cases[::-1]:
                        measure(name, port, p, page_admin)
                c.stop(p)

            stores = [None, pin_store.url]
            pin_store.restart()  # empty, its counts at 0: what this round's process asks
            for store in stores if round_ % 2 == 0 else stores[::-1]:
                whole(store, round_)

        tls: dict[str, tuple[Result, Result]] = {}
        if args.tls:
            tls = tls_rounds(
                c, args, backends, nginx=nginx, haproxy=haproxy, cpus=(proxy_cpu, load_cpu)
            )
        h2: dict[str, H2Result] = {}
        if args.http2:
            h2 = http2_rounds(
                c, args, backends, nginx=nginx, haproxy=haproxy, cpus=(proxy_cpu, load_cpu)
            )
        features: tuple[dict[str, Result], dict[str, str]] | None = None
        if args.features:
            features = features_rounds(
                c, args, backends, haproxy=haproxy, pin_store=pin_store, cpus=(proxy_cpu, load_cpu)
            )

    results = list(best.values())
    base = best["nginx 1 worker"]
    print()
    print(f"wrk -t1 -c{args.connections}, {args.duration:g}s each, best of {args.rounds}; "
          f"proxy core {proxy_cpu}, wrk and backends core {load_cpu}")  # fmt: skip
    print(f"balancer data path: {_build()}")
    backends_note = "one backend (--one-backend)" if args.one_backend else "two backends"
    print(f"{backends_note}; balancer --upstream-keepalive {keepalive}")
    print(
        "balancer 1 worker: the data path with the core's Router (cookie:sid) and Metrics; "
        "--admin: python -m balancer with its admin app, the dashboard's stream closed or open; "
        "--pin-store: the same, page closed, with the pin table shared in Redis"
    )
    print(
        f"{'target':<20} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'x nginx':>8} {'p99 x':>7}"
        f" {'CPU us/req':>11}"
    )
    for r in results:
        cpu = f"{r.cpu_us:>11.1f}" if r.cpu_us == r.cpu_us else f"{'-':>11}"
        print(
            f"{r.name:<20} {r.rps:>10,.0f} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f} "
            f"{r.rps / base.rps:>8.2f} {r.p99_ms / base.p99_ms:>7.2f} {cpu}"
            + (f"  ({r.errors})" if r.errors else "")
        )
    ours = best["balancer 1 worker"]
    ok = ours.rps >= 0.67 * base.rps and ours.p99_ms <= 1.5 * base.p99_ms
    print(f"targets (>= 0.67x nginx req/s, p99 <= 1.5x nginx): {'met' if ok else 'NOT met'}")
    if tls:
        print_tls(tls, args)
    if h2:
        print_http2(h2, args)
    if features is not None:
        print_features(*features, args)
    if args.quick:
        return 0
    shared, alone = best["--pin-store"], best["--admin, page closed"]
    ratio = shared.rps / alone.rps
    print(
        f"--pin-store: {ratio:.2f}x the req/s without, {shared.cpu_us / alone.cpu_us:.2f}x "
        f"the CPU us/req (target >= 0.90x req/s): {'met' if ratio >= 0.9 else 'NOT met'}"
    )
    print(f"--pin-store: commands Redis received, per round (warm-up included): {redis_calls}")
    return 0


def _tls_files(c: Cluster) -> tuple[Path, Path, Path]:
    """A self-signed P-256 certificate for 127.0.0.1: (cert, key, both in one file for
    HAProxy)."""
    cert, key, both = c.tmp / "tls.pem", c.tmp / "tls.key", c.tmp / "tls-both.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=bench",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    both.write_bytes(cert.read_bytes() + key.read_bytes())
    return cert, key, both


def nginx_tls_config(
    tmp: Path,
    port: int,
    backends: list[int],
    cert: Path,
    key: Path,
    *,
    http2: tuple[str, str] = ("", ""),
) -> str:
    """`nginx_proxy_config` terminating TLS (TLS 1.2 and 1.3, the balancer's TLS 1.2 ciphers);
    `http2`: what turns HTTP/2 on, `nginx_http2()`'s (a `listen` parameter, a directive)."""
    from balancer.control._tls import CIPHERS  # noqa: PLC0415 - what the balancer offers

    listen = "backlog=4096;"
    tls_listen = (
        f"ssl {http2[0]}backlog=4096; {http2[1]}ssl_certificate {cert}; ssl_certificate_key {key}; "
        f"ssl_protocols TLSv1.2 TLSv1.3; ssl_ciphers {CIPHERS}; "
        "proxy_set_header X-Forwarded-Proto https;"
    )
    return nginx_proxy_config(tmp, port, backends).replace(listen, tls_listen)


def nginx_http2(nginx: str) -> tuple[str, str]:
    """What turns HTTP/2 on in `nginx_tls_config`: the directive `http2 on;` from nginx 1.25.1
    (the `listen` parameter is deprecated there), the parameter `http2` before."""
    done = subprocess.run([nginx, "-v"], capture_output=True, text=True, timeout=10, check=True)
    found = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", done.stderr + done.stdout)
    version = tuple(int(n) for n in found.groups()) if found else (0, 0, 0)
    return ("", "http2 on; ") if version >= (1, 25, 1) else ("http2 ", "")


def haproxy_tls_config(port: int, backends: list[int], both: Path, alpn: str = "http/1.1") -> str:
    """`haproxy_config` terminating TLS as `nginx_tls_config` does, offering `alpn`."""
    from balancer.control._tls import CIPHERS  # noqa: PLC0415 - what the balancer offers

    return haproxy_config(port, backends).replace(
        f"bind 127.0.0.1:{port}",
        f"bind 127.0.0.1:{port} ssl crt {both} alpn {alpn} ssl-min-ver TLSv1.2 "
        f"ciphers {CIPHERS}\n    http-request set-header X-Forwarded-Proto https",
    )


def tls_rounds(
    c: Cluster,
    args: argparse.Namespace,
    backends: list[int],
    *,
    nginx: str,
    haproxy: str,
    cpus: tuple[int | None, int | None],
) -> dict[str, tuple[Result, Result]]:
    """`--tls`: each proxy terminating TLS, keep-alive then a handshake a request; the best
    of `--rounds` of each, by name: (keep-alive, handshakes)."""
    proxy_cpu, load_cpu = cpus
    cert, key, both = _tls_files(c)
    keep = c.write("tls-keep.lua", _WRK_LUA)
    close = c.write("tls-close.lua", _WRK_CLOSE_LUA)
    best: dict[str, tuple[Result, Result]] = {}

    def measure(name: str, port: int, proxy: subprocess.Popen[bytes], scheme: str) -> None:
        results = []
        for lua in (keep, close):
            run_wrk(port, args.warmup, args.connections, lua, cpu=load_cpu, name=name,
                    scheme=scheme)  # fmt: skip
            before = cpu_seconds(proxy)
            result = run_wrk(port, args.duration, args.connections, lua, cpu=load_cpu, name=name,
                             scheme=scheme)  # fmt: skip
            after = cpu_seconds(proxy)
            if result.requests:
                result.cpu_us = (sum(after) - sum(before)) / result.requests * 1e6
            results.append(result)
        keep_alive, handshakes = results
        print(
            f"  TLS {name}: {keep_alive.rps:,.0f} req/s keep-alive ({keep_alive.cpu_us:.1f} "
            f"CPU us/req), {handshakes.rps:,.0f} handshakes/s ({handshakes.cpu_us:.1f} us each)",
            file=sys.stderr,
            flush=True,
        )
        old = best.get(name)
        best[name] = (
            keep_alive if old is None or keep_alive.rps > old[0].rps else old[0],
            handshakes if old is None or handshakes.rps > old[1].rps else old[1],
        )

    for _ in range(args.rounds):
        port = free_port()
        conf = c.write("proxy-tls.conf", nginx_tls_config(c.tmp, port, backends, cert, key))
        p = c.start([nginx, "-c", str(conf), "-p", str(c.tmp), "-e", "stderr"], port, proxy_cpu)
        measure("nginx 1 worker", port, p, "https")
        c.stop(p)

        port = free_port()
        conf = c.write("haproxy-tls.cfg", haproxy_tls_config(port, backends, both))
        p = c.start([haproxy, "-f", str(conf)], port, proxy_cpu)
        measure("haproxy 1 thread", port, p, "https")
        c.stop(p)

        for name, scheme in (("balancer", "https"), ("balancer, no TLS", "http")):
            port = free_port()
            urls = [f"http://127.0.0.1:{backend}" for backend in backends]
            flags = ["--tls-cert", str(cert), "--tls-key", str(key)] if scheme == "https" else []
            p = c.start(balancer_command(port, urls, *flags), port, proxy_cpu)
            measure(name, port, p, scheme)
            c.stop(p)
    return best


def print_tls(best: dict[str, tuple[Result, Result]], args: argparse.Namespace) -> None:
    """The `--tls` table: keep-alive and handshakes, each with its ratio to nginx."""
    base_keep, base_new = best["nginx 1 worker"]
    print()
    print(
        f"TLS (--tls): wrk -t1 -c{args.connections} over https, {args.duration:g}s each, best "
        f"of {args.rounds}; keep-alive, and Connection: close (a full handshake a request); "
        "balancer: python -m balancer --tls-cert"
    )
    print(
        f"{'target':<18} {'keep-alive/s':>12} {'x nginx':>8} {'us/req':>7} "
        f"{'handshakes/s':>12} {'x nginx':>8} {'us/req':>7}"
    )
    for name, (keep, new) in best.items():
        print(
            f"{name:<18} {keep.rps:>12,.0f} {keep.rps / base_keep.rps:>8.2f} {keep.cpu_us:>7.1f} "
            f"{new.rps:>12,.0f} {new.rps / base_new.rps:>8.2f} {new.cpu_us:>7.1f}"
            + "".join(f"  ({r.errors})" for r in (keep, new) if r.errors)
        )
    keep, new = best["balancer"]
    ok = keep.rps >= 0.8 * base_keep.rps and new.rps >= 0.7 * base_new.rps
    print(
        "TLS targets (keep-alive >= 0.8x nginx, handshakes >= 0.7x): "
        f"{'met' if ok else 'NOT met'} ({keep.rps / base_keep.rps:.2f}x, "
        f"{new.rps / base_new.rps:.2f}x)"
    )


@dataclass
class H2Result(Result):
    """An h2load run: no percentiles (h2load prints min, max, mean and sd), the protocol ALPN
    chose (`h2`, `http/1.1` where the server offers no h2: then h2load pipelines `-m`
    requests on each connection; `none` where none was printed)."""

    protocol: str = "none"
    mean_ms: float = float("nan")
    max_ms: float = float("nan")


def parse_h2load(out: str, name: str) -> H2Result:
    """h2load's summary as a result; req/s NaN and the reason in `errors` where it printed
    none (a failed connect, a refused protocol)."""
    protocol = re.search(r"^Application protocol: (\S+)", out, re.MULTILINE)
    finished = re.search(r"^finished in [\d.]+s, ([\d.]+) req/s", out, re.MULTILINE)
    counts = re.search(
        r"^requests: \d+ total, \d+ started, (\d+) done, \d+ succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        out,
        re.MULTILINE,
    )
    times = re.search(r"^time for request:\s+(\S+)\s+(\S+)\s+(\S+)", out, re.MULTILINE)
    status = re.search(r"^status codes: \d+ 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out, re.M)
    result = H2Result(name, float("nan"), float("nan"), float("nan"), "")
    result.protocol = protocol.group(1) if protocol else "none"
    if finished is None or counts is None:
        last = [line for line in out.splitlines() if line.strip()][-1:] or ["no output"]
        result.errors = f"h2load printed no result: {last[0]}"
        return result
    result.rps = float(finished.group(1))
    result.requests = int(counts.group(1))
    failed, errored, timeout = (int(n) for n in counts.groups()[1:])
    notes = [f"{failed} failed"] * bool(failed) + [f"{errored} errored"] * bool(errored)
    notes += [f"{timeout} timed out"] * bool(timeout)
    if status is not None and any(int(n) for n in status.groups()):
        notes.append("non-2xx: " + "/".join(status.groups()) + " 3xx/4xx/5xx")
    result.errors = ", ".join(notes)
    if times is not None:
        result.max_ms, result.mean_ms = _ms(times.group(2)), _ms(times.group(3))
    return result


def _ms(value: str) -> float:
    found = re.fullmatch(r"([\d.]+)(us|ms|s)", value)
    if found is None:
        return float("nan")
    return float(found.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[found.group(2)]


def run_h2load(
    port: int, duration: float, args: argparse.Namespace, *, cpu: int | None, name: str
) -> H2Result:
    """h2load over https to `port` for `duration` s (whole seconds), `--h2-clients`
    connections of `--h2-streams` concurrent streams each, one thread, one `sid` cookie (h2load
    sends the same headers on every request: every proxy routes all of it to one backend)."""
    command = [
        "h2load", "-t1", f"-c{args.h2_clients}", f"-m{args.h2_streams}",
        f"-D{max(1, round(duration))}", "-H", "cookie: sid=s1", f"https://127.0.0.1:{port}/",
    ]  # fmt: skip
    if cpu is not None and shutil.which("taskset"):
        command = ["taskset", "-c", str(cpu), *command]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=duration + 30, check=False
    )
    return parse_h2load(done.stdout + done.stderr, name)


def cpu_per_request(proxy: subprocess.Popen[bytes], run: Callable[[], R]) -> R:
    """`run()`'s result with `proxy`'s CPU time (user + system) over its requests."""
    before = cpu_seconds(proxy)
    result = run()
    after = cpu_seconds(proxy)
    if result.requests:
        result.cpu_us = (sum(after) - sum(before)) / result.requests * 1e6
    return result


def balancer_command(port: int, backends: list[str], *flags: str) -> list[str]:
    """`python -m balancer` on `port`, `--sticky cookie:sid` (wrk's and h2load's cookie), its
    default upstream pool, each of `backends` (`URL [OPTS]`), then `flags`."""
    command = [sys.executable, "-m", "balancer", "--listen", f"127.0.0.1:{port}"]
    command += ["--sticky", "cookie:sid"]
    for backend in backends:
        command += ["--backend", backend]
    return [*command, *flags]


def http2_rounds(
    c: Cluster,
    args: argparse.Namespace,
    backends: list[int],
    *,
    nginx: str,
    haproxy: str,
    cpus: tuple[int | None, int | None],
) -> dict[str, H2Result]:
    """`--http2`: nginx, HAProxy and `python -m balancer` terminating TLS with h2 offered by
    ALPN (the `--tls` table's certificate, backends and cores), loaded by h2load; the best of
    `--rounds` by name."""
    proxy_cpu, load_cpu = cpus
    cert, key, both = _tls_files(c)
    seconds = _row_seconds(args)
    best: dict[str, H2Result] = {}

    def measure(name: str, port: int, proxy: subprocess.Popen[bytes]) -> None:
        run_h2load(port, args.warmup, args, cpu=load_cpu, name=name)
        result = cpu_per_request(
            proxy, lambda: run_h2load(port, seconds, args, cpu=load_cpu, name=name)
        )
        print(
            f"  HTTP/2 {name}: {result.protocol}, {result.rps:,.0f} req/s, "
            f"{result.cpu_us:.1f} CPU us/req" + (f" ({result.errors})" if result.errors else ""),
            file=sys.stderr,
            flush=True,
        )
        old = best.get(name)
        if old is None or not old.rps >= result.rps:  # a NaN (no result) is replaced
            best[name] = result

    for _ in range(args.rounds):
        port = free_port()
        text = nginx_tls_config(c.tmp, port, backends, cert, key, http2=nginx_http2(nginx))
        conf = c.write("proxy-h2.conf", text)
        p = c.start([nginx, "-c", str(conf), "-p", str(c.tmp), "-e", "stderr"], port, proxy_cpu)
        measure("nginx 1 worker", port, p)
        c.stop(p)

        port = free_port()
        conf = c.write("haproxy-h2.cfg", haproxy_tls_config(port, backends, both, "h2,http/1.1"))
        p = c.start([haproxy, "-f", str(conf)], port, proxy_cpu)
        measure("haproxy 1 thread", port, p)
        c.stop(p)

        port = free_port()
        urls = [f"http://127.0.0.1:{b}" for b in backends]
        command = balancer_command(port, urls, "--tls-cert", str(cert), "--tls-key", str(key))
        p = c.start(command, port, proxy_cpu)
        measure("balancer", port, p)
        c.stop(p)
    return best


def print_http2(best: dict[str, H2Result], args: argparse.Namespace) -> None:
    """The `--http2` table; a row whose h2load did not negotiate h2 says so and gets no ratio."""
    base = best["nginx 1 worker"]
    print()
    print(
        f"HTTP/2 (--http2): h2load -t1 -c{args.h2_clients} -m{args.h2_streams} over TLS, "
        f"{_row_seconds(args):g}s each, best of {args.rounds}; ALPN h2,http/1.1 offered; "
        "balancer: python -m balancer --tls-cert"
    )
    print(
        f"{'target':<18} {'protocol':>9} {'req/s':>10} {'x nginx':>8} {'mean ms':>8} "
        f"{'max ms':>8} {'us/req':>7}"
    )
    for name, r in best.items():
        h2 = r.protocol == "h2" and base.protocol == "h2"
        ratio = f"{r.rps / base.rps:>8.2f}" if h2 else f"{'-':>8}"
        notes = [r.errors] if r.errors else []
        if r.protocol != "h2":
            notes.append(f"negotiated {r.protocol}, not HTTP/2: no ratio")
        print(
            f"{name:<18} {r.protocol:>9} {r.rps:>10,.0f} {ratio} {r.mean_ms:>8.2f} "
            f"{r.max_ms:>8.2f} {r.cpu_us:>7.1f}" + "".join(f"  ({n})" for n in notes)
        )


@dataclass(frozen=True)
class Feature:
    """A row of `--features`: `python -m balancer` with `flags` added to the plain one."""

    name: str
    flags: tuple[str, ...] = ()
    load: str = "http"  # wrk over http, wrk over https, or h2load ("h2")
    front: str | None = None  # HAProxy in mode tcp in front: "plain" or "send-proxy-v2"
    weights: tuple[int, ...] = ()  # weight=N on each backend, in order
    log: bool = False  # its stderr (the log) to a file rather than /dev/null


def features_rounds(
    c: Cluster,
    args: argparse.Namespace,
    backends: list[int],
    *,
    haproxy: str,
    pin_store: RedisServer,
    cpus: tuple[int | None, int | None],
) -> tuple[dict[str, Result], dict[str, str]]:
    """`--features`: `python -m balancer` alone with each feature on, in the same run as the
    plain one; the best of `--rounds` by name, and a note a row (what shows the feature was
    on: log lines, Redis commands, the protocol)."""
    proxy_cpu, load_cpu = cpus
    cert, key, _ = _tls_files(c)
    tls = ("--tls-cert", str(cert), "--tls-key", str(key))
    trusted = ("--trusted-proxy", "127.0.0.1/32")
    rows = [
        Feature("plain"),
        Feature("--sticky none", ("--sticky", "none")),
        Feature("TLS keep-alive", tls, load="https"),
        Feature("HTTP/2 (h2load)", tls, load="h2"),
        Feature("--access-log json", ("--access-log", "--log-format", "json"), log=True),
        Feature("weight=3, weight=1", weights=(3, 1)),
        Feature("--pin-store", ("--pin-store", pin_store.url)),
        Feature("HAProxy L4 in front", trusted, front="plain"),
        Feature("HAProxy L4, PROXY v2", (*trusted, "--proxy-protocol"), front="send-proxy-v2"),
    ]
    if shutil.which("h2load") is None:
        rows = [row for row in rows if row.load != "h2"]
    lua = c.write("features.lua", _WRK_LUA)
    seconds = _row_seconds(args)
    best: dict[str, Result] = {}
    notes: dict[str, str] = {}

    def load(row: Feature, port: int, duration: float) -> Result:
        if row.load == "h2":
            return run_h2load(port, duration, args, cpu=load_cpu, name=row.name)
        return run_wrk(port, duration, args.connections, lua, cpu=load_cpu, name=row.name,
                       scheme="https" if row.load == "https" else "http")  # fmt: skip

    for _ in range(args.rounds):
        for row in rows:
            port = free_port()
            urls = [f"http://127.0.0.1:{b}" for b in backends]
            if row.weights:
                urls = [f"{u} weight={w}" for u, w in zip(urls, row.weights, strict=False)]
            log = c.tmp / "features-access.log" if row.log else None
            if row.flags[:2] == ("--pin-store", pin_store.url):
                pin_store.restart()  # empty, its counts at 0
            p = c.start(balancer_command(port, urls, *row.flags), port, proxy_cpu, log=log)
            target, front = port, None
            if row.front is not None:
                target = free_port()
                config = haproxy_l4_config(target, port, proxy_v2=row.front == "send-proxy-v2")
                conf = c.write("haproxy-l4.cfg", config)
                front = c.start([haproxy, "-f", str(conf)], target, load_cpu)
            load(row, target, args.warmup)
            result = cpu_per_request(p, lambda: load(row, target, seconds))  # noqa: B023
            note = _feature_note(row, result, log, pin_store)
            if front is not None:
                c.stop(front)
            c.stop(p)
            print(
                f"  feature {row.name}: {result.rps:,.0f} req/s, {result.cpu_us:.1f} CPU us/req"
                + (f" ({note})" if note else ""),
                file=sys.stderr,
                flush=True,
            )
            if row.name not in best or result.rps > best[row.name].rps:
                best[row.name], notes[row.name] = result, note
            if log is not None:
                log.unlink(missing_ok=True)
    return best, notes


def _feature_note(row: Feature, result: Result, log: Path | None, store: RedisServer) -> str:
    """What shows `row`'s feature was on in its run, and its load's errors."""
    notes = [result.errors] if result.errors else []
    if isinstance(result, H2Result) and result.protocol != "h2":
        notes.append(f"h2load negotiated {result.protocol}: not HTTP/2")
    if log is not None:
        text = log.read_bytes() if log.exists() else b""
        lines = text.count(b'"event": "access"')
        notes.append(f"{lines:,} access lines, {len(text) / 2**20:,.1f} MiB")
    if "--pin-store" in row.flags:
        with redis.Redis.from_url(store.url) as client:
            stats = client.info("commandstats")
        get, set_ = (stats.get(f"cmdstat_{n}", {}).get("calls", 0) for n in ("get", "set"))
        notes.append(f"Redis got GET {get:,}, SET {set_:,}, warm-up included")
    return "; ".join(notes)


def haproxy_l4_config(port: int, target: int, *, proxy_v2: bool) -> str:
    """HAProxy in `mode tcp`, one thread, relaying each connection on `port` to `target`,
    with a PROXY v2 header first where `proxy_v2`."""
    send = " send-proxy-v2" if proxy_v2 else ""
    return f"""global
    nbthread 1
    maxconn 4096
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend in
    bind 127.0.0.1:{port}
    default_backend app
backend app
    server b 127.0.0.1:{target}{send}
"""


def print_features(
    best: dict[str, Result], notes: dict[str, str], args: argparse.Namespace
) -> None:
    """The `--features` table: each row against `plain` of the same run."""
    base = best["plain"]
    print()
    print(
        f"Features (--features): python -m balancer, one core, {_row_seconds(args):g}s a row, "
        f"best of {args.rounds}; wrk -t1 -c{args.connections} over http (https: TLS "
        f"keep-alive; HTTP/2: h2load -c{args.h2_clients} -m{args.h2_streams}); plain: "
        "--sticky cookie:sid, two backends, nothing else; HAProxy L4 (mode tcp, 1 thread) on "
        "the load's core, its CPU not counted; CPU: the balancer process's"
    )
    print(
        f"{'feature':<22} {'req/s':>10} {'x plain':>8} {'CPU us/req':>11} {'+us/req':>8} "
        f"{'CPU x':>6}"
    )
    for name, r in best.items():
        print(
            f"{name:<22} {r.rps:>10,.0f} {r.rps / base.rps:>8.2f} {r.cpu_us:>11.1f} "
            f"{r.cpu_us - base.cpu_us:>+8.1f} {r.cpu_us / base.cpu_us:>6.2f}"
            + (f"  ({notes[name]})" if notes.get(name) else "")
        )
    print(
        "HTTP/2's row is h2load's load, the others wrk's: compare its CPU us/req, not req/s; "
        "'HAProxy L4, PROXY v2' against 'HAProxy L4 in front' is what the header costs"
    )


def _row_seconds(args: argparse.Namespace) -> float:
    """Seconds a row of `--http2` and `--features`: `--duration`, at most 5 with `--quick`."""
    return min(args.duration, 5.0) if args.quick else float(args.duration)


def _build() -> str:
    """Which build of the data path the balancer processes import (scripts/build-fast)."""
    if compiled(balancer.datapath._proxy):
        return "compiled with mypyc (scripts/build-fast)"
    return "plain Python (BALANCER_PLAIN=1, or no build: scripts/build-fast)"


if __name__ == "__main__":
    sys.exit(main())
