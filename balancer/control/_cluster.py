"""`--workers N` behind one admin address: each balancer process's internal admin endpoint,
the front that fans the admin API out to them, and the log a restarted process catches up from.

    the parent (no event loop)   reserves before forking (`reserve`): the public admin
                                 socket and one loopback socket a balancer process, all
                                 listening, so a process restarted as i serves the same port
    balancer process i           serves its own admin API on its loopback socket
                                 (`internal_app`: the admin routes and GET /internal/log)
    balancer process 0           also serves the public admin address: the front

The front (its routes come before the admin API's own, in `FRONT_ROUTES`):

- ``GET /backends``: every process's, merged by `merge_backends` (counters summed, the
  worst state, each process's state under ``"states"``), and ``"processes"``: which answered.
- ``GET /metrics``: every process's scrape, each sample summed over them (`merge_metrics`),
  and a comment line naming the processes that did not answer.
- any other method (``POST``, ``DELETE``, ...) on any path: sent unchanged (method, path,
  query string, body, content type) to every process, its own included, so a route means
  the same through the front as on one process; the answer is process 0's (else the first
  that answered), with ``"processes"`` added: each one's status, or why it did not answer.
- the dashboard: process 0's, each tick adding the others' numbers (`OtherProcesses`,
  from each one's ``GET /internal/counts``).
- every other ``GET`` (``/healthz``): process 0's own.

Each call to a process is bounded by `PEER_TIMEOUT` in all (connect, send, answer): one
that is stopped or restarting is named in the answer, never waited for. The calls share one
`httpx.AsyncClient` for the process's life (`Peers`); with ``--admin-token`` they carry the
token, which the internal endpoints require as the public one does.

**Where the admin state lives.** Every process keeps the log of the mutating requests it
applied with a 2xx or 3xx (`AdminLog`: method, path, query, body; the last `LOG_MAX`).
A balancer process restarted after a crash asks its peers for their log (lowest index
first), replays it on its own admin app before it listens, and keeps it as its own: a
drained backend stays drained, an added one is there, a removed one is gone. Replaying
rather than copying a snapshot carries whatever a route means without this module knowing
(a drain's ``?now=1``, a session's move). A change made while a process restarts may reach
it twice (in the log and as the front's call it finds queued): the routes answer a repeat
with 404 or 409 and change nothing.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..datapath._metrics import BackendCounts
from ._dashboard import add_counts
from ._events import ADMIN_LOG_REPLAYED, ADMIN_LOG_UNAVAILABLE, ADMIN_PROCESS_UNANSWERED
from ._log import log_event

__all__ = [
    "COUNTS_PATH",
    "FRONT_ROUTES",
    "LOG_MAX",
    "LOG_PATH",
    "PEER_TIMEOUT",
    "AdminLog",
    "ClusterMember",
    "ClusterSockets",
    "OtherProcesses",
    "Peers",
    "catch_up",
    "internal_app",
    "internal_routes",
    "merge_backends",
    "merge_metrics",
    "reserve",
]

PEER_TIMEOUT = 1.0  # seconds one call to a balancer process may take in all
LOG_MAX = 10_000  # mutating admin requests kept for a restarted process (a few MB at most)
LOG_PATH = "/internal/log"
_SAFE = frozenset({"GET", "HEAD", "OPTIONS"})
_PID_HEADER = "x-balancer-pid"
_FORWARDED_HEADERS = ("content-type",)  # of the client's; the token is the front's own
# The worst first: the state a merged backend shows when processes disagree.
_STATE_RANK = {"up": 0, "draining": 1, "drained": 2, "down": 3, "absent": 4}
_ABSENT = "absent"  # a backend this process does not have
_SUMMED = frozenset({"in_flight", "sessions", "pinned_sessions"})  # and every *_total
# A state gauge summed over the processes counts them: say so.
_MERGED_HELP = {
    "balancer_backend_state": "The number of balancer processes that see each backend in "
    "each state (1 or 0 with one process).",
}


# -- sockets, reserved by the parent -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClusterMember:
    """What balancer process `index` of `count` needs: its sockets and its peers."""

    index: int
    restarts: int  # times the parent restarted it: above 0, it catches up from its peers
    admin: socket.socket | None  # the public admin socket: process 0's only
    internal: socket.socket  # its own loopback socket
    addresses: tuple[str, ...]  # every process's internal "127.0.0.1:port", by index


@dataclass(frozen=True, slots=True)
class ClusterSockets:
    """The sockets the parent binds and listens on before forking (`reserve`); a process
    restarted as i inherits the same ones, so the addresses never change and a call made
    while it restarts waits in the backlog instead of being refused."""

    admin: socket.socket
    internal: tuple[socket.socket, ...]

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(f"127.0.0.1:{sock.getsockname()[1]}" for sock in self.internal)

    def member(self, index: int, restarts: int) -> ClusterMember:
        """In the forked child: close the sockets process `index` does not serve (the
        parent keeps its own copies) and return what it does."""
        addresses = self.addresses
        if index != 0:
            self.admin.close()
        for other, sock in enumerate(self.internal):
            if other != index:
                sock.close()
        return ClusterMember(
            index=index,
            restarts=restarts,
            admin=self.admin if index == 0 else None,
            internal=self.internal[index],
            addresses=addresses,
        )

    def close(self) -> None:
        for sock in (self.admin, *self.internal):
            sock.close()


def reserve(host: str, port: int, count: int) -> ClusterSockets:
    """Bind and listen on the public admin address and on `count` loopback ports.

    Raises OSError (its `filename` None) when the admin address cannot be bound; nothing is
    left open then.
    """
    opened: list[socket.socket] = []
    try:
        admin = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        opened.append(admin)
        admin.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        admin.bind((host, port))
        admin.listen(128)
        for _ in range(count):
            sock = socket.socket(socket.AF_INET)
            opened.append(sock)
            sock.bind(("127.0.0.1", 0))
            sock.listen(128)
    except OSError:
        for sock in opened:
            sock.close()
        raise
    return ClusterSockets(opened[0], tuple(opened[1:]))


# -- the log of mutating requests ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Entry:
    method: str
    path: str
    query: str
    body: bytes
    content_type: str

    def as_json(self) -> dict[str, str]:
        return {
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "body": base64.b64encode(self.body).decode(),
            "content_type": self.content_type,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> _Entry:
        """Raises KeyError, TypeError or ValueError for a malformed entry."""
        return cls(
            str(data["method"]),
            str(data["path"]),
            str(data["query"]),
            base64.b64decode(str(data["body"]), validate=True),
            str(data["content_type"]),
        )


class AdminLog:
    """The mutating requests this process applied, oldest first, the last `LOG_MAX`."""

    def __init__(self, entries: Iterable[_Entry] = ()) -> None:
        self.entries: deque[_Entry] = deque(entries, maxlen=LOG_MAX)

    def __len__(self) -> int:
        return len(self.entries)

    def as_json(self) -> list[dict[str, str]]:
        return [entry.as_json() for entry in self.entries]


class _Recorder:
    """Pure ASGI, outermost on a process's internal app: note each mutating request that
    was applied (a status below 400) in the log, and name the process (its pid) on every
    answer."""

    def __init__(self, app: ASGIApp, log: AdminLog) -> None:
        self._app = app
        self._log = log
        self._pid = str(os.getpid()).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        record = scope["method"] not in _SAFE
        chunks: list[bytes] = []
        status = 0

        async def receive_body() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
            return message

        async def send_named(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (_PID_HEADER.encode(), self._pid),
                ]
            await send(message)

        await self._app(scope, receive_body if record else receive, send_named)
        if record and status < 400:
            content_type = next(
                (v for k, v in scope["headers"] if k == b"content-type"), b""
            ).decode("latin-1")
            self._log.entries.append(
                _Entry(
                    scope["method"],
                    scope["path"],
                    scope["query_string"].decode("latin-1"),
                    b"".join(chunks),
                    content_type,
                )
            )


def internal_app(app: ASGIApp, log: AdminLog) -> ASGIApp:
    """A process's internal admin endpoint: its admin app (built with `internal_routes`), each
    applied change noted in `log`."""
    return _Recorder(app, log)


async def _log_endpoint(request: Request) -> Response:
    log: AdminLog = request.app.state.admin_log
    return JSONResponse({"pid": os.getpid(), "entries": log.as_json()})


# -- calls to the processes ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Reply:
    """One process's answer to a call, or why there was none."""

    index: int
    address: str
    status: int | None = None  # None: no answer
    body: bytes = b""
    content_type: str = "application/json"
    pid: int | None = None
    error: str | None = None

    def describe(self) -> dict[str, object]:
        described: dict[str, object] = {
            "index": self.index,
            "address": self.address,
            "answered": self.status is not None,
        }
        if self.status is None:
            described["error"] = self.error
        else:
            described["status"] = self.status
            described["pid"] = self.pid
        return described


