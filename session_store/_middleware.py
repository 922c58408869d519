"""The ASGI middleware that gives every request a server-side ``request.session``."""

from __future__ import annotations

import enum
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

from starlette.datastructures import MutableHeaders, Secret
from starlette.requests import HTTPConnection, cookie_parser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._exceptions import (
    SessionError,
    SessionStoreError,
    SessionTooLarge,
    StoreUnavailable,
    WriteNotAcknowledged,
)
from ._session import Session
from ._signing import SessionIdSigner, new_session_id
from ._store import Changes, SessionStore, VersionedStore
from ._url import store_from_env
from ._users import UserIndex

__all__ = ["SessionMiddleware", "load_session", "save_session"]

logger = logging.getLogger("session_store")

Autoload = bool | Callable[[Scope], bool]

STARLETTE_MAX_AGE = 14 * 24 * 60 * 60  # seconds: Starlette's default max_age, 14 days
# How Starlette's middleware clears its cookie, spelled as it spells it.
_EPOCH = "expires=Thu, 01 Jan 1970 00:00:00 GMT"


class _Unset(enum.Enum):
    """The default of a parameter for which None means something (``max_age``)."""

    UNSET = enum.auto()


_UNSET = _Unset.UNSET


_ONE_SETTING = "SessionMiddleware: {theirs} (Starlette's name) and {ours} are one setting; give one"


def _one_of(ours: str, our_value: Any, theirs: str, their_value: Any) -> Any:
    """The value of the one spelling given of a setting, or None; both is a TypeError."""
    if our_value is not None and their_value is not None:
        raise TypeError(_ONE_SETTING.format(theirs=theirs, ours=ours))
    return our_value if our_value is not None else their_value


# One encoder for all: json.dumps with options builds a new one per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


# JSONEncoder.encode's own texts for the commonest values, without its per-call encoder
# object (an int took ~6 us through it, a third of a write's middleware CPU; issue 16).
_encode_str = json.encoder.encode_basestring  # ensure_ascii=False, as _ENCODER
_CONSTANTS = {True: "true", False: "false", None: "null"}


def _encode(key: str, value: Any) -> str:
    kind = type(value)
    if kind is str:
        return _encode_str(value)
    if kind is int:
        return int.__repr__(value)
    if kind is bool or value is None:
        return _CONSTANTS[value]
    try:
        return _ENCODER.encode(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"session[{key!r}] cannot be stored: only JSON values are ({exc})") from exc


_DECODE = json.JSONDecoder().decode
# Decoding a stored text took ~0.6 us a key on every load, the same few texts again and
# again on cached (hybrid) reads (issue 16). Only texts that decode to an immutable value
# are remembered: one object may then be shared by requests, as small ints already are.
_DECODED_CACHE_SIZE = 4096  # texts remembered, decoded
_DECODED_CACHE_LENGTH = 128  # characters: a longer text is decoded every time
_MISSING = object()
_VARY_COOKIE = (b"vary", b"Cookie")
_COOKIE_CACHE_SIZE = 10_000  # Cookie headers remembered, parsed
_COOKIE_CACHE_LENGTH = 1024  # bytes: a longer header is parsed every time (bounds memory)
_NO_CHANGES = Changes()
# Values that cannot change in place: the same object as loaded is the same JSON text.
_IMMUTABLE = frozenset({str, int, float, bool, type(None)})


def _encode_all(session: Session) -> dict[str, str]:
    """Every key's JSON text; a value still the immutable object loaded reuses its text
    (encoding it again was a third of the middleware's CPU on a read, issue 16)."""
    baseline = session.baseline
    loaded = session.loaded_values
    encoded: dict[str, str] = {}
    for key, value in dict.items(session):
        if type(value) in _IMMUTABLE and key in baseline and loaded.get(key, _DECODE) is value:
            encoded[key] = baseline[key]
        else:
            encoded[key] = _encode(key, value)
    return encoded


