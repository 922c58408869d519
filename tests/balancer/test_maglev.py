from __future__ import annotations

from collections import Counter

import pytest

from balancer.datapath._maglev import TableCache, build_table, is_prime, key_hash, walk

NAMES = [f"backend-{i:02d}" for i in range(10)]


@pytest.mark.parametrize(
    ("n", "prime"), [(0, False), (1, False), (2, True), (9, False), (251, True), (65537, True)]
)
def test_is_prime(n: int, prime: bool) -> None:
    assert is_prime(n) is prime


def test_table_is_deterministic_and_even() -> None:
    table = build_table(NAMES, 65537)
    assert table == build_table(list(NAMES), 65537)
    shares = Counter(table)
    assert set(shares) == set(range(10))
    assert max(shares.values()) / (65537 / 10) < 1.01


def test_removing_a_name_moves_little() -> None:
    table = build_table(NAMES, 65537)
    smaller = build_table(NAMES[:-1], 65537)
    moved = sum(1 for a, b in zip(table, smaller, strict=True) if a != b) / 65537
    # Ideal: only the removed backend's tenth moves.
    assert 0.1 <= moved < 0.11


@pytest.mark.parametrize(
    "weights",
    [
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 5],
        [256, 1, 1, 1, 1, 1, 1, 1, 1, 1],
        [3, 1] * 5,
    ],
)
def test_a_weighted_table_shares_the_slots_by_weight(weights: list[int]) -> None:
    table = build_table(NAMES, 65537, weights)
    shares = Counter(table)
    total = sum(weights)
    for i, weight in enumerate(weights):
        expected = 65537 * weight / total
        # Within 3% of the weight's share (or 3 slots, for a share of a few dozen).
        assert abs(shares[i] - expected) <= max(0.03 * expected, 3), (i, shares[i], expected)
    assert build_table(NAMES, 65537, tuple(weights)) == table  # deterministic


def test_equal_weights_build_the_unweighted_table() -> None:
    assert build_table(NAMES, 65537, [4] * 10) == build_table(NAMES, 65537)


@pytest.mark.parametrize(("changed", "weight"), [(0, 2), (9, 3), (4, 3), (3, 1)])
def test_changing_one_weight_moves_little_more_than_the_share_that_changes(
    changed: int, weight: int
) -> None:
    before = [1, 2] * 5
    after = list(before)
    after[changed] = weight
    a = build_table(NAMES, 65537, before)
    b = build_table(NAMES, 65537, after)
    moved = sum(1 for x, y in zip(a, b, strict=True) if x != y) / 65537
    # The ideal: only the changed backend's gain or loss of share moves.
    ideal = abs(after[changed] / sum(after) - before[changed] / sum(before))
    assert ideal * 0.99 <= moved <= ideal * 1.3, (moved, ideal)
    # Keys whose slot did not change hands between two backends other than the changed
    # one: a weight change on one backend never trades slots among the others wholesale.
    between_others = sum(1 for x, y in zip(a, b, strict=True) if x != y and changed not in (x, y))
    assert between_others / 65537 < ideal * 0.3


@pytest.mark.parametrize(
    ("names", "size", "weights", "error"),
    [
        (["a"], 100, None, "must be a prime"),
        (["a", "a"], 7, None, "distinct"),
        (["a", "b"], 7, [1], "2 names"),
        (["a", "b"], 7, [1, 0], ">= 1"),
    ],
)
def test_bad_input(names: list[str], size: int, weights: list[int] | None, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        build_table(names, size, weights)


def test_empty_and_single() -> None:
    assert build_table([], 7) == []
    assert build_table(["only"], 7) == [0] * 7


def test_key_hash_is_stable() -> None:
    # A constant: the same in every process and on every machine (CRC-32).
    assert key_hash(b"session-1") == 0x23C0BE2E
    assert key_hash(b"a") == 0xE8B7BE43


def test_the_table_cache_builds_each_set_once_and_forgets_the_least_recently_used() -> None:
    cache = TableCache(251, kept=2)
    a, b, c = ("x", "y"), ("x",), ("y",)
    first = cache.get(a)
    assert first == build_table(a, 251)
    assert cache.get(a) is first  # kept: not built again
    cache.get(b)
    cache.get(a)  # used again: now b is the least recent
    cache.get(c)  # one over `kept`: b goes
    assert len(cache) == 2
    assert cache.get(a) is first
    assert cache.get(b) == build_table(b, 251)
    with pytest.raises(ValueError, match="table_size must be a prime, not 250"):
        TableCache(250)
    weighted = cache.get(a, (1, 2))  # the same names weighed otherwise: another table
    assert weighted == build_table(a, 251, (1, 2)) != first
    assert cache.get(a, (1, 2)) is weighted


@pytest.mark.parametrize(
    "excluded", [(), ("backend-03",), ("backend-00", "backend-05", "backend-09")]
)
def test_walk_moves_forward_past_the_excluded_names(excluded: tuple[str, ...]) -> None:
    table = build_table(NAMES, 251)
    exclude = frozenset(excluded)
    for h in range(0, 2**32, 2**32 // 997):
        slot = h % 251
        while NAMES[table[slot]] in exclude:  # the rule, spelled out slot by slot
            slot = (slot + 1) % 251
        assert walk(table, NAMES, h, exclude) == table[slot]


def test_walk_finds_nothing_when_every_name_is_excluded_or_none_is_left() -> None:
    assert walk(build_table(NAMES, 251), NAMES, 7, frozenset(NAMES)) == -1
    assert walk([], [], 7, frozenset()) == -1
