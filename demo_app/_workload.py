"""Simulated users of the demo app, for `demo_app.compare`: each a cookie jar and a ledger.

A `User` is one client with its own `httpx.Client` (hence its own cookie jar) and what its
session must hold. Its step ``n`` increments the counter (even ``n``) or adds one item to the
cart (odd ``n``); every reply is checked against the ledger. A session is *lost* when a reply
shows less than it must hold: a counter that went back, a cart without an item it had. A
request that failed (a transport error or a status other than 200) may or may not have
reached the app, so its write is *unsure*: a later reply may show it or not, and neither is a
loss.

A user may be given several balancer replicas: it starts on one (its index modulo their
number) and, when a request fails to connect (the replica is gone: nothing was sent, so
nothing can have been applied), sends the same request to the next replica, at most once
per other replica. Its cookie jar goes with it: cookies are scoped by host, not port.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

__all__ = ["Step", "User"]


@dataclass(frozen=True, slots=True)
class Step:
    """What one request of one user came to."""

    ok: bool  # a 200 reply with the expected shape
    latency: float  # seconds, send to reply (or to failure)
    instance: str | None  # the instance that answered, for an ok step
    lost: bool  # the reply showed the session lost or corrupted
    switches: int = 0  # balancer replicas it moved to after a connect error


@dataclass(slots=True)
class _Ledger:
    """What the session must hold, as far as the client can know."""

    count: int = 0
    cart: list[str] = field(default_factory=list)
    unsure_increments: int = 0  # counter requests that failed: applied or not
    unsure_items: set[str] = field(default_factory=set)  # cart items whose request failed

    def check_count(self, got: int) -> bool:
        """Record a counter reply; False if the session lost something."""
        ok = self.count + 1 <= got <= self.count + 1 + self.unsure_increments
        if not ok and got == 1:
            self.cart = []  # a fresh session: its cart is empty too
        self.count, self.unsure_increments = got, 0
        return ok

    def holds(self, session: dict[str, Any]) -> bool:
        """Whether a session read back holds at least every sure write; changes nothing."""
        count, cart = session.get("count", 0), session.get("cart", [])
        if not (isinstance(count, int) and isinstance(cart, list)):
            return False
        sure = {x for x in self.cart if x not in self.unsure_items}
        return count >= self.count and sure <= set(cart)

    def check_cart(self, got: list[str], item: str) -> bool:
        """Record a cart reply after adding ``item``; False if the session lost something."""
        sure = [x for x in got if x not in self.unsure_items]
        ok = bool(got) and got[-1] == item and sure == [*self.cart, item]
        if not ok and got == [item]:
            self.count = 0  # a fresh session: its counter starts again
        self.cart, self.unsure_items = list(got), set()
        return ok


class User:
    """One simulated client of the app behind ``balancers`` (one base URL or several replicas).

    `step` is called by one thread at a time per user (steps of one user are sequential);
    different users run in parallel. `close` releases the client. Raises ValueError for an
    empty ``balancers``.
    """

    def __init__(
        self,
        index: int,
        balancers: str | Sequence[str],
        *,
        timeout: float = 5.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.index = index
        self.balancers = [balancers] if isinstance(balancers, str) else list(balancers)
        if not self.balancers:
            raise ValueError("a user needs at least one balancer URL")
        self.current = index % len(self.balancers)  # users spread over the replicas
        # Its own client: its own cookie jar and its own keep-alive connection, like a
        # browser. ``tls`` may be shared: httpx builds a new context per client otherwise.
        self.client = httpx.Client(timeout=timeout, verify=tls or True)
        self.ledger = _Ledger()
        self.lost = False  # lost or corrupted at least once
        self.first_instance: str | None = None  # where its session was created
        self.last_instance: str | None = None  # where its latest request went
        self.instance_changes = 0
        self.switches = 0  # moves to another balancer replica after a connect error

    def _post(self, path: str, body: Any) -> httpx.Response:
        """POST to the current replica, moving on to the next after a connect error.

        Counts each move in `switches`; raises the last error (httpx) once every replica
        refused, or at once for an error after the request was sent.
        """
        tries = 0
        while True:
            url = self.balancers[self.current] + path
            try:
                return self.client.post(url, json=body)
            except httpx.ConnectError:
                # Refused or unreachable: nothing reached the app, so sending it again
                # elsewhere cannot apply it twice.
                tries += 1
                if tries >= len(self.balancers):
                    raise
                self.switches += 1
                self.current = (self.current + 1) % len(self.balancers)

    def step(self, n: int) -> Step:
        """Send request ``n`` and check its reply; never raises for a failed request."""
        item = f"u{self.index}-{n}"
        started = time.perf_counter()
        switched_before = self.switches
        try:
            if n % 2 == 0:
                reply = self._post("/api/counter", None)
            else:
                reply = self._post("/api/cart", {"item": item})
            body: Any = reply.json() if reply.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            body = None
        switches = self.switches - switched_before
        latency = time.perf_counter() - started
        if not (isinstance(body, dict) and isinstance(body.get("instance"), str)):
            # It may have reached the app: its write may show up later, or not.
            if n % 2 == 0:
                self.ledger.unsure_increments += 1
            else:
                self.ledger.unsure_items.add(item)
            return Step(ok=False, latency=latency, instance=None, lost=False, switches=switches)
        instance: str = body["instance"]
        if n % 2 == 0:
            intact = isinstance(body.get("count"), int) and self.ledger.check_count(body["count"])
        else:
            cart = body.get("cart")
            intact = isinstance(cart, list) and self.ledger.check_cart(cart, item)
        self._served_by(instance)
        self.lost = self.lost or not intact
        return Step(ok=True, latency=latency, instance=instance, lost=not intact, switches=switches)

    def read(self) -> Step:
        """Read the session (``GET /api/session``) and check it holds what the ledger says
        it must: a read changes nothing, so a counter below the ledger's or a cart without
        a sure item is a loss (a stale copy served counts so too). Never raises."""
        started = time.perf_counter()
        try:
            url = self.balancers[self.current] + "/api/session"
            reply = self.client.get(url)
            body: Any = reply.json() if reply.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            body = None
        latency = time.perf_counter() - started
        if not (isinstance(body, dict) and isinstance(body.get("instance"), str)):
            return Step(ok=False, latency=latency, instance=None, lost=False)
        session = body.get("session")
        intact = isinstance(session, dict) and self.ledger.holds(session)
        self._served_by(body["instance"])
        self.lost = self.lost or not intact
        return Step(ok=True, latency=latency, instance=body["instance"], lost=not intact)

    def _served_by(self, instance: str) -> None:
        if self.first_instance is None:
            self.first_instance = instance
        elif instance != self.last_instance:
            self.instance_changes += 1
        self.last_instance = instance

    def close(self) -> None:
        self.client.close()
