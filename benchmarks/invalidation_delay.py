"""Benchmark: how long a hybrid instance serves its copy after another process's write.

    .venv/bin/python benchmarks/invalidation_delay.py [--writes 2000] [--interval-ms 2]

A `HybridStore` holds a session; another process (its own Redis client, as another
instance would) writes that session ``--writes`` times, ``--interval-ms`` apart, noting the
monotonic clock (one clock for every process on Linux) just before each write. The delay is
from there to the moment the hybrid store has marked its copy untrusted (the tracking
connection's invalidation handled): the longest a write elsewhere can go unseen by a read
here. Prints p50, p99 and the maximum. Traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from redis_plumbing import RedisServer  # noqa: E402
from session_store import Changes, HybridStore, RedisStore  # noqa: E402

WRITER = """
import sys, time, redis
client = redis.Redis.from_url(sys.argv[1])
key, count, interval = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
client.ping()
for i in range(count):
    time.sleep(interval)
    started = time.monotonic()
    client.hset(key, "d:n", str(i))
    print(started, flush=True)
"""


async def measure(url: str, writes: int, interval: float) -> list[float]:
    store = HybridStore(RedisStore.from_url(url))
    assert store.tracker is not None, "tracking needs a single Redis server"
    await store.save("bench", Changes({"n": '"0"'}), created=time.time(), ttl=600, create=True)
    store.tracker.start()
    await asyncio.wait_for(store.tracker.subscribed_event.wait(), 5)
    seen: list[float] = []
    handle = store._invalidated

    def timed(keys: object) -> None:
        handle(keys)  # type: ignore[arg-type]
        seen.append(time.monotonic())

    store.tracker._on_invalidate = timed
    key = store.redis.key("bench")
    writer = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITER, url, key, str(writes), str(interval),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(writer.communicate(), writes * (interval + 0.05) + 30)
    await asyncio.sleep(0.1)  # the last invalidation's way here
    await store.aclose()
    started = [float(line) for line in output.split()]
    if len(seen) != len(started):
        raise RuntimeError(f"{len(started)} writes, {len(seen)} invalidations (lost or merged)")
    return sorted(end - start for start, end in zip(started, seen, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writes", type=int, default=2000, help="writes (2000)")
    parser.add_argument("--interval-ms", type=float, default=2.0, help="between writes (2)")
    args = parser.parse_args()
    if not 1 <= args.writes <= 100_000 or not 0.5 <= args.interval_ms <= 1000:
        sys.exit("invalidation_delay: --writes 1..100000, --interval-ms 0.5..1000")
    with RedisServer() as redis:
        delays = asyncio.run(measure(redis.url, args.writes, args.interval_ms / 1000))
    p50, p99 = delays[len(delays) // 2], delays[int(len(delays) * 0.99) - 1]
    print(
        f"invalidation delay, {len(delays)} writes by another process: "
        f"p50 {p50 * 1e6:.0f} us, p99 {p99 * 1e6:.0f} us, max {delays[-1] * 1e6:.0f} us"
    )


if __name__ == "__main__":
    main()