async def load_session(connection: HTTPConnection) -> Session:
    """Load ``connection.session`` if the middleware did not (``autoload``), and return it.

    Also a FastAPI dependency as it is (``Depends(load_session)``; `session_store.fastapi`
    names it ``SessionDep``). Raises `StoreUnavailable` if the store cannot be reached,
    `SessionError` if no `SessionMiddleware` of ours runs in front of the app.
    """
    session = connection.scope.get("session")
    if not isinstance(session, Session):
        raise SessionError(
            "no session_store.SessionMiddleware in front of this app: add it "
            "(app.add_middleware(SessionMiddleware, secret_key=...)) before using the session"
        )
    await session.load()
    return session


async def save_session(connection: HTTPConnection) -> None:
    """Save what a WebSocket endpoint changed in its session now, not when it closes.

    A WebSocket's session is saved when the endpoint returns (the socket closed, by either
    side); a long-lived one saves sooner with this. Only a session the client already
    holds (its cookie came with the handshake) can be saved: no cookie follows the
    handshake, so a new or regenerated session is not kept. Raises `StoreUnavailable` if
    the store cannot be reached, `SessionError` on an HTTP request (its response saves the
    session) or without our middleware.
    """
    session = connection.scope.get("session")
    if not isinstance(session, Session):
        raise SessionError(
            "no session_store.SessionMiddleware in front of this app: add it "
            "(app.add_middleware(SessionMiddleware, secret_key=...)) before using the session"
        )
    if session.saver is None:
        raise SessionError(
            "save_session is for WebSocket endpoints: an HTTP response saves the session itself"
        )
    await session.saver()