class Peers:
    """Calls to every balancer process's internal endpoint over one shared client (made
    and closed by the caller, for the process's life); each call bounded by `timeout`."""

    def __init__(
        self,
        addresses: Sequence[str],
        client: httpx.AsyncClient,
        *,
        token: str | None,
        timeout: float = PEER_TIMEOUT,
    ) -> None:
        self.addresses = tuple(addresses)
        self._client = client
        self._timeout = timeout
        self.auth = {} if token is None else {"authorization": f"Bearer {token}"}

    async def call(
        self,
        index: int,
        method: str,
        target: str,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
    ) -> _Reply:
        """Process `index`'s answer to `method target`; never raises for its failure."""
        address = self.addresses[index]
        try:
            async with asyncio.timeout(self._timeout):
                response = await self._client.request(
                    method,
                    f"http://{address}{target}",
                    content=body,
                    headers={**(headers or {}), **self.auth},
                    timeout=self._timeout,
                )
        except TimeoutError:
            error = f"no answer within {self._timeout} s"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:200]
        else:
            pid = response.headers.get(_PID_HEADER)
            return _Reply(
                index,
                address,
                response.status_code,
                response.content,
                response.headers.get("content-type", ""),
                int(pid) if pid is not None and pid.isdigit() else None,
            )
        log_event(
            ADMIN_PROCESS_UNANSWERED,
            level=logging.WARNING,
            index=index,
            request=f"{method} {target}",
            error=error,
        )
        return _Reply(index, address, error=error)

    async def all(
        self,
        method: str,
        target: str,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
    ) -> list[_Reply]:
        """Every process's answer, by index, the calls made at once."""
        calls = (self.call(i, method, target, body, headers) for i in range(len(self.addresses)))
        return list(await asyncio.gather(*calls))


