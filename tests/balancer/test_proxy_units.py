"""The data path's pure parts: options, the retry budget, trusted proxies, header helpers."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from balancer import ConfigError
from balancer._http import (
    TrustedProxies,
    chunk,
    connection_tokens,
    error_response,
    forwarded_for,
    new_request_id,
)
from balancer._proxy import ProxyOptions, _RetryBudget
from tests.helpers import FakeClock


@pytest.mark.parametrize(
    ("make", "setting"),
    [
        (lambda: ProxyOptions(header_timeout=0), "--header-timeout"),
        (lambda: ProxyOptions(response_timeout=math.inf), "--upstream-response-timeout"),
        (lambda: ProxyOptions(max_request_line=0), "--max-request-line"),
        (lambda: ProxyOptions(keepalive_per_backend=-1), "--upstream-keepalive"),
        (lambda: ProxyOptions(retry_floor=-1), "--retry-floor"),
        (lambda: ProxyOptions(retry_ratio=-0.1), "--retry-budget"),
        (lambda: ProxyOptions(trusted_proxies=("10.0.0.0/8", "nope")), "--trusted-proxy"),
    ],
)
def test_options_out_of_range_are_refused(make: Callable[[], object], setting: str) -> None:
    with pytest.raises(ConfigError) as info:
        make()
    assert info.value.setting == setting


def test_retry_budget_allows_a_share_of_requests_plus_a_floor() -> None:
    clock = FakeClock()
    budget = _RetryBudget(ratio=0.2, floor=2.0, clock=clock)
    assert [budget.withdraw() for _ in range(3)] == [True, True, False]  # the floor's start
    budget.requests += 10  # ten requests earn two retries
    assert [budget.withdraw() for _ in range(3)] == [True, True, False]
    clock.advance(1.0)  # a second earns the floor
    assert [budget.withdraw() for _ in range(3)] == [True, True, False]
    clock.advance(3600)  # capped: ten seconds of the floor at most
    assert sum(budget.withdraw() for _ in range(100)) == 20


def test_trusted_proxies() -> None:
    trusted = TrustedProxies(["10.0.0.0/8", "::1"])
    assert "10.1.2.3" in trusted
    assert "::1" in trusted
    assert "11.0.0.1" not in trusted
    assert "not an ip" not in trusted
    assert not TrustedProxies([])
    # From the right: skip trusted hops; what a client wrote further left is not believed.
    assert trusted.client_ip("10.0.0.1", b"1.1.1.1, 2.2.2.2, 10.0.0.2") == "2.2.2.2"
    assert trusted.client_ip("10.0.0.1", b"10.0.0.3, 10.0.0.2") == "10.0.0.3"
    assert trusted.client_ip("10.0.0.1", None) == "10.0.0.1"


def test_header_helpers() -> None:
    assert connection_tokens(b"Keep-Alive, X-Foo ,,") == [b"keep-alive", b"x-foo"]
    assert forwarded_for("192.0.2.1") == b"192.0.2.1"
    assert forwarded_for("2001:db8::1") == b'"[2001:db8::1]"'
    assert b"".join(chunk(b"hello")) == b"5\r\nhello\r\n"
    assert len(new_request_id()) == 16
    assert new_request_id() != new_request_id()
    response = error_response(503, keep_alive=False)
    assert response.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert response.endswith(b"Connection: close\r\n\r\n503 Service Unavailable\n")
