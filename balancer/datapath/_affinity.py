"""Affinity: which stickiness mode, and the balancer's own signed affinity cookie.

Hashing the application's session cookie is sticky only once that cookie exists; the
request that creates the session has none (docs/architecture.md, "Stickiness from the first
request"). So the balancer pins each client with a cookie of its own that names the
backend by id, signed with itsdangerous like HAProxy's `cookie SERVERID insert`. A value
that is tampered with, malformed, or signed by a secret not in the list means "no pin",
never an error.
"""

from __future__ import annotations

import hashlib
import re
import secrets as _secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from itsdangerous import BadSignature, Signer

__all__ = [
    "DEFAULT_AFFINITY_COOKIE",
    "DEFAULT_COOKIE_PATH",
    "DEFAULT_SAME_SITE",
    "AffinityCookie",
    "SameSite",
    "Sticky",
    "StickyMode",
    "cookie_value",
    "generate_secret",
    "set_cookie_value",
]

DEFAULT_AFFINITY_COOKIE = "lb_affinity"

StickyMode = Literal["cookie", "ip", "none"]
SameSite = Literal["lax", "strict", "none"]
# Lax, since following a link into the site must keep the pin.
DEFAULT_SAME_SITE: SameSite = "lax"
DEFAULT_COOKIE_PATH = "/"
_SAME_SITE = {"lax": b"Lax", "strict": b"Strict", "none": b"None"}

# RFC 6265 section 4.1.1: a cookie-name is an RFC 7230 token.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# The most affinity values kept verified; each backend has one per secret, so this is
# plenty, and it bounds memory against clients sending a stream of distinct values.
_VERIFIED_MAX = 4096
_DOMAIN = re.compile(r"[A-Za-z0-9.-]+")
# What may precede a cookie name in a Cookie header: "a=1; b=2", or "a=1;b=2".
_BEFORE_NAME = b"; \t"


def is_cookie_name(name: str) -> bool:
    return _TOKEN.fullmatch(name) is not None


@dataclass(frozen=True, slots=True)
class Sticky:
    """The stickiness mode: `cookie:NAME` (NAME is the app's session cookie), `ip`, `none`."""

    mode: StickyMode
    cookie: str | None = None  # the application's session cookie, in mode "cookie" only

    @classmethod
    def parse(cls, text: str) -> Sticky:
        """Parse `cookie:NAME`, `ip` or `none`; raises ValueError saying what is wrong."""
        if text == "ip":
            return cls("ip")
        if text == "none":
            return cls("none")
        kind, sep, name = text.partition(":")
        if kind == "cookie" and sep:
            if not is_cookie_name(name):
                raise ValueError(f"{name!r} is not a valid cookie name")
            return cls("cookie", name)
        raise ValueError(f"expected cookie:NAME, ip or none, got {text!r}")

    def __str__(self) -> str:
        return f"cookie:{self.cookie}" if self.mode == "cookie" else self.mode


def generate_secret() -> str:
    """A fresh random secret, for a process that was given none (pass it to its workers)."""
    return _secrets.token_urlsafe(32)


def cookie_value(header: bytes | None, name: bytes) -> bytes | None:
    """The value of cookie `name` in a Cookie header, or None if missing or empty.

    The data path joins several Cookie headers with `; ` (RFC 9113 section 8.2.3 does the
    same for HTTP/2). The first occurrence wins, as browsers send the most specific path
    first. Runs on every request: a `bytes.find`, not a split of the whole header.
    """
    if not header:
        return None
    needle = name + b"="
    at = header.find(needle)
    while at > 0 and header[at - 1] not in _BEFORE_NAME:
        at = header.find(needle, at + 1)  # the name ended another one: "xsid=" for "sid="
    if at < 0:
        return None
    start = at + len(needle)
    end = header.find(b";", start)
    value = (header[start:end] if end >= 0 else header[start:]).strip()
    if len(value) > 1 and value[0] == 0x22 and value[-1] == 0x22:  # a "quoted" value
        value = value[1:-1]
    return value or None


def set_cookie_value(head: bytes, name: bytes) -> bytes | None:
    """The value a response head's Set-Cookie fields give cookie `name` (the last one
    wins), or None if none does or the value is empty (a deletion).

    `head` is the status line and the header fields, each line ending in CRLF. Field names
    are case-insensitive (RFC 9110 section 5.1); the cookie's name is not (RFC 6265).
    """
    lower = head.lower()
    needle = b"\nset-cookie:"
    found: bytes | None = None
    at = lower.find(needle)
    while at >= 0:
        start = at + len(needle)
        end = head.find(b"\n", start)
        if end < 0:
            end = len(head)
        pair = head[start:end].split(b";", 1)[0]
        key, sep, value = pair.partition(b"=")
        if sep and key.strip() == name:
            value = value.strip()
            if len(value) > 1 and value[0] == 0x22 and value[-1] == 0x22:  # a "quoted" value
                value = value[1:-1]
            found = value
        at = lower.find(needle, end)
    return found or None


