"""The client-side transport: its decisions against a mock inner transport (and the router's
own, key by key), then real demo_app processes, a real registry and a real balancer."""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from balancer import AffinityCookie, ConfigError, Pool, Router, Sticky
from balancer.transport import (
    BalancedSyncTransport,
    BalancedTransport,
    BalancePolicy,
    StaticInstances,
)
from redis_plumbing import RedisServer
from service_registry import Instance, Registry
from tests.helpers import async_wait_for
from tests.processes import Process, balancer, demo_app

pytestmark = pytest.mark.anyio

URLS = [f"http://127.0.0.1:{port}" for port in (9301, 9302, 9303, 9304)]
TABLE = 251  # a small prime: tables build in microseconds, and the balancer takes it too


class Recorder:
    """An inner transport: answers with the origin it was sent to; some origins refuse."""

    def __init__(self, dead: frozenset[str] = frozenset()) -> None:
        self.dead = dead
        self.seen: list[str] = []
        self.hosts: list[str] = []
        self.closed = False
        self.transport = httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        origin = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        self.seen.append(origin)
        self.hosts.append(request.headers["host"])
        if origin in self.dead:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, text=origin)


def client(transport: BalancedTransport) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=transport, base_url="http://demo")


async def test_round_robin_spreads_and_rewrites_the_origin() -> None:
    inner = Recorder()
    transport = BalancedTransport(StaticInstances(URLS[:3]), inner=inner.transport)
    async with client(transport) as http:
        for _ in range(30):
            assert (await http.get("/x?y=1")).status_code == 200
    assert Counter(inner.seen) == dict.fromkeys(URLS[:3], 10)
    assert inner.hosts[0] == inner.seen[0].removeprefix("http://")


@pytest.mark.parametrize("balance", ["least-inflight", "p2c"])
async def test_load_aware_policies_use_every_instance(balance: BalancePolicy) -> None:
    inner = Recorder()
    transport = BalancedTransport(StaticInstances(URLS[:3]), balance=balance, inner=inner.transport)
    async with client(transport) as http:
        await asyncio.gather(*(http.get("/") for _ in range(60)))
    assert set(inner.seen) == set(URLS[:3])


async def test_connect_errors_retry_elsewhere_and_eject() -> None:
    dead = URLS[0]
    inner = Recorder(dead=frozenset({dead}))
    transport = BalancedTransport(StaticInstances(URLS[:3]), inner=inner.transport)
    async with client(transport) as http:
        answers = [(await http.get("/")).text for _ in range(20)]
    assert dead not in answers
    assert inner.seen.count(dead) == 1  # tried once, then ejected for ejection_time


async def test_every_instance_down_is_a_connect_error() -> None:
    inner = Recorder(dead=frozenset(URLS[:2]))
    transport = BalancedTransport(StaticInstances(URLS[:2]), inner=inner.transport)
    async with client(transport) as http:
        with pytest.raises(httpx.ConnectError):
            await http.get("/")
    empty = BalancedTransport(StaticInstances([]), inner=inner.transport)
    async with client(empty) as http:
        with pytest.raises(httpx.ConnectError, match="no live instance"):
            await http.get("/")


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"balance": "random"}, "balance"),
        ({"hash_on": "query:x"}, "hash_on"),
        ({"hash_on": "cookie:"}, "hash_on"),
        ({"table_size": 100}, "table_size"),
        ({"max_attempts": 0}, "max_attempts"),
    ],
)
def test_bad_options_name_the_parameter(kwargs: dict[str, object], parameter: str) -> None:
    with pytest.raises(ValueError, match=f"^{parameter}[: ]") as info:
        BalancedTransport(StaticInstances(URLS), **kwargs)  # type: ignore[arg-type]
    assert not isinstance(info.value, ConfigError)


def router_choice(pool: Pool, key: str) -> str:
    """The balancer's own decision for a client whose session cookie is `key`, unpinned."""
    router = Router(
        pool,
        sticky=Sticky("cookie", "sid"),
        affinity=AffinityCookie(secrets=["0123456789abcdef0123"]),
        table_size=TABLE,
    )
    return router.decide(client_ip="127.0.0.1", cookie_header=f"sid={key}".encode()).backend.url


async def test_hash_agrees_with_the_balancers_router_on_every_key() -> None:
    inner = Recorder()
    transport = BalancedTransport(
        StaticInstances(URLS), balance="hash", hash_on="cookie:sid", table_size=TABLE,
        inner=inner.transport,
    )  # fmt: skip
    keys = [secrets.token_urlsafe(8) for _ in range(200)]
    pool = Pool(URLS)
    async with client(transport) as http:
        for key in keys:
            response = await http.get("/", headers={"cookie": f"a=1; sid={key}"})
            assert response.text == router_choice(pool, key), key
        # A caller-given key, and a header, hash the same way.
        key = keys[0]
        given = await http.get("/", extensions={"balance_key": key})
        assert given.text == router_choice(pool, key)
    assert len(set(inner.seen)) == 4


