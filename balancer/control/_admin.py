"""The admin API: a Starlette app over the pool and the metrics.

    GET    /healthz                  200 {"status": "ok"} (no token needed: for probes)
    GET    /backends                 every backend: state, in-flight, totals, errors
    POST   /backends                 {"url": "http://host:port", "name", "weight", "backup",
                                     "max_conns": optional}: 201, 400, 409
    PATCH  /backends/{id}            {"weight": N} (1..256): 200, 400, 404; the table is rebuilt
    POST   /backends/{id}/drain      200, 404 unknown, 409 already draining; ?sessions=keep|move
                                     (pinned clients stay or move; default --drain-sessions),
                                     ?now=1 ends it at once (DRAINED), started or not
    POST   /backends/{id}/enable     200, 404 unknown, 409 not draining (or drained)
    DELETE /backends/{id}            200, 404 unknown
    GET    /metrics                  Prometheus text format
    POST   /tls/reload               the listener's certificate files read again: 200, 422
                                     a file does not load (nothing changed), 404 no TLS
    POST   /config/reload            the --config file read again (`_reload`): 200 with what
                                     changed and what needs a restart, 422 a bad file
                                     (nothing changed), 404 no --config

With the router (`router=`, the balancer's), one session at a time, named by its handle
(`datapath._pins.handle`: a digest, never the session cookie's value, a bearer credential):

    GET    /backends/{id}/sessions   the sessions pinned to it, most recent first: ?limit=N
                                     (default 100, at most 1000; 400 beyond), and how many
                                     were seen in the last PINNED_WINDOW seconds; 404 unknown
    DELETE /sessions/{handle}        forget its pin: its next request is placed anew; 404
    POST   /sessions/{handle}/move   {"backend": "<id>"}: its next request goes there; 404
                                     unknown session or backend, 409 a backend not up

With a supervisor (`--spawn`):

    GET    /workers                  the workers: state, pid, port, restarts, held ones
    POST   /workers/scale            {"delta": 1 | -1}: 202, 400, 409 below one worker
    POST   /workers/restart          a rolling restart, one worker at a time: 202

With a dashboard (`balancer.control._dashboard`): the page at GET / and its stream at
GET /dashboard/stream; its buttons call the routes above, and nothing else.

With a token, every route but /healthz and the page's static files needs
`Authorization: Bearer <token>` (401 otherwise); configuration requires one when the admin
address is not loopback. Every error is JSON: {"error": <sentence>, "reason": <code>}.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, ExceptionHandler, Receive, Scope, Send

from .._exceptions import (
    BackendExists,
    ConfigError,
    InvalidTransition,
    TlsError,
    UnknownBackend,
)
from ..datapath._backend import (
    DRAIN_SESSIONS,
    MAX_WEIGHT,
    Backend,
    BackendState,
    DrainSessions,
    check_backend_name,
)
from ..datapath._metrics import Metrics
from ..datapath._pins import Pin, PinTable, handle
from ..datapath._pool import Pool
from ._dashboard import DASHBOARD_ROUTES, OPEN_PATHS, Dashboard
from ._drains import PINNED_WINDOW, report_drained
from ._events import (
    BACKEND_ADDED,
    BACKEND_DRAINING,
    BACKEND_ENABLED,
    BACKEND_REMOVED,
    BACKEND_WEIGHT,
    ROLLING_RESTART_REQUESTED,
    SESSION_FORGOTTEN,
    SESSION_MOVED,
)
from ._log import log_event

__all__ = [
    "MAX_SESSIONS_LIMIT",
    "ROUTES",
    "SESSIONS_LIMIT",
    "SESSION_ROUTES",
    "WORKER_ROUTES",
    "SessionControl",
    "WorkerControl",
    "create_admin_app",
    "describe_backend",
]

# A request body larger than this is refused: the only body is {"url": ...}.
_MAX_BODY = 4096
_DRAIN_SESSIONS: dict[str, DrainSessions] = {s: s for s in DRAIN_SESSIONS}
SESSIONS_LIMIT = 100  # sessions GET /backends/{id}/sessions lists without ?limit=
MAX_SESSIONS_LIMIT = 1000  # the most it lists: the answer stays small (~100 KB)
_HANDLE = re.compile(r"[0-9a-f]{16}")  # what `handle` gives


class WorkerControl(Protocol):
    """What the admin API needs of the supervisor (`supervisors._supervisor.Supervisor`)."""

    def describe(self) -> dict[str, object]:
        """The workers, as JSON."""

    def scale(self, delta: int) -> int:
        """Change the desired count; returns it; raises InvalidTransition below one."""

    def request_restart(self) -> None:
        """Ask for a rolling restart."""


class SessionControl(Protocol):
    """What the admin API needs of the router (`datapath._router.Router`) for one session."""

    @property
    def pins(self) -> PinTable:
        """The pin table: session -> backend, last seen."""

    def move(self, name: str, backend_id: str | None) -> Pin:
        """Order the session whose handle is `name` to `backend_id` (None: placed anew) on
        its next request; LookupError for an unknown session."""


def describe_backend(backend: Backend, now: float) -> dict[str, object]:
    """The JSON shape of a backend in the admin API."""
    ejected_until = backend.ejected_until
    return {
        "id": backend.id,
        "url": backend.url,
        "state": backend.state.value,
        "in_flight": backend.in_flight,
        "requests_total": backend.requests_total,
        "failures_total": backend.failures_total,
        "ejections_total": backend.ejections_total,
        "healthy": backend.healthy,
        "draining": backend.draining,
        "drained_reason": backend.drained_reason,
        "keep_pinned": backend.keep_pinned,
        "drain_for": now - backend.drain_since if backend.draining else None,
        "down_reason": backend.down_reason,
        "ejected_for": None if ejected_until is None else max(0.0, ejected_until - now),
        "weight": backend.weight(now),  # slow start's share, 0.1..1
        "configured_weight": backend.configured_weight,  # the operator's, 1..256
        "backup": backend.backup,
        "max_conns": backend.max_conns,  # 0: no cap
    }


def _error(status: int, reason: str, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "reason": reason}, status_code=status)


async def _json_object(request: Request, example: str) -> dict[str, object] | JSONResponse:
    """The request's body as a JSON object, or the 413/400 answer that says what is wrong.
    A body that is JSON but not an object comes back as an empty dict: the caller's check
    of the field it needs then names the expected shape (``example``)."""
    body = await request.body()
    if len(body) > _MAX_BODY:
        return _error(413, "body_too_large", f"the body is over {_MAX_BODY} bytes")
    try:
        data = json.loads(body)
    except ValueError:
        return _error(400, "invalid_json", f"the body must be JSON: {example}")
    return data if isinstance(data, dict) else {}


class _BearerAuth:
    """Pure ASGI (never BaseHTTPMiddleware: docs/architecture.md, "Measured facts")."""

    def __init__(self, app: ASGIApp, token: str, open_paths: frozenset[str]) -> None:
        self._app = app
        self._expected = f"Bearer {token}".encode()
        self._open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self._open_paths:
            await self._app(scope, receive, send)
            return
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                given = value
                break
        # compare_digest: no timing hint of how much of the token was right.
        if hmac.compare_digest(given, self._expected):
            await self._app(scope, receive, send)
            return
        response = _error(401, "unauthorized", "a valid bearer token is required")
        response.headers["WWW-Authenticate"] = 'Bearer realm="balancer"'
        await response(scope, receive, send)


class _SameOrigin:
    """Refuse what a browser sent on behalf of another site (403).

    A state-changing request from another site: with a token this is belt and braces
    (another site can neither know the token nor make a browser send an Authorization
    header); without one (loopback only), a page elsewhere could still make the browser
    POST to 127.0.0.1. Browsers say where a request comes from (`Sec-Fetch-Site`, and
    `Origin` on every POST and DELETE), so such a request is refused. curl and scripts send
    neither header and are unaffected.

    With `loopback_only` (no token), any request whose Host is not a loopback name or
    address: DNS rebinding points an attacker's domain at 127.0.0.1, which makes the
    attacker's page same-origin with this app, so only the Host header still tells.
    """

    _SAFE = frozenset({"GET", "HEAD", "OPTIONS"})

    def __init__(self, app: ASGIApp, loopback_only: bool) -> None:
        self._app = app
        self._loopback_only = loopback_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            host = headers.get(b"host", b"")
            refusal: JSONResponse | None = None
            if self._loopback_only and host and not _is_loopback_host(host):
                refusal = _error(403, "host_not_allowed", "only a loopback Host is served")
            elif scope["method"] not in self._SAFE:
                site = headers.get(b"sec-fetch-site")
                origin = headers.get(b"origin")
                if site in (b"cross-site", b"same-site") or (
                    origin is not None and origin.partition(b"://")[2] != host
                ):
                    refusal = _error(403, "cross_origin", "a request from another site is refused")
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self._app(scope, receive, send)


def _is_loopback_host(host: bytes) -> bool:
    """`localhost`, `127.0.0.1:8081`, `[::1]:8081`, ...: a Host header naming this machine."""
    text = host.decode("latin-1").lower()
    if text.startswith("["):
        name, bracket, _ = text[1:].partition("]")
        if not bracket:
            return False
    else:
        name = text.rpartition(":")[0] if ":" in text else text
    if name == "localhost" or name.endswith(".localhost"):  # RFC 6761 6.3
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _is_name(name: str) -> bool:
    try:
        check_backend_name(name)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class _Admin:
    """What the endpoints read, as `request.app.state.admin` (set by `create_admin_app`)."""

    pool: Pool
    metrics: Metrics
    clock: Callable[[], float]
    workers: WorkerControl | None
    fingerprint: Callable[[], str] | None
    pins: PinTable | None
    router: SessionControl | None = None


def _admin(request: Request) -> _Admin:
    admin: _Admin = request.app.state.admin
    return admin


def _workers(request: Request) -> WorkerControl:
    workers = _admin(request).workers
    assert workers is not None  # the /workers routes exist only with a supervisor
    return workers


def _describe(request: Request, backend: Backend, status_code: int = 200) -> JSONResponse:
    return JSONResponse(describe_backend(backend, _admin(request).clock()), status_code)


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def list_backends(request: Request) -> Response:
    admin = _admin(request)
    now = admin.clock()
    body: dict[str, object] = {"pool": repr(admin.pool)}
    if admin.fingerprint is not None:
        body["fingerprint"] = admin.fingerprint()
    body["backends"] = [describe_backend(b, now) for b in admin.pool]
    return JSONResponse(body)


async def add_backend(request: Request) -> Response:
    data = await _json_object(request, '{"url": "http://..."}')
    if isinstance(data, JSONResponse):
        return data
    url = data.get("url")
    if not isinstance(url, str):
        return _error(400, "missing_url", 'the body must be {"url": "http://host:port"}')
    name = data.get("name")
    if name is not None and not isinstance(name, str):
        return _error(400, "invalid_name", '"name", if given, must be a string')
    weight = data.get("weight", 1)
    if not isinstance(weight, int) or not _is_weight(weight):
        return _error(400, "invalid_weight", f'"weight" must be an integer from 1 to {MAX_WEIGHT}')
    max_conns = data.get("max_conns", 0)
    if not isinstance(max_conns, int) or isinstance(max_conns, bool) or max_conns < 0:
        return _error(400, "invalid_max_conns", '"max_conns" must be an integer >= 0 (0: no cap)')
    backup = data.get("backup", False)
    if not isinstance(backup, bool):
        return _error(400, "invalid_backup", '"backup" must be true or false')
    try:
        backend = _admin(request).pool.add(
            url, name=name, weight=weight, backup=backup, max_conns=max_conns
        )
    except BackendExists as exc:  # a ValueError too: caught first
        return _error(409, "exists", str(exc))
    except ValueError as exc:
        reason = "invalid_url" if name is None or _is_name(name) else "invalid_name"
        return _error(400, reason, str(exc))
    log_event(BACKEND_ADDED, backend=backend.id, url=backend.url)
    return _describe(request, backend, 201)


async def drain(request: Request) -> Response:
    admin = _admin(request)
    backend = admin.pool[request.path_params["backend_id"]]
    query = request.query_params
    given = query.get("sessions")
    sessions = None if given is None else _DRAIN_SESSIONS.get(given)
    if given is not None and sessions is None:
        return _error(400, "invalid_sessions", "?sessions= must be keep or move")
    now_flag = query.get("now", "0")
    if now_flag not in ("0", "1"):
        return _error(400, "invalid_now", "?now= must be 0 or 1")
    if not (backend.draining and now_flag == "1"):
        admin.pool.drain(backend.id, admin.clock(), sessions=sessions)
        log_event(
            BACKEND_DRAINING,
            backend=backend.id,
            in_flight=backend.in_flight,
            sessions="keep" if backend.keep_pinned else "move",
        )
    if now_flag == "1" and backend.drained_reason is None:
        backend.finish_drain("now")
        report_drained(backend, admin.pins, admin.clock())
    return _describe(request, backend)


async def enable(request: Request) -> Response:
    backend = _admin(request).pool.enable(request.path_params["backend_id"])
    log_event(BACKEND_ENABLED, backend=backend.id)
    return _describe(request, backend)


def _is_weight(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_WEIGHT


async def change_backend(request: Request) -> Response:
    """PATCH: the operator's weight, at run time (the pool's generation changes, so the
    router rebuilds its weighted table: about |delta share| of the hashed keys move)."""
    pool = _admin(request).pool
    backend = pool[request.path_params["backend_id"]]  # UnknownBackend: 404
    data = await _json_object(request, '{"weight": 2}')
    if isinstance(data, JSONResponse):
        return data
    weight = data.get("weight")
    if set(data) != {"weight"} or not isinstance(weight, int) or not _is_weight(weight):
        return _error(
            400, "invalid_weight", f'the body must be {{"weight": N}}, N from 1 to {MAX_WEIGHT}'
        )
    old = backend.configured_weight
    pool.set_weight(backend.id, weight)
    log_event(BACKEND_WEIGHT, backend=backend.id, weight=weight, was=old)
    return _describe(request, backend)


async def remove(request: Request) -> Response:
    pool = _admin(request).pool
    backend = pool[request.path_params["backend_id"]]
    pool.remove(backend.id)
    log_event(BACKEND_REMOVED, backend=backend.id, in_flight=backend.in_flight)
    return _describe(request, backend)


async def metrics_endpoint(request: Request) -> Response:
    body, content_type = _admin(request).metrics.render()
    return Response(body, media_type=content_type)


async def list_workers(request: Request) -> Response:
    return JSONResponse(_workers(request).describe())


async def scale_workers(request: Request) -> Response:
    data = await _json_object(request, '{"delta": 1}')
    if isinstance(data, JSONResponse):
        return data
    delta = data.get("delta")
    if delta not in (1, -1) or isinstance(delta, bool):
        return _error(400, "invalid_delta", 'the body must be {"delta": 1} or {"delta": -1}')
    desired = _workers(request).scale(delta)  # InvalidTransition below one worker: 409
    return JSONResponse({"desired": desired}, status_code=202)


async def reload_tls(request: Request) -> Response:
    """Read the listener's certificate files again: 200 with what now serves, or 422 with
    the file and why, and the certificates in use unchanged."""
    reload = request.app.state.tls_reload
    if reload is None:
        return _error(404, "no_tls", "the listener does not serve TLS (no --tls-cert)")
    try:
        served: dict[str, object] = reload("admin")
    except TlsError as exc:
        return _error(422, "tls_reload_failed", f"{exc}; the certificates in use are unchanged")
    return JSONResponse(served)


async def reload_config(request: Request) -> Response:
    """Read the --config file again: 200 with what changed, or 422 with the setting and
    why, and nothing changed."""
    reload = request.app.state.config_reload
    if reload is None:
        return _error(404, "no_config", "the balancer was started without --config: no file")
    try:
        changed: dict[str, object] = reload("admin")
    except ConfigError as exc:
        return _error(422, "config_reload_failed", f"{exc}; nothing was changed")
    return JSONResponse(changed)


async def restart_workers(request: Request) -> Response:
    _workers(request).request_restart()
    log_event(ROLLING_RESTART_REQUESTED, source="admin")
    return JSONResponse({"restart": "requested"}, status_code=202)


def _router(request: Request) -> SessionControl:
    router = _admin(request).router
    assert router is not None  # the session routes exist only with a router
    return router


def _describe_pin(pin: Pin, now: float) -> dict[str, object]:
    """The JSON shape of a session in the admin API: its handle, never its value."""
    return {
        "session": handle(pin.session),
        "seen_ago": round(max(0.0, now - pin.seen), 3),  # seconds
        "backend": pin.backend_id or None,  # where it is pinned now
        # An operator's order waits for the session's next request: to a backend ("to"),
        # or, with "to" None, to be placed anew (forgotten).
        "moving": pin.moved is not None,
        "to": pin.moved or None,
    }


def _session_name(request: Request) -> str | JSONResponse:
    """The path's session handle, or the 400 that says what one looks like."""
    name = request.path_params["session"]
    if not isinstance(name, str) or not _HANDLE.fullmatch(name):
        return _error(400, "invalid_session", "a session is named by 16 hex digits (its handle)")
    return name


