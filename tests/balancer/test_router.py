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
    Pool,
    Router,
    Sticky,
)
from balancer.datapath._maglev import key_hash

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
        assert decision == Decision(backend, None, False)
        assert decide(router, pin(backend.id) + b"; sid=other") is decision  # shared
        # No session cookie yet: the same backend, and its answer is learned from.
        assert decide(router, pin(backend.id)) == Decision(backend, None, False, True)


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
    with_session = decide(router, affinity + b"; sid=session-42")
    assert with_session.repinned is False
    assert with_session.backend.id == expected_hashed(pool, b"session-42")
    assert with_session.set_cookie == AffinityCookie(secrets=SECRETS).set_cookie(
        with_session.backend.id
    )
    without = decide(router, affinity)
    assert without.repinned is False
    assert without.set_cookie is not None


def test_tampered_pin_for_a_real_backend_is_no_pin() -> None:
    pool, router = make()
    target = list(pool)[3]
    value = AffinityCookie(secrets=SECRETS).sign(target.id)
    tampered = b"lb_affinity=" + value[:-2] + (b"AA" if value[-2:] != b"AA" else b"BB")
    decision = decide(router, tampered + b"; sid=k")
    assert decision.set_cookie is not None  # a fresh pin, because the old one was not valid
    assert decision.backend.id == expected_hashed(pool, b"k")


@pytest.mark.parametrize("how", ["down", "draining", "excluded", "ejected"])
def test_failover_of_a_pinned_client(how: str) -> None:
    pool, router = make(policy=BackendPolicy(eject_after=1))
    pinned = list(pool)[2]
    exclude: frozenset[str] = frozenset()
    if how == "down":
        pinned.mark_down("refused", 0.0)
    elif how == "draining":
        pool.drain(pinned.id)
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
        assert decision.repinned is True
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
    pool.drain(drained.id)
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
        assert decide(router, valid) == Decision(target, None, False)
    for tampered in (
        b"lb_affinity=" + value[:-2] + (b"AA" if value[-2:] != b"AA" else b"BB") + b"; sid=k",
        b"lb_affinity=" + value + b"x; sid=k",
        b"lb_affinity=" + value[:-1] + b"; sid=k",
    ):
        for _ in range(2):
            decision = decide(router, tampered)
            assert decision.set_cookie is not None  # no pin: a fresh one is issued
            assert decision.backend.id == expected_hashed(pool, b"k")
    assert decide(router, valid) == Decision(target, None, False)


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
    assert decide(router, header) == Decision(pinned, None, False)
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
        each.drain(created.backend.id)  # the creator cannot take it: the hash does
    assert decide(router, b"sid=known").backend.id == decide(other, b"sid=known").backend.id
    assert decide(router, b"sid=unknown").backend.id == decide(other, b"sid=unknown").backend.id


def test_the_session_table_is_bounded_oldest_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("balancer.datapath._router._SESSIONS_MAX", 3)
    pool, router = make()
    target = next(iter(pool))
    for n in range(4):
        router.learn(_set_cookie_head(b"s%d" % n), target.id)
    hashed = make()[1]
    # s0 went out first: it is hashed again, like on a router that never saw it.
    assert decide(router, b"sid=s0").backend.id == decide(hashed, b"sid=s0").backend.id
    assert all(decide(router, b"sid=s%d" % n).backend is target for n in (1, 2, 3))


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
    next(iter(pool)).drain()  # a state change is not a change of the table's members
    assert router.fingerprint() == before
    pool.add("http://127.0.0.1:9100")
    assert router.fingerprint() != before
