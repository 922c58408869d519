from __future__ import annotations

import math
import os
import random
import subprocess
import sys
from collections import Counter

import pytest

from balancer import (
    AffinityCookie,
    BackendPolicy,
    BackendState,
    Balance,
    Decision,
    NoBackendAvailable,
    PinnedBackendDown,
    PinTable,
    Pool,
    Router,
    Sticky,
    UnknownBackend,
)
from balancer.datapath._maglev import key_hash
from balancer.datapath._pins import handle

URLS = [f"http://127.0.0.1:{9001 + i}" for i in range(5)]
SECRETS = ["s1"]
COOKIE = Sticky("cookie", "sid")


def make(
    urls: list[str] = URLS,
    *,
    sticky: Sticky = COOKIE,
    seed: int = 1,
    epsilon: float = 0.25,
    balance: Balance = "round-robin",
    policy: BackendPolicy | None = None,
    now: list[float] | None = None,
) -> tuple[Pool, Router]:
    pool = Pool(urls, policy=policy)
    clock = now if now is not None else [0.0]
    router = Router(
        pool,
        sticky=sticky,
        affinity=AffinityCookie(secrets=SECRETS),
        balance=balance,
        hash_balance_factor=epsilon,
        rng=random.Random(seed),
        clock=lambda: clock[0],
    )
    return pool, router


def pin(backend_id: str, secrets: list[str] = SECRETS) -> bytes:
    return b"lb_affinity=" + AffinityCookie(secrets=secrets).sign(backend_id)


def decide(
    router: Router, cookie: bytes | None = None, exclude: frozenset[str] = frozenset()
) -> Decision:
    return router.decide(client_ip="10.0.0.1", cookie_header=cookie, exclude=exclude)


def expected_hashed(pool: Pool, key: bytes) -> str:
    """The id an independent router over the same UP set gives for a session key."""
    _, router = make([b.url for b in pool])
    other = router._pool  # a fresh pool with the same URLs
    for b in pool:
        if b.state is not BackendState.UP:
            other[b.id].mark_down("x", 0.0)
    return decide(router, b"sid=" + key).backend.id


# -- cookie mode ---------------------------------------------------------------------------


def test_new_client_is_placed_and_pinned() -> None:
    _, router = make()
    decision = decide(router)
    assert decision.repinned is False
    assert decision.set_cookie == AffinityCookie(secrets=SECRETS).set_cookie(decision.backend.id)
    assert decision.set_cookie is not None
    assert decision.set_cookie.endswith(b"; Path=/; HttpOnly; SameSite=Lax")


def test_creating_request_and_later_ones_reach_the_same_backend_on_every_replica() -> None:
    _, first = make(seed=1)
    _, second = make(seed=2)
    created = decide(first)  # no cookie yet: this request creates the session
    assert created.set_cookie is not None
    pin_cookie = created.set_cookie.split(b";")[0]
    # The app's new session cookie may hash elsewhere: the pin wins, on both replicas.
    for router in (first, second):
        for sid in (b"new-session", b"another", b"x"):
            later = decide(router, pin_cookie + b"; sid=" + sid)
            assert later.backend.id == created.backend.id
            assert later.set_cookie is None
            assert later.repinned is False


def test_valid_pin_is_kept_and_costs_no_cookie() -> None:
    pool, router = make()
    for backend in pool:
        decision = decide(router, pin(backend.id) + b"; sid=whatever")
        assert (decision.backend, decision.set_cookie, decision.reason) == (backend, None, None)
        assert decision.pin is router.pins.get(b"whatever")  # the table follows the pin
        assert decision.pin is not None
        assert decision.pin.backend_id == backend.id
        # No session cookie yet: the same backend, and its answer is learned from.
        assert decide(router, pin(backend.id)) == Decision(backend, None, None, True)


def test_pin_signed_by_an_old_secret_is_kept_and_resigned() -> None:
    pool = Pool(URLS)
    router = Router(pool, sticky=COOKIE, affinity=AffinityCookie(secrets=["new", "old"]))
    backend = next(iter(pool))
    decision = decide(router, pin(backend.id, ["old"]))
    assert decision.backend is backend
    assert decision.repinned is False
    assert decision.set_cookie == AffinityCookie(secrets=["new"]).set_cookie(backend.id)