async def catch_up(member: ClusterMember, peers: Peers, app: ASGIApp, log: AdminLog) -> None:
    """A restarted process: fetch a peer's log (lowest index first), replay it on `app`
    (the process's own admin app, in process) and make it this process's log. No peer
    answers: logged, and the process starts with its configured backends."""
    for index in range(len(peers.addresses)):
        if index == member.index:
            continue
        reply = await peers.call(index, "GET", LOG_PATH)
        if reply.status != 200:
            continue
        try:
            entries = [_Entry.from_json(e) for e in json.loads(reply.body)["entries"]]
        except (KeyError, TypeError, ValueError):
            continue
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as local:
            for entry in entries:
                headers = {"content-type": entry.content_type} if entry.content_type else {}
                await local.request(
                    entry.method,
                    entry.path + (f"?{entry.query}" if entry.query else ""),
                    content=entry.body,
                    headers={**headers, **peers.auth},
                )
        log.entries.clear()
        log.entries.extend(entries)
        log_event(ADMIN_LOG_REPLAYED, index=member.index, source=index, entries=len(entries))
        return
    log_event(
        ADMIN_LOG_UNAVAILABLE,
        level=logging.WARNING,
        index=member.index,
        hint="no peer gave its admin log: this process starts with the configured backends",
    )


# -- the dashboard's numbers of the other processes ------------------------------------------------

COUNTS_PATH = "/internal/counts"


