"""Benchmark the client-side transport and the balancer's discovery, in one run.

    .venv/bin/python benchmarks/client.py [--requests 2000] [--rounds 3] [--starts 20]

1. Cost per request: GET /healthz of one demo_app instance, one request at a time, through
   a plain `httpx.AsyncClient` to the instance and through `BalancedTransport` (static list,
   and the registry with one instance), each the best of `--rounds`; printed in us a
   request and as a ratio to the plain client. Then the transport's own CPU cost, with no
   network: the same client over an in-memory `httpx.MockTransport`, bare and wrapped.
2. Discovery latency: a balancer with `--discover` (default `--discover-interval`) in front
   of one registered instance, under a light request loop; `--starts` times, a new instance
   is started and the time from its process start (and from its readiness, seen directly)
   to the first request the balancer gives it is measured; the median is printed. Then it
   is stopped and its removal waited for.

Redis is the project's own (`RedisServer`); everything listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator

import httpx

from balancer.transport import BalancedTransport, BalancePolicy, StaticInstances
from redis_plumbing import RedisServer, free_port
from service_registry import Instance, Registry


def wait_until(condition: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.005)  # poll interval


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


def demo_app(port: int, name: str, registry: str | None = None) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "demo_app", "--port", str(port), "--instance-id", name]
    args += ["--log-level", "warning"]
    if registry is not None:
        args += ["--registry", registry, "--service", "bench"]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@contextlib.contextmanager
def running(*processes: subprocess.Popen[bytes]) -> Iterator[None]:
    try:
        yield
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


async def per_request_us(client: httpx.AsyncClient, requests: int) -> float:
    await client.get("/healthz")  # connection open, first read of the registry done
    started = time.perf_counter()
    for _ in range(requests):
        response = await client.get("/healthz")
        response.raise_for_status()
    return (time.perf_counter() - started) / requests * 1e6


async def cost(url: str, redis_url: str, requests: int, rounds: int) -> None:
    registry = Registry.from_url(redis_url, "bench")
    await registry.register(Instance("bench", "one", url, ttl=600))

    async def plain() -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=url)

    async def static() -> httpx.AsyncClient:
        transport = BalancedTransport(StaticInstances([url]))
        return httpx.AsyncClient(transport=transport, base_url="http://bench")

    async def registered() -> httpx.AsyncClient:
        transport = BalancedTransport(registry, balance="p2c")
        return httpx.AsyncClient(transport=transport, base_url="http://bench")

    makers: dict[str, Callable[[], Awaitable[httpx.AsyncClient]]] = {
        "plain httpx.AsyncClient": plain,
        "BalancedTransport, static": static,
        "BalancedTransport, registry": registered,
    }
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, make in makers.items():
            async with await make() as client:
                result = await per_request_us(client, requests)
            best[name] = min(best.get(name, result), result)
    await registry.deregister("one")
    await registry.aclose()
    base = best["plain httpx.AsyncClient"]
    print(f"\ncost per request ({requests} sequential GET /healthz, best of {rounds}):")
    for name, us in best.items():
        print(f"  {name:30s} {us:8.1f} us   x{us / base:.3f}")


async def overhead(requests: int, rounds: int) -> None:
    """The transport's own cost: an in-memory inner transport, bare and wrapped."""

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="ok")

    def bare() -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(answer), base_url="http://one")

    def wrapped(balance: BalancePolicy, **extra: str) -> Callable[[], httpx.AsyncClient]:
        def make() -> httpx.AsyncClient:
            transport = BalancedTransport(
                StaticInstances([f"http://127.0.0.1:{9000 + n}" for n in range(5)]),
                balance=balance,
                inner=httpx.MockTransport(answer),
                **extra,  # type: ignore[arg-type]
            )
            return httpx.AsyncClient(transport=transport, base_url="http://bench")

        return make

    makers: dict[str, Callable[[], httpx.AsyncClient]] = {
        "mock transport alone": bare,
        "BalancedTransport round-robin": wrapped("round-robin"),
        "BalancedTransport p2c": wrapped("p2c"),
        "BalancedTransport hash (cookie)": wrapped("hash", hash_on="cookie:sid"),
    }
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, make in makers.items():
            async with make() as client:
                client.cookies.set("sid", "some-session-id")
                result = await per_request_us(client, requests * 5)
            best[name] = min(best.get(name, result), result)
    base = best["mock transport alone"]
    print(f"\nthe transport's own cost (in memory, 5 instances, best of {rounds}):")
    for name, us in best.items():
        extra_us = f"(+{us - base:.1f} us)" if us != base else ""
        print(f"  {name:34s} {us:8.1f} us {extra_us}")


def discovery(redis: RedisServer, starts: int) -> None:
    registry_url = redis.url
    base_port = free_port()
    base = demo_app(base_port, "base", registry_url)
    proxy_port, admin_port = free_port(), free_port()
    command = [sys.executable, "-m", "balancer", "--listen", f"127.0.0.1:{proxy_port}"]
    command += ["--admin", f"127.0.0.1:{admin_port}", "--sticky", "none"]
    command += ["--discover", f"redis://127.0.0.1:{redis.port}/0/bench"]
    lb = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proxy = f"http://127.0.0.1:{proxy_port}"
    totals: list[float] = []
    from_ready: list[float] = []
    with running(lb, base), httpx.Client(base_url=proxy, timeout=5) as client:
        wait_until(lambda: answers(f"http://127.0.0.1:{admin_port}/healthz"), 20, "balancer")
        wait_until(lambda: answers(proxy + "/healthz"), 20, "the base instance")
        for n in range(starts):
            port = free_port()
            name = f"new{n}"
            started = time.monotonic()
            new = demo_app(port, name, registry_url)
            ready_at: float | None = None
            with running(new):
                while True:
                    if ready_at is None and answers(f"http://127.0.0.1:{port}/readyz"):
                        ready_at = time.monotonic()
                    answered = client.get("/api/session").json()["instance"]
                    if answered == name:
                        served = time.monotonic()
                        break
                    if served_too_late := time.monotonic() - started > 30:
                        raise RuntimeError(f"{name} not served in 30 s ({served_too_late})")
                totals.append(served - started)
                from_ready.append(served - (ready_at if ready_at is not None else served))
                new.send_signal(signal.SIGTERM)
                new.wait(15)
    print(f"\ndiscovery latency, median of {starts} starts (balancer --discover, defaults):")
    print(f"  process start -> first request served through the balancer: "
          f"{statistics.median(totals) * 1000:7.1f} ms (min {min(totals) * 1000:.1f}, "
          f"max {max(totals) * 1000:.1f})")  # fmt: skip
    print(f"  instance ready -> first request served through the balancer: "
          f"{statistics.median(from_ready) * 1000:7.1f} ms")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--starts", type=int, default=20)
    args = parser.parse_args()
    with RedisServer() as redis:
        port = free_port()
        app = demo_app(port, "bench")
        url = f"http://127.0.0.1:{port}"
        with running(app):
            wait_until(lambda: answers(url + "/healthz"), 20, "the instance")
            asyncio.run(cost(url, redis.url, args.requests, args.rounds))
        asyncio.run(overhead(args.requests, args.rounds))
        discovery(redis, args.starts)


if __name__ == "__main__":
    main()
