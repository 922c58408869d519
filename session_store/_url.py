"""A store named by a URL, or by the environment, for apps that pass none."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from redis_plumbing import RedisURLError

from ._hybrid import HybridStore
from ._memory import MemoryStore
from ._redis import RedisStore
from ._store import SessionStore

__all__ = ["store_from_env", "store_from_url"]

logger = logging.getLogger("session_store")

_HYBRID = "hybrid+"


def store_from_url(url: str) -> SessionStore:
    """The store ``url`` names: ``memory://`` a `MemoryStore`; any URL `redis_client`
    reads (``redis://``, ``rediss://``, ``redis+sentinel://``, ``redis+cluster://``, ...)
    a `RedisStore` with its own client; the same behind ``hybrid+`` (``hybrid+redis://``)
    a `HybridStore` in front of it. Raises `RedisURLError` (a ValueError) for any other."""
    if url.strip().lower() == "memory://":
        return MemoryStore()
    if url[: len(_HYBRID)].lower() == _HYBRID:
        return HybridStore(RedisStore.from_url(url[len(_HYBRID) :]))
    try:
        return RedisStore.from_url(url)
    except RedisURLError as exc:
        raise RedisURLError(f"{exc}; or memory://, or hybrid+ before a Redis URL") from None


def store_from_env(environ: Mapping[str, str] | None = None) -> SessionStore:
    """The store ``SESSION_STORE_URL`` names (`store_from_url`), else a `RedisStore` for
    ``REDIS_URL``, else a `MemoryStore`, with a warning: sessions in one process's memory
    are lost when it restarts and are not seen by any other instance.

    Raises ValueError naming the variable whose URL cannot be read."""
    env = os.environ if environ is None else environ
    for name in ("SESSION_STORE_URL", "REDIS_URL"):
        url = env.get(name, "")
        if url:
            try:
                return (
                    store_from_url(url) if name == "SESSION_STORE_URL" else RedisStore.from_url(url)
                )
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
    logger.warning(
        "session_store: no store given and neither SESSION_STORE_URL nor REDIS_URL is set: "
        "sessions are kept in this process's memory, lost at restart and not shared with "
        "other instances (set SESSION_STORE_URL=redis://host:6379/0, or pass store=...)"
    )
    return MemoryStore()