async def _counts_endpoint(request: Request) -> Response:
    """What process 0's dashboard adds of this process's numbers each tick."""
    admin = request.app.state.admin  # the admin app's `_Admin`: its pool and metrics
    metrics, pool = admin.metrics, admin.pool
    return JSONResponse(
        {
            "counts": {
                backend_id: [c.requests, c.errors, list(c.buckets)]
                for backend_id, c in metrics.counts().items()
            },
            "in_flight": {b.id: b.in_flight for b in pool},
            "requests_total": {b.id: b.requests_total for b in pool},
            "failovers": metrics.failovers,
            "repins": metrics.repins,
            "connections": metrics.connections_active,
        }
    )


def internal_routes() -> list[BaseRoute]:
    """The internal endpoint's own routes, for its admin app (its `app.state.admin_log`
    set): GET /internal/log (the log, for a restarted peer) and GET /internal/counts (its
    numbers, for process 0's dashboard)."""
    return [
        Route(LOG_PATH, _log_endpoint, methods=["GET"]),
        Route(COUNTS_PATH, _counts_endpoint, methods=["GET"]),
    ]


class OtherProcesses:
    """The numbers of every balancer process but this one, summed, for the dashboard
    (`_dashboard.OtherNumbers`): `sample()` fetches them once a tick; a process that does
    not answer adds nothing that tick (and `missing` counts it)."""

    def __init__(self, peers: Peers, index: int) -> None:
        self._peers = peers
        self._others = [i for i in range(len(peers.addresses)) if i != index]
        self.counts: dict[str, BackendCounts] = {}
        self.in_flight: dict[str, int] = {}
        self.requests_total: dict[str, int] = {}
        self.failovers = self.repins = self.connections = 0
        self.missing = 0

    async def sample(self) -> None:
        replies = await asyncio.gather(
            *(self._peers.call(i, "GET", COUNTS_PATH) for i in self._others)
        )
        counts: dict[str, BackendCounts] = {}
        in_flight: dict[str, int] = {}
        requests_total: dict[str, int] = {}
        failovers = repins = connections = missing = 0
        for reply in replies:
            try:
                if reply.status != 200:
                    raise ValueError(reply.error or reply.status)
                data = json.loads(reply.body)
                for backend_id, (requests, errors, buckets) in data["counts"].items():
                    theirs = BackendCounts(int(requests), int(errors), tuple(map(int, buckets)))
                    ours = counts.get(backend_id)
                    counts[backend_id] = theirs if ours is None else add_counts(ours, theirs)
                for total, key in ((in_flight, "in_flight"), (requests_total, "requests_total")):
                    for backend_id, value in data[key].items():
                        total[backend_id] = total.get(backend_id, 0) + int(value)
                failovers += int(data["failovers"])
                repins += int(data["repins"])
                connections += int(data["connections"])
            except (KeyError, TypeError, ValueError):
                missing += 1
        self.counts, self.in_flight, self.requests_total = counts, in_flight, requests_total
        self.failovers, self.repins, self.connections = failovers, repins, connections
        self.missing = missing


# -- the merges, pure ---------------------------------------------------------------------------


def _worst(states: Iterable[str]) -> str:
    return max(states, key=lambda state: _STATE_RANK.get(state, 2))


def _summed(key: str, value: object) -> bool:
    return (key in _SUMMED or key.endswith("_total")) and (
        isinstance(value, int | float) and not isinstance(value, bool)
    )


