"""Client-side (peer-to-peer) balancing for httpx: call a service with no balancer in between.

    registry = Registry.from_url("redis://127.0.0.1:6379/0", "demo")
    transport = BalancedTransport(registry, balance="p2c")
    async with httpx.AsyncClient(transport=transport, base_url="http://demo") as client:
        await client.get("/api/session")        # some live instance of "demo" answers
    await registry.aclose()

The transport keeps a local list of the service's live instances, read from the registry
(`service_registry/_registry.py`) at most every `refresh` seconds in the background (a request
never waits for Redis once the first read is done; an unreachable Redis keeps the last
list), rewrites each request's origin to the instance it picks, and sends it through ONE
inner `httpx.AsyncHTTPTransport` (its connection pool is shared by every instance).

Policies (`balance`):

- "round-robin";
- "least-inflight": fewest requests in flight from this transport;
- "p2c": power of two choices over in-flight x latency (Finagle's and Linkerd's P2C with a
  moving average of the time to the response head);
- "hash": the balancer's own Maglev consistent hash (`balancer/datapath/_maglev.py`) over the same
  backend ids (sha256 of the normalized URL, sorted), keyed like the balancer's router:
  `hash_on="cookie:NAME"` (the session cookie's value: the balancer's `--sticky cookie:NAME`
  for a client without an affinity pin), `"header:NAME"`, or a per-request key in
  ``request.extensions["balance_key"]`` (str or bytes; `--sticky ip` keys by the client IP).
  Given the same live set and table size, client and balancer pick the same instance.
  `weights={url: N}` weighs the table as the balancer's `--backend "URL weight=N"` does
  (weighted Maglev, the same code): give both the same weights and they still agree.

A connect error (nothing was sent, so any method is safe to resend) is retried on another
instance, up to `max_attempts` tries in all; `eject_after` connect errors in a row eject an
instance for `ejection_time` seconds (never the last one standing). When no instance is
known, the request fails with `httpx.ConnectError`, as a refused connection would.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import httpx

from service_registry import Instance, Registry, RegistryError, Snapshot

from .datapath._affinity import cookie_value
from .datapath._backend import Backend
from .datapath._maglev import DEFAULT_TABLE_SIZE, TableCache, is_prime, key_hash, walk

__all__ = [
    "BalancePolicy",
    "BalancedSyncTransport",
    "BalancedTransport",
    "InstanceSource",
    "StaticInstances",
]

BalancePolicy = Literal["round-robin", "least-inflight", "p2c", "hash"]
_POLICIES = ("round-robin", "least-inflight", "p2c", "hash")
_URLS_KEPT = 1024  # rewritten URLs kept per transport
_EWMA_DECAY = 0.3  # weight of the newest latency sample
_DEFAULT_LATENCY = 0.001  # seconds: what an instance is assumed to take before measured
BALANCE_KEY = "balance_key"  # request.extensions key of a caller-given hash key


class InstanceSource(Protocol):
    """Where the transport learns the live instances: a `Registry`, or `StaticInstances`."""

    service: str

    async def read(self) -> Snapshot: ...


class StaticInstances:
    """A fixed list of instances (tests, or a service whose addresses never change)."""

    def __init__(self, urls: Iterable[str], *, service: str = "static") -> None:
        self.service = service
        self.instances = tuple(
            Instance(service=service, id=f"i{n}", address=url) for n, url in enumerate(urls)
        )

    async def read(self) -> Snapshot:
        return Snapshot(self.instances, time.time(), None)


# -- the pure part: which instance takes a request ----------------------------------------


@dataclass(slots=True, eq=False)
class _Member:
    instance: Instance
    backend_id: str  # the balancer's id for the same URL: what Maglev hashes
    origin: tuple[bytes, bytes, int | None]  # scheme, host, port, for httpx.URL
    host_header: str
    in_flight: int = 0
    latency: float = _DEFAULT_LATENCY  # seconds, moving average
    failures_in_a_row: int = 0
    ejected_until: float | None = None


def _member(instance: Instance) -> _Member | None:
    try:
        backend = Backend(instance.address)
    except ValueError:
        return None  # https or otherwise not what the balancer would take: skip it
    port = backend.port
    netloc = backend.url.removeprefix("http://")
    return _Member(instance, backend.id, (b"http", backend.host.encode(), port), netloc)


class _Picker:
    """The transport's in-memory state and its decisions. Pure: no I/O, the clock passed in."""

    def __init__(
        self,
        *,
        balance: BalancePolicy,
        table_size: int,
        eject_after: int,
        ejection_time: float,
        rng: random.Random,
        weights: Mapping[str, int] | None = None,
    ) -> None:
        self.balance = balance
        self.tables = TableCache(table_size)  # the router's cache, of the same tables
        # By backend id (of the URL, as the balancer's); ValueError naming a bad one.
        self.weights = {
            Backend(url, weight=weight).id: weight for url, weight in (weights or {}).items()
        }
        self.eject_after = eject_after
        self.ejection_time = ejection_time
        self.rng = rng
        self.members: dict[str, _Member] = {}  # by backend id
        self._sorted: list[_Member] = []  # the members by backend id, as the router sorts
        self._sorted_ids: tuple[str, ...] = ()  # of `_sorted`
        self._sorted_table: list[int] | None = None  # the Maglev table of `_sorted`
        self.ejected = 0  # members with an ejection running
        self._rr = 0

    def update(self, instances: Iterable[Instance]) -> None:
        """Replace the live set; members that stay keep their counters."""
        fresh: dict[str, _Member] = {}
        for instance in instances:
            member = _member(instance)
            if member is None:
                continue
            old = self.members.get(member.backend_id)
            fresh[member.backend_id] = old if old is not None else member
        self.members = fresh
        self._sorted = sorted(fresh.values(), key=lambda m: m.backend_id)
        self._sorted_ids = tuple(m.backend_id for m in self._sorted)
        self._sorted_table = None
        self.ejected = sum(1 for m in self._sorted if m.ejected_until is not None)

    def _usable(self, now: float, exclude: frozenset[str]) -> list[_Member]:
        members = self._sorted
        if self.ejected:
            for member in members:
                if member.ejected_until is not None and now >= member.ejected_until:
                    member.ejected_until = None
                    self.ejected -= 1
        if not self.ejected and not exclude:
            return members  # the common case: no list built
        up = [m for m in members if m.ejected_until is None and m.backend_id not in exclude]
        if up:
            return up
        # Every instance ejected: Envoy's panic mode, try them all rather than fail.
        return [m for m in members if m.backend_id not in exclude]

    def choose(self, key: bytes | None, now: float, exclude: frozenset[str]) -> _Member | None:
        """The member for this request, or None when no instance is left."""
        up = self._usable(now, exclude)
        if not up:
            return None
        if self.balance == "hash" and key is not None:
            return self._hashed(key_hash(key), up, now, exclude)
        if self.balance == "least-inflight":
            return min(up, key=lambda m: m.in_flight)
        if self.balance == "p2c" and len(up) > 1:
            a, b = self.rng.sample(up, 2)
            return a if (a.in_flight + 1) * a.latency <= (b.in_flight + 1) * b.latency else b
        self._rr = (self._rr + 1) % len(up)
        return up[self._rr]

    def _hashed(self, h: int, up: list[_Member], now: float, exclude: frozenset[str]) -> _Member:
        # As the balancer's router, with its code (`_maglev.TableCache` and `walk`): the
        # table over the healthy set (sorted ids), and for a retry, forward past the
        # excluded ones.
        healthy = self._usable(now, frozenset())
        if healthy is self._sorted:
            ids = self._sorted_ids
            table = self._sorted_table
            if table is None:
                table = self._sorted_table = self.tables.get(ids, self._weights_of(ids))
        else:
            ids = tuple(m.backend_id for m in healthy)
            table = self.tables.get(ids, self._weights_of(ids))
        index = walk(table, ids, h, exclude)
        return healthy[index] if index >= 0 else up[0]  # every healthy one excluded: any other

    def _weights_of(self, ids: tuple[str, ...]) -> tuple[int, ...] | None:
        """The table's weights for `ids`, None when they are all equal (as the router)."""
        given = self.weights
        if not given:
            return None
        weights = tuple(given.get(i, 1) for i in ids)
        return weights if len(set(weights)) > 1 else None

    def started(self, member: _Member) -> None:
        member.in_flight += 1

    def finished(self, member: _Member, *, latency: float | None) -> None:
        member.in_flight = max(0, member.in_flight - 1)
        if latency is not None:
            member.latency += _EWMA_DECAY * (latency - member.latency)

    def connect_failed(self, member: _Member, now: float) -> bool:
        """Count a connect error; returns whether the member was ejected by it."""
        member.failures_in_a_row += 1
        if not self.eject_after or member.failures_in_a_row < self.eject_after:
            return False
        others = [m for m in self.members.values() if m is not member and m.ejected_until is None]
        if not others:
            return False  # never eject the last instance standing
        member.ejected_until = now + self.ejection_time
        member.failures_in_a_row = 0
        self.ejected += 1
        return True

    def succeeded(self, member: _Member) -> None:
        member.failures_in_a_row = 0


