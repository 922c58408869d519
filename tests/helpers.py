"""Helpers for tests: waiting on conditions with deadlines, free ports, a fake clock,
`with` for things that start several processes, reading a server-sent event stream, and
cancelling a task at every step of its event loop."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Self

import httpx

# The project's one free-port helper, re-exported (the `as` tells mypy --strict so): the
# socket tests import it from here.
from redis_plumbing import free_port as free_port  # noqa: PLC0414


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(0.01)


async def async_wait_for(
    condition: Callable[[], Awaitable[bool]], within: float = 10.0, what: str = ""
) -> None:
    """The async twin of `wait_for`: fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what or condition}")
        await asyncio.sleep(0.01)


async def async_wait_until(
    condition: Callable[[], bool], within: float = 10.0, what: str = ""
) -> None:
    """`async_wait_for` for a plain (synchronous) condition."""

    async def check() -> bool:
        return condition()

    await async_wait_for(check, within, what)


async def lost_cancels(run: Callable[[], Awaitable[object]], steps: int = 40) -> list[int]:
    """The event-loop steps after which a cancel of ``run()`` was lost.

    For each n below ``steps``: start ``run()`` as a task, let the loop take n steps, cancel
    the task, and wait up to 5 s for it to end cancelled. A task that goes on is cancelled
    again until it ends (the next round needs the loop to itself) and n is reported.
    """
    lost = []
    for n in range(steps):
        task = asyncio.ensure_future(run())
        for _ in range(n):
            await asyncio.sleep(0)  # one step of the loop: where the cancel lands
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5)
        if not done or not task.cancelled():
            lost.append(n)
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)
    return lost


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class StartStop:
    """`with` over `start()` and `stop()` for a set of processes: a start that fails part-way
    is stopped again, so that nothing it began is left running."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class Stream:
    """The server-sent events of one streaming response, read one at a time."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.iter_lines()

    def next(self) -> tuple[str, dict[str, Any]]:
        kind = ""
        for line in self._lines:
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                return kind, json.loads(line[6:])
        raise AssertionError("the stream ended")

    def rest(self) -> list[str]:
        """The lines left up to the end of the response, data lines excluded."""
        return [line for line in self._lines if line.startswith("data: ")]

    def subscribers(self) -> int:
        kind, data = self.next()
        count: int = data["subscribers"] if kind == "tick" else -1
        return count