def merge_backends(bodies: Mapping[int, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every backend once, from the `GET /backends` bodies of the processes that answered
    (by index): in-flight, the ``*_total`` counters and session counts summed; ``state``
    the worst of theirs (up, draining, drained, down, then absent: one that a process does
    not have), each process's under ``states``; ``healthy`` only if healthy in all,
    ``draining`` if in any; the rest as the lowest-numbered process has it."""
    rows: dict[str, dict[int, Mapping[str, Any]]] = {}
    for index in sorted(bodies):
        for row in bodies[index].get("backends", []):
            rows.setdefault(str(row["id"]), {})[index] = row
    merged = []
    for by_index in rows.values():
        first = by_index[min(by_index)]
        row = dict(first)
        for key, value in first.items():
            if _summed(key, value):
                row[key] = sum(r.get(key) or 0 for r in by_index.values())
        states = {
            str(i): str(by_index[i]["state"]) if i in by_index else _ABSENT for i in sorted(bodies)
        }
        row["state"] = _worst(states.values())
        row["states"] = states
        row["healthy"] = len(by_index) == len(bodies) and all(
            r.get("healthy") is True for r in by_index.values()
        )
        row["draining"] = any(r.get("draining") is True for r in by_index.values())
        merged.append(row)
    return merged


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def merge_metrics(texts: Sequence[str]) -> bytes:
    """One Prometheus text body from several: each sample (name and labels) summed over
    them, families and samples in the order first seen. A state gauge summed counts the
    processes in each state (its help says so)."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    labels_of: dict[tuple[str, tuple[tuple[str, str], ...]], dict[str, str]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name not in families:
                help_text = _MERGED_HELP.get(family.name, family.documentation)
                families[family.name] = Metric(family.name, help_text, family.type)
                values[family.name] = {}
            samples = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                samples[key] = samples.get(key, 0.0) + sample.value
                labels_of.setdefault(key, dict(sample.labels))
    for name, metric in families.items():
        for key, value in values[name].items():
            metric.add_sample(key[0], labels_of[key], value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families.values()))
    return generate_latest(registry)


# -- the front's endpoints ------------------------------------------------------------------------


def _peers(request: Request) -> Peers:
    peers: Peers = request.app.state.peers  # set with FRONT_ROUTES
    return peers


def _no_answer(replies: Sequence[_Reply]) -> JSONResponse:
    return JSONResponse(
        {
            "error": "no balancer process answered",
            "reason": "no_process",
            "processes": [r.describe() for r in replies],
        },
        status_code=503,
    )


async def front_backends(request: Request) -> Response:
    replies = await _peers(request).all("GET", "/backends")
    bodies: dict[int, dict[str, Any]] = {}
    for reply in replies:
        if reply.status == 200:
            try:
                bodies[reply.index] = json.loads(reply.body)
            except ValueError:
                continue
    if not bodies:
        return _no_answer(replies)
    first = bodies[min(bodies)]
    body: dict[str, object] = {k: v for k, v in first.items() if k != "backends"}
    body["backends"] = merge_backends(bodies)
    body["processes"] = [r.describe() for r in replies]
    return JSONResponse(body)


async def front_metrics(request: Request) -> Response:
    replies = await _peers(request).all("GET", "/metrics")
    texts = [r.body.decode() for r in replies if r.status == 200]
    if not texts:
        return _no_answer(replies)
    missing = [f"{r.index} ({r.error or r.status})" for r in replies if r.status != 200]
    body = merge_metrics(texts)
    if missing:
        note = f"# balancer processes not counted: {', '.join(missing)}\n"
        body = note.encode() + body
    return Response(body, media_type=CONTENT_TYPE_LATEST)


async def front_forward(request: Request) -> Response:
    """Any mutating request: the same to every process; process 0's answer."""
    body = await request.body()
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    headers = {k: v for k in _FORWARDED_HEADERS if (v := request.headers.get(k)) is not None}
    replies = await _peers(request).all(request.method, target, body, headers)
    answered = [r for r in replies if r.status is not None]
    if not answered:
        return _no_answer(replies)
    primary = answered[0]
    assert primary.status is not None
    try:
        data = json.loads(primary.body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return Response(primary.body, primary.status, media_type=primary.content_type or None)
    data["processes"] = [r.describe() for r in replies]
    return JSONResponse(data, primary.status)


# Before the admin API's own routes on the front (they shadow them); `app.state.peers` set.
FRONT_ROUTES: list[BaseRoute] = [
    Route("/backends", front_backends, methods=["GET"]),
    Route("/metrics", front_metrics, methods=["GET"]),
    Route("/{path:path}", front_forward, methods=["POST", "PUT", "PATCH", "DELETE"]),
]