async def list_sessions(request: Request) -> Response:
    admin = _admin(request)
    backend = admin.pool[request.path_params["backend_id"]]  # UnknownBackend: 404
    given = request.query_params.get("limit", str(SESSIONS_LIMIT))
    limit = int(given) if given.isdigit() else 0
    if not 1 <= limit <= MAX_SESSIONS_LIMIT:
        return _error(
            400, "invalid_limit", f"?limit= must be a whole number from 1 to {MAX_SESSIONS_LIMIT}"
        )
    pins = _router(request).pins
    now = admin.clock()
    since = now - PINNED_WINDOW
    return JSONResponse(
        {
            "backend": backend.id,
            "window": PINNED_WINDOW,
            "pinned": pins.counts(since).get(backend.id, 0),
            "sessions": [_describe_pin(p, now) for p in pins.recent(backend.id, since, limit)],
        }
    )


async def forget_session(request: Request) -> Response:
    name = _session_name(request)
    if isinstance(name, JSONResponse):
        return name
    try:
        pin = _router(request).move(name, None)
    except LookupError:
        return _error(404, "unknown_session", f"no session has the handle {name}")
    log_event(SESSION_FORGOTTEN, session=name)
    return JSONResponse(_describe_pin(pin, _admin(request).clock()))


async def move_session(request: Request) -> Response:
    name = _session_name(request)
    if isinstance(name, JSONResponse):
        return name
    data = await _json_object(request, '{"backend": "<id>"}')
    if isinstance(data, JSONResponse):
        return data
    target = data.get("backend")
    if not isinstance(target, str):
        return _error(400, "missing_backend", 'the body must be {"backend": "<backend id>"}')
    backend = _admin(request).pool[target]  # UnknownBackend: 404
    if backend.state is not BackendState.UP:
        # The router would place the session elsewhere: say so now instead.
        return _error(
            409,
            "backend_not_up",
            f"backend {backend.id} is {backend.state.value}: a session moves only to one up",
        )
    try:
        # One scan of the pin table (a digest an entry): a second to learn where the
        # session was would double the admin call's hold on the event loop.
        pin = _router(request).move(name, backend.id)
    except UnknownBackend:
        raise  # a LookupError too, but not this one: checked above
    except LookupError:
        return _error(404, "unknown_session", f"no session has the handle {name}")
    log_event(SESSION_MOVED, session=name, backend=backend.id)
    return JSONResponse(_describe_pin(pin, _admin(request).clock()))