async def test_weighted_hash_agrees_with_a_weighted_router() -> None:
    weights = dict(zip(URLS, [1, 4, 2, 1], strict=True))
    inner = Recorder()
    transport = BalancedTransport(
        StaticInstances(URLS), balance="hash", hash_on="cookie:sid", table_size=TABLE,
        inner=inner.transport, weights=weights,
    )  # fmt: skip
    pool = Pool()
    for url, weight in weights.items():
        pool.add(url, weight=weight)
    keys = [secrets.token_urlsafe(8) for _ in range(400)]
    async with client(transport) as http:
        for key in keys:
            response = await http.get("/", headers={"cookie": f"sid={key}"})
            assert response.text == router_choice(pool, key), key
    counts = Counter(inner.seen)
    assert counts[URLS[1]] > 2 * counts[URLS[0]]  # weight 4 against 1
    with pytest.raises(ValueError, match="weight must be an integer from 1 to 256"):
        BalancedTransport(StaticInstances(URLS), weights={URLS[0]: 0})


async def test_hash_with_one_instance_dead_agrees_with_the_router_without_it() -> None:
    dead = URLS[1]
    inner = Recorder(dead=frozenset({dead}))
    transport = BalancedTransport(
        StaticInstances(URLS), balance="hash", hash_on="header:x-user", table_size=TABLE,
        inner=inner.transport,
    )  # fmt: skip
    survivors = Pool([u for u in URLS if u != dead])
    async with client(transport) as http:
        keys = [f"user-{n}" for n in range(60)]
        for key in keys:
            response = await http.get("/", headers={"x-user": key})
            # The first key that hashes to the dead instance ejects it (and is retried);
            # from then on the table is the one the balancer builds with that backend DOWN.
            assert response.text == router_choice(survivors, key), key
    assert dead in inner.seen


# -- real processes ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def apps() -> Iterator[list[Process]]:
    with demo_app("c1") as a, demo_app("c2") as b, demo_app("c3") as c:
        yield [a, b, c]


@pytest.fixture
async def registry(redis_server: RedisServer) -> AsyncIterator[Registry]:
    registry = Registry.from_url(redis_server.url, f"svc-{secrets.token_hex(4)}")
    try:
        yield registry
    finally:
        await registry.aclose()


async def test_through_the_registry_follows_registrations(
    apps: list[Process], registry: Registry
) -> None:
    for n, app in enumerate(apps):
        await registry.register(Instance(registry.service, f"c{n + 1}", app.url, ttl=30))
    transport = BalancedTransport(registry, refresh=0.05)
    async with httpx.AsyncClient(transport=transport, base_url=f"http://{registry.service}") as h:
        seen = {(await h.get("/api/session")).json()["instance"] for _ in range(9)}
        assert seen == {"c1", "c2", "c3"}
        await registry.deregister("c2")

        async def gone() -> bool:
            await h.get("/healthz")  # a request starts a background read when one is due
            return "c2" not in {i.id for i in transport.instances}

        await async_wait_for(gone, within=5, what="c2 to leave the transport's list")
        seen = {(await h.get("/api/session")).json()["instance"] for _ in range(10)}
        assert seen == {"c1", "c3"}
    await transport.aclose()


async def test_hash_agrees_with_a_real_balancer(apps: list[Process]) -> None:
    urls = [app.url for app in apps]
    with balancer(urls, "--sticky", "cookie:sid", admin=False) as (proxy, _):
        transport = BalancedTransport(StaticInstances(urls), balance="hash", hash_on="cookie:sid")
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://demo") as direct,
            httpx.AsyncClient(base_url=proxy.url) as central,
        ):
            for n in range(12):
                cookie = {"cookie": f"sid=key-{n}"}
                via_balancer = (await central.get("/api/session", headers=cookie)).json()
                via_transport = (await direct.get("/api/session", headers=cookie)).json()
                assert via_transport["instance"] == via_balancer["instance"], n
        await transport.aclose()


def test_sync_transport_balances_and_retries(apps: list[Process]) -> None:
    dead = "http://127.0.0.1:1"  # nothing listens on port 1
    transport = BalancedSyncTransport(instances=[dead, *(app.url for app in apps)])
    with httpx.Client(transport=transport, base_url="http://demo") as http:
        seen = Counter(http.get("/api/session").json()["instance"] for _ in range(12))
    assert set(seen) == {"c1", "c2", "c3"}
    assert sum(seen.values()) == 12


def test_sync_transport_reads_the_registry(apps: list[Process], redis_server: RedisServer) -> None:
    service = f"svc-{secrets.token_hex(4)}"

    async def register() -> None:
        registry = Registry.from_url(redis_server.url, service)
        try:
            await registry.register(Instance(service, "only", apps[0].url, ttl=30))
        finally:
            await registry.aclose()

    asyncio.run(register())
    transport = BalancedSyncTransport(registry_url=redis_server.url, service=service)
    with httpx.Client(transport=transport, base_url=f"http://{service}") as http:
        assert http.get("/api/session").json()["instance"] == "c1"
    assert [i.id for i in transport.instances] == ["only"]