@pytest.mark.parametrize(
    "affinity",
    [
        b"lb_affinity=garbage",
        b"lb_affinity=",
        b"lb_affinity=000000000000.AAAAAAAAAAAAAAAAAAAAAAAAAAA",
        b"lb_affinity=" + AffinityCookie(secrets=["other"]).sign("x"),  # foreign secret
        b"lb_affinity=" + AffinityCookie(secrets=SECRETS).sign("0123456789ab"),  # stale id
    ],
    ids=["garbage", "empty", "bad signature", "foreign secret", "stale id"],
)
def test_tampered_malformed_or_stale_pin_means_no_pin(affinity: bytes) -> None:
    pool, router = make()
    stale = affinity.endswith(b"0123456789ab") or b"0123456789ab." in affinity
    with_session = decide(router, affinity + b"; sid=session-42")
    # Found again by its session (the hash here: the table has never seen it), re-pinned.
    assert with_session.reason == ("removed" if stale else "lost_pin")
    assert with_session.backend.id == expected_hashed(pool, b"session-42")
    assert with_session.set_cookie == AffinityCookie(secrets=SECRETS).set_cookie(
        with_session.backend.id
    )
    without = decide(router, affinity)
    assert without.reason == ("removed" if stale else None)  # else a new client, placed
    assert without.set_cookie is not None


def test_tampered_pin_for_a_real_backend_is_no_pin() -> None:
    pool, router = make()
    target = list(pool)[3]
    value = AffinityCookie(secrets=SECRETS).sign(target.id)
    tampered = b"lb_affinity=" + value[:-2] + (b"AA" if value[-2:] != b"AA" else b"BB")
    decision = decide(router, tampered + b"; sid=k")
    assert decision.set_cookie is not None  # a fresh pin, because the old one was not valid
    assert decision.backend.id == expected_hashed(pool, b"k")


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("down", "down"),
        ("draining, move", "drain"),
        ("drained", "drain"),
        ("excluded", "failed"),
        ("ejected", "down"),
    ],
)
def test_failover_of_a_pinned_client(how: str, reason: str) -> None:
    pool, router = make(policy=BackendPolicy(eject_after=1))
    pinned = list(pool)[2]
    exclude: frozenset[str] = frozenset()
    if how == "down":
        pinned.mark_down("refused", 0.0)
    elif how == "draining, move":
        pool.drain(pinned.id, 0.0, sessions="move")
    elif how == "drained":
        pool.drain(pinned.id, 0.0)
        pinned.finish_drain("now")
    elif how == "ejected":
        pinned.request_started()
        pinned.request_finished(failed=True, now=0.0)
    else:
        exclude = frozenset({pinned.id})
    for key, cookie in [
        (b"s-1", pin(pinned.id) + b"; sid=s-1"),
        (pinned.id.encode(), pin(pinned.id)),  # no session cookie: the pinned id is the key
    ]:
        decision = decide(router, cookie, exclude)
        assert decision.backend is not pinned
        assert decision.reason == reason
        assert decision.set_cookie == AffinityCookie(secrets=SECRETS).set_cookie(
            decision.backend.id
        )
        if how != "excluded":
            assert decision.backend.id == expected_hashed(pool, key)


def test_failover_order_is_the_same_on_every_replica() -> None:
    pool_a, router_a = make(seed=1)
    pool_b, router_b = make(list(reversed(URLS)), seed=99)  # same set, other order
    rng = random.Random(7)
    # Take backends down one at a time; both replicas must send every client alike.
    for victim in list(pool_a)[:4]:
        victim.mark_down("x", 0.0)
        pool_b[victim.id].mark_down("x", 0.0)
        for _ in range(500):
            sid = b"%d" % rng.getrandbits(64)
            cookie = pin(victim.id) + b"; sid=" + sid
            a, b = decide(router_a, cookie), decide(router_b, cookie)
            assert (a.backend.id, a.set_cookie, a.repinned) == (b.backend.id, b.set_cookie, True)
    assert len(pool_a.selectable()) == 1


@pytest.mark.parametrize("sticky", [COOKIE, Sticky("ip")])
def test_two_routers_agree_on_10000_keys(sticky: Sticky) -> None:
    _, first = make(sticky=sticky, seed=1)
    _, second = make(list(reversed(URLS)), sticky=sticky, seed=2)
    rng = random.Random(3)
    counts: Counter[str] = Counter()
    for _ in range(10_000):
        key = ".".join(str(rng.randrange(256)) for _ in range(4))
        cookie = b"sid=" + key.encode()
        a = first.decide(client_ip=key, cookie_header=cookie)
        b = second.decide(client_ip=key, cookie_header=cookie)
        assert a.backend.id == b.backend.id
        assert a.set_cookie == b.set_cookie
        counts[a.backend.id] += 1
    assert len(counts) == len(URLS)
    assert max(counts.values()) / (10_000 / len(URLS)) < 1.1


# -- bounded load --------------------------------------------------------------------------


@pytest.mark.parametrize("epsilon", [0.05, 0.25, 1.0])
def test_bounded_load_never_exceeds_the_cap_for_new_clients(epsilon: float) -> None:
    pool, router = make([f"http://127.0.0.1:{9001 + i}" for i in range(10)], epsilon=epsilon)
    backends = list(pool)
    rng = random.Random(5)
    for i in range(5000):
        backend = decide(router).backend
        backend.request_started()
        total = sum(b.in_flight for b in backends)
        assert max(b.in_flight for b in backends) <= math.ceil((1 + epsilon) * total / 10)
        if i % 3 == 0:  # some requests finish, unevenly
            busy = [b for b in backends if b.in_flight]
            rng.choice(busy).request_finished(failed=False, now=0.0)