class SessionMiddleware:
    """Server-side sessions for any ASGI app, in any `SessionStore`.

    A drop-in for Starlette's ``SessionMiddleware``: it takes every keyword of
    Starlette's (``secret_key``, ``session_cookie``, ``max_age``, ``path``,
    ``same_site``, ``https_only``, ``domain``, ``partitioned``) with the same
    meaning, writes the cookie's attributes as Starlette does, and sends the cookie
    when the session changed, ``Vary: Cookie`` when the app used it. The cookie
    holds only a signed random id; the data stays in ``store``. Without a store,
    `store_from_env` picks one (``SESSION_STORE_URL``, then ``REDIS_URL``, else this
    process's memory, with a warning) and the middleware closes it at lifespan's end.

    Keys: ``secret_key`` (one key), or ``secret_keys``, newest first: the first
    signs, all verify. Each at least 16 characters.

    Expiry: a session ends after ``idle_timeout`` seconds without a request, and
    ``absolute_lifetime`` seconds after it was created, whichever is first. Given
    Starlette's ``max_age``, that is the lifetime and the cookie's Max-Age (None: a
    browser-session cookie; 0 or less: a cookie the browser drops at once and a
    session never kept). With ``secret_key`` or ``max_age``, the defaults are
    Starlette's: 14 days, and no shorter idle expiry unless ``idle_timeout`` says so;
    with ``secret_keys`` alone, 30 minutes idle and 24 hours in all.

    Two spellings of one setting (``secret_key``/``secret_keys``,
    ``session_cookie``/``cookie_name``, ``https_only``/``secure``,
    ``max_age``/``absolute_lifetime`` or ``persistent``) given together raise
    TypeError; settings that cannot work raise ValueError.

    Store calls: a request without a valid cookie makes none until it puts
    something in the session; a request with one loads it once (before the app
    runs when ``autoload`` says so, else on ``await load_session(request)``); an
    unchanged session is only touched to extend its idle expiry, at most once
    per ``touch_interval`` seconds; a changed one writes only the changed keys; one
    emptied by the app is destroyed and its cookie cleared, as Starlette clears it.

    When the store is unavailable the request gets ``503`` with ``Retry-After``
    (``on_unavailable="error"``), or goes on with an empty session that is not
    saved (``on_unavailable="empty"``).
    """

    def __init__(
        self,
        app: ASGIApp,
        store: SessionStore | None = None,
        secret_keys: Sequence[str | bytes] | None = None,
        *,
        # Starlette's keywords, with Starlette's meaning.
        secret_key: str | bytes | Secret | None = None,
        session_cookie: str | None = None,
        max_age: int | _Unset | None = _UNSET,  # seconds
        path: str = "/",
        same_site: Literal["lax", "strict", "none"] = "lax",
        https_only: bool | None = None,
        domain: str | None = None,
        partitioned: bool = False,
        # Ours.
        cookie_name: str | None = None,  # default "session"
        idle_timeout: float | None = None,  # seconds; see the expiry defaults above
        absolute_lifetime: float | None = None,  # seconds; see the expiry defaults above
        touch_interval: float | None = None,  # seconds; default min(60, idle_timeout / 4)
        max_size: int = 64 * 1024,  # bytes of JSON text, keys included
        persistent: bool | None = None,  # Max-Age = absolute_lifetime; False: browser-session
        secure: bool | None = None,
        httponly: bool = True,
        autoload: Autoload = True,
        on_unavailable: Literal["error", "empty"] = "error",
        retry_after: int = 5,  # seconds, in the 503's Retry-After
        clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(store, str | bytes | Secret):
            raise TypeError(
                "SessionMiddleware(app, store, ...): the second argument is the store; "
                "pass the key by name, secret_key=..."
            )
        keys = self._keys(secret_key, secret_keys)
        cookie_name = _one_of("cookie_name", cookie_name, "session_cookie", session_cookie)
        secure = bool(_one_of("secure", secure, "https_only", https_only))
        starlette_expiry = secret_key is not None or max_age is not _UNSET
        if max_age is not _UNSET:
            # max_age=None says only "no Max-Age": it leaves absolute_lifetime free.
            if persistent is not None or (absolute_lifetime is not None and max_age is not None):
                ours = "persistent" if persistent is not None else "absolute_lifetime"
                raise TypeError(_ONE_SETTING.format(theirs="max_age", ours=ours))
            persistent = max_age is not None
            if max_age is not None:
                absolute_lifetime = max(max_age, 1)
        if absolute_lifetime is None:
            absolute_lifetime = STARLETTE_MAX_AGE if starlette_expiry else 24 * 60 * 60
        if idle_timeout is None:
            idle_timeout = absolute_lifetime if starlette_expiry else 30 * 60
        if idle_timeout <= 0 or absolute_lifetime <= 0:
            raise ValueError("idle_timeout and absolute_lifetime must be positive")
        if same_site not in ("lax", "strict", "none"):
            raise ValueError(f"same_site must be 'lax', 'strict' or 'none', not {same_site!r}")
        if same_site == "none" and not secure:
            raise ValueError(
                "same_site='none' needs https_only=True (or secure=True): browsers reject it "
                "otherwise"
            )
        if partitioned and not secure:
            raise ValueError(
                "partitioned=True needs https_only=True (or secure=True): browsers reject a "
                "Partitioned cookie without Secure"
            )
        if on_unavailable not in ("error", "empty"):
            raise ValueError(f"on_unavailable must be 'error' or 'empty', not {on_unavailable!r}")
        name = "secret_key" if secret_key is not None else "secret_keys"
        try:
            self.signer = SessionIdSigner(keys, max_age=math.ceil(absolute_lifetime))
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        self.app = app
        # Last, once every setting is known good: a store made here holds a client.
        self._owns_store = store is None
        self.store = store if store is not None else store_from_env()
        self.cookie_name = cookie_name or "session"
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
        # max_age=0 or less, as Starlette: no cookie is ever read back, nothing is stored.
        self.keeps = not (isinstance(max_age, int) and max_age <= 0)
        # Starlette's order and spelling: apps' own tests compare them.
        flags = "httponly; " if httponly else ""
        flags += f"samesite={same_site}"
        if secure:
            flags += "; secure"
        if domain is not None:
            flags += f"; domain={domain}"
        if partitioned:
            flags += "; partitioned"
        if isinstance(max_age, int):
            lifetime = f"Max-Age={max_age}; "
        else:
            lifetime = (
                f"Max-Age={math.ceil(absolute_lifetime)}; " if persistent is not False else ""
            )
        self._attributes = f"; path={path}; {lifetime}{flags}"
        self._expired = f"{self.cookie_name}=; path={path}; {_EPOCH}; {flags}"
        self._cookies: dict[bytes, str | None] = {}  # a Cookie header -> our cookie's value
        # A store that serves cached copies (hybrid) gets the version the client last saw
        # written, from a cookie of its own: the session cookie's value must not change
        # with every write (a balancer pins by it). See `_version_cookie`.
        self._versions = self.store if isinstance(self.store, VersionedStore) else None
        self.version_cookie_name = f"{self.cookie_name}_v"
        self._version_attributes = self._attributes
        self._version_texts: dict[bytes, str | None] = {}  # a Cookie header -> its version
        self._decoded: dict[str, Any] = {}  # a stored JSON text -> its immutable value

    @staticmethod
    def _keys(
        secret_key: str | bytes | Secret | None, secret_keys: Sequence[str | bytes] | None
    ) -> Sequence[str | bytes]:
        if secret_key is not None and secret_keys is not None:
            raise TypeError(_ONE_SETTING.format(theirs="secret_key", ours="secret_keys"))
        if secret_key is not None:
            return [str(secret_key) if isinstance(secret_key, Secret) else secret_key]
        if secret_keys is None:
            raise TypeError(
                "SessionMiddleware needs secret_key=... (or secret_keys=[newest, ...]); make "
                'one with: python -c "import secrets; print(secrets.token_urlsafe(32))"'
            )
        return secret_keys

    def _cookie(self, value: str) -> str:
        return f"{self.cookie_name}={value}{self._attributes}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            if scope["type"] == "lifespan" and self._owns_store:
                await self.app(scope, receive, self._closing_store(send))
            else:
                await self.app(scope, receive, send)
            return

        session = Session()
        scope["session"] = session
        session.middleware = self
        cookie_value = self._read_cookie(scope)
        session_id = None
        if cookie_value is not None and self.keeps:
            session_id = self.signer.unsign(cookie_value)
        if session_id is not None:
            at_least = self._version_of(scope, session_id) if self._versions is not None else 0
            session.loaded = False
            autoload = self.autoload if isinstance(self.autoload, bool) else self.autoload(scope)
            if autoload:
                try:
                    await self._load(session, session_id, at_least)
                except StoreUnavailable as exc:
                    if not await self._on_unavailable(exc, session, scope, send):
                        return
            else:  # a closure only where `load_session` will need it
                session.loader = lambda: self._load(session, session_id, at_least)

        if scope["type"] == "websocket":
            # No Set-Cookie once the handshake is over: a change to a session the client
            # holds is saved when the endpoint returns, or sooner with `save_session`.
            session.saver = lambda: self._save_websocket(session, cookie_value)
            await self.app(scope, receive, send)
            try:
                await self._save_websocket(session, cookie_value)
            except (SessionError, TypeError) as exc:
                # The socket is closed: nobody to answer. Logged, as a failed save is.
                logger.warning("websocket session not saved: %s", exc)
            return

        replaced = False

        async def send_wrapper(message: Message) -> None:
            nonlocal replaced
            if replaced:
                return  # the app's own response was replaced by the 503
            if message["type"] == "http.response.start":
                try:
                    cookie = await self._commit(session, cookie_value)
                    if session.bind_to is not None:
                        await self._bind(session)
                except StoreUnavailable as exc:
                    if self.on_unavailable == "error":
                        replaced = True
                        await self._send_unavailable(exc, send)
                        return
                    logger.warning("session not saved, store unavailable: %s", exc)
                    cookie = None
                if session.accessed or cookie is not None:
                    # Optional in ASGI, and any iterable: a list of our own to append to.
                    raw = message["headers"] = list(message.get("headers", ()))
                    # Only when the app used the session: Vary: Cookie on every
                    # response would keep HTTP caches from storing any of them.
                    if session.accessed:
                        # A loop, not any() over a generator: ~1 us less a response.
                        for name, _ in raw:
                            if name.lower() == b"vary":
                                MutableHeaders(raw=raw).add_vary_header("Cookie")
                                break
                        else:
                            raw.append(_VARY_COOKIE)
                    if cookie is not None:
                        raw.append((b"set-cookie", cookie.encode("latin-1")))
                        if session.saved_version is not None and self._versions is not None:
                            raw.append((b"set-cookie", self._version_cookie(session)))
            await send(message)

        await self.app(scope, receive, send_wrapper)

    def _closing_store(self, send: Send) -> Send:
        """``send`` for a lifespan: the store this middleware made is closed at its end."""

        async def closing(message: Message) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await self.store.aclose()
            await send(message)

        return closing

    def _read_cookie(self, scope: Scope) -> str | None:
        """The session cookie's value as the client sent it, or None."""
        for name, value in scope["headers"]:
            if name == b"cookie":
                # A client sends the same header on every request: parsed once (issue 16),
                # in a dict bounded as the signer's cache is.
                if value in self._cookies:
                    cached = self._cookies[value]
                else:
                    cached = cookie_parser(value.decode("latin-1")).get(self.cookie_name)
                    if len(value) <= _COOKIE_CACHE_LENGTH:
                        if len(self._cookies) >= _COOKIE_CACHE_SIZE:
                            self._cookies.clear()
                        self._cookies[value] = cached
                if cached is not None:
                    return cached
        return None

    def _version_of(self, scope: Scope, session_id: str) -> int:
        """The version the client's version cookie names for ``session_id``, else 0."""
        for name, value in scope["headers"]:
            if name == b"cookie":
                # Parsed once per Cookie header, as `_read_cookie` does.
                if value in self._version_texts:
                    text = self._version_texts[value]
                else:
                    text = cookie_parser(value.decode("latin-1")).get(self.version_cookie_name)
                    if len(value) <= _COOKIE_CACHE_LENGTH:
                        if len(self._version_texts) >= _COOKIE_CACHE_SIZE:
                            self._version_texts.clear()
                        self._version_texts[value] = text
                if text is not None:
                    version, _, tag = text.partition(".")
                    if tag == session_id[:8] and version.isdigit() and len(version) < 20:
                        return int(version)
        return 0

    def _version_cookie(self, session: Session) -> bytes:
        """``{name}_v=VERSION.ID8``: the version this request's save gave the session, and
        the first 8 characters of its id (a cookie left from another session is ignored).
        Not signed: a client that sends a higher version only makes its own reads ask
        Redis, a lower one gets what the invalidations say."""
        assert session.id is not None
        value = f"{session.saved_version}.{session.id[:8]}"
        return f"{self.version_cookie_name}={value}{self._version_attributes}".encode("latin-1")

    async def _load(self, session: Session, session_id: str, at_least: int = 0) -> None:
        if at_least and self._versions is not None:
            record = await self._versions.load_at_least(session_id, at_least)
        else:
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
        loaded = session.loaded_values
        decoded = self._decoded
        for key, text in record.fields.items():
            value = decoded.get(text, _MISSING)
            if value is _MISSING:
                try:
                    value = _DECODE(text)
                except ValueError:
                    logger.warning("dropped session key %r: stored value is not JSON", key)
                    del session.baseline[key]
                    continue
                if type(value) in _IMMUTABLE and len(text) <= _DECODED_CACHE_LENGTH:
                    if len(decoded) >= _DECODED_CACHE_SIZE:
                        decoded.clear()
                    decoded[text] = value
            loaded[key] = value
            dict.__setitem__(session, key, value)

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

    async def _commit(self, session: Session, cookie_value: str | None) -> str | None:
        """Write what the request changed; return the Set-Cookie value to send, if any."""
        if session.destroyed:
            if session.id is not None:
                await self.store.destroy(session.id, ttl=self.idle_timeout)
            return self._expired if cookie_value is not None else None
        if not session.loaded:
            return None  # never loaded, so never changed
        now = self.clock()
        if not session.accessed and session.id is not None:
            # Loaded but never looked at by the app: nothing can have changed.
            if self._touch_due(session):
                await self._touch(session, now)
            return None
        encoded = _encode_all(session)
        unchanged = session.id is not None and encoded == session.baseline
        if not unchanged:  # what the store holds already passed this check
            size = sum(len(key) + len(text) for key, text in encoded.items())
            if size > self.max_size:
                raise SessionTooLarge(size, self.max_size)

        if session.id is None or session.regenerated:
            if not encoded:
                if session.id is None:
                    return None  # nothing worth a cookie
                await self.store.destroy(session.id, ttl=self.idle_timeout)
                return self._expired
            if not self.keeps:
                # max_age <= 0: the cookie dies at once, so the session is never kept.
                return self._cookie(self.signer.sign(new_session_id()))
            created = session.created or now
            new_id = await self._create(encoded, created, now)
            if session.id is not None:
                await self.store.destroy(session.id, ttl=self.idle_timeout)
            session.id = new_id
            return self._cookie(self.signer.sign(new_id))

        baseline = session.baseline
        changes = (
            _NO_CHANGES
            if unchanged
            else Changes(
                {k: v for k, v in encoded.items() if baseline.get(k) != v},
                frozenset(baseline.keys() - encoded.keys()),
            )
        )
        if not encoded and (changes or session.modified):
            # Emptied: as Starlette's, the cookie is cleared; the store forgets the
            # session (a tombstone, so a concurrent request cannot bring it back).
            await self.store.destroy(session.id, ttl=self.idle_timeout)
            return self._expired
        if changes:
            ttl = self._ttl(session.created, now)
            version = await self.store.save(
                session.id, changes, created=session.created, ttl=ttl, create=False
            )
            if version is None:
                # Destroyed (or expired) while this request ran: the change is dropped
                # rather than bring a logged-out session back.
                return self._expired
            session.saved_version = version
        elif self._touch_due(session):
            await self._touch(session, now)
        if (changes or session.modified) and cookie_value is not None:
            # As Starlette: a changed session's cookie is sent again, and with it a fresh
            # Max-Age. The value the client sent is reused: same id, no new signature.
            return self._cookie(cookie_value)
        return None

    async def _bind(self, session: Session) -> None:
        """`bind_user`'s binding, once the session is saved under its final id."""
        assert session.bind_to is not None
        if session.id is None or session.destroyed or not self.keeps:
            logger.warning("bind_user: the session was not saved (empty), so not bound")
            return
        if not isinstance(self.store, UserIndex):
            raise SessionError(f"bind_user: {self.store!r} keeps no index of sessions by user")
        now = self.clock()
        lifetime = (session.created or now) + self.absolute_lifetime - now
        await self.store.bind_user(session.id, session.bind_to, ttl=lifetime)
        session.bind_to = None

    async def _save_websocket(self, session: Session, cookie_value: str | None) -> None:
        """Save a WebSocket's session (see `save_session`); what is saved becomes the
        baseline the next save compares with."""
        if session.id is None or session.regenerated:
            if session.regenerated or dict.__len__(session):
                logger.warning(
                    "a session started or regenerated on a websocket is not kept: no cookie "
                    "can carry its id after the handshake"
                )
            return
        await self._commit(session, cookie_value)
        if session.bind_to is not None:
            await self._bind(session)
        session.baseline = {key: _encode(key, value) for key, value in dict.items(session)}
        session.modified = False

    def _touch_due(self, session: Session) -> bool:
        """Whether an unchanged session's idle expiry is due to be renewed: checked before
        a coroutine is made for `_touch` (most requests are not due; issue 16)."""
        return session.ttl is None or self.idle_timeout - session.ttl >= self.touch_interval

    async def _touch(self, session: Session, now: float) -> None:
        assert session.id is not None
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
