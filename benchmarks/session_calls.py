"""Benchmark: requests through the session benchmark app in this process, no HTTP: the
figure to run under callgrind, where instruction counts are free of a shared machine's noise.

    .venv/bin/python benchmarks/session_calls.py ours write 1000
    valgrind --tool=callgrind .venv/bin/python benchmarks/session_calls.py ours write 1300

Serves ``BENCH_KIND`` (``none``, ``ours``, ``hybrid``, ``starsessions``; session_apps.py) to
ASGI calls made here, one after the other, on uvloop as uvicorn would: one write makes the
session, 200 requests warm it up, then ``N`` are timed, and their CPU time per request
printed. Instructions per request: run it under callgrind with two counts (say 1300 and
300) and divide the difference of the totals by theirs (1000): start-up cancels out. Starts
its own Redis on 127.0.0.1, or uses ``REDIS_URL``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import uvloop  # noqa: E402

from benchmarks.session_apps import create  # noqa: E402
from redis_plumbing import RedisServer  # noqa: E402

Message = dict[str, Any]


async def _request(app: Any, method: str, path: str, cookie: bytes | None) -> list[Message]:
    headers = [(b"host", b"127.0.0.1")]
    if cookie is not None:
        headers.append((b"cookie", cookie))
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "headers": headers, "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }  # fmt: skip
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


async def run(kind: str, request: str, count: int) -> float:
    """CPU seconds per request of ``count`` requests."""
    os.environ["BENCH_KIND"] = kind
    app = create()
    first = await _request(app, "POST", "/write", None)
    cookies = [value for name, value in first[0]["headers"] if name == b"set-cookie"]
    cookie = b"; ".join(value.split(b";")[0] for value in cookies) or None
    method, path = ("POST", "/write") if request == "write" else ("GET", "/read")
    for _ in range(200):
        await _request(app, method, path, cookie)
    started = time.process_time()
    for _ in range(count):
        sent = await _request(app, method, path, cookie)
    elapsed = time.process_time() - started
    if sent[0]["status"] != 200:
        raise RuntimeError(f"{kind} {request}: answered {sent[0]['status']}")
    return elapsed / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=("none", "ours", "hybrid", "starsessions"))
    parser.add_argument("request", choices=("read", "write"))
    parser.add_argument("count", type=int, help="requests timed, after 200 to warm up")
    args = parser.parse_args()
    if args.count < 1:
        parser.error(f"count must be 1 or more, not {args.count}")
    if os.environ.get("REDIS_URL"):
        seconds = uvloop.run(run(args.kind, args.request, args.count))
    else:
        with RedisServer() as redis:
            os.environ["REDIS_URL"] = redis.url
            seconds = uvloop.run(run(args.kind, args.request, args.count))
    print(f"{args.kind} {args.request}: {seconds * 1e6:.1f} us of CPU a request")


if __name__ == "__main__":
    main()
