"""Signed session ids: rotation order, tampering, expiry."""

from __future__ import annotations

import hashlib

import itsdangerous
import pytest

from session_store import SessionIdSigner, new_session_id

NEW = "the-newest-secret-key"
OLD = "an-older-secret-key!!"


def test_new_ids_are_256_bit_and_unique() -> None:
    ids = {new_session_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 43 for i in ids)  # 32 bytes in unpadded base64url


def test_round_trip() -> None:
    signer = SessionIdSigner([NEW])
    assert signer.unsign(signer.sign("abc")) == "abc"


@pytest.mark.parametrize(
    ("signed_with", "verified_with", "valid"),
    [
        ([NEW, OLD], [NEW], True),  # the FIRST key signs
        ([NEW, OLD], [OLD], False),  # ... not the fallback (CVE-2025-47278)
        ([OLD], [NEW, OLD], True),  # every key verifies
        ([OLD], [NEW], False),  # a dropped key no longer verifies
    ],
)
def test_rotation_order(signed_with: list[str], verified_with: list[str], valid: bool) -> None:
    value = SessionIdSigner(signed_with).sign("abc")
    assert (SessionIdSigner(verified_with).unsign(value) == "abc") is valid


@pytest.mark.parametrize(
    "bad", ["", "abc", "abc.def", "abc.def.ghi", "\u00e9t\u00e9", "a" * 5000, ".." * 10]
)
def test_malformed_values_are_none(bad: str) -> None:
    assert SessionIdSigner([NEW]).unsign(bad) is None


def test_tampered_values_are_none() -> None:
    signer = SessionIdSigner([NEW])
    value = signer.sign("abc")
    assert signer.unsign("abd" + value[3:]) is None
    # A character inside the signature: the last one of a base64 text also carries padding
    # bits, and a change there alone may decode to the same bytes (a valid signature).
    i = len(value) - 10
    assert signer.unsign(value[:i] + ("A" if value[i] != "A" else "B") + value[i + 1 :]) is None


def test_expired_signature_is_none() -> None:
    class Old(itsdangerous.TimestampSigner):
        def get_timestamp(self) -> int:
            return 1_000_000_000

    old = Old(NEW.encode(), salt="session_store.cookie", digest_method=hashlib.sha256)
    value = old.sign("abc").decode()
    assert SessionIdSigner([NEW]).unsign(value) == "abc"
    assert SessionIdSigner([NEW], max_age=3600).unsign(value) is None


@pytest.mark.parametrize(
    ("keys", "message"),
    [([], "non-empty"), (NEW, "non-empty"), (["short"], "16 characters")],
)
def test_bad_keys_are_refused(keys: list[str] | str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SessionIdSigner(keys)
