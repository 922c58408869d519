"""Benchmark: session requests/s on one Redis, on Sentinel and on Redis Cluster, in one run.

    .venv/bin/python benchmarks/redis_topology.py [--duration 5] [--connections 32] [--rounds 2]

The workload is the one `benchmarks/session_middleware.py` measures for "ours": one uvicorn worker
serving `benchmarks/session_apps.py` with `SessionMiddleware` and `RedisStore.from_url`, a
read request (``GET /read``: load the session) and a write request (``POST /write``: load,
change, save), loaded by wrk. Only the URL changes between the rows:

- ``one redis``: ``redis://``, one server;
- ``sentinel``: ``redis+sentinel://`` naming three sentinels of one primary and one replica;
- ``cluster``: ``redis+cluster://`` naming three primaries and three replicas;
- the same two with ``--min-replicas-ack 1`` on the write (``WAIT 1`` after each save).

As in session_middleware.py the app has one core to itself and wrk shares the other with every
Redis process of the topology; best of ``--rounds``. Needs wrk (apt-get install wrk).
Every server is started here on free 127.0.0.1 ports and stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from benchmarks.session_middleware import Result, _pin, _serve, _session_cookie, _wrk  # noqa: E402
from redis_plumbing import RedisServer  # noqa: E402
from tests.redis_sentinel import SentinelSetup  # noqa: E402
from tests.redis_topology import Cluster  # noqa: E402


@contextlib.contextmanager
def topologies() -> Iterator[dict[str, tuple[str, list[int]]]]:
    """Every topology running: name -> (URL, pids of its Redis processes)."""
    with contextlib.ExitStack() as stack:
        single = stack.enter_context(RedisServer())
        sentinel = stack.enter_context(SentinelSetup())
        cluster = stack.enter_context(Cluster())
        sentinel_pids = [s.process.pid for s in sentinel.sentinels]
        sentinel_pids += [p for p in (sentinel.primary.pid, sentinel.replica.pid) if p]
        yield {
            "one redis": (single.url, [p for p in (single.pid,) if p]),
            "sentinel": (sentinel.url, sentinel_pids),
            "cluster": (cluster.url, [n.pid for n in cluster.nodes if n.pid]),
        }


def measure_one(url: str, *, duration: int, connections: int, acks: int) -> dict[str, Result]:
    env_acks = {"BENCH_MIN_REPLICAS_ACK": str(acks)} if acks else {}
    os.environ.update(env_acks)
    try:
        process, app = _serve("ours", url)
    finally:
        for name in env_acks:
            os.environ.pop(name, None)
    try:
        server = psutil.Process(process.pid)
        cookie = _session_cookie(app)
        _wrk(app + "/read", cookie, post=False, duration=1, connections=connections, server=server)
        results = {}
        for request, post in (("read", False), ("write", True)):
            results[request] = _wrk(
                f"{app}/{request}",
                cookie,
                post=post,
                duration=duration,
                connections=connections,
                server=server,
            )
        return results
    finally:
        process.terminate()
        process.wait(15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run (5)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each, best kept (2)")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("benchmark: wrk is missing: apt-get install wrk")

    rows = [
        ("one redis", 0),
        ("sentinel", 0),
        ("cluster", 0),
        ("sentinel", 1),
        ("cluster", 1),
    ]
    best: dict[tuple[str, int, str], Result] = {}
    with topologies() as running:
        if _pin(0):
            # Redis shares the load generator's core; the app has the other one alone.
            for _, pids in running.values():
                for pid in pids:
                    subprocess.run(
                        ["taskset", "-pc", "0", str(pid)], capture_output=True, check=True
                    )
        for _ in range(args.rounds):
            for name, acks in rows:
                url = running[name][0]
                results = measure_one(
                    url, duration=args.duration, connections=args.connections, acks=acks
                )
                for request, result in results.items():
                    key = (name, acks, request)
                    if key not in best or result.rps > best[key].rps:
                        best[key] = result

    print(
        f"\nsessions through RedisStore, 1 uvicorn worker, wrk -c{args.connections}, "
        f"{args.duration} s each, best of {args.rounds}"
    )
    header = f"{'topology':<22}{'request':<9}{'req/s':>8}{'p50 ms':>8}{'p99 ms':>8}"
    print(header + f"{'CPU us/req':>12}{'vs one':>8}")
    for name, acks in rows:
        label = name + (f" +ack {acks}" if acks else "")
        for request in ("read", "write"):
            r = best[(name, acks, request)]
            base = best[("one redis", 0, request)].rps
            print(
                f"{label:<22}{request:<9}{r.rps:>8.0f}{r.p50_ms:>8.2f}{r.p99_ms:>8.2f}"
                f"{r.cpu_us:>12.0f}{r.rps / base:>8.2f}"
            )


if __name__ == "__main__":
    main()