async def unknown_backend(request: Request, exc: Exception) -> Response:
    return _error(404, "unknown_backend", str(exc))


async def invalid_transition(request: Request, exc: Exception) -> Response:
    return _error(409, "invalid_transition", str(exc))


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http")
    response = _error(exc.status_code, reason, exc.detail)
    response.headers.update(exc.headers or {})
    return response


ROUTES: list[BaseRoute] = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/backends", list_backends, methods=["GET"]),
    Route("/backends", add_backend, methods=["POST"]),
    Route("/backends/{backend_id}/drain", drain, methods=["POST"]),
    Route("/backends/{backend_id}/enable", enable, methods=["POST"]),
    Route("/backends/{backend_id}", remove, methods=["DELETE"]),
    Route("/backends/{backend_id}", change_backend, methods=["PATCH"]),
    Route("/metrics", metrics_endpoint, methods=["GET"]),
    Route("/tls/reload", reload_tls, methods=["POST"]),
    Route("/config/reload", reload_config, methods=["POST"]),
]
# With a supervisor (`workers`).
WORKER_ROUTES: list[BaseRoute] = [
    Route("/workers", list_workers, methods=["GET"]),
    Route("/workers/scale", scale_workers, methods=["POST"]),
    Route("/workers/restart", restart_workers, methods=["POST"]),
]
# With the router (`router`).
SESSION_ROUTES: list[BaseRoute] = [
    Route("/backends/{backend_id}/sessions", list_sessions, methods=["GET"]),
    Route("/sessions/{session}", forget_session, methods=["DELETE"]),
    Route("/sessions/{session}/move", move_session, methods=["POST"]),
]
_EXCEPTION_HANDLERS: dict[Any, ExceptionHandler] = {
    UnknownBackend: unknown_backend,
    InvalidTransition: invalid_transition,
    HTTPException: http_error,
}


