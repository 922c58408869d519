"""The registry protocol: the pure decisions, table-driven, then the Redis side for real."""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterator, Iterator

import pytest

from redis_plumbing import RedisServer
from service_registry import (
    Instance,
    Membership,
    Registry,
    RegistryError,
    RegistryTarget,
    RegistryUnavailable,
    Snapshot,
    live_instances,
    parse_registry_url,
)
from tests.helpers import async_wait_for
from tests.redis_topology import TLSServer

pytestmark = pytest.mark.anyio


def instance(n: int, *, ttl: float = 3.0, port: int | None = None) -> Instance:
    return Instance("demo", f"i{n}", f"http://127.0.0.1:{port or 9000 + n}", ttl=ttl)


# -- pure -------------------------------------------------------------------------------


def test_record_round_trips_as_json() -> None:
    original = Instance("demo", "a-1", "http://10.0.0.5:9001", "1.2", {"zone": "b"}, 2.5)
    assert Instance.from_json(original.to_json()) == original
    assert Instance.from_json(original.to_json().encode()) == original


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("not json", "not a registry record"),
        ('{"id": "a"}', "not a registry record"),
        ('{"service": "d", "id": "a b", "address": "http://h:1"}', "instance id 'a b'"),
        ('{"service": "d", "id": "a", "address": "ftp://h:1"}', "expected http://host:port"),
        ('{"service": "d", "id": "a", "address": "http://h:1", "ttl": 0}', "ttl"),
        ('{"service": "d{x}", "id": "a", "address": "http://h:1"}', "service"),
    ],
)
def test_bad_records_are_refused(text: str, words: str) -> None:
    with pytest.raises(RegistryError, match=words):
        Instance.from_json(text)


NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("entries", "alive"),
    [
        ([], []),
        ([("i1", NOW - 1, instance(1).to_json())], ["i1"]),
        ([("i1", NOW - 3, instance(1).to_json())], ["i1"]),  # exactly its ttl: still alive
        ([("i1", NOW - 3.01, instance(1).to_json())], []),  # past its ttl: dead
        ([("i1", NOW - 5, instance(1, ttl=10).to_json())], ["i1"]),  # its own, longer ttl
        ([("i2", NOW, instance(1).to_json())], []),  # the record names another id
        ([("i1", NOW, "garbage"), ("i2", NOW, instance(2).to_json())], ["i2"]),
        ([("i3", NOW, instance(3).to_json()), ("i1", NOW, instance(1).to_json())], ["i1", "i3"]),
        ([("x", NOW, Instance("other", "x", "http://h:1").to_json())], []),  # other service
    ],
)
def test_live_instances(entries: list[tuple[str, float, str]], alive: list[str]) -> None:
    assert [i.id for i in live_instances(entries, NOW, service="demo")] == alive


def snapshot(*instances: Instance, epoch: str | None = "e1") -> Snapshot:
    return Snapshot(tuple(instances), NOW, epoch)


def test_membership_adds_and_removes_at_once() -> None:
    members = Membership()
    changes = members.update(snapshot(instance(1), instance(2)), 0.0)
    assert [i.id for i in changes.added] == ["i1", "i2"]
    assert not changes.removed
    assert not members.update(snapshot(instance(1), instance(2)), 0.5)  # nothing new
    changes = members.update(snapshot(instance(2)), 1.0)
    assert [i.id for i in changes.removed] == ["i1"]
    assert sorted(members.instances) == ["i2"]


def test_membership_replaces_an_instance_whose_address_changed() -> None:
    members = Membership()
    members.update(snapshot(instance(1)), 0.0)
    moved = instance(1, port=9100)
    changes = members.update(snapshot(moved), 1.0)
    assert changes.removed == (instance(1),)
    assert changes.added == (moved,)


def test_after_redis_lost_its_data_removals_wait_one_ttl() -> None:
    members = Membership()
    members.update(snapshot(instance(1), instance(2)), 0.0)
    # Redis restarted empty: no epoch, nobody yet. Keep everyone for the longest ttl (3 s).
    assert not members.update(snapshot(epoch=None), 1.0)
    # One came back with a new epoch; the other never does (it died meanwhile).
    assert not members.update(snapshot(instance(2), epoch="e2"), 2.0)
    assert not members.update(snapshot(instance(2), epoch="e2"), 4.9)
    changes = members.update(snapshot(instance(2), epoch="e2"), 5.0)
    assert [i.id for i in changes.removed] == ["i1"]


