"""The PROXY protocol header (HAProxy's proxy-protocol.txt, versions 1 and 2): the line or
binary block an L4 load balancer (HAProxy `send-proxy`, nginx `proxy_protocol on`, AWS NLB,
a Kubernetes Service's cloud balancer) puts before a connection's first byte to say whose it
is. With `--proxy-protocol`, `_proxy` reads it from each connection before any HTTP.

Pure: bytes in, `read_header` says "need more" (None), or the client it names and how many
bytes the header took (`ProxyHeader`), or raises `BadProxyHeader`. Bounded: a version 1 line
is at most `V1_MAX` bytes, a version 2 header at most `V2_MAX`; past that without a complete
header, it is an error, not a wait.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final

__all__ = ["V1_MAX", "V2_MAX", "V2_MAX_TLVS", "BadProxyHeader", "ProxyHeader", "read_header"]

# Version 1: "PROXY TCP6 <39> <39> 65535 65535\r\n" is the longest line (spec, 2.1).
V1_MAX: Final = 107
_V1_PREFIX: Final = b"PROXY "
# Version 2 (spec, 2.2): 12 bytes of signature, version and command, family and transport,
# the length (big-endian) of what follows: the addresses, then TLVs.
_V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED: Final = 16
_V2_ADDRESSES_MAX: Final = 216  # AF_UNIX's two 108-byte paths, the largest address block
# TLVs accepted after the addresses, in bytes (skipped, not read): AWS NLB's VPC endpoint
# id, GCP's and Azure's are tens of bytes, HAProxy's SSL ones about a hundred; a header
# claiming more is refused rather than waited for.
V2_MAX_TLVS: Final = 4096
V2_MAX: Final = _V2_FIXED + _V2_ADDRESSES_MAX + V2_MAX_TLVS
_CMD_LOCAL: Final = 0x20  # version 2, LOCAL: the proxy's own connection (a health check)
_CMD_PROXY: Final = 0x21  # version 2, PROXY: on behalf of the client in the addresses
_TCP4: Final = 0x11  # AF_INET, STREAM: 4 + 4 + 2 + 2 bytes of addresses
_TCP6: Final = 0x21  # AF_INET6, STREAM: 16 + 16 + 2 + 2
# Bytes of the address block by family and transport byte (TCP and UDP over IPv4, IPv6,
# UNIX); TLVs, if any, follow it.
_ADDRESS_BYTES: Final = {0x11: 12, 0x12: 12, 0x21: 36, 0x22: 36, 0x31: 216, 0x32: 216}


class BadProxyHeader(ValueError):
    """A connection's start that is not a valid PROXY header; `reason` says why (a short
    snake_case word, the metrics' rejection reason)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A complete header: the client it speaks for and the bytes it took.

    `client` is None for a header that names no client (v1 UNKNOWN, v2 LOCAL, a v2 family
    other than TCP over IPv4 or IPv6): the connection's own peer is the client then, as the
    spec asks. `port` is the client's port, 0 without a client."""

    client: str | None
    port: int
    consumed: int  # bytes of the header: what follows them is the connection's own data


def read_header(data: bytes) -> ProxyHeader | None:
    """The PROXY header at the start of `data` (all bytes read so far on the connection).

    Returns None while `data` is a valid header's beginning that is not complete yet; raises
    BadProxyHeader as soon as it cannot be one, or is longer than the version's bound.
    """
    if data[:1] == b"P":
        return _read_v1(data)
    if data[:1] == b"\r":
        return _read_v2(data)
    if not data:
        return None
    raise BadProxyHeader("not_proxy_protocol")


def _read_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if not _V1_PREFIX.startswith(data[:6]):
            raise BadProxyHeader("not_proxy_protocol")
        if len(data) >= V1_MAX:
            raise BadProxyHeader("v1_too_long")
        return None
    line = data[:end]
    if not line.startswith(_V1_PREFIX):
        raise BadProxyHeader("not_proxy_protocol")
    parts = line.split(b" ")
    consumed = end + 2
    if parts[1] == b"UNKNOWN":
        return ProxyHeader(None, 0, consumed)  # the rest of the line is to be ignored
    if len(parts) != 6:
        raise BadProxyHeader("v1_malformed")
    family = parts[1]
    if family == b"TCP4":
        version = 4
    elif family == b"TCP6":
        version = 6
    else:
        raise BadProxyHeader("v1_bad_protocol")
    source = _v1_address(parts[2], version)
    _v1_address(parts[3], version)
    port = _v1_port(parts[4])
    _v1_port(parts[5])
    return ProxyHeader(source, port, consumed)


def _v1_address(text: bytes, version: int) -> str:
    try:
        address = ipaddress.ip_address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise BadProxyHeader("v1_bad_address") from None
    if address.version != version:
        raise BadProxyHeader("v1_bad_address")
    return str(address)


def _v1_port(text: bytes) -> int:
    if not (1 <= len(text) <= 5 and text.isdigit()):
        raise BadProxyHeader("v1_bad_port")
    port = int(text)
    if port > 65535:
        raise BadProxyHeader("v1_bad_port")
    return port


def _read_v2(data: bytes) -> ProxyHeader | None:
    size = len(data)
    if size < _V2_FIXED:
        if not _V2_SIGNATURE.startswith(data[:12]):
            raise BadProxyHeader("not_proxy_protocol")
        if size > 12 and data[12] not in (_CMD_LOCAL, _CMD_PROXY):
            raise BadProxyHeader("v2_bad_command")
        return None
    if not data.startswith(_V2_SIGNATURE):
        raise BadProxyHeader("not_proxy_protocol")
    command = data[12]
    if command not in (_CMD_LOCAL, _CMD_PROXY):
        # Another version, or a command the spec leaves unassigned: "must drop".
        raise BadProxyHeader("v2_bad_command")
    length = (data[14] << 8) | data[15]
    if length > _V2_ADDRESSES_MAX + V2_MAX_TLVS:
        raise BadProxyHeader("v2_too_long")
    consumed = _V2_FIXED + length
    if size < consumed:
        return None
    if command == _CMD_LOCAL:
        return ProxyHeader(None, 0, consumed)  # the block is skipped unread (spec, 2.2)
    family = data[13]
    addresses = _ADDRESS_BYTES.get(family, -1)
    if addresses < 0:
        return ProxyHeader(None, 0, consumed)  # UNSPEC or unassigned: skipped unread
    if length < addresses:
        raise BadProxyHeader("v2_short_addresses")
    _check_tlvs(data, _V2_FIXED + addresses, consumed)
    if family == _TCP4:
        source = str(ipaddress.IPv4Address(data[16:20]))
        port = (data[24] << 8) | data[25]
    elif family == _TCP6:
        source = str(ipaddress.IPv6Address(data[16:32]))
        port = (data[48] << 8) | data[49]
    else:
        return ProxyHeader(None, 0, consumed)  # UDP or UNIX: HAProxy keeps the peer too
    return ProxyHeader(source, port, consumed)


def _check_tlvs(data: bytes, at: int, end: int) -> None:
    """The TLVs between `at` and `end` are whole (type, 2-byte length, value): a length
    that runs past the header means a header that is not what it claims."""
    position = at
    while position < end:
        if end - position < 3:
            raise BadProxyHeader("v2_bad_tlv")
        position += 3 + ((data[position + 1] << 8) | data[position + 2])
    if position != end:
        raise BadProxyHeader("v2_bad_tlv")
