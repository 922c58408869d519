"""HTTP/1.1 header rules the data path applies on both sides: what is hop-by-hop, who is
trusted to speak for the client (`X-Forwarded-*`, `Forwarded`), how a request head is read,
checked and rebuilt to forward (`RequestHead`, `read_field`, `finish_head`,
`forwarding_block`), the status a parser error earns (`classify`), and small constant pieces.

Pure functions over bytes and a request's head; the protocols in `_proxy` and `_upstream`
call them. A request head that breaks a rule raises `Rejected` with its status (4xx, 5xx).
"""

from __future__ import annotations

import binascii
import ipaddress
import os
import re
from collections.abc import Iterable
from http import HTTPStatus
from typing import Final

import httptools

__all__ = [
    "BODY_CHUNKED",
    "BODY_LENGTH",
    "BODY_NONE",
    "BODY_UNTIL_CLOSE",
    "HOP_BY_HOP",
    "Rejected",
    "RequestHead",
    "RequestIds",
    "TrustedProxies",
    "add_upgrade",
    "check_version",
    "chunk",
    "classify",
    "connection_tokens",
    "drop_named",
    "error_response",
    "finish_head",
    "forwarded_for",
    "forwarding_block",
    "hop_by_hop_fields",
    "new_request_id",
    "read_field",
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


def error_response(
    status: int, *, keep_alive: bool, retry_after: int = 0, reason: str = ""
) -> bytes:
    """A complete plain-text response for an error the balancer answers itself, with
    `Retry-After: retry_after` (seconds) when that is not 0; `reason`, if any, is a second
    line of the body."""
    phrase = HTTPStatus(status).phrase
    lines = f"{status} {phrase}\n" + (f"{reason}\n" if reason else "")
    body = lines.encode("ascii")
    head = [
        f"HTTP/1.1 {status} {phrase}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
    ]
    if retry_after:
        head.append(f"Retry-After: {retry_after}")
    if not keep_alive:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


# -- a request's head: read, checked, rebuilt to forward -----------------------------------


class Rejected(Exception):
    """A request the balancer refuses (raised in a parser callback): answer `status`, count
    `reason` (the metrics' rejection reason), close."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason


# Request headers the data path reads; any other is forwarded as is.
_H_FORWARD: Final = 0  # end-to-end, not read: forwarded as is
_H_HOST: Final = 1
_H_COOKIE: Final = 2
_H_CONTENT_LENGTH: Final = 3
_H_TRANSFER_ENCODING: Final = 4
_H_CONNECTION: Final = 5
_H_UPGRADE: Final = 6
_H_EXPECT: Final = 7
_H_XFF: Final = 8
_H_XFP: Final = 9
_H_XFH: Final = 10
_H_FORWARDED: Final = 11
_H_REQUEST_ID: Final = 12
_H_DROP: Final = 13  # the other hop-by-hop headers
_HEADERS: Final = {
    b"host": _H_HOST,
    b"cookie": _H_COOKIE,
    b"content-length": _H_CONTENT_LENGTH,
    b"transfer-encoding": _H_TRANSFER_ENCODING,
    b"connection": _H_CONNECTION,
    b"upgrade": _H_UPGRADE,
    b"expect": _H_EXPECT,
    b"x-forwarded-for": _H_XFF,
    b"x-forwarded-proto": _H_XFP,
    b"x-forwarded-host": _H_XFH,
    b"forwarded": _H_FORWARDED,
    b"x-request-id": _H_REQUEST_ID,
    b"keep-alive": _H_DROP,
    b"te": _H_DROP,
    b"trailer": _H_DROP,
}
# Kinds by a name's exact bytes, filled as names are seen: clients send the same few names,
# so a field costs one dict lookup instead of lower() and a prefix test.
_HEADER_KINDS: Final[dict[bytes, int]] = {}
_CACHED_NAMES: Final = 1024
_METHOD_TOKEN: Final = re.compile(rb"[A-Z][A-Z-]{0,23} ")


def _header_kind(name: bytes) -> int:
    lname = name.lower()
    kind = _HEADERS.get(lname)
    if kind is None:
        kind = _H_DROP if lname.startswith(b"proxy-") else _H_FORWARD
    if len(_HEADER_KINDS) < _CACHED_NAMES:
        _HEADER_KINDS[name] = kind
    return kind


class RequestHead:
    """A request's head as read so far: the pieces to forward and the fields the data path
    reads. `_proxy`'s request extends it.

    Defaults are class attributes, so that a request costs only the fields it changes
    (no __slots__ on purpose: a plain GET sets about a dozen of its forty fields)."""

    # The head to forward, as pieces; [0] and [2] become the method and the target.
    head: list[bytes]
    method = b""
    header_size = 0  # bytes of the header fields read, as counted against the limit
    headers_done = False
    http10 = False
    keep_alive = True
    upgrade_value: bytes | None = None
    expect_continue = False
    host: bytes | None = None
    cookie: bytes | None = None
    xff: bytes | None = None
    xfp: bytes | None = None
    xfh: bytes | None = None
    forwarded: bytes | None = None
    request_id: bytes | None = None
    options: list[bytes] | None = None  # headers named by Connection
    transfer_encoding: bytes | None = None
    body_kind = BODY_NONE

    def __init__(self) -> None:
        self.head = [b"", b" ", b"", b" HTTP/1.1\r\n"]


def read_field(req: RequestHead, name: bytes, value: bytes, max_header_bytes: int) -> None:
    """Take one header field of `req`: kept in the head to forward, dropped (hop-by-hop),
    or read into a field of `req` for `finish_head` and `forwarding_block`. A field after
    the head (a trailer) is dropped. Raises Rejected: 431 past `max_header_bytes` (bytes of
    all fields, 4 a field for ": " and CRLF), 400 for a second Host, 417 for an Expect
    other than 100-continue."""
    if req.headers_done:
        return  # a trailer field: dropped (Trailer is hop-by-hop; bodies are re-framed)
    req.header_size += len(name) + len(value) + 4
    if req.header_size > max_header_bytes:
        raise Rejected(431, "headers_too_large")
    kind = _HEADER_KINDS.get(name)
    if kind is None:
        kind = _header_kind(name)
    if kind == _H_FORWARD:
        req.head += (name, b": ", value, b"\r\n")
    elif kind == _H_COOKIE:
        req.cookie = value if req.cookie is None else req.cookie + b"; " + value
        req.head += (name, b": ", value, b"\r\n")
    elif kind == _H_HOST:
        if req.host is not None:
            raise Rejected(400, "bad_request")  # RFC 9112 section 3.2
        req.host = value
        req.head += (name, b": ", value, b"\r\n")
    elif kind == _H_CONTENT_LENGTH:
        # llhttp rejects a second, a list and Content-Length with Transfer-Encoding.
        req.body_kind = BODY_LENGTH
        req.head += (name, b": ", value, b"\r\n")
    elif kind == _H_TRANSFER_ENCODING:
        req.transfer_encoding = value
    elif kind == _H_CONNECTION:
        for option in connection_tokens(value):
            if option not in (b"close", b"keep-alive", b"upgrade"):
                req.options = [*(req.options or ()), option]
    elif kind == _H_UPGRADE:
        req.upgrade_value = value
    elif kind == _H_EXPECT:
        if value.strip().lower() != b"100-continue":
            raise Rejected(417, "expectation")
        req.expect_continue = True
    elif kind == _H_XFF:
        req.xff = value if req.xff is None else req.xff + b", " + value
    elif kind == _H_XFP:
        req.xfp = value
    elif kind == _H_XFH:
        req.xfh = value
    elif kind == _H_FORWARDED:
        req.forwarded = value if req.forwarded is None else req.forwarded + b", " + value
    elif kind == _H_REQUEST_ID:
        req.request_id = value
        req.head += (name, b": ", value, b"\r\n")


def check_version(version: str) -> bool:
    """Whether a request of HTTP `version` (the parser's "1.0", "1.1") is HTTP/1.0; raises
    Rejected(505) for any other."""
    if version == "1.0":
        return True
    if version != "1.1":
        raise Rejected(505, "version")
    return False


def finish_head(req: RequestHead, method: bytes, local_host: bytes) -> None:
    """Check and complete `req`'s head once its fields are read (`req.http10` set): the
    method, the headers `Connection` named dropped, the framing, a Host for HTTP/1.0
    (`local_host`, the address the client reached). Raises Rejected: 501 for CONNECT or a
    transfer coding other than chunked, 400 for an HTTP/1.1 request without Host."""
    if method == b"CONNECT":
        raise Rejected(501, "method")  # a tunnel, not a request to route
    req.method = method
    if req.options:
        req.head = drop_named(req.head, req.options)
    head = req.head
    head[0] = method
    if req.transfer_encoding is not None:
        # Only chunked is relayed: another coding could not be re-framed (RFC 9112 6.1).
        if req.transfer_encoding.strip().lower() != b"chunked":
            raise Rejected(501, "transfer_encoding")
        req.body_kind = BODY_CHUNKED
        head.append(b"Transfer-Encoding: chunked\r\n")
    if req.host is None:
        if not req.http10:
            raise Rejected(400, "bad_request")  # RFC 9112 section 3.2
        head += (b"Host: ", local_host, b"\r\n")


def add_upgrade(req: RequestHead) -> None:
    """Forward `req` as an upgrade request (the parser said so): the Upgrade field back in,
    and no keep-alive (after an upgrade request the parser stops: one request per such
    connection)."""
    req.keep_alive = False
    req.head += (b"Connection: Upgrade\r\nUpgrade: ", req.upgrade_value or b"", b"\r\n")


def drop_named(head: list[bytes], options: list[bytes]) -> list[bytes]:
    """`head` without the fields that `Connection` names (`options`, lower-cased; RFC 9110
    section 7.6.1). Runs before anything but whole `name: value` fields (four pieces each,
    after the request line's four) is in the head."""
    kept = head[:4]
    for i in range(4, len(head), 4):
        if head[i].lower() not in options:
            kept += head[i : i + 4]
    return kept


def forwarding_block(
    peer: bytes,
    for_node: bytes,
    host: bytes | None,
    *,
    xff: bytes | None = None,
    xfp: bytes | None = None,
    xfh: bytes | None = None,
    forwarded: bytes | None = None,
    proto: bytes = b"http",
) -> bytes:
    """The forwarding header lines of a request from `peer` (its address; `for_node`, its
    `for=...;proto=...` of Forwarded) with `host` (its Host), which came over `proto`
    (http, or https on a TLS listener): `X-Forwarded-For`, `-Proto`, `-Host` and
    `Forwarded`, each appended to what the request sent in `xff`, `xfp`, `xfh` and
    `forwarded`: pass those only for a trusted peer (an untrusted one's are dropped)."""
    lines = [
        b"X-Forwarded-For: ",
        xff + b", " + peer if xff else peer,
        b"\r\nX-Forwarded-Proto: ",
        xfp or proto,
        b"\r\n",
    ]
    xfh = xfh or host
    if xfh:
        lines += (b"X-Forwarded-Host: ", xfh, b"\r\n")
    lines += (b"Forwarded: ", forwarded + b", " if forwarded else b"", for_node)
    if host and b'"' not in host and b"\\" not in host:
        lines += (b';host="', host, b'"')
    lines.append(b"\r\n")
    return b"".join(lines)


def classify(exc: httptools.HttpParserError, data: bytes) -> tuple[int, str]:
    """The status and the rejection reason for a request httptools refused; `data`: the
    bytes fed, when the refused message began at their start (else b"")."""
    message = str(exc)
    if isinstance(exc, httptools.HttpParserInvalidMethodError):
        if _METHOD_TOKEN.match(data):
            return 501, "method"  # a well-formed method we do not know
        return 400, "bad_request"
    if "chunk" in message:
        return 400, "bad_chunk"
    if "Content-Length" in message or "Transfer-Encoding" in message:
        return 400, "smuggling"
    if "version" in message or "PRI" in message:
        return 505, "version"
    return 400, "bad_request"
