"""How well the router's Maglev hashing spreads and keeps sessions; a script, not a test.

    .venv/bin/python benchmarks/hashing.py [--sessions 100000] [--backends 10]

Prints the share of sessions that move when one backend leaves and when one joins (ideal
1/n and 1/(n+1), target within 1.1x), the max/mean load with and without bounded load
(target <= 1.05 with it), and the cost of a lookup and of a whole `Router.decide`.
With weights (`--backend "URL weight=N"`, weighted Maglev): each backend's share of the
sessions against its weight's share (target within 3%), and the sessions that move when one
weight changes against the share that changes hands (target within 1.1x).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from balancer import DEFAULT_TABLE_SIZE, AffinityCookie, Pool, Router, Sticky
from balancer.datapath._maglev import build_table, key_hash


def urls(n: int) -> list[str]:
    return [f"http://10.0.0.{i + 1}:8000" for i in range(n)]


def router(pool: Pool, epsilon: float = 0.25, seed: int = 1) -> Router:
    return Router(
        pool,
        sticky=Sticky("cookie", "sid"),
        affinity=AffinityCookie(secrets=["bench"]),
        hash_balance_factor=epsilon,
        rng=random.Random(seed),
    )


def placements(r: Router, cookies: list[bytes]) -> list[str]:
    return [r.decide(client_ip="10.9.9.9", cookie_header=c).backend.id for c in cookies]


def moved(before: list[str], after: list[str]) -> float:
    return sum(1 for a, b in zip(before, after, strict=True) if a != b) / len(before)


def max_over_mean(ids: list[str] | Counter[str], n: int) -> float:
    counts = ids if isinstance(ids, Counter) else Counter(ids)
    total = sum(counts.values())
    return max(counts.values()) / (total / n)


def per_call_ns(fn: Callable[[], object], number: int = 200_000) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number * 1e9


def ip_router(pool: Pool) -> Router:
    return Router(pool, sticky=Sticky("ip"))


def weighted_section(n: int, cookies: list[bytes]) -> None:
    """Shares and moves with weights 1, 2, 3, 1, 2, 3, ...; the table alone decides (mode
    ip, one client address per session), as the pin table would keep known sessions."""
    weights = [i % 3 + 1 for i in range(n)]
    start = time.perf_counter()
    build_table([f"{i:012x}" for i in range(n)], weights=weights)
    print(f"\nweighted table build (weights {weights[:3]}...): ", end="")
    print(f"{(time.perf_counter() - start) * 1e3:.0f} ms")
    pool = Pool()
    for url, weight in zip(urls(n), weights, strict=True):
        pool.add(url, weight=weight)
    ips = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(len(cookies))]
    r = ip_router(pool)
    base = [r.decide(ip, None).backend.id for ip in ips]
    counts = Counter(base)
    total = sum(weights)
    worst = max(
        abs(counts[b.id] / len(ips) - b.configured_weight / total) / (b.configured_weight / total)
        for b in pool
    )
    ok = "ok" if worst <= 0.03 else "MISSED"
    print(f"{'share against weight, worst':<34}{worst:>10.4f}{'':>10}{'':>8}  <= 0.03 {ok}")
    print(f"{'sessions that move':<34}{'measured':>10}{'ideal':>10}{'ratio':>8}  target")
    first = next(iter(pool))
    for new in (first.configured_weight * 2, 3 if first.configured_weight != 3 else 2):
        old = first.configured_weight
        pool.set_weight(first.id, new)
        after = [r.decide(ip, None).backend.id for ip in ips]
        pool.set_weight(first.id, old)
        value = moved(base, after)
        ideal = abs(new / (total - old + new) - old / total)
        ok = "ok" if value / ideal <= 1.1 else "MISSED"
        label = f"one weight {old} -> {new}"
        print(f"{label:<34}{value:>10.4f}{ideal:>10.4f}{value / ideal:>8.3f}  <= 1.1 {ok}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--backends", type=int, default=10)
    args = parser.parse_args()
    n, sessions = args.backends, args.sessions
    rng = random.Random(42)
    keys = [b"%032x" % rng.getrandbits(128) for _ in range(sessions)]
    cookies = [b"sid=" + k for k in keys]

    print(f"Maglev, table size {DEFAULT_TABLE_SIZE}, {n} backends, {sessions:,} sessions\n")
    start = time.perf_counter()
    build_table([f"{i:012x}" for i in range(n)])
    print(f"table build: {(time.perf_counter() - start) * 1e3:.0f} ms\n")

    pool = Pool(urls(n))
    base = placements(router(pool), cookies)
    leaver = next(iter(pool))
    leaver.mark_down("benchmark", 0.0)
    leave = moved(base, placements(router(pool), cookies))
    leaver.mark_up(0.0)
    pool.add(f"http://10.0.0.{n + 1}:8000")
    join = moved(base, placements(router(pool), cookies))

    print(f"{'sessions that move':<34}{'measured':>10}{'ideal':>10}{'ratio':>8}  target")
    for label, value, ideal in [
        ("one backend leaves", leave, 1 / n),
        ("one backend joins", join, 1 / (n + 1)),
    ]:
        ok = "ok" if value / ideal <= 1.1 else "MISSED"
        print(f"{label:<34}{value:>10.4f}{ideal:>10.4f}{value / ideal:>8.3f}  <= 1.1 {ok}")

    print(f"\n{'max/mean load':<34}{'measured':>10}  target")
    hashed = max_over_mean(base, n)
    print(f"{'session cookie hash (no bound)':<34}{hashed:>10.4f}")
    for epsilon in (0.0, 0.25, 0.05):
        bounded_pool = Pool(urls(n))
        r = router(bounded_pool, epsilon=epsilon)
        for _ in range(sessions):  # new clients; each session stays as load
            r.decide(client_ip="10.9.9.9", cookie_header=None).backend.request_started()
        load = Counter({b.id: b.in_flight for b in bounded_pool})
        label = f"new clients, epsilon {epsilon}" + (" (off)" if epsilon == 0 else "")
        target = (
            ""
            if epsilon == 0
            else ("  <= 1.05 " + ("ok" if max_over_mean(load, n) <= 1.05 else "MISSED"))
        )
        print(f"{label:<34}{max_over_mean(load, n):>10.4f}{target}")

    weighted_section(n, cookies)

    table = build_table([f"{i:012x}" for i in range(n)])
    size = DEFAULT_TABLE_SIZE
    key = keys[0]
    r = router(Pool(urls(n)))
    pinned = r.decide(client_ip="1", cookie_header=None).set_cookie or b""
    pin_cookie = pinned.split(b";")[0] + b"; sid=" + key
    ip_router = Router(Pool(urls(n)), sticky=Sticky("ip"))
    print(f"\n{'cost per call':<34}{'ns':>10}")
    for label, fn in [
        ("table lookup (hash + index)", lambda: table[key_hash(key) % size]),
        ("decide, valid pin", lambda: r.decide(client_ip="1", cookie_header=pin_cookie)),
        (
            "decide, session cookie, no pin",
            lambda: r.decide(client_ip="1", cookie_header=cookies[0]),
        ),
        ("decide, ip", lambda: ip_router.decide(client_ip="10.1.2.3", cookie_header=None)),
    ]:
        print(f"{label:<34}{per_call_ns(fn):>10.0f}")


if __name__ == "__main__":
    main()
