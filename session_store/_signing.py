"""Signed session ids in cookies, with key rotation."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable, Sequence

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
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(secret_keys, str | bytes) or not secret_keys:
            raise ValueError("secret_keys must be a non-empty list of keys, newest first")
        if any(len(key) < 16 for key in secret_keys):
            # One line, naming the fix, and never the key: it ends up in logs.
            raise ValueError(
                f"a secret key must be at least 16 characters long (got one of "
                f"{min(len(key) for key in secret_keys)}); make one with: "
                f'python -c "import secrets; print(secrets.token_urlsafe(32))"'
            )
        keys = [key.encode() if isinstance(key, str) else key for key in reversed(secret_keys)]
        self._signer = itsdangerous.TimestampSigner(keys, salt=salt, digest_method=hashlib.sha256)
        self.max_age = max_age
        self.cache_size = cache_size
        self._clock = clock
        self._verified: dict[str, tuple[str, float]] = {}

    def sign(self, session_id: str) -> str:
        return self._signer.sign(session_id).decode("ascii")

    def unsign(self, value: str) -> str | None:
        """The session id in ``value``, or None if it is tampered, expired or malformed."""
        cached = self._verified.get(value)
        if cached is not None:
            session_id, signed_at = cached
            if self.max_age is None or self._clock() - signed_at <= self.max_age:
                return session_id
            del self._verified[value]
            return None
        try:
            raw, timestamp = self._signer.unsign(value, max_age=self.max_age, return_timestamp=True)
            session_id = raw.decode("ascii")
        except (itsdangerous.BadData, UnicodeError):
            return None
        # Verifying costs two HMACs (~25 us here); a client sends the same value on
        # every request. Only values that verified are remembered, keyed by the whole
        # signed text, so the cache cannot be used to skip a check.
        if len(self._verified) >= self.cache_size:
            self._verified.clear()
        self._verified[value] = (session_id, timestamp.timestamp())
        return session_id
