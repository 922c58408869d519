"""HTTP/1.1 header rules the data path applies on both sides: what is hop-by-hop, who is
trusted to speak for the client (`X-Forwarded-*`, `Forwarded`), and small constant pieces.

Pure functions over bytes; the protocols in `_proxy` and `_upstream` call them.
"""

from __future__ import annotations

import binascii
import ipaddress
import os
import re
from collections.abc import Iterable
from http import HTTPStatus
from typing import Final

__all__ = [
    "BODY_CHUNKED",
    "BODY_LENGTH",
    "BODY_NONE",
    "BODY_UNTIL_CLOSE",
    "HOP_BY_HOP",
    "RequestIds",
    "TrustedProxies",
    "chunk",
    "connection_tokens",
    "error_response",
    "forwarded_for",
    "hop_by_hop_fields",
    "new_request_id",
]

# How a message body is delimited (RFC 9112 section 6.3).
BODY_NONE: Final = 0  # no body: HEAD, 1xx, 204, 304, or a request without framing headers
BODY_LENGTH: Final = 1  # Content-Length
BODY_CHUNKED: Final = 2  # Transfer-Encoding: chunked
BODY_UNTIL_CLOSE: Final = 3  # a response without either: the body ends when the server closes

# RFC 9110 section 7.6.1: meaningful for one connection only, never forwarded. Transfer-
# Encoding is re-derived from the framing we write; Upgrade is put back for an upgrade.
# Any `Proxy-*` header is dropped too (checked by prefix where headers are read).
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

_IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedProxies:
    """The networks whose peers may speak for the client through forwarding headers.

    Raises ValueError (naming `trusted_proxies`) for a value that is not an address or CIDR.
    """

    __slots__ = ("_networks",)

    def __init__(self, networks: Iterable[str]) -> None:
        parsed: list[_IPNetwork] = []
        for text in networks:
            try:
                parsed.append(ipaddress.ip_network(text.strip(), strict=False))
            except ValueError as exc:
                raise ValueError(f"trusted_proxies: {text!r} is not a network ({exc})") from None
        self._networks = tuple(parsed)

    def __bool__(self) -> bool:
        return bool(self._networks)

    def __contains__(self, address: object) -> bool:
        if not self._networks or not isinstance(address, str):
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self._networks)

    def client_ip(self, peer: str, x_forwarded_for: bytes | None) -> str:
        """The client's address for a request from a trusted `peer`.

        Walks `X-Forwarded-For` from the right, skipping trusted proxies, and returns the
        first address they did not vouch for (the leftmost if all are trusted); anything a
        client put further left is ignored, since a client can write any value there.
        """
        if not x_forwarded_for:
            return peer
        hops = [hop.strip() for hop in x_forwarded_for.decode("latin-1").split(",")]
        for hop in reversed(hops):
            if hop and hop not in self:
                return hop
        return hops[0] or peer


def hop_by_hop_fields(*, keep: Iterable[bytes] = ()) -> re.Pattern[bytes]:
    """A pattern matching whole hop-by-hop field lines of a head, each with the CRLF that
    precedes it (so `sub(b"", head)` removes them), except the names in `keep`."""
    names = sorted(HOP_BY_HOP - frozenset(keep))
    alternatives = b"|".join(re.escape(name) for name in names)
    return re.compile(
        rb"\r\n(?:" + alternatives + rb"|proxy-[^:\r\n]*)[ \t]*:[^\r\n]*", re.IGNORECASE
    )


def connection_tokens(value: bytes) -> list[bytes]:
    """The lower-cased option names of a `Connection` header value."""
    return [token.strip().lower() for token in value.split(b",") if token.strip()]


def forwarded_for(ip: str) -> bytes:
    """The `for=` node of a `Forwarded` element (RFC 7239 section 6: IPv6 quoted, bracketed)."""
    if ":" in ip:
        return b'"[' + ip.encode("ascii") + b']"'
    return ip.encode("ascii")


class RequestIds:
    """Random ids for `X-Request-Id`: 16 hex digits (64 bits) from os.urandom, drawn
    `batch` at a time: one system call a batch and a slice an id, instead of drawing and
    formatting a number for every request (~0.5 us of a request's ~10 us)."""

    __slots__ = ("_at", "_batch", "_hex")

    def __init__(self, batch: int = 512) -> None:
        self._batch = batch
        self._hex = b""
        self._at = 0

    def next(self) -> bytes:
        at = self._at
        if at >= len(self._hex):
            self._hex = binascii.hexlify(os.urandom(8 * self._batch))
            at = 0
        self._at = at + 16
        return self._hex[at : at + 16]

    def reset(self) -> None:
        """Forget the ids drawn: a forked child must not repeat its parent's."""
        self._hex = b""
        self._at = 0


_request_ids = RequestIds()
os.register_at_fork(after_in_child=_request_ids.reset)


def new_request_id() -> bytes:
    """A random id for `X-Request-Id`: 16 hex characters (64 bits)."""
    return _request_ids.next()


def chunk(data: bytes) -> tuple[bytes, bytes, bytes]:
    """`data` as one chunk of a chunked body, as pieces for `writelines`."""
    return (b"%x\r\n" % len(data), data, b"\r\n")


def error_response(status: int, *, keep_alive: bool) -> bytes:
    """A complete plain-text response for an error the balancer answers itself."""
    phrase = HTTPStatus(status).phrase
    body = f"{status} {phrase}\n".encode("ascii")
    head = [
        f"HTTP/1.1 {status} {phrase}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
    ]
    if not keep_alive:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body