def _key_reader(hash_on: str | None) -> Callable[[httpx.Request], bytes | None]:
    """How to read a request's hash key: `cookie:NAME`, `header:NAME`, or only the
    extension. Raises ValueError naming `hash_on`."""
    kind, _, name = (hash_on or "").partition(":")
    if hash_on is not None and (kind not in ("cookie", "header") or not name):
        raise ValueError(f"hash_on: expected cookie:NAME or header:NAME, got {hash_on!r}")
    cookie = name.encode()

    def read(request: httpx.Request) -> bytes | None:
        given = request.extensions.get(BALANCE_KEY)
        if given is not None:
            return given.encode() if isinstance(given, str) else bytes(given)
        if kind == "cookie":
            header = request.headers.get("cookie")
            return None if header is None else cookie_value(header.encode("latin-1"), cookie)
        if kind == "header":
            value = request.headers.get(name)
            return None if value is None else value.encode("latin-1")
        return None

    return read


def _check(balance: str, table_size: int, max_attempts: int) -> None:
    if balance not in _POLICIES:
        raise ValueError(f"balance: expected one of {', '.join(_POLICIES)}, got {balance!r}")
    if not is_prime(table_size):
        raise ValueError(f"table_size must be a prime, not {table_size!r}")
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, not {max_attempts!r}")


