"""Encryption at rest: a store wrapper that encrypts each session value, field by field.

Per field, not per session, so that a save still carries only the keys a request changed
and concurrent requests that change different keys still both keep their change. Each
value is sealed with AES-256-GCM under the newest key; the session id and the key name are
its associated data, so a value copied to another key or another session (by someone who
can write to the store) does not open. A stored value reads as::

    <key id: 4 bytes><nonce: 12 bytes><ciphertext + 16-byte tag>, base64url, no padding

The key id (the first 4 bytes of the key's SHA-256) picks the key to open it with, so
rotation is a list, newest first: the newest seals, all open. A value that does not open
(no key of the list sealed it, it was written before encryption was on, it was tampered
with) is dropped from the session as it is read, with a warning: with a wrong key list the
session reads as empty; never an error, never a 500. ``cryptography`` is an optional
dependency: ``pip install 'sticky-sessions[encryption]'``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
from collections.abc import Collection, Sequence

from ._exceptions import SessionError
from ._store import Changes, SessionRecord, SessionStore, VersionedStore
from ._users import UserIndex

try:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
except ImportError:  # the optional [encryption] extra; EncryptedStore() says so
    _CRYPTOGRAPHY = False
else:
    _CRYPTOGRAPHY = True

__all__ = ["EncryptedStore"]

logger = logging.getLogger("session_store")

_KEY_BYTES = 32  # AES-256
_NONCE_BYTES = 12  # GCM's: random, so under 2**32 values a key (NIST SP 800-38D 8.3)
_ID_BYTES = 4
_TAG_BYTES = 16
_MAKE_KEY = 'python -c "import secrets; print(secrets.token_urlsafe(32))"'


def _key_bytes(index: int, key: str | bytes) -> bytes:
    if isinstance(key, bytes) and len(key) == _KEY_BYTES:
        return key
    text = key.decode("ascii", "replace") if isinstance(key, bytes) else key
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != _KEY_BYTES:
        raise ValueError(
            f"keys[{index}] is not a key: give 32 random bytes, base64url (make one with: "
            f"{_MAKE_KEY})"
        )
    return raw


class EncryptedStore:
    """Any `SessionStore`, with every session value encrypted at rest (AES-256-GCM).

    ``keys``: newest first, each 32 random bytes, base64url (``secrets.token_urlsafe(32)``)
    or raw. The first seals what is saved; all open what is loaded, so a key is retired by
    moving a new one in front and dropping the old one once every session saved under it
    has expired (the middleware's ``absolute_lifetime``). Raises ValueError for a key that
    is not one, ImportError (naming the extra) without ``cryptography``.

    Wrap the outermost store: ``EncryptedStore(HybridStore(RedisStore(...)), keys)``;
    a hybrid's memory then holds the sealed values too. What the store holds is larger
    than the middleware's ``max_size`` counts (the plaintext): ~4/3 of it plus 44 bytes a
    key. Ids, versions and expiry are not encrypted; a user index (`UserIndex`) is passed
    through to the wrapped store.
    """

    def __init__(self, store: SessionStore, keys: Sequence[str | bytes]) -> None:
        if not _CRYPTOGRAPHY:
            raise ImportError(
                "EncryptedStore needs the cryptography package: "
                "pip install 'sticky-sessions[encryption]'"
            )
        if isinstance(keys, str | bytes) or not keys:
            raise ValueError(f"keys: a list of keys, newest first (make one with: {_MAKE_KEY})")
        raw = [_key_bytes(i, key) for i, key in enumerate(keys)]
        self.store = store
        self._sealer = AESGCM(raw[0])
        self._sealer_id = hashlib.sha256(raw[0]).digest()[:_ID_BYTES]
        self._openers: dict[bytes, AESGCM] = {}
        for key in raw:
            self._openers.setdefault(hashlib.sha256(key).digest()[:_ID_BYTES], AESGCM(key))

    def seal(self, session_id: str, name: str, text: str) -> str:
        """``text`` (a value's JSON) sealed for key ``name`` of session ``session_id``."""
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._sealer.encrypt(nonce, text.encode(), _context(session_id, name))
        return base64.urlsafe_b64encode(self._sealer_id + nonce + sealed).rstrip(b"=").decode()

    def open(self, session_id: str, name: str, stored: str) -> str | None:
        """The text `seal` sealed, or None if it does not open (see the module's doc)."""
        try:
            raw = base64.urlsafe_b64decode(stored + "=" * (-len(stored) % 4))
        except (binascii.Error, ValueError):
            return None
        if len(raw) < _ID_BYTES + _NONCE_BYTES + _TAG_BYTES:
            return None
        opener = self._openers.get(raw[:_ID_BYTES])
        if opener is None:
            return None
        nonce, sealed = raw[_ID_BYTES : _ID_BYTES + _NONCE_BYTES], raw[_ID_BYTES + _NONCE_BYTES :]
        try:
            return opener.decrypt(nonce, sealed, _context(session_id, name)).decode()
        except (InvalidTag, UnicodeDecodeError):
            return None

    async def load(self, session_id: str) -> SessionRecord | None:
        return self._opened(session_id, await self.store.load(session_id))

    async def load_at_least(self, session_id: str, version: int) -> SessionRecord | None:
        """`load`, through the wrapped store's `load_at_least` when it has one (a
        `HybridStore`: a copy older than the client's version cookie is not served)."""
        if isinstance(self.store, VersionedStore):
            return self._opened(session_id, await self.store.load_at_least(session_id, version))
        return await self.load(session_id)

    def _opened(self, session_id: str, record: SessionRecord | None) -> SessionRecord | None:
        if record is None:
            return None
        fields: dict[str, str] = {}
        dropped = 0
        for name, stored in record.fields.items():
            text = self.open(session_id, name, stored)
            if text is None:
                dropped += 1
            else:
                fields[name] = text
        if dropped:
            logger.warning(
                "dropped %d of %d session keys that do not decrypt (a key missing from "
                "EncryptedStore's keys, written before encryption, or tampered with)",
                dropped,
                len(record.fields),
            )
        return SessionRecord(fields, record.created, record.version, record.ttl)

    async def save(
        self, session_id: str, changes: Changes, *, created: float, ttl: float, create: bool
    ) -> int | None:
        sealed = {name: self.seal(session_id, name, text) for name, text in changes.updated.items()}
        return await self.store.save(
            session_id, Changes(sealed, changes.deleted), created=created, ttl=ttl, create=create
        )

    async def touch(self, session_id: str, ttl: float) -> None:
        await self.store.touch(session_id, ttl)

    async def destroy(self, session_id: str, *, ttl: float) -> None:
        await self.store.destroy(session_id, ttl=ttl)

    def _index(self) -> UserIndex:
        if not isinstance(self.store, UserIndex):
            raise SessionError(f"{self.store!r} keeps no index of sessions by user (bind_user)")
        return self.store

    async def bind_user(self, session_id: str, user_id: str, *, ttl: float) -> None:
        await self._index().bind_user(session_id, user_id, ttl=ttl)

    async def user_session_ids(self, user_id: str) -> list[str]:
        return await self._index().user_session_ids(user_id)

    async def unbind_user(self, user_id: str, session_ids: Collection[str]) -> None:
        await self._index().unbind_user(user_id, session_ids)

    async def ping(self) -> None:
        await self.store.ping()

    async def aclose(self) -> None:
        await self.store.aclose()

    def __repr__(self) -> str:
        return f"<EncryptedStore {self.store!r} [{len(self._openers)} keys]>"


def _context(session_id: str, name: str) -> bytes:
    # NUL cannot occur in a session id (base64url), so no two pairs give the same bytes.
    return f"{session_id}\0{name}".encode()
