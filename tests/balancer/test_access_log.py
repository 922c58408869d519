"""The access log (--access-log): a real proxy with the real router (cookie stickiness) on
127.0.0.1, its records formatted by `configure_logging` as JSON lines or from a plain
template, each field checked."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from balancer import (
    AffinityCookie,
    Decision,
    Metrics,
    Pool,
    ProxyOptions,
    ProxyServer,
    Router,
    Sticky,
    configure_logging,
)
from balancer.control._log import DEFAULT_ACCESS_FORMAT, AccessFormat
from balancer.datapath._access import ACCESS_FIELDS, pin_outcome
from tests.balancer.backends import Client, HttpBackend
from tests.helpers import free_port

pytestmark = pytest.mark.anyio


@contextlib.asynccontextmanager
async def sticky_proxy(urls: list[str], **options: Any) -> AsyncIterator[tuple[ProxyServer, Pool]]:
    """A ProxyServer with the access log on and the real Router, --sticky cookie:sid."""
    pool = Pool(urls)
    router = Router(pool, sticky=Sticky("cookie", "sid"), affinity=AffinityCookie(secrets=["k"]))
    opts = ProxyOptions(access_log=True, queue_timeout=0.0, **options)
    server = ProxyServer(router, Metrics(pool), opts, backends=pool)
    await server.start("127.0.0.1", 0)
    try:
        yield server, pool
    finally:
        await server.shutdown()


def _records(stream: io.StringIO) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [line for line in lines if line["event"] == "access"]


async def _raw(port: int, request: bytes) -> bytes:
    """The whole response to `request` as bytes (it has a Content-Length)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            return head + await reader.readexactly(length)
    finally:
        writer.close()


async def test_json_lines_carry_every_field(stream: io.StringIO) -> None:
    configure_logging("json", stream=stream)
    async with HttpBackend() as backend, sticky_proxy([backend.url]) as (server, pool):
        request = b"POST /echo?x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
        response = await _raw(server.port, request)
        (backend_id,) = (b.id for b in pool)
    (record,) = _records(stream)
    assert list(record) == ["time", "level", "event", *ACCESS_FIELDS]
    assert record["time"].endswith("Z")
    assert record["level"] == "INFO"
    assert record["client"] == "127.0.0.1"
    assert (record["method"], record["path"], record["protocol"]) == (
        "POST",
        "/echo?x=1",
        "HTTP/1.1",
    )
    assert record["status"] == 200
    assert record["bytes_in"] == len(request)
    assert record["bytes_out"] == len(response)
    assert record["backend"] == backend_id
    # A new connection to the backend: the connect took some time, then the response.
    connect, upstream, total = (
        record["upstream_connect_time"],
        record["upstream_response_time"],
        record["request_time"],
    )
    assert 0 < connect < 5
    assert 0 < upstream < 5
    assert connect + upstream <= total + 1e-6
    assert record["request_id"] == backend.seen[-1].header("x-request-id")
    assert len(record["request_id"]) >= 16
    # No cookie at all: a new client, placed and pinned.
    assert (record["pin"], record["repin_reason"]) == ("new", None)


async def test_pin_outcomes_and_a_repins_reason(stream: io.StringIO) -> None:
    configure_logging("json", stream=stream)
    async with (
        HttpBackend("a") as a,
        HttpBackend("b") as b,
        sticky_proxy([a.url, b.url]) as (server, pool),
    ):
        client = await Client.open(server.port)
        first = await client.request(b"GET / HTTP/1.1\r\nHost: h\r\nCookie: sid=s1\r\n\r\n")
        assert first.status == 200
        pin = (first.header("set-cookie") or "").split(";")[0]
        assert pin
        cookie = f"Cookie: sid=s1; {pin}\r\n".encode()
        request = b"GET /again HTTP/1.1\r\nHost: h\r\nX-Request-Id: abc-123\r\n" + cookie + b"\r\n"
        assert (await client.request(request)).status == 200
        pinned = next(x for x in pool if x.id == _records(stream)[-1]["backend"])
        pinned.mark_down("test", server.clock())
        moved = await client.request(request)
        assert moved.status == 200
        await client.close()
    first_rec, hit, repinned = _records(stream)
    # A session cookie without a pin: "lost_pin" (rule 3 of the router).
    assert (first_rec["pin"], first_rec["repin_reason"]) == ("repinned", "lost_pin")
    assert (hit["pin"], hit["repin_reason"]) == ("hit", None)
    assert hit["request_id"] == "abc-123"  # the client's own
    assert hit["upstream_connect_time"] == 0  # a kept-alive connection
    assert (repinned["pin"], repinned["repin_reason"]) == ("repinned", "down")
    assert repinned["backend"] != pinned.id
    assert repinned["backend"] in {x.id for x in pool}


async def test_a_502_names_its_backend(stream: io.StringIO) -> None:
    configure_logging("json", stream=stream)
    port = free_port()  # nothing listens: the connect is refused
    async with sticky_proxy([f"http://127.0.0.1:{port}"]) as (server, pool):
        client = await Client.open(server.port)
        response = await client.request(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
        await client.close()
    assert response.status == 502
    (record,) = _records(stream)
    (backend,) = pool
    assert (record["status"], record["backend"]) == (502, backend.id)
    assert record["upstream_connect_time"] is None  # it never reached the backend
    assert record["upstream_response_time"] is None
    assert record["bytes_out"] > 0
    assert record["pin"] == "new"


async def test_plain_lines_follow_the_template(stream: io.StringIO) -> None:
    template = '$client "$method $path" $status ${bytes_out}B pin=$pin reason=$repin_reason'
    configure_logging("plain", stream=stream, access_format=template)
    async with HttpBackend() as backend, sticky_proxy([backend.url]) as (server, _):
        response = await _raw(server.port, b'GET /a"b HTTP/1.1\r\nHost: h\r\n\r\n')
    (line,) = stream.getvalue().splitlines()
    assert line == f'127.0.0.1 "GET /a\\x22b" 200 {len(response)}B pin=new reason=-'


async def test_the_default_template(stream: io.StringIO) -> None:
    configure_logging("plain", stream=stream)
    async with HttpBackend() as backend, sticky_proxy([backend.url]) as (server, _):
        await _raw(server.port, b"GET / HTTP/1.1\r\nHost: h\r\nX-Request-Id: r1\r\n\r\n")
    (line,) = stream.getvalue().splitlines()
    stamp, rest = line.split(" ", 1)
    assert stamp.endswith("Z")
    assert rest.startswith('127.0.0.1 "GET / HTTP/1.1" 200 ')
    assert " pin=new reason=- id=r1" in rest
    assert " connect=0." in rest  # seconds, 3 decimals


def test_a_bad_template_is_refused_with_the_field_named() -> None:
    with pytest.raises(ValueError, match=r"unknown field \$stauts"):
        AccessFormat("$stauts")
    with pytest.raises(ValueError, match="invalid template"):
        AccessFormat("costs $ 5")
    AccessFormat(DEFAULT_ACCESS_FORMAT)


def test_pin_outcome_of_each_decision_shape() -> None:
    (backend,) = Pool(["http://127.0.0.1:9001"])
    assert pin_outcome(None) == (None, None)
    assert pin_outcome(Decision(backend, None)) == ("none", None)  # --sticky ip, none
    assert pin_outcome(Decision(backend, b"c", None, True)) == ("new", None)
    assert pin_outcome(Decision(backend, None, None, True)) == ("hit", None)
    assert pin_outcome(Decision(backend, b"c", "drain", False)) == ("repinned", "drain")
