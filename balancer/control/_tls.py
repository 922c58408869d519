"""TLS: the listener's certificates, chosen by SNI and reloaded by swapping, and the client
context that verifies ``https://`` backends.

The data path reads the listener's `ssl.SSLContext` (`TlsListener.context`) for each new
connection. With one certificate it is that certificate's context; with several, a front
context built once, whose `sni_callback` switches each new handshake to the context of the
certificate that matches the name the client asked for, from the current `Certificates`
(a callback into Python and a switch of OpenSSL's certificate state a handshake: not paid
when there is nothing to choose). A reload builds a whole new
`Certificates` from the same files and, only if every pair loads, swaps it in (and, with
one certificate, its context): handshakes from then on get the new ones, established
connections keep the session they have (uvicorn's `create_ssl_context`, one context
validated at startup; nginx and HAProxy reload the same way). A bad file changes nothing
and the error says which file and why.

Every context has the same settings: TLS 1.2 and 1.3 only, Mozilla's "intermediate"
cipher list for TLS 1.2 (TLS 1.3's suites are OpenSSL's defaults, all of them AEAD), no
compression, no renegotiation. ALPN offers ``h2`` then ``http/1.1`` on the listener
(`ALPN_H2`; ``http/1.1`` only with ``--http2 off``, `ALPN`), and ``http/1.1`` to backends.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .._exceptions import TlsError

__all__ = [
    "ALPN",
    "ALPN_H2",
    "CIPHERS",
    "CertificatePair",
    "Certificates",
    "TlsListener",
    "backend_context",
]

ALPN = ("http/1.1",)
# The listener's with HTTP/2 (the default): OpenSSL picks the first of the server's list that
# the client offers too, so a client that offers both gets h2.
ALPN_H2 = ("h2", "http/1.1")
# Mozilla's "intermediate" configuration (ssl-config.mozilla.org, guideline 5.7), TLS 1.2
# suites; its DHE ones are left out: Python loads no DH parameters, so they could never
# be chosen.
CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)


@dataclass(frozen=True, slots=True)
class CertificatePair:
    """A certificate chain file (PEM, the leaf first) and its private key file (PEM)."""

    cert: Path
    key: Path


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise TlsError("--tls-key", "", "the key is encrypted (give an unencrypted PEM key)")


def _read(setting: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsError(setting, str(path), f"cannot read it: {exc.strerror}") from None


def _names(pair: CertificatePair) -> tuple[str, ...]:
    """The DNS names (subjectAltName, else the common name) of `pair`'s certificate,
    lowercased; raises TlsError when the file holds no PEM certificate."""
    text = _read("--tls-cert", pair.cert)
    if b"-----BEGIN CERTIFICATE-----" not in text:
        raise TlsError("--tls-cert", str(pair.cert), "holds no PEM certificate")
    try:
        # The stdlib's only X.509 reader (what its own tests use): reads the first
        # certificate of the file, the leaf.
        decoded = ssl._ssl._test_decode_cert(str(pair.cert))  # type: ignore[attr-defined]
    except (ssl.SSLError, OSError) as exc:
        raise TlsError("--tls-cert", str(pair.cert), f"not a valid certificate ({exc})") from None
    names = [value for kind, value in decoded.get("subjectAltName", ()) if kind == "DNS"]
    if not names:
        for rdn in decoded.get("subject", ()):
            names += [value for key, value in rdn if key == "commonName"]
    return tuple(name.lower() for name in names)


def server_context(pair: CertificatePair, alpn: Sequence[str] = ALPN_H2) -> ssl.SSLContext:
    """A server context serving `pair`, offering the protocols `alpn`; raises TlsError naming
    the flag, the file and why."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols(list(alpn))
    _read("--tls-key", pair.key)  # names the key file when it is the one missing
    try:
        context.load_cert_chain(pair.cert, pair.key, password=_no_password)
    except TlsError as exc:
        raise TlsError(exc.setting, str(pair.key), exc.reason) from None
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            reason = f"it is not the key of {pair.cert}"
        else:
            reason = "not a PEM private key"  # OpenSSL says only "PEM lib"
        raise TlsError("--tls-key", str(pair.key), reason) from None
    return context