def test_bounded_load_does_not_move_pinned_clients() -> None:
    pool, router = make()
    hot = next(iter(pool))
    for _ in range(100):
        hot.request_started()
    assert decide(router, pin(hot.id)).backend is hot
    assert decide(router).backend is not hot  # new clients avoid it


def test_slow_start_shares_capacity_by_weight() -> None:
    now = [0.0]
    pool, router = make(policy=BackendPolicy(slow_start=100.0), now=now)
    cold = next(iter(pool))
    cold.mark_down("x", 0.0)
    cold.mark_up(0.0)
    now[0] = 10.0  # weight 0.1
    for _ in range(2000):
        decide(router).backend.request_started()
    others = [b.in_flight for b in pool if b is not cold]
    assert cold.in_flight < min(others) / 4


# -- exclusions and empty pools ------------------------------------------------------------


def test_exclude_for_a_retry_of_a_new_client() -> None:
    _, router = make()
    first = decide(router).backend
    retry = decide(router, None, frozenset({first.id}))
    assert retry.backend is not first
    assert retry.set_cookie is not None


@pytest.mark.parametrize("sticky", [COOKIE, Sticky("ip"), Sticky("none")])
def test_no_backend_available(sticky: Sticky) -> None:
    pool, router = make(sticky=sticky)
    everyone = frozenset(b.id for b in pool)
    with pytest.raises(NoBackendAvailable):
        decide(router, b"sid=x", everyone)
    with pytest.raises(NoBackendAvailable):
        decide(router, pin(next(iter(pool)).id), everyone)
    with pytest.raises(NoBackendAvailable):
        decide(router, None, everyone)
    for backend in pool:
        backend.mark_down("x", 0.0)
    with pytest.raises(NoBackendAvailable):
        decide(router, b"sid=x")
    with pytest.raises(NoBackendAvailable):
        decide(router)


# -- ip and none ---------------------------------------------------------------------------


def test_ip_mode_sets_no_cookies_and_moves_few_clients_on_failover() -> None:
    pool, router = make(sticky=Sticky("ip"))
    ips = [f"10.1.{i // 256}.{i % 256}" for i in range(5000)]
    before = {ip: router.decide(client_ip=ip, cookie_header=None) for ip in ips}
    assert all(d.set_cookie is None and not d.repinned for d in before.values())
    victim = next(iter(pool))
    victim.mark_down("x", 0.0)
    after = {ip: router.decide(client_ip=ip, cookie_header=pin(victim.id)) for ip in ips}
    stayed = [ip for ip in ips if before[ip].backend is not victim]
    moved = sum(1 for ip in stayed if after[ip].backend is not before[ip].backend)
    assert all(after[ip].backend is not victim for ip in ips)
    assert moved / len(stayed) < 0.02  # Maglev: only the victim's share moves, nearly


def test_round_robin_cycles_over_up_backends() -> None:
    pool, router = make(sticky=Sticky("none"))
    counts = Counter(decide(router, pin(next(iter(pool)).id)).backend.id for _ in range(500))
    assert set(counts.values()) == {100}
    drained = next(iter(pool))
    pool.drain(drained.id, 0.0)
    counts = Counter(decide(router).backend.id for _ in range(400))
    assert drained.id not in counts
    assert set(counts.values()) == {100}


def test_least_inflight() -> None:
    pool, router = make(sticky=Sticky("none"), balance="least-inflight")
    backends = list(pool)
    for i, backend in enumerate(backends):
        for _ in range(i + 1):
            backend.request_started()
    assert decide(router).backend is backends[0]
    assert decide(router, None, frozenset({backends[0].id})).backend is backends[1]


def test_least_inflight_ties_go_round_robin() -> None:
    _, router = make(sticky=Sticky("none"), balance="least-inflight")
    # An idle pool (every request answered before the next): all tie, each gets its share,
    # where `min` gave every one to the first backend.
    counts = Counter(decide(router).backend.id for _ in range(500))
    assert set(counts.values()) == {100}


def test_default_balance_steers_around_a_hung_backend() -> None:
    pool = Pool(URLS)
    router = Router(pool, sticky=Sticky("none"))  # the default --balance
    hung = next(iter(pool))
    counts: Counter[str] = Counter()
    for _ in range(1000):
        backend = decide(router).backend
        backend.request_started()
        counts[backend.id] += 1
        if backend is not hung:  # the others answer at once; the hung one holds its request
            backend.request_finished(failed=False, now=0.0)
    # Round robin sent it every fifth request (200) until a health check took it out.
    assert counts[hung.id] == 1
    assert sorted(counts.values()) == [1, 249, 250, 250, 250]


