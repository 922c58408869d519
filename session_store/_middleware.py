"""The ASGI middleware that gives every request a server-side ``request.session``."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

from starlette.datastructures import MutableHeaders
from starlette.requests import HTTPConnection, cookie_parser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._exceptions import (
    SessionStoreError,
    SessionTooLarge,
    StoreUnavailable,
    WriteNotAcknowledged,
)
from ._session import Session
from ._signing import SessionIdSigner, new_session_id
from ._store import Changes, SessionStore

__all__ = ["SessionMiddleware", "load_session"]

logger = logging.getLogger("session_store")

Autoload = bool | Callable[[Scope], bool]


# One encoder for all: json.dumps with options builds a new one per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _encode(key: str, value: Any) -> str:
    try:
        return _ENCODER.encode(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"session[{key!r}] cannot be stored: only JSON values are ({exc})") from exc


async def load_session(connection: HTTPConnection) -> Session:
    """Load ``connection.session`` if the middleware did not (``autoload``), and return it.

    Raises `StoreUnavailable` if the store cannot be reached.
    """
    session: Session = connection.scope["session"]
    await session.load()
    return session


class SessionMiddleware:
    """Server-side sessions for any ASGI app, in any `SessionStore`.

    The cookie holds only a signed random id; the data stays in the store.
    ``secret_keys`` is newest first: the first signs, all verify.

    Expiry: a session ends after ``idle_timeout`` seconds without a request,
    and ``absolute_lifetime`` seconds after it was created, whichever is first.

    Store calls: a request without a valid cookie makes none until it puts
    something in the session; a request with one loads it once (before the app
    runs when ``autoload`` says so, else on ``await load_session(request)``); an
    unchanged session is only touched to extend its idle expiry, at most once
    per ``touch_interval`` seconds; a changed one writes only the changed keys.

    When the store is unavailable the request gets ``503`` with ``Retry-After``
    (``on_unavailable="error"``), or goes on with an empty session that is not
    saved (``on_unavailable="empty"``).
    """

    def __init__(
        self,
        app: ASGIApp,
        store: SessionStore,
        secret_keys: Sequence[str | bytes],
        *,
        cookie_name: str = "session",
        idle_timeout: float = 30 * 60,  # seconds
        absolute_lifetime: float = 24 * 60 * 60,  # seconds
        touch_interval: float | None = None,  # seconds; default min(60, idle_timeout / 4)
        max_size: int = 64 * 1024,  # bytes of JSON text, keys included
        persistent: bool = True,  # Max-Age = absolute_lifetime; False: a browser-session cookie
        path: str = "/",
        domain: str | None = None,
        secure: bool = False,
        httponly: bool = True,
        same_site: Literal["lax", "strict", "none"] = "lax",
        autoload: Autoload = True,
        on_unavailable: Literal["error", "empty"] = "error",
        retry_after: int = 5,  # seconds, in the 503's Retry-After
        clock: Callable[[], float] = time.time,
    ) -> None:
        if idle_timeout <= 0 or absolute_lifetime <= 0:
            raise ValueError("idle_timeout and absolute_lifetime must be positive")
        if same_site not in ("lax", "strict", "none"):
            raise ValueError(f"same_site must be 'lax', 'strict' or 'none', not {same_site!r}")
        if same_site == "none" and not secure:
            raise ValueError("same_site='none' needs secure=True: browsers reject it otherwise")
        if on_unavailable not in ("error", "empty"):
            raise ValueError(f"on_unavailable must be 'error' or 'empty', not {on_unavailable!r}")
        self.app = app
        self.store = store
        self.cookie_name = cookie_name
        self.idle_timeout = idle_timeout
        self.absolute_lifetime = absolute_lifetime
        self.touch_interval = (
            touch_interval if touch_interval is not None else min(60.0, idle_timeout / 4)
        )
        self.max_size = max_size
        self.autoload = autoload
        self.on_unavailable = on_unavailable
        self.retry_after = retry_after
        self.clock = clock
        self.signer = SessionIdSigner(secret_keys, max_age=math.ceil(absolute_lifetime))
        attributes = [f"Path={path}"]
        if domain:
            attributes.append(f"Domain={domain}")
        if persistent:
            attributes.append(f"Max-Age={math.ceil(absolute_lifetime)}")
        if httponly:
            attributes.append("HttpOnly")
        if secure:
            attributes.append("Secure")
        attributes.append(f"SameSite={same_site.capitalize()}")
        self._attributes = "; ".join(attributes)
        self._expired = f"{cookie_name}=; " + "; ".join(
            [a for a in attributes if not a.startswith("Max-Age")] + ["Max-Age=0"]
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return

        session = Session()
        scope["session"] = session
        had_cookie, session_id = self._read_cookie(scope)
        if session_id is not None:
            session.loaded = False
            session.loader = lambda: self._load(session, session_id)
            autoload = self.autoload if isinstance(self.autoload, bool) else self.autoload(scope)
            if autoload:
                try:
                    await self._load(session, session_id)
                except StoreUnavailable as exc:
                    if not await self._on_unavailable(exc, session, scope, send):
                        return

        if scope["type"] == "websocket":
            # No Set-Cookie on a WebSocket: the session is readable, not saved.
            await self.app(scope, receive, send)
            return

        replaced = False

        async def send_wrapper(message: Message) -> None:
            nonlocal replaced
            if replaced:
                return  # the app's own response was replaced by the 503
            if message["type"] == "http.response.start":
                try:
                    cookie = await self._commit(session, had_cookie)
                except StoreUnavailable as exc:
                    if self.on_unavailable == "error":
                        replaced = True
                        await self._send_unavailable(exc, send)
                        return
                    logger.warning("session not saved, store unavailable: %s", exc)
                    cookie = None
                headers = MutableHeaders(scope=message)
                if session.accessed or had_cookie:
                    headers.add_vary_header("Cookie")
                if cookie is not None:
                    headers.append("Set-Cookie", cookie)
            await send(message)

        await self.app(scope, receive, send_wrapper)

    def _read_cookie(self, scope: Scope) -> tuple[bool, str | None]:
        for name, value in scope["headers"]:
            if name == b"cookie":
                cookies = cookie_parser(value.decode("latin-1"))
                if self.cookie_name in cookies:
                    return True, self.signer.unsign(cookies[self.cookie_name])
        return False, None

    async def _load(self, session: Session, session_id: str) -> None:
        record = await self.store.load(session_id)
        session.loaded = True
        if record is None or record.created + self.absolute_lifetime <= self.clock():
            # Unknown, expired or destroyed: a fresh session with a fresh id. The
            # client's id is never adopted (session fixation).
            return
        session.id = session_id
        session.created = record.created
        session.ttl = record.ttl
        session.baseline = dict(record.fields)
        for key, text in record.fields.items():
            try:
                dict.__setitem__(session, key, json.loads(text))
            except ValueError:
                logger.warning("dropped session key %r: stored value is not JSON", key)
                del session.baseline[key]

    async def _on_unavailable(
        self, exc: StoreUnavailable, session: Session, scope: Scope, send: Send
    ) -> bool:
        """Whether the request goes on (with an empty session) after a failed load."""
        if self.on_unavailable == "empty" or scope["type"] == "websocket":
            logger.warning("session store unavailable, going on with an empty session: %s", exc)
            session.loaded = True
            return True
        await self._send_unavailable(exc, send)
        return False

    async def _send_unavailable(self, exc: StoreUnavailable, send: Send) -> None:
        logger.warning("session store unavailable, answered 503: %s", exc)
        if isinstance(exc, WriteNotAcknowledged):
            # Not "unreachable": the write reached the primary, but no replica confirmed it.
            body = b"503 Service Unavailable: the session change was not replicated, retry later\n"
        else:
            body = b"503 Service Unavailable: the session store is unreachable, retry later\n"
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", str(self.retry_after).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _ttl(self, created: float, now: float) -> float:
        return min(self.idle_timeout, created + self.absolute_lifetime - now)

    async def _commit(self, session: Session, had_cookie: bool) -> str | None:
        """Write what the request changed; return the Set-Cookie value to send, if any."""
        if session.destroyed:
            if session.id is not None:
                await self.store.destroy(session.id, ttl=self.idle_timeout)
            return self._expired if had_cookie else None
        if not session.loaded:
            return None  # never loaded, so never changed
        now = self.clock()
        if not session.accessed and session.id is not None:
            # Loaded but never looked at by the app: nothing can have changed.
            await self._touch_if_due(session, now)
            return None
        encoded = {key: _encode(key, value) for key, value in dict.items(session)}
        size = sum(len(key) + len(text) for key, text in encoded.items())
        if size > self.max_size:
            raise SessionTooLarge(size, self.max_size)

        if session.id is None or session.regenerated:
            if not encoded and session.id is None:
                return None  # nothing worth a cookie
            created = session.created or now
            new_id = await self._create(encoded, created, now)
            if session.id is not None:
                await self.store.destroy(session.id, ttl=self.idle_timeout)
            session.id = new_id
            return f"{self.cookie_name}={self.signer.sign(new_id)}; {self._attributes}"

        baseline = session.baseline
        changes = Changes(
            {k: v for k, v in encoded.items() if baseline.get(k) != v},
            frozenset(baseline.keys() - encoded.keys()),
        )
        ttl = self._ttl(session.created, now)
        if changes:
            if (
                await self.store.save(
                    session.id, changes, created=session.created, ttl=ttl, create=False
                )
                is None
            ):
                # Destroyed (or expired) while this request ran: the change is dropped
                # rather than bring a logged-out session back.
                return self._expired
        else:
            await self._touch_if_due(session, now)
        return None

    async def _touch_if_due(self, session: Session, now: float) -> None:
        assert session.id is not None
        if session.ttl is None or self.idle_timeout - session.ttl >= self.touch_interval:
            await self.store.touch(session.id, self._ttl(session.created, now))

    async def _create(self, encoded: dict[str, str], created: float, now: float) -> str:
        for _ in range(3):
            session_id = new_session_id()
            if (
                await self.store.save(
                    session_id,
                    Changes(encoded),
                    created=created,
                    ttl=self._ttl(created, now),
                    create=True,
                )
                is not None
            ):
                return session_id
        # 256 random bits colliding three times means the store is broken, not unlucky.
        raise SessionStoreError("the store refused three new session ids")
