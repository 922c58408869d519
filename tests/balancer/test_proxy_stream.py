"""Bodies stream through the proxy in bounded memory: 200 MB up and 200 MB down through a
proxy in a process of its own (on uvloop), whose RSS is watched with psutil."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import psutil
import pytest

from tests.balancer.backends import Client, HttpBackend

pytestmark = pytest.mark.anyio

SIZE = 200 * 1024 * 1024  # bytes each way
GROWTH_LIMIT = 50 * 1024 * 1024  # bytes of RSS the proxy may grow by
BACKENDS = Path(__file__).with_name("backends.py")


@contextlib.asynccontextmanager
async def proxy_process(url: str) -> AsyncIterator[tuple[int, psutil.Process]]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(BACKENDS), url, stdout=subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(20):
            port = int(await process.stdout.readline())
        yield port, psutil.Process(process.pid)
    finally:
        if process.returncode is None:
            process.terminate()
            async with asyncio.timeout(20):
                await process.wait()


async def peak_rss_growth(process: psutil.Process, work: Awaitable[None]) -> int:
    """Run `work` while sampling the process's RSS; the peak growth over the start, bytes."""
    start = process.memory_info().rss
    peak = start
    task = asyncio.ensure_future(work)
    while not task.done():
        peak = max(peak, process.memory_info().rss)
        await asyncio.wait({task}, timeout=0.05)
    await task
    return peak - start


async def upload(port: int, *, chunked: bool) -> None:
    client = await Client.open(port)
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % SIZE
    await client.send(b"POST /sink HTTP/1.1\r\nHost: h\r\n" + framing + b"\r\n\r\n")
    piece = b"u" * 65536
    for _ in range(SIZE // len(piece)):
        client.writer.write(b"10000\r\n" + piece + b"\r\n" if chunked else piece)
        await client.writer.drain()
    if chunked:
        await client.send(b"0\r\n\r\n")
    response = await client.read(within=120)
    assert (response.status, response.text) == (200, str(SIZE))
    await client.close()


async def download(port: int, *, chunked: bool) -> None:
    client = await Client.open(port)
    query = "?chunked" if chunked else ""
    await client.send(f"GET /stream/{SIZE}{query} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
    response = await client.read(keep_body=False, within=120)
    assert (response.status, response.body_size) == (200, SIZE)
    await client.close()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_200_mb_each_way_in_bounded_memory(chunked: bool) -> None:
    async with HttpBackend() as backend, proxy_process(backend.url) as (port, process):
        growth = await peak_rss_growth(process, upload(port, chunked=chunked))
        assert growth < GROWTH_LIMIT, f"upload grew the proxy by {growth / 2**20:.1f} MiB"
        growth = await peak_rss_growth(process, download(port, chunked=chunked))
        assert growth < GROWTH_LIMIT, f"download grew the proxy by {growth / 2**20:.1f} MiB"
