"""The balancer's own CPU time for one proxied request, without sockets or an event loop.

    .venv/bin/python benchmarks/data_path.py [--requests 100000]
    BALANCER_PLAIN=1 .venv/bin/python benchmarks/data_path.py    # the plain Python build
    .venv/bin/python benchmarks/data_path.py --access-log json   # with the access log on

A real `ProxyServer` (Router with cookie stickiness and the signed affinity cookie, or the
`--sticky` and `--balance` given, over three backends; Metrics)
is fed requests as `data_received` calls, and each backend connection its response the same
way; the transports are C-level stand-ins (a deque's append for `write`), so what is timed
is the balancer's code and the parsers': what a change to the data path costs, without the
kernel's share and the noise of a loaded machine that `benchmarks/proxy.py` sees. Under
real load the same code costs about 2.3 times as much (cold caches, the event loop's own
work), and the kernel adds ~16-18 us for the four system calls of a proxied request.
With `--access-log plain|json` every request is logged as `python -m balancer --access-log`
logs it, its lines written to /dev/null.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
import types
from typing import Any

import balancer.datapath._proxy
from balancer import (
    AffinityCookie,
    Metrics,
    Pool,
    ProxyOptions,
    ProxyServer,
    Router,
    Sticky,
    configure_logging,
)
from balancer._build import compiled
from balancer.datapath._proxy import tune_gc
from balancer.datapath._upstream import UpstreamConnection

_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Wed, 25 Nov 2026 17:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 16\r\nConnection: keep-alive\r\n\r\n"
    b"hello from 9001\n"
)


def _transport(sink: collections.deque[bytes]) -> Any:
    """A transport whose methods are C functions, so that it costs next to nothing."""
    return types.SimpleNamespace(
        write=sink.append,
        writelines=sink.extend,
        is_closing=bool,  # bool() is False
        get_extra_info={"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8080)}.get,
        pause_reading=bool,
        resume_reading=bool,
        # None, as a transport's: the pool closes the connections beyond its demand.
        close=[].clear,
        abort=[].clear,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000, help="per round (5 rounds)")
    parser.add_argument("--sticky", default="cookie:sid", help="cookie:sid (default), ip, none")
    parser.add_argument(
        "--balance", choices=["least-inflight", "round-robin"], help="of --sticky none"
    )
    parser.add_argument(
        "--access-log", choices=["plain", "json"], help="log every request, in this format"
    )
    args = parser.parse_args()
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    try:
        sticky = Sticky.parse(args.sticky)
    except ValueError as exc:
        parser.error(f"--sticky: {exc}")

    pool = Pool(["http://127.0.0.1:9001", "http://127.0.0.1:9002", "http://127.0.0.1:9003"])
    balance = {} if args.balance is None else {"balance": args.balance}  # else the default
    router = Router(pool, sticky=sticky, affinity=AffinityCookie(secrets=["b"]), **balance)
    options = ProxyOptions(keepalive_per_backend=8, access_log=args.access_log is not None)
    if args.access_log is not None:
        configure_logging(args.access_log, stream=open(os.devnull, "w"))  # noqa: SIM115
    server = ProxyServer(router, Metrics(pool), options)
    client_out: collections.deque[bytes] = collections.deque(maxlen=4)
    upstream_out: collections.deque[bytes] = collections.deque(maxlen=4)
    for backend in pool:
        upstream = server.pool(backend)
        for _ in range(4):
            conn = UpstreamConnection(upstream)
            conn.connection_made(_transport(upstream_out))
            upstream.release(conn)
    client = server._protocol()
    client.connection_made(_transport(client_out))
    # 1,000 clients' sessions, as wrk sends them in benchmarks/proxy.py.
    head = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nCookie: sid=s%d\r\n\r\n"
    requests = [head % i for i in range(1000)]

    def run(n: int) -> None:
        feed = client.data_received
        for i in range(n):
            feed(requests[i % 1000])
            conn = client._upstream
            assert conn is not None
            conn.data_received(_RESPONSE)

    run(2000)  # the caches (response heads, routing decisions) warm, as in a long run
    if not client_out or not client_out[-1].startswith(b"HTTP/1.1 200 OK\r\n"):
        print(f"unexpected response: {client_out[-1] if client_out else None!r}", file=sys.stderr)
        return 1
    tune_gc()
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        run(args.requests)
        best = min(best, (time.perf_counter() - started) / args.requests * 1e6)
    build = (
        "compiled (scripts/build-fast)" if compiled(balancer.datapath._proxy) else "plain Python"
    )
    policy = f"--sticky {sticky}" + (f" --balance {args.balance}" if args.balance else "")
    if args.access_log is not None:
        policy += f", --access-log --log-format {args.access_log}"
    print(f"data path, {build}: {best:.2f} us a request (best of 5 x {args.requests:,}, {policy})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