class Certificates:
    """The contexts of a list of pairs, loaded and checked; the first is the default, served
    to a client that sends no name or one that no certificate has. Raises TlsError for the
    first pair that does not load. Each context offers the protocols `alpn` (after SNI
    switched a handshake to one, OpenSSL reads ALPN from it)."""

    def __init__(self, pairs: Sequence[CertificatePair], alpn: Sequence[str] = ALPN_H2) -> None:
        if not pairs:
            raise ValueError("pairs: at least one certificate is needed")
        self.pairs = tuple(pairs)
        self.alpn = tuple(alpn)
        # The certificates first: a broken one is then named as such, not as a bad key.
        self.names = tuple(_names(pair) for pair in pairs)
        self.contexts = tuple(server_context(pair, alpn) for pair in pairs)
        self._exact: dict[str, ssl.SSLContext] = {}
        self._wildcard: dict[str, ssl.SSLContext] = {}  # "example.com" for "*.example.com"
        for context, names in zip(self.contexts, self.names, strict=True):
            for name in names:
                if name.startswith("*."):
                    self._wildcard.setdefault(name[2:], context)
                else:
                    self._exact.setdefault(name, context)  # the first pair that names it

    def select(self, server_name: str | None) -> ssl.SSLContext:
        """The context for `server_name` (SNI): an exact name, else a wildcard one label
        deep (RFC 6125 section 6.4.3), else the default."""
        if server_name:
            name = server_name.lower().rstrip(".")
            context = self._exact.get(name)
            if context is not None:
                return context
            _, dot, parent = name.partition(".")
            if dot:
                context = self._wildcard.get(parent)
                if context is not None:
                    return context
        return self.contexts[0]


class TlsListener:
    """The listener's TLS: `context`, the one a new connection's handshake gets now (the
    data path's `ListenerTls`), and `reload()` to read the files again. ALPN offers h2 and
    http/1.1, or http/1.1 only without `http2`. Raises TlsError at construction for a pair
    that does not load."""

    def __init__(self, pairs: Sequence[CertificatePair], *, http2: bool = True) -> None:
        alpn = ALPN_H2 if http2 else ALPN
        self.certificates = Certificates(pairs, alpn)
        self.context = self.certificates.contexts[0]
        if len(pairs) > 1:
            # The front context: settings as every other; its certificate is only what a
            # handshake would get if the callback did not switch it (it always does).
            self.context = server_context(self.certificates.pairs[0], alpn)
            self.context.sni_callback = self._sni
        self.reloads = 0

    def _sni(
        self, connection: ssl.SSLObject | ssl.SSLSocket, name: str | None, _: ssl.SSLContext
    ) -> None:
        # Called for every handshake, with name None when the client sent no SNI.
        connection.context = self.certificates.select(name)

    def reload(self) -> Certificates:
        """Load every pair again from its files and serve them to new handshakes; raises
        TlsError (and serves what it served) if any pair does not load."""
        certificates = Certificates(self.certificates.pairs, self.certificates.alpn)
        self.certificates = certificates
        if self.context.sni_callback is None:
            self.context = certificates.contexts[0]  # one certificate: nothing to choose
        self.reloads += 1
        return certificates


def backend_context(ca: Path | None) -> ssl.SSLContext:
    """The client context for ``https://`` backends: certificates verified, and their host
    names, against `ca` (a PEM bundle) or, without one, the system's trust store. Raises
    TlsError naming --backend-ca when the bundle does not load."""
    if ca is None:
        context = ssl.create_default_context()
    else:
        _read("--backend-ca", ca)
        # Only the private CA: a public certificate must not pass for the backend's.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies, and checks host names
        try:
            context.load_verify_locations(cafile=str(ca))
        except ssl.SSLError:
            raise TlsError("--backend-ca", str(ca), "holds no PEM certificate") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(list(ALPN))
    return context
