"""Benchmark the balancer's data path against nginx and HAProxy, in one run.

    .venv/bin/python benchmarks/proxy.py [--duration 10] [--connections 64]
    .venv/bin/python benchmarks/proxy.py --one-backend --quick    # 64 clients, one hot backend

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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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

    def start(self, args: list[str], port: int, cpu: int | None) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            self.pinned(args, cpu),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
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
    args = parser.parse_args()
    if args.upstream_keepalive is not None and args.upstream_keepalive < 0:
        parser.error("--upstream-keepalive must be at least 0")
    keepalive = "default" if args.upstream_keepalive is None else str(args.upstream_keepalive)
    for tool in ("nginx", "haproxy", "wrk"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"{tool} is not installed", file=sys.stderr)
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
    from balancer.control._tls import CIPHERS  # noqa: PLC0415 - what the balancer offers

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

    listen = "backlog=4096;"
    tls_listen = (
        f"ssl backlog=4096; ssl_certificate {cert}; ssl_certificate_key {key}; "
        f"ssl_protocols TLSv1.2 TLSv1.3; ssl_ciphers {CIPHERS}; "
        "proxy_set_header X-Forwarded-Proto https;"
    )
    for _ in range(args.rounds):
        port = free_port()
        text = nginx_proxy_config(c.tmp, port, backends).replace(listen, tls_listen)
        conf = c.write("proxy-tls.conf", text)
        p = c.start([nginx, "-c", str(conf), "-p", str(c.tmp), "-e", "stderr"], port, proxy_cpu)
        measure("nginx 1 worker", port, p, "https")
        c.stop(p)

        port = free_port()
        text = haproxy_config(port, backends).replace(
            f"bind 127.0.0.1:{port}",
            f"bind 127.0.0.1:{port} ssl crt {both} alpn http/1.1 ssl-min-ver TLSv1.2 "
            f"ciphers {CIPHERS}\n    http-request set-header X-Forwarded-Proto https",
        )
        conf = c.write("haproxy-tls.cfg", text)
        p = c.start([haproxy, "-f", str(conf)], port, proxy_cpu)
        measure("haproxy 1 thread", port, p, "https")
        c.stop(p)

        for name, scheme in (("balancer", "https"), ("balancer, no TLS", "http")):
            port = free_port()
            command = [sys.executable, "-m", "balancer", "--listen", f"127.0.0.1:{port}"]
            command += ["--sticky", "cookie:sid"]  # its default upstream pool
            for backend in backends:
                command += ["--backend", f"http://127.0.0.1:{backend}"]
            if scheme == "https":
                command += ["--tls-cert", str(cert), "--tls-key", str(key)]
            p = c.start(command, port, proxy_cpu)
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


def _build() -> str:
    """Which build of the data path the balancer processes import (scripts/build-fast)."""
    if compiled(balancer.datapath._proxy):
        return "compiled with mypyc (scripts/build-fast)"
    return "plain Python (BALANCER_PLAIN=1, or no build: scripts/build-fast)"


if __name__ == "__main__":
    sys.exit(main())
