from __future__ import annotations

import pytest

from balancer import AffinityCookie, ConfigError, Sticky, generate_secret
from balancer.datapath._affinity import cookie_value

NAMES = (b"lb_affinity", b"sid")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, [None, None]),
        (b"", [None, None]),
        (b"sid=abc", [None, b"abc"]),
        (b"lb_affinity=x.y; sid=abc", [b"x.y", b"abc"]),
        (b"a=1;sid=abc ;  lb_affinity=v", [b"v", b"abc"]),
        (b'sid="quoted"', [None, b"quoted"]),
        (b"sid=; lb_affinity", [None, None]),
        (b"xsid=1; sidx=2", [None, None]),
        (b"sid=first; sid=second", [None, b"first"]),
        (b"sid=a=b", [None, b"a=b"]),
        (b";;;=;garbage\xff", [None, None]),
    ],
)
def test_cookie_value(header: bytes | None, expected: list[bytes | None]) -> None:
    assert [cookie_value(header, name) for name in NAMES] == expected


@pytest.mark.parametrize(
    ("text", "sticky"),
    [
        ("ip", Sticky("ip")),
        ("none", Sticky("none")),
        ("cookie:sid", Sticky("cookie", "sid")),
        ("cookie:session_id", Sticky("cookie", "session_id")),
    ],
)
def test_sticky_parse_round_trips(text: str, sticky: Sticky) -> None:
    assert Sticky.parse(text) == sticky
    assert str(sticky) == text


@pytest.mark.parametrize(
    "text", ["", "cookie", "cookie:", "cookie:a b", "cookie:a;b", "IP", "hash"]
)
def test_sticky_parse_rejects(text: str) -> None:
    # A library error: a plain ValueError; balancer._config names the flag (--sticky).
    with pytest.raises(ValueError, match="cookie") as info:
        Sticky.parse(text)
    assert not isinstance(info.value, ConfigError)


def test_sign_and_verify_with_rotation() -> None:
    # Newest first, as SessionMiddleware's secret_keys: the first signs, every one verifies.
    old = AffinityCookie(secrets=["old"])
    rotated = AffinityCookie(secrets=["new", "old"])
    assert rotated.sign("abc123def456") == AffinityCookie(secrets=["new"]).sign("abc123def456")
    value = rotated.sign("abc123def456")
    assert rotated.verify(value) == ("abc123def456", True)
    assert rotated.verify(value) == ("abc123def456", True)  # memoized path
    assert rotated.verify(old.sign("abc123def456")) == ("abc123def456", False)
    assert old.verify(value) is None  # signed by a secret it does not know


@pytest.mark.parametrize(
    "value",
    [None, b"", b"abc123def456", b"abc123def456.", b".sig", b"abc123def456.AAAA", b"\xff\xfe.x"],
)
def test_tampered_or_malformed_values_are_no_pin(value: bytes | None) -> None:
    assert AffinityCookie(secrets=["s"]).verify(value) is None


def test_tampered_id_is_no_pin() -> None:
    affinity = AffinityCookie(secrets=["s"])
    value = affinity.sign("abc123def456")
    forged = b"abc123def457" + value[len(b"abc123def456") :]
    assert affinity.verify(forged) is None


def test_set_cookie_header_value() -> None:
    affinity = AffinityCookie(secrets=["s"], name="pin")
    value = affinity.set_cookie("abc123def456")
    assert value == b"pin=" + affinity.sign("abc123def456") + b"; Path=/; HttpOnly; SameSite=Lax"
    lasting = AffinityCookie(secrets=["s"], name="pin", max_age=3600)
    assert lasting.set_cookie("abc123def456") == value + b"; Max-Age=3600"


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"secrets": []}, "secrets"),
        ({"secrets": ["s"], "name": "a b"}, "name"),
        ({"secrets": ["s"], "max_age": 0}, "max_age"),
    ],
)
def test_bad_affinity_arguments_name_the_parameter(
    kwargs: dict[str, object], parameter: str
) -> None:
    with pytest.raises(ValueError, match=f"^{parameter}") as info:
        AffinityCookie(**kwargs)  # type: ignore[arg-type]
    assert not isinstance(info.value, ConfigError)


def test_generated_secrets_differ() -> None:
    assert generate_secret() != generate_secret()
    assert len(generate_secret()) >= 32