@pytest.mark.parametrize("balance", ["round-robin", "least-inflight"])
def test_none_mode_slow_start(balance: Balance) -> None:
    now = [0.0]
    pool, router = make(
        sticky=Sticky("none"), balance=balance, policy=BackendPolicy(slow_start=10.0), now=now
    )
    cold = next(iter(pool))
    cold.mark_down("x", 0.0)
    cold.mark_up(0.0)
    now[0] = 2.5  # weight 0.25 against 1.0 for the four others
    counts: Counter[str] = Counter()
    for _ in range(1700):
        backend = decide(router).backend
        backend.request_started()
        counts[backend.id] += 1
    assert counts[cold.id] == pytest.approx(100, abs=5)


# -- caching -------------------------------------------------------------------------------


def test_table_is_rebuilt_only_when_the_up_set_changes() -> None:
    # Observed through the tables' identity, not by patching build_table: the compiled
    # build (scripts/build-fast) calls it directly, past any patch.
    pool, router = make()
    victim = next(iter(pool))
    decide(router, b"sid=a")
    table, first = router._table, router._indexes
    for _ in range(10):
        decide(router, b"sid=a")
    assert router._table is table  # same UP set: nothing rebuilt
    victim.mark_down("x", 0.0)
    decide(router, b"sid=a")
    assert router._table is not table
    assert victim not in router._table
    assert router._indexes is not first
    assert len(router._tables) == 2
    victim.mark_up(1.0)  # back to a set seen before: its table is reused, not built again
    decide(router, b"sid=a")
    assert router._indexes is first


def test_cached_decision_never_vouches_for_a_tampered_pin() -> None:
    pool, router = make()
    target = list(pool)[3]
    value = AffinityCookie(secrets=SECRETS).sign(target.id)
    valid = b"lb_affinity=" + value + b"; sid=k"
    for _ in range(3):  # the valid header's decision is cached now
        assert decide(router, valid).backend is target
    for tampered in (
        b"lb_affinity=" + value[:-2] + (b"AA" if value[-2:] != b"AA" else b"BB") + b"; sid=k",
        b"lb_affinity=" + value + b"x; sid=k",
        b"lb_affinity=" + value[:-1] + b"; sid=k",
    ):
        for _ in range(2):
            decision = decide(router, tampered)
            assert decision.set_cookie is not None  # no pin: a fresh one is issued
            assert decision.backend.id == expected_hashed(pool, b"k")
    kept = decide(router, valid)
    assert (kept.backend, kept.set_cookie, kept.reason) == (target, None, None)


def test_cached_decision_follows_backend_state() -> None:
    pool, router = make()
    pinned = list(pool)[2]
    header = pin(pinned.id) + b"; sid=s"
    assert decide(router, header).backend is pinned
    pinned.mark_down("refused", 0.0)
    moved = decide(router, header)
    assert moved.backend is not pinned
    assert moved.repinned is True
    assert moved.backend.id == expected_hashed(pool, b"s")
    pinned.mark_up(1.0)
    assert (decide(router, header).backend, decide(router, header).set_cookie) == (pinned, None)
    pool.drain(pinned.id, 2.0)  # keeps its pinned clients
    assert decide(router, header).backend is pinned
    pinned.finish_drain("now")  # the cached decision must not outlive the drain
    assert decide(router, header).reason == "drain"
    pool.remove(pinned.id)
    assert decide(router, header).backend is not pinned


def test_new_clients_are_placed_at_random_even_with_a_cookie_header() -> None:
    _, router = make()
    # Neither cookie: placement is random each time, never replayed from the cache.
    placed = {decide(router, b"other=1").backend.id for _ in range(100)}
    assert len(placed) > 1


def test_decision_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("balancer.datapath._router._DECIDED_MAX", 16)
    pool, router = make()
    for i in range(100):
        key = b"s%d" % i
        assert decide(router, b"sid=" + key).backend.id == expected_hashed(pool, key)
        assert len(router._unpinned_decided) <= 16
    long_header = b"sid=" + b"x" * 600
    decide(router, long_header)
    assert long_header not in router._unpinned_decided


def test_a_session_cookie_without_a_pin_is_decided_once_but_never_counted_as_pinned() -> None:
    pool, router = make()
    header = b"sid=k"
    first = decide(router, header)
    assert decide(router, header) is first  # from the cache: no cookie scan, no hash
    assert first.backend.id == expected_hashed(pool, b"k")
    assert header not in router.decisions  # the dashboard counts signed pins only
    first.backend.mark_down("refused", 0.0)
    assert decide(router, header).backend is not first.backend  # follows backend state


def test_key_hash_drives_cookie_placement() -> None:
    _, router = make()
    decision = decide(router, b"sid=abc")
    assert decision.backend is router._table[key_hash(b"abc") % 65537]