def test_after_an_outage_removals_wait_but_a_goodbye_does_not() -> None:
    members = Membership()
    members.update(snapshot(instance(1), instance(2), instance(3)), 0.0)
    members.unreachable()
    assert not members.update(snapshot(instance(3)), 10.0)  # in grace: keep 1 and 2
    changes = members.update(snapshot(instance(3)), 11.0, gone=["i2"])
    assert [i.id for i in changes.removed] == ["i2"]  # it said "down": no grace for it
    changes = members.update(snapshot(instance(3)), 13.0)
    assert [i.id for i in changes.removed] == ["i1"]


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("redis://127.0.0.1:6379/demo", RegistryTarget("redis://127.0.0.1:6379/0", "demo")),
        ("redis://h/3/api.v2", RegistryTarget("redis://h/3", "api.v2")),
        ("rediss://u:p@h:1/0/s?ssl_cert_reqs=none",
         RegistryTarget("rediss://u:p@h:1/0?ssl_cert_reqs=none", "s")),
        ("redis+sentinel://s1:26379,s2:26380/mymaster/demo",
         RegistryTarget("redis+sentinel://s1:26379,s2:26380/mymaster", "demo")),
        ("redis+sentinel://u:p@s1/mymaster/2/demo",
         RegistryTarget("redis+sentinel://u:p@s1/mymaster/2", "demo")),
        ("redis+cluster://a:7000,b:7001/demo",
         RegistryTarget("redis+cluster://a:7000,b:7001", "demo")),
        ("rediss+cluster://a:7000/0/demo?ssl_ca_certs=/ca.pem",
         RegistryTarget("rediss+cluster://a:7000/0?ssl_ca_certs=/ca.pem", "demo")),
    ],
)  # fmt: skip
def test_parse_registry_url(url: str, target: RegistryTarget) -> None:
    assert parse_registry_url(url) == target


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("redis://h:1", "names no service"),
        ("redis://h:1/2", "names no service"),
        ("redis://h:1/x/y", "/DB/SERVICE"),
        ("redis://h:1/0/a:b", "service 'a:b'"),
        ("http://h:1/0/s", "expected redis://"),
        ("unix:///run/redis.sock", "expected redis://"),
        ("redis:///0/s", "has no host"),
        ("redis://h:99999/0/s", "not a valid URL"),
        ("redis+sentinel://s1/demo", "names no master"),
        ("redis+sentinel://s1", "names no service"),
        ("redis+sentinel://s1/m/x/demo", "database 'x' is not a number"),
        ("redis+cluster://a:1,b:2", "names no service"),
        ("redis+cluster://a:1/3/demo", "only database 0"),
        ("redis+cluster://a:1/x/y/demo", "expected the path /DB"),
        ("redis://:hunter2@h:1", "names no service"),
    ],
)
def test_bad_registry_urls(url: str, words: str) -> None:
    with pytest.raises(RegistryError, match=re.escape(words)) as error:
        parse_registry_url(url)
    assert "hunter2" not in str(error.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:hunter2@10.0.0.1/0/demo", "redis://10.0.0.1/0/demo"),
        ("redis+sentinel://app:hunter2@s1,s2/mymaster/demo?sentinel_password=hunter2",
         "redis+sentinel://app@s1,s2/mymaster/demo"),
        ("redis+cluster://a:1,b:2/demo", "redis+cluster://a:1,b:2/demo"),
    ],
)  # fmt: skip
def test_a_target_never_shows_a_password(url: str, shown: str) -> None:
    assert str(parse_registry_url(url)) == shown


# -- Redis ------------------------------------------------------------------------------


@pytest.fixture
async def registry(redis_server: RedisServer) -> AsyncIterator[Registry]:
    """A registry for a service of this test's own, on the shared Redis."""
    registry = Registry.from_url(redis_server.url, f"svc-{secrets.token_hex(4)}", timeout=1.0)
    try:
        yield registry
    finally:
        await registry.aclose()


def of(registry: Registry, n: int, ttl: float = 3.0) -> Instance:
    return Instance(registry.service, f"i{n}", f"http://127.0.0.1:{9000 + n}", ttl=ttl)


async def test_register_heartbeat_read_deregister(registry: Registry) -> None:
    assert (await registry.read()).instances == ()
    assert await registry.register(of(registry, 1)) is True  # new
    assert await registry.register(of(registry, 1)) is False  # a heartbeat
    assert await registry.register(of(registry, 2)) is True
    read = await registry.read()
    assert [i.id for i in read.instances] == ["i1", "i2"]
    assert read.epoch is not None
    assert await registry.deregister("i1") is True
    assert await registry.deregister("i1") is False
    assert [i.id for i in (await registry.read()).instances] == ["i2"]