class AffinityCookie:
    """Signs and verifies affinity values: a backend id, signed.

    `secrets` are newest first, as `SessionMiddleware`'s `secret_keys`: the first signs,
    every one verifies, so secrets rotate without unpinning clients. Every balancer replica
    must be given the same secrets. The signature is deterministic, so a backend's value is
    the same for every client and verified values are memoized (docs/architecture.md,
    "Measured facts"). Raises ValueError, naming the parameter, for no secret, a bad cookie
    name, a `max_age` under 1, a bad `same_site`, `path` or `domain`, or `same_site` none
    or `partitioned` without `secure` (browsers drop such a cookie).

    The cookie is always HttpOnly; `secure` (the listener serves TLS), `same_site`,
    `partitioned` (CHIPS: kept inside a third-party iframe, where a Lax cookie is not
    sent), `domain` and `path` are its other attributes.
    """

    def __init__(
        self,
        *,
        secrets: Sequence[str | bytes],
        name: str = DEFAULT_AFFINITY_COOKIE,
        max_age: int | None = None,
        secure: bool = False,
        same_site: str = DEFAULT_SAME_SITE,
        partitioned: bool = False,
        domain: str | None = None,
        path: str = DEFAULT_COOKIE_PATH,
    ) -> None:
        if not secrets:
            raise ValueError("secrets: at least one secret is needed")
        if not is_cookie_name(name):
            raise ValueError(f"name: {name!r} is not a valid cookie name")
        if max_age is not None and max_age < 1:
            raise ValueError(f"max_age must be at least 1 second, not {max_age!r}")
        if same_site not in _SAME_SITE:
            raise ValueError(f"same_site must be lax, strict or none, not {same_site!r}")
        if (same_site == "none" or partitioned) and not secure:
            raise ValueError("same_site none and partitioned need secure")
        if not (path.startswith("/") and path.isascii()) or any(c in path for c in "; \t\r\n"):
            raise ValueError(f"path must be an absolute path without ';', not {path!r}")
        if domain is not None and not (domain.isascii() and _DOMAIN.fullmatch(domain)):
            raise ValueError(f"domain must be a domain name, not {domain!r}")
        self.name = name
        self.name_bytes = name.encode()
        attributes = b"; Path=" + path.encode("ascii")
        if domain is not None:
            attributes += b"; Domain=" + domain.encode("ascii")
        attributes += b"; HttpOnly"
        if secure:
            attributes += b"; Secure"
        attributes += b"; SameSite=" + _SAME_SITE[same_site]
        if partitioned:
            attributes += b"; Partitioned"
        if max_age is not None:
            attributes += b"; Max-Age=%d" % max_age
        self._attributes = attributes
        keys = [s.encode() if isinstance(s, str) else s for s in secrets]
        # itsdangerous wants its keys oldest first (the last one signs).
        self._signer = Signer(keys[::-1], salt=b"balancer.affinity")
        self._newest = Signer(keys[0], salt=b"balancer.affinity")
        # Names the signing secret without revealing it, for the routing fingerprint. A
        # signed cookie already lets anyone test guesses of the secret offline, so these
        # 32 bits of a hash let no more be learned than a cookie does.
        self.key_id = hashlib.sha256(b"balancer.affinity.key-id\0" + keys[0]).hexdigest()[:8]
        # value -> (backend id, signed by the newest secret)
        self._verified: dict[bytes, tuple[str, bool]] = {}

    def sign(self, backend_id: str) -> bytes:
        """The cookie value that pins a client to `backend_id`."""
        return self._signer.sign(backend_id.encode())

    def verify(self, value: bytes | None) -> tuple[str, bool] | None:
        """`(backend id, signed by the newest secret)`, or None for anything not valid."""
        if not value:
            return None
        hit = self._verified.get(value)
        if hit is not None:
            return hit
        try:
            backend_id = self._signer.unsign(value).decode("ascii")
        except (BadSignature, UnicodeDecodeError):
            return None
        result = (backend_id, self._newest.verify_signature(*value.rsplit(b".", 1)))
        if len(self._verified) >= _VERIFIED_MAX:
            self._verified.clear()
        self._verified[value] = result
        return result

    def set_cookie(self, backend_id: str) -> bytes:
        """A complete Set-Cookie header value pinning the client to `backend_id`.

        Without `max_age` it lasts as long as the browser session (HAProxy's and Traefik's
        default). An app session that outlives it is then placed by the hash of its cookie,
        which may not be where it was created: give `max_age` the app session's lifetime to
        avoid that.
        """
        return self.name_bytes + b"=" + self.sign(backend_id) + self._attributes
