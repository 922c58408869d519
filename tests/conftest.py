"""Fixtures shared by every test: a real Redis, started by the project itself."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from redis_plumbing import RedisServer


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One Redis for the whole run; tests keep apart by key prefix, not by FLUSHDB."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own, free to be killed and restarted."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def prefix() -> str:
    return f"test-{secrets.token_hex(4)}:"