class _Router:
    """Rewrites a request's origin to the chosen instance's, path and query kept.

    httpx builds a URL in ~40 us (it parses and validates every part); a service is called
    on a few paths, so the rewritten URLs are kept by (instance, path and query), bounded.
    """

    def __init__(self) -> None:
        self._urls: dict[tuple[str, bytes], httpx.URL] = {}

    def route(self, request: httpx.Request, member: _Member) -> None:
        key = (member.backend_id, request.url.raw_path)
        url = self._urls.get(key)
        if url is None:
            scheme, host, port = member.origin
            url = request.url.copy_with(scheme=scheme.decode(), host=host.decode(), port=port)
            if len(self._urls) >= _URLS_KEPT:
                self._urls.clear()
            self._urls[key] = url
        request.url = url
        request.headers["Host"] = member.host_header


def _no_instance(service: str, request: httpx.Request) -> httpx.ConnectError:
    return httpx.ConnectError(f"no live instance of service {service!r}", request=request)


# -- the async transport -----------------------------------------------------------------


class _TrackedStream(httpx.AsyncByteStream):
    """The response body, which tells the picker when the request is over."""

    def __init__(self, stream: httpx.AsyncByteStream, done: Callable[[], None]) -> None:
        self._stream = stream
        self._done: Callable[[], None] | None = done

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            if self._done is not None:
                done, self._done = self._done, None
                done()


