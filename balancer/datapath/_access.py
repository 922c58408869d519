"""What the access log says about a request: its fields, and the pin outcome of a routing
Decision. Pure; the data path (`_proxy`) fills the fields of each request it answers, and
`balancer.control._log` formats them (JSON, or the plain template of --access-log-format).
"""

from __future__ import annotations

from typing import Final

from ._router import Decision

__all__ = ["ACCESS_FIELDS", "PIN_OUTCOMES", "pin_outcome"]

# The fields of an access log record, in the order a JSON line has them (after `time`,
# `level` and `event`). Times in seconds (as nginx's $request_time), None where there is no
# value (no backend reached, no routing decision).
ACCESS_FIELDS: Final = (
    "client",  # the client's address (X-Forwarded-For's, from a --trusted-proxy)
    "method",
    "path",  # the request target as received, query included
    "protocol",  # HTTP/1.1 or HTTP/1.0
    "status",  # as sent to the client; 499: it left before its response
    "bytes_in",  # request line, header fields, blank line and body (de-chunked)
    "bytes_out",  # written to the client: head, body (as framed) and any 100 Continue
    "backend",  # the backend id of the last attempt, or None
    "upstream_connect_time",  # last attempt: routing to the request written (0: kept-alive)
    "upstream_response_time",  # last attempt: request written to the response's end
    "request_time",  # the request's first byte to its response's end
    "request_id",  # X-Request-Id, the client's or the one the balancer added
    "pin",  # PIN_OUTCOMES, or None without a routing decision
    "repin_reason",  # with pin "repinned": REPIN_REASONS of _router, else None
)

# hit: a valid pin kept; new: a client placed and pinned; repinned: moved off its pin (or
# given one again), `repin_reason` says why; none: no stickiness by cookie (--sticky ip or
# none).
PIN_OUTCOMES: Final = ("hit", "new", "repinned", "none")


def pin_outcome(decision: Decision | None) -> tuple[str | None, str | None]:
    """(pin, repin_reason) for the access log; (None, None) without a decision.

    Read from the Decision's shape, as the router's rules make it (`_router`'s docstring):
    a reason is a re-pin; a new cookie with `learn` and no pin table entry is rule 4, a new
    client (or a pin re-signed with the newest secret for a client without a session
    cookie, which keeps its backend); no cookie, no entry and nothing to learn is mode ip
    or none; anything else kept a valid pin (rule 1)."""
    if decision is None:
        return None, None
    reason = decision.reason
    if reason is not None:
        return "repinned", reason
    if decision.set_cookie is not None:
        if decision.learn and decision.pin is None:
            return "new", None
        return "hit", None
    if decision.pin is None and not decision.learn:
        return "none", None
    return "hit", None