async def test_a_read_tells_a_deregistration_from_a_death(registry: Registry) -> None:
    # Issue 15: a watcher drains an instance that left and drops one that died; a "down"
    # notice may be lost, so the read itself says which.
    await registry.register(of(registry, 1))
    await registry.register(of(registry, 2, ttl=0.2))
    await registry.deregister("i1")
    await wait_until_gone(registry, "i2")  # i2 died: no heartbeat within its ttl
    read = await registry.read()
    assert (read.instances, read.left) == ((), frozenset({"i1"}))
    await registry.register(of(registry, 1))  # back: no longer "left"
    assert (await registry.read()).left == frozenset()


async def wait_until_gone(registry: Registry, instance_id: str) -> None:
    async def gone() -> bool:
        return instance_id not in {i.id for i in (await registry.read()).instances}

    await async_wait_for(gone, 3, f"{instance_id} to expire")


async def test_the_epoch_changes_when_redis_lost_its_data_whoever_writes_first(
    registry: Registry,
) -> None:
    # The instance that set the epoch is also the first to write after the loss: the
    # epoch must change all the same, or watchers drop everyone else at once.
    await registry.register(of(registry, 1))
    await registry.register(of(registry, 2))
    before = (await registry.read()).epoch
    assert before is not None
    await registry.register(of(registry, 1))  # a heartbeat keeps it
    assert (await registry.read()).epoch == before
    await registry.client.delete(
        registry.heartbeats_key,
        registry.epoch_key,
        *(registry.instance_prefix + i for i in ("i1", "i2")),
    )
    await registry.register(of(registry, 1))
    after = (await registry.read()).epoch
    assert after is not None
    assert after != before


async def test_an_instance_that_stops_heartbeating_expires_and_is_swept(
    registry: Registry,
) -> None:
    await registry.register(of(registry, 1, ttl=0.2))
    await registry.register(of(registry, 2, ttl=30))

    async def only_i2() -> bool:
        return [i.id for i in (await registry.read()).instances] == ["i2"]

    await async_wait_for(only_i2, within=3, what="i1's ttl to run out")

    # Once its record has expired too, a read also drops i1 from the sorted set: nothing
    # grows without bound.
    async def swept() -> bool:
        await registry.read()
        return await registry.client.zrange(registry.heartbeats_key, 0, -1) == [b"i2"]

    await async_wait_for(swept, within=3, what="i1 to be swept from the heartbeats")
    assert [i.id for i in (await registry.read()).instances] == ["i2"]


async def test_notices_say_up_and_down(registry: Registry) -> None:
    async with registry.notices() as next_notice:
        assert await next_notice(0.05) is None
        await registry.register(of(registry, 1))
        await registry.register(of(registry, 1))  # a heartbeat says nothing
        await registry.deregister("i1")
        seen = []
        for _ in range(50):
            notice = await next_notice(0.1)
            if notice is not None:
                seen.append((notice.event, notice.id))
            if len(seen) == 2:
                break
    assert seen == [("up", "i1"), ("down", "i1")]


async def test_an_instance_of_another_service_is_refused(registry: Registry) -> None:
    with pytest.raises(RegistryError, match="of service"):
        await registry.register(Instance("other", "x", "http://h:1"))


async def test_redis_down_is_registry_unavailable(own_redis: RedisServer) -> None:
    registry = Registry.from_url(own_redis.url, "demo", timeout=0.5)
    try:
        await registry.register(instance(1))
        own_redis.stop()
        with pytest.raises(RegistryUnavailable):
            await registry.read()
        with pytest.raises(RegistryUnavailable):
            await registry.register(instance(1))
        own_redis.start()
        # A restarted (empty) Redis: the scripts are loaded again, the heartbeat re-registers.
        assert await registry.register(instance(1)) is True
        assert [i.id for i in (await registry.read()).instances] == ["i1"]
    finally:
        await registry.aclose()


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSServer]:
    with TLSServer(tmp_path_factory.mktemp("tls")) as server:
        yield server


async def test_registry_over_tls_as_an_acl_user(tls_server: TLSServer) -> None:
    base = tls_server.tls_url().replace("/0?", "/0/tls-demo?")
    target = parse_registry_url(base)
    assert tls_server.password not in str(target)
    registry = Registry.from_target(target)
    try:
        async with registry.notices() as next_notice:
            assert await registry.register(of(registry, 1)) is True
            notice = None
            for _ in range(20):
                notice = notice or await next_notice(0.1)
            assert notice is not None
            assert (notice.event, notice.id) == ("up", "i1")
        assert [i.id for i in (await registry.read()).instances] == ["i1"]
    finally:
        await registry.aclose()


async def test_registry_with_a_wrong_password_is_unavailable_not_a_hang(
    tls_server: TLSServer,
) -> None:
    registry = Registry.from_url(tls_server.tls_url(password="wrong"), "tls-demo", timeout=0.5)
    try:
        with pytest.raises(RegistryUnavailable, match=r"(?i)invalid username-password|WRONGPASS"):
            await registry.read()
    finally:
        await registry.aclose()