def create_admin_app(
    *,
    pool: Pool,
    metrics: Metrics,
    token: str | None = None,
    clock: Callable[[], float] = time.monotonic,
    workers: WorkerControl | None = None,
    dashboard: Dashboard | None = None,
    fingerprint: Callable[[], str] | None = None,
    pins: PinTable | None = None,
    router: SessionControl | None = None,
    front: Sequence[BaseRoute] = (),
    tls_reload: Callable[[str], dict[str, object]] | None = None,
    config_reload: Callable[[str], dict[str, object]] | None = None,
) -> Starlette:
    """The admin ASGI app. `clock` is the same monotonic clock the health checks use;
    `workers`, the supervisor, adds the /workers routes; `dashboard`, the page at /;
    `fingerprint`, the router's, is in /backends (equal on replicas that route alike);
    `pins`, the router's pin table, gives a drain's report its pinned sessions (the
    router's, when only `router` is given); `router` adds the session routes; `front`,
    routes that come first and shadow the API's own (`_cluster.FRONT_ROUTES`, and the
    internal endpoints' GET /internal/log, with `--workers N`); `tls_reload`, called with
    the source, reloads the listener's certificates for POST /tls/reload (raises TlsError);
    `config_reload`, likewise, the --config file for POST /config/reload (ConfigError)."""
    routes = [*front, *ROUTES]
    open_paths = {"/healthz"}
    if workers is not None:
        routes += WORKER_ROUTES
    if router is not None:
        routes += SESSION_ROUTES
        pins = router.pins if pins is None else pins
    if dashboard is not None:
        routes += DASHBOARD_ROUTES
        open_paths |= OPEN_PATHS
    # The first is the outermost: a cross-site request is refused before its token is read.
    middleware = [Middleware(_SameOrigin, loopback_only=token is None)]
    if token is not None:
        middleware.append(Middleware(_BearerAuth, token=token, open_paths=frozenset(open_paths)))
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=_EXCEPTION_HANDLERS)
    app.state.admin = _Admin(pool, metrics, clock, workers, fingerprint, pins, router=router)
    app.state.dashboard = dashboard
    app.state.tls_reload = tls_reload
    app.state.config_reload = config_reload
    return app
