"""Benchmark: how long a hybrid instance serves its copy after another process's write.

    .venv/bin/python benchmarks/invalidation_delay.py [--writes 2000] [--interval-ms 2]

A `HybridStore` holds a session; another process (its own Redis client, as another
instance would) writes that session ``--writes`` times, ``--interval-ms`` apart, noting the
monotonic clock (one clock for every process on Linux) just before each write. The delay is
from there to the moment the hybrid store has marked its copy untrusted (the tracking
connection's invalidation handled): the longest a write elsewhere can go unseen by a read
here. Prints p50, p99 and the maximum. Traffic stays on 127.0.0.1.

    .venv/bin/python benchmarks/invalidation_delay.py --cpu [--cpu-seconds 5]

What BCAST costs an instance that does not even hold the sessions written: a `HybridStore`
tracks, idle, while another process saves sessions (`RedisStore.save`, the real script, 1,000
sessions in turn) at the demo's write rate (100 a second) and at a high one (5,000 a
second), ``--cpu-seconds`` each. The tracking process's CPU time (`time.process_time`) over
that time, less what the same time costs it with no writes (its PINGs), divided by the
writes: the CPU each instance pays per session write made anywhere. Every instance pays it,
whatever the number of instances: N instances pay N times it per write in all.
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
from session_store._tracking import Tracker  # noqa: E402

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


SAVER = """
import asyncio, sys, time
sys.path.insert(0, sys.argv[1])
from session_store import Changes, RedisStore

async def main(url, rate, seconds):
    store = RedisStore.from_url(url)
    ids = [f"cpu-{i}" for i in range(1000)]
    sys.stdin.readline()  # go
    tick, done, start = 0.01, 0, time.monotonic()  # seconds; a batch of saves per tick
    while done < rate * seconds:
        batch = [ids[(done + i) % len(ids)] for i in range(max(1, int(rate * tick)))]
        await asyncio.gather(*(
            store.save(sid, Changes({"n": str(done)}), created=0, ttl=600_000, create=False)
            for sid in batch
        ))
        done += len(batch)
        await asyncio.sleep(max(0.0, start + done / rate - time.monotonic()))
    print(done, time.monotonic() - start, flush=True)
    await store.aclose()

asyncio.run(main(sys.argv[2], float(sys.argv[3]), float(sys.argv[4])))
"""


async def cpu_per_write(url: str, rate: float, seconds: float) -> tuple[int, int, float, float]:
    """Writes made, messages received, the tracking process's CPU per write (us) and the
    writer's achieved rate, for ``rate`` session saves a second by another process."""
    store = HybridStore(RedisStore.from_url(url))
    assert store.tracker is not None, "tracking is on by default"
    for i in range(1000):  # the sessions exist before tracking starts
        await store.redis.save(f"cpu-{i}", Changes({}), created=0, ttl=600_000, create=True)
    store.tracker.start()
    await asyncio.wait_for(store.tracker.subscribed_event.wait(), 5)
    idle = time.process_time()
    await asyncio.sleep(seconds)
    idle = (time.process_time() - idle) / seconds  # CPU seconds a second, PINGs only
    writer = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SAVER, str(ROOT), url, str(rate), str(seconds),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert writer.stdin is not None
    await asyncio.sleep(0.5)  # the writer's imports, on its own CPU
    messages, cpu, wall = store._invalidations, time.process_time(), time.monotonic()
    writer.stdin.write(b"go\n")
    output, _ = await asyncio.wait_for(writer.communicate(), seconds * 3 + 30)
    # Every message in: a write of our own whose invalidation comes after all of them.
    before = store._invalidations
    await store.redis.client.set(f"{store.redis.prefix}cpu-fence", "1", px=10_000)
    deadline = time.monotonic() + 5  # seconds
    # A counter the store keeps, with no event to wait on; polled, bounded.
    while store._invalidations == before and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.001)
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    messages = store._invalidations - messages - 1
    await store.aclose()
    writes, took = output.split()
    per_write = (cpu - idle * wall) / int(writes)
    return int(writes), messages, per_write * 1e6, int(writes) / float(took)


async def measure(url: str, writes: int, interval: float) -> list[float]:
    store = HybridStore(RedisStore.from_url(url))
    # One connection's delay: a redis:// URL (a Cluster's tracker is one per primary).
    assert isinstance(store.tracker, Tracker), "measured on one server: use a redis:// URL"
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
    parser.add_argument(
        "--cpu", action="store_true", help="measure BCAST's CPU cost per write instead"
    )
    parser.add_argument("--cpu-seconds", type=float, default=5.0, help="per rate, with --cpu (5)")
    args = parser.parse_args()
    if args.cpu:
        if not 1 <= args.cpu_seconds <= 60:
            sys.exit("invalidation_delay: --cpu-seconds 1..60")
        for rate in (100, 5000):
            with RedisServer() as redis:
                made = asyncio.run(cpu_per_write(redis.url, rate, args.cpu_seconds))
            writes, messages, per_write, achieved = made
            print(
                f"BCAST, {writes} session saves by another process at {achieved:.0f}/s: "
                f"{messages} messages, the tracking process's CPU {per_write:.1f} us a write "
                f"({per_write * writes / max(messages, 1):.0f} us a message)"
            )
        return
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
