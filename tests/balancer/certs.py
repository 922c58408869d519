"""Certificates for the TLS tests, made with the `openssl` command line (the `cryptography`
package is not a dependency): a private CA and leaf certificates it signs."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Authority", "Leaf"]

_CURVE = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)


@dataclass(frozen=True)
class Leaf:
    """A certificate (`cert`, PEM) and its key (`key`, PEM)."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Authority:
    """A CA in `directory`: `cert` is the file a client trusts."""

    directory: Path
    cert: Path
    key: Path

    @classmethod
    def create(cls, directory: Path, name: str = "test-ca") -> Authority:
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = directory / f"{name}.pem", directory / f"{name}.key"
        _openssl("req", "-x509", *_CURVE, "-keyout", key, "-out", cert, "-days", "2",
                 "-subj", f"/CN={name}")  # fmt: skip
        return cls(directory, cert, key)

    def issue(self, stem: str, *names: str) -> Leaf:
        """A certificate for DNS `names` and IP 127.0.0.1, in files named after `stem`."""
        cert, key = self.directory / f"{stem}.pem", self.directory / f"{stem}.key"
        csr = self.directory / f"{stem}.csr"
        _openssl("req", "-new", *_CURVE, "-keyout", key, "-out", csr, "-subj", f"/CN={names[0]}")
        extensions = self.directory / f"{stem}.ext"
        alt = ",".join([*(f"DNS:{name}" for name in names), "IP:127.0.0.1"])
        extensions.write_text(f"subjectAltName={alt}\n")
        _openssl("x509", "-req", "-in", csr, "-CA", self.cert, "-CAkey", self.key,
                 "-CAcreateserial", "-out", cert, "-days", "2", "-extfile", extensions)  # fmt: skip
        return Leaf(cert, key)
