"""The service registry through a real Sentinel failover: no instance missing for longer
than one heartbeat interval once the sentinels have promoted the replica.

Instances heartbeat through ``redis+sentinel://`` (demo_app's `Registration`, in this
process); a watcher reads the registry every 50 ms, as the balancer's discovery does, and
feeds the same `Membership` the balancer keeps. The replication stream is held back before
the primary is killed (`tests.redis_sentinel.Link`), and one instance registers in that
moment, so the promoted replica has lost its record and the others' latest heartbeats:
what a failover can really lose. The registry needs no WAIT for this: every heartbeat
writes the whole record again, so a lost one is back with the next beat.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from demo_app._registration import Registration
from service_registry import Membership, Registry, RegistryError
from tests.helpers import async_wait_until
from tests.redis_sentinel import SentinelSetup

pytestmark = pytest.mark.anyio

TTL = 3.0  # seconds; the default registry ttl
HEARTBEAT = TTL / 3  # seconds: Registration beats every ttl / 3
POLL = 0.05  # seconds between the watcher's reads
# A read sees a heartbeat at most a poll period after it was written, and a beat that
# follows a failed one reconnects first (one sentinel query, one connect).
SLACK = POLL + 0.2  # seconds


@dataclass
class Watch:
    """What the watcher saw: each successful read's time and ids, and Membership's removals."""

    reads: list[tuple[float, frozenset[str]]] = field(default_factory=list)
    failed_reads: int = 0
    removed: list[str] = field(default_factory=list)
    running: bool = True


async def watch(registry: Registry, seen: Watch) -> None:
    membership = Membership()
    while seen.running:
        try:
            snapshot = await registry.read()
        except RegistryError:
            seen.failed_reads += 1
            membership.unreachable()
        else:
            now = time.monotonic()
            seen.reads.append((now, frozenset(i.id for i in snapshot.instances)))
            changes = membership.update(snapshot, now)
            seen.removed.extend(i.id for i in changes.removed)
        await asyncio.sleep(POLL)  # the watcher's schedule


def registration(url: str, name: str, port: int) -> Registration:
    return Registration(
        url,
        service="demo",
        advertise=f"http://127.0.0.1:{port}",
        instance_id=name,
        ttl=TTL,
        ready_path=None,
        handle_signals=False,
    )


@pytest.fixture
def sentinel() -> Iterator[SentinelSetup]:
    with SentinelSetup() as setup:
        yield setup


@pytest.mark.timeout(60)
async def test_a_failover_loses_no_instance_for_longer_than_one_heartbeat(
    sentinel: SentinelSetup,
) -> None:
    watcher = Registry.from_url(sentinel.url, "demo")
    seen = Watch()
    names = ["a", "b", "c"]
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(watcher.aclose)
        for n, name in enumerate(names):
            await stack.enter_async_context(registration(sentinel.url, name, 9001 + n).lifespan())
        task = asyncio.create_task(watch(watcher, seen))
        try:
            await async_wait_until(
                lambda: bool(seen.reads) and seen.reads[-1][1] == {"a", "b", "c"},
                10,
                "every instance registered",
            )
            old = sentinel.current_primary()
            sentinel.link.hold()  # the replica stops receiving: heartbeats pile up unreplicated
            late = registration(sentinel.url, "late", 9004)
            await stack.enter_async_context(late.lifespan())
            names.append("late")
            await async_wait_until(
                lambda: "late" in seen.reads[-1][1], 5, "the late instance on the primary"
            )
            killed = time.monotonic()
            sentinel.kill_primary()
            await asyncio.to_thread(sentinel.wait_failover, old)
            promoted = time.monotonic()
            # Two heartbeats' time after the promotion is enough to see every instance back.
            await asyncio.sleep(2 * HEARTBEAT + SLACK)  # the length of the observation
        finally:
            seen.running = False
            await task

    after = [(t, ids) for t, ids in seen.reads if t >= promoted]
    assert after, "the watcher read nothing after the failover"
    assert after[-1][1] == set(names)
    longest = 0.0
    for name in names:
        missing_since = [t for t, ids in after if name not in ids]
        if missing_since:
            longest = max(longest, max(missing_since) - promoted)
    print(
        f"\nregistry failover: promoted {promoted - killed:.2f} s after the SIGKILL; "
        f"{seen.failed_reads} reads failed meanwhile; after the promotion an instance was "
        f"missing from reads for at most {longest:.2f} s (heartbeat {HEARTBEAT:.2f} s); "
        f"the balancer's membership removed {seen.removed or 'nothing'}"
    )
    assert longest <= HEARTBEAT + SLACK
    # The balancer's view (Membership's grace after an outage) drops nobody at all.
    assert seen.removed == []