class _Balancing:
    """What both transports are built from, in one place: the checks (ValueError naming
    the parameter), the hash key reader, the picker, the URL rewriter, the clock."""

    def __init__(
        self,
        *,
        balance: BalancePolicy,
        hash_on: str | None,
        table_size: int,
        refresh: float,
        max_attempts: int,
        eject_after: int,
        ejection_time: float,
        clock: Callable[[], float],
        rng: random.Random | None,
        weights: Mapping[str, int] | None,
    ) -> None:
        _check(balance, table_size, max_attempts)
        self.refresh = refresh
        self.max_attempts = max_attempts
        self._key = _key_reader(hash_on)
        self._picker = _Picker(
            balance=balance,
            table_size=table_size,
            eject_after=eject_after,
            ejection_time=ejection_time,
            rng=rng if rng is not None else random.Random(),
            weights=weights,
        )
        self._router = _Router()
        self._clock = clock


class BalancedTransport(_Balancing, httpx.AsyncBaseTransport):
    """An `httpx.AsyncBaseTransport` that balances over a service's live instances.

    `source` is a `Registry` (the service it was built for) or `StaticInstances`; the caller
    owns and closes it. `inner` defaults to one `httpx.AsyncHTTPTransport` that this
    transport creates and closes in `aclose()`. Raises ValueError, naming the parameter, for
    a bad `balance`, `hash_on`, `table_size`, `max_attempts` or `weights` (URL to weight,
    1..256, for "hash"). See the module docstring for
    the rules.
    """

    def __init__(
        self,
        source: InstanceSource,
        *,
        balance: BalancePolicy = "round-robin",
        hash_on: str | None = None,
        table_size: int = DEFAULT_TABLE_SIZE,
        refresh: float = 1.0,
        max_attempts: int = 3,
        eject_after: int = 1,
        ejection_time: float = 10.0,
        inner: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        weights: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__(
            balance=balance,
            hash_on=hash_on,
            table_size=table_size,
            refresh=refresh,
            max_attempts=max_attempts,
            eject_after=eject_after,
            ejection_time=ejection_time,
            clock=clock,
            rng=rng,
            weights=weights,
        )
        self.source = source
        self._owns_inner = inner is None
        self._inner = inner if inner is not None else httpx.AsyncHTTPTransport(retries=0)
        self._loaded_at: float | None = None
        self._refreshing: asyncio.Task[None] | None = None
        self._first: asyncio.Lock | None = None

    def __repr__(self) -> str:
        return f"<BalancedTransport {self.source.service!r} [instances: {len(self.instances)}]>"

    @property
    def instances(self) -> tuple[Instance, ...]:
        """The instances the transport balances over now."""
        return tuple(m.instance for m in self._picker.members.values())

    async def update(self) -> None:
        """Read the source now; an unreachable registry keeps the last list."""
        try:
            instances = (await self.source.read()).instances
        except RegistryError:
            self._loaded_at = self._clock()  # try again after `refresh`, not on every request
            return
        self._picker.update(instances)
        self._loaded_at = self._clock()

    async def _fresh(self) -> None:
        loaded = self._loaded_at
        if loaded is None:
            if self._first is None:
                self._first = asyncio.Lock()
            async with self._first:  # one first read, however many requests wait for it
                if self._loaded_at is None:
                    await self.update()
            return
        if self._clock() - loaded >= self.refresh and self._refreshing is None:
            # In the background: a request never waits for Redis after the first read.
            self._refreshing = asyncio.create_task(self._refresh_task(), name="balanced-refresh")

    async def _refresh_task(self) -> None:
        try:
            await self.update()
        finally:
            self._refreshing = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await self._fresh()
        picker = self._picker
        key = self._key(request) if picker.balance == "hash" else None
        exclude: frozenset[str] = frozenset()
        for attempt in range(1, self.max_attempts + 1):
            now = self._clock()
            member = picker.choose(key, now, exclude)
            if member is None:
                raise _no_instance(self.source.service, request)
            self._router.route(request, member)
            picker.started(member)
            try:
                response = await self._inner.handle_async_request(request)
            except (httpx.ConnectError, httpx.ConnectTimeout):
                picker.finished(member, latency=None)
                picker.connect_failed(member, self._clock())
                exclude |= {member.backend_id}
                if attempt == self.max_attempts or len(exclude) >= len(picker.members):
                    raise
                continue
            except BaseException:
                picker.finished(member, latency=None)
                raise
            picker.succeeded(member)
            latency = self._clock() - now
            assert isinstance(response.stream, httpx.AsyncByteStream)
            done = functools.partial(picker.finished, member, latency=latency)
            response.stream = _TrackedStream(response.stream, done)
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    async def aclose(self) -> None:
        """Stop the background read and close the inner transport (if created here)."""
        task = self._refreshing
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._owns_inner:
            await self._inner.aclose()


# -- the sync transport ------------------------------------------------------------------


class BalancedSyncTransport(_Balancing, httpx.BaseTransport):
    """The sync twin of `BalancedTransport`, for `httpx.Client`.

    `instances` is a static list of URLs, or `registry_url` + `service` names a registry,
    read every `refresh` seconds by a daemon thread with an event loop of its own (redis
    asyncio client inside), stopped and joined by `close()`. Same policies and rules.
    """

    def __init__(
        self,
        *,
        instances: Sequence[str] = (),
        registry_url: str | None = None,
        service: str = "static",
        balance: BalancePolicy = "round-robin",
        hash_on: str | None = None,
        table_size: int = DEFAULT_TABLE_SIZE,
        refresh: float = 1.0,
        max_attempts: int = 3,
        eject_after: int = 1,
        ejection_time: float = 10.0,
        inner: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        weights: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__(
            balance=balance,
            hash_on=hash_on,
            table_size=table_size,
            refresh=refresh,
            max_attempts=max_attempts,
            eject_after=eject_after,
            ejection_time=ejection_time,
            clock=clock,
            rng=rng,
            weights=weights,
        )
        self.service = service
        self._lock = threading.Lock()  # the picker is shared by the caller's threads
        self._owns_inner = inner is None
        self._inner = inner if inner is not None else httpx.HTTPTransport(retries=0)
        self._stop = threading.Event()
        self._loaded = threading.Event()
        self._thread: threading.Thread | None = None
        if registry_url is None:
            self._picker.update(StaticInstances(instances, service=service).instances)
            self._loaded.set()
        else:
            self._thread = threading.Thread(
                target=self._poll, args=(registry_url,), name="balanced-refresh", daemon=True
            )
            self._thread.start()

    @property
    def instances(self) -> tuple[Instance, ...]:
        with self._lock:
            return tuple(m.instance for m in self._picker.members.values())

    def _poll(self, registry_url: str) -> None:
        async def poll() -> None:
            registry = Registry.from_url(registry_url, self.service)
            try:
                while not self._stop.is_set():
                    try:
                        snapshot = await registry.read()
                    except RegistryError:
                        pass  # keep the last list; the next read may succeed
                    else:
                        with self._lock:
                            self._picker.update(snapshot.instances)
                    self._loaded.set()
                    # The schedule of the reads; `close()` cuts it short.
                    await asyncio.to_thread(self._stop.wait, self.refresh)
            finally:
                await registry.aclose()

        asyncio.run(poll())

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        # Bounded: an unreachable registry fails the first read within its timeout.
        self._loaded.wait(5.0)
        key = self._key(request) if self._picker.balance == "hash" else None
        exclude: frozenset[str] = frozenset()
        for attempt in range(1, self.max_attempts + 1):
            now = self._clock()
            with self._lock:
                member = self._picker.choose(key, now, exclude)
                if member is not None:
                    self._picker.started(member)
            if member is None:
                raise _no_instance(self.service, request)
            self._router.route(request, member)
            try:
                response = self._inner.handle_request(request)
            except (httpx.ConnectError, httpx.ConnectTimeout):
                with self._lock:
                    self._picker.finished(member, latency=None)
                    self._picker.connect_failed(member, self._clock())
                    total = len(self._picker.members)
                exclude |= {member.backend_id}
                if attempt == self.max_attempts or len(exclude) >= total:
                    raise
                continue
            except BaseException:
                with self._lock:
                    self._picker.finished(member, latency=None)
                raise
            with self._lock:
                self._picker.succeeded(member)
                self._picker.finished(member, latency=self._clock() - now)
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        if self._owns_inner:
            self._inner.close()
