"""Signed session ids in cookies, with key rotation."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence

import itsdangerous

__all__ = ["SessionIdSigner", "new_session_id"]


def new_session_id() -> str:
    """A fresh random session id: 256 bits from the OS CSPRNG, URL- and cookie-safe."""
    return secrets.token_urlsafe(32)


class SessionIdSigner:
    """Signs and verifies session ids with itsdangerous.

    ``secret_keys`` is ordered NEWEST FIRST: the first key signs, every key
    verifies. To rotate, put the new key in front and keep the old ones until
    every cookie they signed has expired. (Flask's CVE-2025-47278 signed with a
    fallback key because the order was read the other way round; itsdangerous
    itself takes the newest LAST, so the list is reversed here, once.)

    ``max_age`` (seconds) makes older signatures invalid without a store call;
    use the session's absolute lifetime.
    """

    def __init__(
        self,
        secret_keys: Sequence[str | bytes],
        *,
        salt: str = "session_store.cookie",
        max_age: int | None = None,
    ) -> None:
        if isinstance(secret_keys, str | bytes) or not secret_keys:
            raise ValueError("secret_keys must be a non-empty list of keys, newest first")
        if any(len(key) < 16 for key in secret_keys):
            raise ValueError("every secret key must be at least 16 characters long")
        keys = [key.encode() if isinstance(key, str) else key for key in reversed(secret_keys)]
        self._signer = itsdangerous.TimestampSigner(keys, salt=salt, digest_method=hashlib.sha256)
        self.max_age = max_age

    def sign(self, session_id: str) -> str:
        return self._signer.sign(session_id).decode("ascii")

    def unsign(self, value: str) -> str | None:
        """The session id in ``value``, or None if it is tampered, expired or malformed."""
        try:
            return self._signer.unsign(value, max_age=self.max_age).decode("ascii")
        except (itsdangerous.BadData, UnicodeError):
            return None
