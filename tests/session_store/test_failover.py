"""Acknowledged writes (``min_replicas_ack``): WAIT on one server, then a real Sentinel failover.

The failover test runs the demo app as a real process over ``redis+sentinel://`` with a
load of session writes, kills the primary with SIGKILL, lets the sentinels promote the
replica, and then reads back every session a 2xx response acknowledged. Asynchronous
replication loses a write when the primary acknowledged it and died before the replica
had it; on loopback the replica is never behind for long (a plain SIGKILL under load lost
nothing in our runs), so the test first holds the replication stream back in the relay
the replica reaches the primary through (`tests.redis_sentinel.Link`, a slow network) and
lets the primary take writes alone for a moment before the kill. With
``--min-replicas-ack 1`` those writes are answered 503 (not acknowledged) and nothing
acknowledged is lost; without it, the count of lost writes is printed. After the failover
no replica is left, so with the option every write is a 503 until the killed node comes
back: the test restarts it, empty, as a replica of the new primary (what a StatefulSet
with a sentinel-aware start script does), and the app recovers by itself, with no restart
of the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.cookiejar as http_cookiejar
import itertools
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from demo_app.__main__ import parse_args
from redis_plumbing import RedisServer
from session_store import (
    HybridStore,
    RedisStore,
    StoreUnavailable,
    WriteNotAcknowledged,
    new_session_id,
)
from session_store._store import Changes
from tests.helpers import async_wait_until, free_port
from tests.processes import Process, demo_app_args
from tests.redis_sentinel import SentinelSetup, acknowledged, info, query
from tests.session_store.app import make_app

pytestmark = pytest.mark.anyio

NOW = 1_700_000_000.0


def client_for(app: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),  # type: ignore[arg-type]
        base_url="http://testserver",
    )


def wait_calls(server: RedisServer) -> int:
    stats = info(server.port, "commandstats")
    entry = stats.get("cmdstat_wait", "calls=0")
    return int(entry.split(",")[0].removeprefix("calls="))


# -- one server: the option's contract ----------------------------------------------------


async def test_without_the_option_no_write_waits(own_redis: RedisServer) -> None:
    store = RedisStore.from_url(own_redis.url)
    try:
        sid = new_session_id()
        assert await store.save(sid, Changes({"a": "1"}), created=NOW, ttl=60, create=True)
        await store.destroy(sid, ttl=60)
        assert wait_calls(own_redis) == 0
    finally:
        await store.aclose()


async def test_a_write_no_replica_confirms_is_not_acknowledged(own_redis: RedisServer) -> None:
    store = RedisStore.from_url(own_redis.url, min_replicas_ack=1, ack_timeout_ms=50)
    try:
        sid = new_session_id()
        started = time.monotonic()
        with pytest.raises(WriteNotAcknowledged, match="0 of 1 required replicas") as caught:
            await store.save(sid, Changes({"a": "1"}), created=NOW, ttl=60, create=True)
        assert time.monotonic() - started < 1.0  # bounded by ack_timeout_ms, not a hang
        assert (caught.value.acknowledged, caught.value.required) == (0, 1)
        assert isinstance(caught.value, StoreUnavailable)
        # The primary has it (WAIT confirms nothing more): it may survive, or not.
        record = await store.load(sid)
        assert record is not None
        with pytest.raises(WriteNotAcknowledged):
            await store.destroy(sid, ttl=60)
        assert wait_calls(own_redis) >= 2  # one a write, two when a NOSCRIPT retry ran
        # A write that wrote nothing (an update of a missing session) has nothing to lose.
        missing = new_session_id()
        changes = Changes({"a": "1"})
        assert await store.save(missing, changes, created=NOW, ttl=60, create=False) is None
    finally:
        await store.aclose()


async def test_the_middleware_answers_an_unacknowledged_write_with_503(
    own_redis: RedisServer,
) -> None:
    store = RedisStore.from_url(own_redis.url, min_replicas_ack=1, ack_timeout_ms=50)
    try:
        async with client_for(make_app(store, retry_after=3)) as client:
            response = await client.post("/set", params={"a": "1"})
            assert response.status_code == 503
            assert response.headers["retry-after"] == "3"
            assert "not replicated" in response.text  # not "unreachable": it says which
            assert "set-cookie" not in response.headers  # no session claimed
            # Reads need no replica.
            assert (await client.get("/read")).status_code == 200
    finally:
        await store.aclose()


@contextlib.asynccontextmanager
async def replicated() -> AsyncIterator[tuple[RedisServer, RedisServer]]:
    """A primary and a replica that confirms its writes."""
    with (
        RedisServer(extra_args=("--repl-diskless-sync-delay", "0")) as primary,
        RedisServer(extra_args=("--replicaof", "127.0.0.1", str(primary.port))) as replica,
    ):
        await async_wait_until(lambda: acknowledged(primary.port), 10, "the replica to confirm")
        yield primary, replica


async def test_hybrid_does_not_defer_a_write_it_cannot_get_acknowledged() -> None:
    async with replicated() as (primary, replica):
        # Slack for a loaded machine's replica to confirm (under the store's 1 s timeout);
        # the write after the replica is killed waits this long for its WAIT, then fails.
        redis = RedisStore.from_url(primary.url, min_replicas_ack=1, ack_timeout_ms=900)
        store = HybridStore(redis)
        try:
            sid = new_session_id()
            assert await store.save(sid, Changes({"a": "1"}), created=NOW, ttl=60, create=True)
            replica.kill()
            with pytest.raises(WriteNotAcknowledged):
                await store.save(sid, Changes({"a": "2"}), created=NOW, ttl=60, create=False)
            record = await store.load(sid)  # cached again, from the primary
            assert record is not None
            primary.kill()
            # Without the option, a cached session's write would be deferred and answered
            # 2xx; memory is no replica, so with it the write fails.
            with pytest.raises(StoreUnavailable):
                await store.save(sid, Changes({"a": "3"}), created=NOW, ttl=60, create=False)
            assert store.pending == 0
            assert (await store.load(sid)) == record  # reads still come from memory
        finally:
            await store.aclose()


async def test_replicas_that_confirm_make_a_write_acknowledged() -> None:
    async with replicated() as (primary, replica):
        store = RedisStore.from_url(primary.url, min_replicas_ack=1, ack_timeout_ms=900)
        try:
            sid = new_session_id()
            assert await store.save(sid, Changes({"a": "1"}), created=NOW, ttl=60, create=True)
            assert await store.save(sid, Changes({"a": "2"}), created=NOW, ttl=60, create=False)
            # The replica has it the moment the write returns, not eventually.
            assert query(replica.port, "HGET", store.key(sid), "d:a") == "2"
        finally:
            await store.aclose()


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"min_replicas_ack": -1}, "min_replicas_ack must be 0"),
        ({"min_replicas_ack": 1.5}, "min_replicas_ack must be an integer"),
        ({"min_replicas_ack": 1, "ack_timeout_ms": 0}, "ack_timeout_ms must be between 1"),
        ({"min_replicas_ack": 1, "ack_timeout_ms": 1000}, "store's timeout"),
    ],
)
def test_options_that_cannot_work_are_refused(options: dict[str, object], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        RedisStore.from_url("redis://127.0.0.1:1/0", **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--store", "redis", "--min-replicas-ack", "-1"], "--min-replicas-ack: must be 0"),
        (["--min-replicas-ack", "1"], "--min-replicas-ack: needs --store redis or hybrid"),
        (
            ["--store", "redis", "--min-replicas-ack", "1", "--ack-timeout-ms", "0"],
            "--ack-timeout-ms: must be 1 to 999",
        ),
        (["--store", "hybrid", "--min-replicas-ack", "1", "--ack-timeout-ms", "5000"], "--ack"),
    ],
)
def test_demo_flags_that_cannot_work_exit_2_naming_the_flag(
    flags: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--port", "9000", "--instance-id", "a", "--redis-url", "redis://127.0.0.1:1/0"]
    with pytest.raises(SystemExit) as exited:
        parse_args([*base, *flags])
    assert exited.value.code == 2
    assert words in capsys.readouterr().err


def test_demo_flags_reach_the_settings() -> None:
    base = ["--port", "9000", "--instance-id", "a", "--store", "redis"]
    flags = ["--redis-url", "redis://127.0.0.1:1/0", "--min-replicas-ack", "2"]
    args = parse_args([*base, *flags, "--ack-timeout-ms", "250"])
    assert (args.min_replicas_ack, args.ack_timeout_ms) == (2, 250)


# -- a real Sentinel failover under load ----------------------------------------------------

CLIENTS = 8
ACK_TIMEOUT_MS = 200
ITEMS_PER_SESSION = 40  # then a client starts a new session: the demo's cart holds 100


@dataclass
class Load:
    """What the clients saw: each item a 2xx response acknowledged, and every failure."""

    acknowledged: dict[str, list[str]] = field(default_factory=dict)  # cookie -> cart items
    failures: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, status)
    successes: list[float] = field(default_factory=list)  # monotonic
    running: bool = True


async def client_loop(http: httpx.AsyncClient, load: Load, name: int) -> None:
    """Add a new, unique item to a cart, again and again: each 2xx is one acknowledged write."""
    cookie: str | None = None
    written = 0
    for n in itertools.count():
        if not load.running:
            return
        if written >= ITEMS_PER_SESSION:
            cookie, written = None, 0
        item = f"c{name}-{n}"
        headers = {"cookie": f"sid={cookie}"} if cookie else {}
        response = await http.post("/api/cart", json={"item": item}, headers=headers)
        now = time.monotonic()
        if response.status_code != 200:
            load.failures.append((now, response.status_code))
            # A client that honours Retry-After waits; this one only briefly, to keep up the load.
            await asyncio.sleep(0.02)
            continue
        new = set_cookie(response)
        if new == "":
            # The app says the session ended (it vanished under this request, as when a
            # failover lost it) and dropped the write: not acknowledged.
            cookie, written = None, 0
            continue
        if new is not None:
            cookie = new  # a new session: the first request, or the old one was lost
        assert cookie is not None
        load.acknowledged.setdefault(cookie, []).append(item)
        load.successes.append(now)
        written += 1


def set_cookie(response: httpx.Response) -> str | None:
    """The value the response sets the session cookie to ("" to end it), if it does."""
    for header in response.headers.get_list("set-cookie"):
        name, _, rest = header.partition("=")
        if name.strip() == "sid":
            return rest.partition(";")[0]
    return None


async def lost_writes(http: httpx.AsyncClient, load: Load) -> int:
    """How many acknowledged items are missing from their session now."""
    lost = 0
    for cookie, items in load.acknowledged.items():
        response = await http.get("/api/session", headers={"cookie": f"sid={cookie}"})
        assert response.status_code == 200
        kept = set(response.json()["session"].get("cart", []))
        lost += sum(1 for item in items if item not in kept)
    return lost


@contextlib.contextmanager
def demo_over_sentinel(setup: SentinelSetup, *flags: str) -> Iterator[Process]:
    port = free_port()
    args = demo_app_args(port, "f", "redis", setup.url) + list(flags)
    process = Process(args, f"http://127.0.0.1:{port}")
    # Drain its output: a warning per 503 would otherwise fill the pipe and stall it.
    assert process.popen.stdout is not None
    drain = threading.Thread(target=process.popen.stdout.read, daemon=True)
    drain.start()
    try:
        process.wait_ready("/readyz")
        yield process
    finally:
        process.terminate()  # SIGTERM, SIGKILL after 15 s; closes its output, ending `drain`
        drain.join(5)


@pytest.fixture
def sentinel() -> Iterator[SentinelSetup]:
    with SentinelSetup() as setup:
        yield setup


@pytest.mark.parametrize("min_replicas_ack", [0, 1], ids=["without-option", "with-option"])
@pytest.mark.timeout(60)
async def test_no_acknowledged_write_is_lost_in_a_sentinel_failover(
    sentinel: SentinelSetup, min_replicas_ack: int
) -> None:
    flags = ["--min-replicas-ack", str(min_replicas_ack), "--ack-timeout-ms", str(ACK_TIMEOUT_MS)]
    with demo_over_sentinel(sentinel, *flags) as app:
        limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
        async with httpx.AsyncClient(base_url=app.url, limits=limits, timeout=10) as http:
            # Each simulated user sends its own cookie: the shared client keeps none.
            http.cookies.jar.set_policy(http_cookiejar.DefaultCookiePolicy(allowed_domains=[]))
            load = Load()
            clients = [asyncio.create_task(client_loop(http, load, n)) for n in range(CLIENTS)]
            try:
                await async_wait_until(lambda: len(load.successes) >= 200, 20, "a steady load")
                old = sentinel.current_primary()
                # A slow network: the primary goes on taking writes the replica has not
                # received yet...
                sentinel.link.hold()
                held = len(load.successes), len(load.failures)
                await async_wait_until(
                    lambda: (
                        len(load.successes) >= held[0] + 20 or len(load.failures) >= held[1] + 20
                    ),
                    10,
                    "writes while the replica lags",
                )
                # ...and dies before they reach it.
                in_lag = len(load.successes) - held[0], len(load.failures) - held[1]
                killed = time.monotonic()
                sentinel.kill_primary()
                await asyncio.to_thread(sentinel.wait_failover, old)
                promoted = time.monotonic()
                sentinel.rejoin(old)  # here, not in a thread: see its docstring
                await async_wait_until(lambda: sentinel.linked(old), 15, "the old primary back")
                rejoined = time.monotonic()
                # Recovery by itself: every client gets 2xx again, nothing restarted.
                mark = len(load.successes)
                await async_wait_until(
                    lambda: len([t for t in load.successes[mark:] if t > rejoined]) >= 100,
                    15,
                    "2xx again after the failover",
                )
            finally:
                load.running = False
                ended = await asyncio.gather(*clients, return_exceptions=True)
            assert [e for e in ended if e is not None] == []

            # Every failure was a clear 503, never a 500 or a hang.
            assert {status for _, status in load.failures} <= {503}
            failed_after_kill = [t for t, _ in load.failures if t >= killed]
            window = (max(failed_after_kill) - killed) if failed_after_kill else 0.0
            lost = await lost_writes(http, load)

    print(
        f"\nmin_replicas_ack={min_replicas_ack}: {len(load.successes)} writes "
        f"acknowledged in {len(load.acknowledged)} sessions, {lost} lost; "
        f"{len(load.failures)} answered 503; 503s for {window:.2f} s after the SIGKILL "
        f"(promotion {promoted - killed:.2f} s after it, old primary back as a replica "
        f"{rejoined - killed:.2f} s after it)"
    )
    if min_replicas_ack:
        # WAIT held every write back while the replica lagged (but those in flight, whose
        # stream had passed the relay already), and lost none.
        assert in_lag[0] <= CLIENTS
        assert in_lag[1] >= 20
        assert lost == 0
    else:
        assert in_lag[0] >= 20  # the primary acknowledged writes the replica never got
