"""`redis_plumbing.redis_client`: every URL form read into the right client, every bad one
refused with a reason; then the real thing over TLS with an ACL user, and over Sentinel;
and `cancellable`, which keeps a cancel that redis-py would lose.

The parsing is pure and table-driven; the TLS tests start a TLS-only redis-server with a CA
and a certificate made here (`tests.redis_topology.TLSServer`), and the Sentinel test a real
primary, replica and three sentinels (`tests.redis_sentinel.SentinelSetup`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
from redis.asyncio.sentinel import SentinelConnectionPool

from redis_plumbing import (
    RedisPlumbingError,
    RedisServer,
    RedisURL,
    RedisURLError,
    cancellable,
    parse_redis_url,
    redact_url,
    redis_client,
)
from session_store import Changes, RedisStore, StoreUnavailable
from tests.helpers import lost_cancels
from tests.redis_sentinel import SentinelSetup
from tests.redis_topology import TLSServer, make_certificates

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1", RedisURL("server", False, (("127.0.0.1", 6379),))),
        ("redis://h:7000/3", RedisURL("server", False, (("h", 7000),), db=3)),
        ("REDIS://h:7000/", RedisURL("server", False, (("h", 7000),))),
        ("redis://h?db=5", RedisURL("server", False, (("h", 6379),), db=5)),
        ("redis://:pw@h", RedisURL("server", False, (("h", 6379),), password="pw")),
        ("redis://u:p%40ss@h/0",
         RedisURL("server", False, (("h", 6379),), username="u", password="p@ss")),
        ("redis://u@h", RedisURL("server", False, (("h", 6379),), username="u")),
        ("redis://[::1]:7000", RedisURL("server", False, (("::1", 7000),))),
        ("redis://h?socket_timeout=0.5&max_connections=20&client_name=app",
         RedisURL("server", False, (("h", 6379),),
                  options={"socket_timeout": 0.5, "max_connections": 20, "client_name": "app"})),
        ("rediss://u:p@h:6380/0?ssl_ca_certs=/ca.pem&ssl_cert_reqs=required",
         RedisURL("server", True, (("h", 6380),), username="u", password="p",
                  options={"ssl_ca_certs": "/ca.pem", "ssl_cert_reqs": "required"})),
        ("rediss://h?ssl_certfile=/c.pem&ssl_keyfile=/c.key&ssl_check_hostname=false",
         RedisURL("server", True, (("h", 6379),),
                  options={"ssl_certfile": "/c.pem", "ssl_keyfile": "/c.key",
                           "ssl_check_hostname": False})),
        ("unix:///run/redis.sock", RedisURL("unix", False, socket_path="/run/redis.sock")),
        ("unix://:pw@/run/redis.sock?db=2",
         RedisURL("unix", False, socket_path="/run/redis.sock", db=2, password="pw")),
        ("redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/mymaster",
         RedisURL("sentinel", False, (("127.0.0.1", 26379), ("127.0.0.1", 26380)),
                  master="mymaster")),
        ("redis+sentinel://s1,s2:5000/mymaster/4",
         RedisURL("sentinel", False, (("s1", 26379), ("s2", 5000)), master="mymaster", db=4)),
        ("redis+sentinel://app:pw@s1/m?sentinel_password=spw&sentinel_username=sentinel",
         RedisURL("sentinel", False, (("s1", 26379),), master="m", username="app",
                  password="pw",
                  sentinel_options={"password": "spw", "username": "sentinel"})),
        ("rediss+sentinel://s1/m?ssl_ca_certs=/ca.pem",
         RedisURL("sentinel", True, (("s1", 26379),), master="m",
                  options={"ssl_ca_certs": "/ca.pem"})),
        ("redis+cluster://a:7000,b:7001,[::1]:7002",
         RedisURL("cluster", False, (("a", 7000), ("b", 7001), ("::1", 7002)))),
        ("redis+cluster://u:p@a/0", RedisURL("cluster", False, (("a", 6379),), username="u",
                                             password="p")),
        ("rediss+cluster://a:7000?ssl_ca_certs=/ca.pem",
         RedisURL("cluster", True, (("a", 7000),), options={"ssl_ca_certs": "/ca.pem"})),
    ],
)  # fmt: skip
def test_every_form_is_read(url: str, expected: RedisURL) -> None:
    got = parse_redis_url(url)
    assert got == expected
    # Fields left out of the repr (secrets, options) compare too.
    assert (got.password, dict(got.options), dict(got.sentinel_options)) == (
        expected.password,
        dict(expected.options),
        dict(expected.sentinel_options),
    )


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("", "empty"),
        ("127.0.0.1:6379", "expected redis://, rediss://, unix://, redis+sentinel://"),
        ("http://h:1/0", "expected redis://, rediss://, unix://, redis+sentinel://"),
        ("redis+sentinels://h/m", "expected redis://"),
        ("redis://", "has no host"),
        ("redis://:pw@/0", "has no host"),
        ("redis://h:0", "port '0' of 'h:0' is not a number from 1 to 65535"),
        ("redis://h:99999", "is not a number from 1 to 65535"),
        ("redis://h:six", "port 'six'"),
        ("redis://[::1", "is not HOST:PORT"),
        ("redis://a,b", "redis:// takes one host; for several, use redis+sentinel://"),
        ("redis://h/zero", "database 'zero' is not a number"),
        ("redis://h/0/1", "expected the path /DB"),
        ("redis://h?db=x", "option db='x' is not a valid value"),
        ("redis://h?socket_timeout=soon", "option socket_timeout='soon'"),
        ("redis://h?colour=blue", "unknown option 'colour'"),
        ("redis://h?x", "is not NAME=VALUE"),
        ("redis://h?ssl_ca_certs=/ca.pem", "option ssl_ca_certs needs TLS: use rediss://"),
        ("redis+cluster://h?ssl_check_hostname=no", "ssl_check_hostname needs TLS"),
        ("redis://h?sentinel_password=x", "are for redis+sentinel://"),
        ("unix://", "names no socket"),
        ("unix://h/run/redis.sock", "unix:// takes no host"),
        ("redis+sentinel://s1:26379", "names no master"),
        ("redis+sentinel://s1:26379/", "names no master"),
        ("redis+sentinel:///m", "has no host"),
        ("redis+sentinel://s1,,s2/m", "an empty entry in its list of hosts"),
        ("redis+sentinel://s1/m/x", "database 'x' is not a number"),
        ("redis+sentinel://s1/m/0/extra", "/MASTER_NAME or /MASTER_NAME/DB"),
        ("redis+sentinel://s1/m%20n", "master name 'm n'"),
        ("redis+cluster://a:1,b:2/1", "Redis Cluster has only database 0, not 1"),
        ("redis+cluster://a:1?db=2", "only database 0"),
        ("redis+cluster://a:1,b:port", "port 'port' of 'b:port'"),
    ],
)
def test_bad_urls_say_what_is_wrong(url: str, words: str) -> None:
    with pytest.raises(RedisURLError, match=re.escape(words)):
        parse_redis_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "redis://u:hunter2@h:99999",
        "redis+sentinel://:hunter2@s1/m/x",
        "http://u:hunter2@h",
        "redis+sentinel://s1/m?sentinel_password=hunter2&colour=blue",
    ],
)
def test_errors_never_show_the_password(url: str) -> None:
    with pytest.raises(RedisURLError) as error:
        parse_redis_url(url)
    assert "hunter2" not in str(error.value)


def test_the_error_is_ours_and_a_value_error() -> None:
    assert issubclass(RedisURLError, RedisPlumbingError)
    assert issubclass(RedisURLError, ValueError)


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("redis://h:1/0", "redis://h:1/0"),
        ("redis://:pw@h:1/0", "redis://h:1/0"),
        ("rediss://user:pw@h:1/0?ssl_ca_certs=/c", "rediss://user@h:1/0?ssl_ca_certs=/c"),
        ("redis://user@h", "redis://user@h"),
        ("redis+sentinel://u:p@a,b/m?sentinel_password=s&x=1",
         "redis+sentinel://u@a,b/m?sentinel_password=***&x=1"),
        ("redis+cluster://u:p:q@a:1,b:2", "redis+cluster://u@a:1,b:2"),
        ("not a url", "not a url"),
        ("", ""),
    ],
)  # fmt: skip
def test_redact_url(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


# -- the clients built --------------------------------------------------------------------


def _kwargs(client: redis.asyncio.Redis) -> dict[str, Any]:
    return client.connection_pool.connection_kwargs


async def test_one_server_gets_timeouts_credentials_and_options() -> None:
    client = redis_client("redis://u:p@h:7000/2?client_name=app", timeout=0.25)
    try:
        assert type(client) is redis.asyncio.Redis
        kwargs = _kwargs(client)
        assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("h", 7000, 2)
        assert (kwargs["username"], kwargs["password"]) == ("u", "p")
        assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 0.25
        assert kwargs["client_name"] == "app"
        assert kwargs["retry"].get_retries() == 1
    finally:
        await client.aclose()


async def test_options_win_over_the_url_and_the_timeout() -> None:
    client = redis_client("redis://h?socket_timeout=3", timeout=0.25, socket_timeout=7.0)
    try:
        assert isinstance(client, redis.asyncio.Redis)
        assert _kwargs(client)["socket_timeout"] == 7.0
        assert _kwargs(client)["socket_connect_timeout"] == 0.25
    finally:
        await client.aclose()


async def test_tls_url_builds_a_tls_client_with_the_ca() -> None:
    client = redis_client("rediss://h:6380/0?ssl_ca_certs=/ca.pem")
    try:
        assert isinstance(client, redis.asyncio.Redis)
        assert client.connection_pool.connection_class.__name__ == "SSLConnection"
        assert _kwargs(client)["ssl_ca_certs"] == "/ca.pem"
    finally:
        await client.aclose()


async def test_unix_socket() -> None:
    client = redis_client("unix:///run/redis.sock?db=1")
    try:
        assert isinstance(client, redis.asyncio.Redis)
        assert _kwargs(client)["path"] == "/run/redis.sock"
        assert _kwargs(client)["db"] == 1
    finally:
        await client.aclose()


async def test_sentinel_url_builds_a_client_of_the_named_primary() -> None:
    client = redis_client(
        "redis+sentinel://app:pw@s1:5000,s2/mymaster/3?sentinel_password=spw", timeout=0.5
    )
    try:
        assert isinstance(client, redis.asyncio.Redis)
        pool = client.connection_pool
        assert isinstance(pool, SentinelConnectionPool)
        assert pool.service_name == "mymaster"
        assert (pool.connection_kwargs["db"], pool.connection_kwargs["password"]) == (3, "pw")
        sentinels = pool.sentinel_manager.sentinels
        addresses = [(s.connection_pool.connection_kwargs["host"],
                      s.connection_pool.connection_kwargs["port"]) for s in sentinels]  # fmt: skip
        assert addresses == [("s1", 5000), ("s2", 26379)]
        first = sentinels[0].connection_pool.connection_kwargs
        assert first["password"] == "spw"  # the sentinels' own, not the data nodes'
        assert first["socket_timeout"] == first["socket_connect_timeout"] == 0.5
    finally:
        await client.aclose()


async def test_cluster_url_seeds_every_node() -> None:
    client = redis_client("redis+cluster://u:p@a:7000,b:7001", timeout=0.5)
    try:
        assert isinstance(client, redis.asyncio.RedisCluster)
        seeds = [(node.host, node.port) for node in client.startup_nodes]
        assert seeds == [("a", 7000), ("b", 7001)]
        kwargs = client.connection_kwargs
        assert (kwargs["username"], kwargs["password"]) == ("u", "p")
        assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 0.5
    finally:
        await client.aclose()


def test_an_option_the_topology_does_not_take_is_a_url_error() -> None:
    with pytest.raises(RedisURLError, match="does not fit a cluster client"):
        redis_client("redis+cluster://a:7000?retry_on_timeout=true")


# -- for real: TLS and an ACL user ------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSServer]:
    with TLSServer(tmp_path_factory.mktemp("tls")) as server:
        yield server


async def test_store_over_tls_as_an_acl_user(tls_server: TLSServer) -> None:
    store = RedisStore.from_url(tls_server.tls_url(), prefix="tls:")
    try:
        await store.ping()
        version = await store.save(
            "s1", Changes({"cart": '["book"]'}), created=time.time(), ttl=60, create=True
        )
        record = await store.load("s1")
        assert record is not None
        assert (record.version, record.fields) == (version, {"cart": '["book"]'})
        whoami = await store.client.execute_command("ACL", "WHOAMI")
        assert whoami in (b"app", "app")
    finally:
        await store.aclose()


async def test_wrong_password_is_a_clear_error_not_a_hang(tls_server: TLSServer) -> None:
    store = RedisStore.from_url(tls_server.tls_url(password="wrong-pw"))
    started = time.monotonic()
    try:
        with pytest.raises(StoreUnavailable, match=r"(?i)invalid username-password|WRONGPASS"):
            await store.ping()
    finally:
        await store.aclose()
    assert time.monotonic() - started < 3


# Python 3.11's asyncio leaves the socket of a failed TLS handshake to the garbage collector
# (an unclosed _SelectorSocketTransport): collect it here, where the warning is expected,
# rather than let it fail whichever test runs when the collector comes by.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_wrong_ca_is_a_clear_error_not_a_hang(tls_server: TLSServer, tmp_path: Path) -> None:
    other_ca, _, _ = make_certificates(tmp_path, name="other")
    store = RedisStore.from_url(tls_server.tls_url(ca=other_ca))
    started = time.monotonic()
    try:
        with pytest.raises(StoreUnavailable, match=r"(?i)certificate verify failed"):
            await store.ping()
    finally:
        await store.aclose()
    assert time.monotonic() - started < 3
    gc.collect()


async def test_plaintext_to_a_tls_port_is_a_clear_error_not_a_hang(
    tls_server: TLSServer,
) -> None:
    store = RedisStore.from_url(f"redis://app:s3cret-pw@127.0.0.1:{tls_server.port}/0")
    started = time.monotonic()
    try:
        with pytest.raises(StoreUnavailable):
            await store.ping()
    finally:
        await store.aclose()
    assert time.monotonic() - started < 3


# -- for real: Sentinel -----------------------------------------------------------------------


async def test_store_through_sentinel_reaches_the_primary() -> None:
    with SentinelSetup() as setup:
        store = RedisStore.from_url(setup.url, prefix="sentinel:")
        try:
            version = await store.save(
                "s1", Changes({"count": "1"}), created=time.time(), ttl=60, create=True
            )
            assert version is not None
            record = await store.load("s1")
            assert record is not None
            assert record.fields == {"count": "1"}
            # The write is on the primary the sentinels name (and replicated from it).
            info = await store.client.info("server")
            assert int(info["tcp_port"]) == setup.current_primary().port
        finally:
            await store.aclose()


# -- cancellable: a cancel that comes during a call is never lost -----------------------------


async def test_a_loop_of_store_calls_ends_wherever_its_cancel_lands(
    redis_server: RedisServer,
) -> None:
    """On Python 3.11 redis-py returned from a call as if its task's cancel had not come
    (its writes go through asyncio.wait_for; CPython gh-86296), and a loop of calls (a
    flusher, a heartbeat) outlived its cancel. The store's calls go through `cancellable`.
    """
    store = RedisStore.from_url(redis_server.url, prefix="cancel:")

    async def reads() -> None:
        while True:
            await store.load("nobody")

    try:
        assert await lost_cancels(reads) == []
    finally:
        await store.aclose()


async def test_cancellable_raises_only_a_cancel_that_came_during_the_call(
    redis_server: RedisServer,
) -> None:
    client = redis_client(redis_server.url)

    async def after_a_cancel_dealt_with() -> object:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        # Taken in, as a task may do: the cancel ends an await that nothing else would.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
        assert task.cancelling() == 1  # not uncancelled: the count stays
        return await cancellable(client.ping())

    try:
        assert await asyncio.ensure_future(after_a_cancel_dealt_with()) is True
        assert await cancellable(client.ping()) is True  # no task's cancel: a plain await
    finally:
        await client.aclose()