_CHILD = """
import sys
from balancer import AffinityCookie, Pool, Router, Sticky
urls = sys.argv[1].split(",")
pool = Pool(urls)
router = Router(pool, sticky=Sticky("cookie", "sid"), affinity=AffinityCookie(secrets=["s1"]))
pool[sys.argv[2]].mark_down("x", 0.0)
for i in range(2000):
    d = router.decide(client_ip="1", cookie_header=b"sid=k%d" % i)
    print(d.backend.id, d.set_cookie.decode())
"""


def test_another_process_with_another_hash_seed_agrees() -> None:
    """The table and the cookie hash use no per-process salt (PYTHONHASHSEED)."""
    pool, router = make()
    victim = list(pool)[1]
    victim.mark_down("x", 0.0)
    expected = []
    for i in range(2000):
        decision = decide(router, b"sid=k%d" % i)
        assert decision.set_cookie is not None
        expected.append(f"{decision.backend.id} {decision.set_cookie.decode()}")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    argv = [sys.executable, "-c", _CHILD, ",".join(reversed(URLS)), victim.id]
    child = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=True)
    assert child.stdout.splitlines() == expected


def _set_cookie_head(value: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nset-cookie: sid=" + value + b"; path=/\r\n"


def test_a_lost_pin_finds_the_backend_that_set_the_session_cookie() -> None:
    _, router = make()
    for n in range(50):
        created = decide(router, None)
        assert created.learn  # no session cookie yet
        sid = b"session-%d" % n
        router.learn(_set_cookie_head(sid), created.backend.id)
        for lost in (b"sid=" + sid, b"lb_affinity=forged.sig; sid=" + sid):
            later = decide(router, lost)
            assert later.backend is created.backend
            assert later.set_cookie is not None  # repinned
            assert not later.learn


def test_a_session_the_table_does_not_know_falls_back_to_its_hash() -> None:
    pool, router = make()
    created = decide(router, None)
    router.learn(_set_cookie_head(b"known"), created.backend.id)
    other_pool, other = make()
    for each in (pool, other_pool):
        each.drain(created.backend.id, 0.0, sessions="move")  # the hash takes it
    assert decide(router, b"sid=known").backend.id == decide(other, b"sid=known").backend.id
    assert decide(router, b"sid=unknown").backend.id == decide(other, b"sid=unknown").backend.id


def test_the_session_table_is_bounded_oldest_out() -> None:
    pool = Pool(URLS)
    router = Router(
        pool, sticky=COOKIE, affinity=AffinityCookie(secrets=SECRETS), pins=PinTable(max_entries=3)
    )
    target = next(iter(pool))
    for n in range(4):
        router.learn(_set_cookie_head(b"s%d" % n), target.id)
    hashed = make()[1]
    assert router.pins.get(b"s0") is None
    assert len(router.pins) == 3
    assert all(decide(router, b"sid=s%d" % n).backend is target for n in (1, 2, 3))
    # s0 went out first: it is hashed again, like on a router that never saw it.
    assert decide(router, b"sid=s0").backend.id == decide(hashed, b"sid=s0").backend.id


def test_a_response_without_the_session_cookie_teaches_nothing() -> None:
    pool, router = make()
    target = next(iter(pool))
    router.learn(b"HTTP/1.1 200 OK\r\nset-cookie: other=x\r\n", target.id)
    router.learn(b"HTTP/1.1 200 OK\r\nset-cookie: sid=; Max-Age=0\r\n", target.id)
    hashed = make()[1]
    for cookie in (b"sid=x", b"other=x"):
        assert decide(router, cookie).backend.id == decide(hashed, cookie).backend.id


def test_fingerprint_is_equal_where_routing_is() -> None:
    named = [f"app{i}={url}" for i, url in enumerate(URLS)]

    def fingerprint(specs: list[str], secret: str = "s1", sticky: Sticky = COOKIE) -> str:
        pool = Pool()
        for spec in specs:
            name, sep, url = spec.partition("=")
            pool.add(url, name=name) if sep else pool.add(spec)
        return Router(pool, sticky=sticky, affinity=AffinityCookie(secrets=[secret])).fingerprint()

    base = fingerprint(URLS)
    assert fingerprint(list(reversed(URLS))) == base  # the order given does not matter
    assert fingerprint(URLS[:-1]) != base
    assert fingerprint(URLS, secret="s2") != base
    assert fingerprint(URLS, sticky=Sticky("cookie", "other")) != base
    respelled = [spec.replace("127.0.0.1", "localhost") for spec in named]
    assert fingerprint(respelled) == fingerprint(named) != base
    pool, router = make()
    before = router.fingerprint()
    next(iter(pool)).drain(0.0)  # a state change is not a change of the table's members
    assert router.fingerprint() == before
    pool.add("http://127.0.0.1:9100")
    assert router.fingerprint() != before


# -- issue 15: drains that keep sessions, strict mode, operators' orders, the pin table ----


def test_a_draining_backend_keeps_its_pinned_clients_and_takes_no_new_one() -> None:
    pool, router = make()
    draining = list(pool)[1]
    pool.drain(draining.id, 0.0)
    header = pin(draining.id) + b"; sid=kept"
    for _ in range(3):
        decision = decide(router, header)
        assert (decision.backend, decision.set_cookie, decision.reason) == (draining, None, None)
    # A lost pin of a session the table knows still finds it during the drain.
    assert decide(router, b"sid=kept").backend is draining
    # A new client never lands on it, nor does a session it does not hold.
    assert all(decide(router).backend is not draining for _ in range(300))
    assert all(decide(router, b"sid=other-%d" % n).backend is not draining for n in range(300))


def test_strict_mode_refuses_for_its_window_then_fails_over() -> None:
    now = [100.0]
    pool = Pool(URLS)
    router = Router(
        pool,
        sticky=COOKIE,
        affinity=AffinityCookie(secrets=SECRETS),
        on_pinned_down="strict",
        strict_window=30.0,
        clock=lambda: now[0],
    )
    pinned = next(iter(pool))
    header = pin(pinned.id) + b"; sid=s"
    pinned.mark_down("refused", 100.0)
    now[0] = 110.2
    with pytest.raises(PinnedBackendDown) as refused:
        decide(router, header)
    assert (refused.value.backend_id, refused.value.retry_after) == (pinned.id, 20)
    assert isinstance(refused.value, NoBackendAvailable)  # the proxy's queue waits on it
    now[0] = 129.5
    with pytest.raises(PinnedBackendDown) as refused:
        decide(router, header)
    assert refused.value.retry_after == 1
    now[0] = 130.0
    moved = decide(router, header)
    assert moved.backend is not pinned
    assert moved.reason == "down"
    # Strict is about pinned clients only: a new one is placed at once.
    assert decide(router).backend is not pinned


def test_strict_mode_refuses_a_retry_away_from_a_pinned_backend_not_yet_down() -> None:
    # The backend refused this request while its health checks still call it UP: a retry
    # elsewhere would restart the session without a word (the process test:
    # test_session_operations, strict before DOWN).
    pool = Pool(URLS)
    router = Router(
        pool,
        sticky=COOKIE,
        affinity=AffinityCookie(secrets=SECRETS),
        on_pinned_down="strict",
        strict_window=30.0,
        clock=lambda: 100.0,
    )
    pinned = next(iter(pool))
    header = pin(pinned.id) + b"; sid=s"
    with pytest.raises(PinnedBackendDown) as refused:
        decide(router, header, frozenset({pinned.id}))
    assert (refused.value.backend_id, refused.value.retry_after) == (pinned.id, 30)
    # Failover mode moves it, as before.
    _, failover = make()
    assert decide(failover, header, frozenset({pinned.id})).reason == "failed"


def test_an_operator_moves_one_session_and_forgets_another() -> None:
    pool, router = make()
    a, b, c = list(pool)[:3]
    shared: list[tuple[bytes, str]] = []
    router.pins.on_learn = lambda session, backend_id: shared.append((session, backend_id))
    decide(router, pin(a.id) + b"; sid=one")
    decide(router, pin(a.id) + b"; sid=two")
    router.move(handle(b"one"), b.id)
    moved = decide(router, pin(a.id) + b"; sid=one")  # its old pin is overruled, once
    assert (moved.backend, moved.reason) == (b, "admin")
    assert moved.set_cookie == AffinityCookie(secrets=SECRETS).set_cookie(b.id)
    assert shared == [(b"one", b.id)]  # the move reaches the shared store
    again = decide(router, pin(b.id) + b"; sid=one")
    assert (again.backend, again.reason) == (b, None)
    router.move(handle(b"two"), None)  # forget: placed anew, by load
    placed = decide(router, pin(a.id) + b"; sid=two")
    assert placed.reason == "admin"
    assert placed.set_cookie is not None
    assert router.pins.get(b"two") is not None
    with pytest.raises(LookupError):
        router.move("0" * 16, c.id)
    with pytest.raises(UnknownBackend):
        router.move(handle(b"one"), "nope")


def test_pinned_sessions_are_counted_by_when_they_were_last_seen() -> None:
    pool, router = make()
    a, b = list(pool)[:2]
    router.decide(client_ip="x", cookie_header=pin(a.id) + b"; sid=old", now=10.0)
    router.decide(client_ip="x", cookie_header=pin(a.id) + b"; sid=new", now=20.0)
    router.decide(client_ip="x", cookie_header=pin(b.id) + b"; sid=other", now=20.0)
    assert router.sessions(15.0) == {a.id: 1, b.id: 1}
    # A cached decision still marks its session seen.
    router.decide(client_ip="x", cookie_header=pin(a.id) + b"; sid=old", now=30.0)
    assert router.sessions(25.0) == {a.id: 1}
    recent = router.pins.recent(a.id, 0.0, 10)
    assert [p.session for p in recent] == [b"old", b"new"]


def test_a_remote_pin_table_is_asked_before_the_hash() -> None:
    pool, router = make()
    router.pins.remote = True
    target = list(pool)[4]
    first = decide(router, b"sid=elsewhere")
    assert first.lookup == b"elsewhere"  # the data path asks the shared store
    router.looked_up(b"elsewhere", target.id)
    found = decide(router, b"sid=elsewhere")
    assert (found.backend, found.reason, found.lookup) == (target, "lost_pin", None)
    router.looked_up(b"nowhere", None)  # the store has none: the hash, and no second ask
    hashed = decide(router, b"sid=nowhere")
    assert hashed.lookup is None
    assert hashed.backend.id == expected_hashed(pool, b"nowhere")


def test_learned_pins_are_shared_and_merely_seen_ones_are_not() -> None:
    _pool, router = make()
    shared: list[tuple[bytes, str]] = []
    router.pins.on_learn = lambda session, backend_id: shared.append((session, backend_id))
    created = decide(router)
    router.learn(_set_cookie_head(b"fresh"), created.backend.id)
    assert shared == [(b"fresh", created.backend.id)]
    decide(router, pin(created.backend.id) + b"; sid=fresh")  # seen: nothing to share
    assert len(shared) == 1
    created.backend.mark_down("refused", 1.0)
    moved = decide(router, pin(created.backend.id) + b"; sid=fresh")
    assert shared[-1] == (b"fresh", moved.backend.id)  # a re-pin is shared


def test_each_repin_decided_is_counted_once_with_its_reason() -> None:
    pool, router = make()
    counted: list[str] = []
    router.on_repin = counted.append
    a = next(iter(pool))
    for _ in range(3):  # a client that ignores its new cookie: one decision, cached
        decide(router, b"sid=lost")
    assert counted == ["lost_pin"]
    decide(router, pin(a.id) + b"; sid=x", frozenset({a.id}))  # a retry elsewhere
    a.mark_down("refused", 0.0)
    decide(router, pin(a.id) + b"; sid=y")
    assert counted == ["lost_pin", "failed", "down"]


# -- the operator's backend options: weight, backup, max-conns (issue 17) -------------------


def weighted(weights: list[int], **kwargs: object) -> tuple[Pool, Router]:
    pool, router = make(URLS[: len(weights)], **kwargs)  # type: ignore[arg-type]
    for backend, weight in zip(list(pool), weights, strict=True):
        pool.set_weight(backend.id, weight)
    return pool, router


WEIGHTS = [1, 2, 3, 4, 10]


def assert_shares(counts: Counter[str], pool: Pool, within: float) -> None:
    total = sum(counts.values())
    weight_total = sum(b.configured_weight for b in pool)
    for backend in pool:
        share = counts[backend.id] / total
        expected = backend.configured_weight / weight_total
        assert abs(share - expected) <= within * expected, (backend.id, share, expected)


def test_hashed_sessions_follow_the_weights() -> None:
    pool, router = weighted(WEIGHTS)
    counts = Counter(decide(router, b"sid=%d" % i).backend.id for i in range(20000))
    assert_shares(counts, pool, 0.05)


@pytest.mark.parametrize("epsilon", [0.0, 0.25])
def test_new_clients_follow_the_weights(epsilon: float) -> None:
    pool, router = weighted(WEIGHTS, epsilon=epsilon)
    counts: Counter[str] = Counter()
    for _ in range(20000):
        backend = decide(router).backend
        counts[backend.id] += 1
        backend.request_started()  # each stays as load: bounded load caps by weight
    assert_shares(counts, pool, 0.05 if epsilon == 0 else 0.3)


@pytest.mark.parametrize("balance", ["round-robin", "least-inflight"])
def test_none_mode_weighs(balance: Balance) -> None:
    pool, router = weighted(WEIGHTS, sticky=Sticky("none"), balance=balance)
    counts: Counter[str] = Counter()
    for _ in range(2000):
        backend = decide(router).backend
        counts[backend.id] += 1
        if balance == "least-inflight":
            backend.request_started()  # least in-flight per unit of weight
    assert_shares(counts, pool, 0.02)


def test_a_weight_change_rebuilds_the_table_and_moves_few_clients() -> None:
    # Mode ip: the table alone decides (in mode cookie the pin table would keep them).
    pool, router = weighted([1, 1, 1, 1, 1], sticky=Sticky("ip"))
    ips = [f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}" for i in range(20000)]
    before = [router.decide(ip, None).backend.id for ip in ips]
    generation = pool.generation
    heavy = pool.set_weight(next(iter(pool)).id, 2)
    assert pool.generation == generation + 1
    after = [router.decide(ip, None).backend.id for ip in ips]
    moved = sum(1 for a, b in zip(before, after, strict=True) if a != b) / 20000
    ideal = 2 / 6 - 1 / 5  # the heavier one's share grows from 1/5 to 2/6
    assert ideal * 0.9 <= moved <= ideal * 1.3
    # Nearly every key that moves moves to the heavier one (Maglev's few collateral moves).
    changed = [b for a, b in zip(before, after, strict=True) if a != b]
    assert changed.count(heavy.id) >= 0.9 * len(changed)
    with pytest.raises(ValueError, match="from 1 to 256"):
        pool.set_weight(heavy.id, 0)


def test_the_fingerprint_covers_weights_and_backups() -> None:
    pool, router = make()
    plain = router.fingerprint()
    first = next(iter(pool)).id
    pool.set_weight(first, 3)
    weighed = router.fingerprint()
    assert weighed != plain
    pool.set_weight(first, 1)
    assert router.fingerprint() == plain  # defaults leave the fingerprint as it was
    backup_pool = Pool(URLS[:-1])
    backup_pool.add(URLS[-1], backup=True)
    _, other = make()
    assert (
        Router(backup_pool, sticky=Sticky("ip")).fingerprint()
        != Router(Pool(URLS), sticky=Sticky("ip")).fingerprint()
    )
    assert other.fingerprint() == plain


def backup_pool(sticky: Sticky = COOKIE) -> tuple[Pool, Router]:
    pool, router = make(URLS[:2], sticky=sticky)
    pool.add(URLS[2], name="spare", backup=True)
    pool.add(URLS[3], name="spare2", backup=True)
    return pool, router


@pytest.mark.parametrize("sticky", [COOKIE, Sticky("ip"), Sticky("none")])
def test_a_backup_takes_traffic_only_when_no_primary_is_up(sticky: Sticky) -> None:
    pool, router = backup_pool(sticky)
    primaries = [b for b in pool if not b.backup]
    phase = iter(range(4))

    def seen() -> set[str]:
        # New sessions each time (in mode cookie the pin table keeps the ones it knows).
        n = next(phase)
        return {
            router.decide(f"10.0.{n}.{i}", b"sid=%d-%d" % (n, i)).backend.id for i in range(200)
        }

    assert seen() == {b.id for b in primaries}
    primaries[0].mark_down("test", 0.0)
    assert seen() == {primaries[1].id}  # one primary up: the backups still wait
    primaries[1].drain(0.0)
    assert seen() == {"spare", "spare2"}  # every backup, not the first only
    primaries[0].mark_up(1.0)
    assert seen() == {primaries[0].id}


def test_a_client_pinned_to_a_backup_keeps_it_once_a_primary_is_back() -> None:
    pool, router = backup_pool()
    for backend in list(pool)[:2]:
        backend.mark_down("test", 0.0)
    placed = decide(router)
    assert placed.backend.backup
    assert placed.set_cookie is not None
    cookie = placed.set_cookie.split(b";")[0] + b"; sid=s1"
    pool[URLS_ID0 := next(iter(pool)).id].mark_up(1.0)
    kept = decide(router, cookie)
    assert kept.backend is placed.backend  # HAProxy: a persistence cookie is honoured
    assert kept.reason is None
    assert decide(router).backend.id == URLS_ID0  # new clients go to the primary
    pool.drain(placed.backend.id, 2.0, sessions="move")  # how an operator moves them
    moved = decide(router, cookie)
    assert moved.backend.id == URLS_ID0
    assert moved.reason == "drain"


@pytest.mark.parametrize("balance", ["round-robin", "least-inflight"])
def test_none_mode_passes_over_a_backend_at_its_max_conns(balance: Balance) -> None:
    pool, router = make(URLS[:1], sticky=Sticky("none"), balance=balance)
    capped = pool.add(URLS[1], max_conns=1)
    capped.request_started()
    assert all(decide(router).backend is not capped for _ in range(20))
    only = next(iter(pool))
    only.mark_down("test", 0.0)
    with pytest.raises(NoBackendAvailable, match="max-conns"):
        decide(router)  # the data path queues it
    capped.request_finished(failed=False, now=0.0)
    assert decide(router).backend is capped


def test_a_new_client_is_placed_past_a_full_backend_and_a_pinned_one_is_not() -> None:
    pool, router = make(URLS[:1], epsilon=0.0)
    capped = pool.add(URLS[1], max_conns=2)
    cookie = pin(capped.id) + b"; sid=x"
    capped.request_started()
    capped.request_started()
    assert capped.full
    assert all(decide(router).backend is not capped for _ in range(50))
    # Pinned: its session is there; the router keeps it, the data path makes it wait.
    assert decide(router, cookie).backend is capped
    assert decide(router, cookie).reason is None
