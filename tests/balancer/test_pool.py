from __future__ import annotations

import pytest

from balancer import (
    Backend,
    BackendExists,
    BackendPolicy,
    BackendState,
    Pool,
    UnknownBackend,
)

URLS = ["http://127.0.0.1:9001", "http://127.0.0.1:9002", "http://127.0.0.1:9003"]


def test_repr_counts_states() -> None:
    pool = Pool(URLS)
    assert repr(pool) == "<Pool [up: 3, draining: 0, drained: 0, down: 0]>"
    a, b, _ = list(pool)
    pool.drain(a.id, 0.0)
    b.mark_down("refused", 0.0)
    assert repr(pool) == "<Pool [up: 1, draining: 1, drained: 0, down: 1]>"


def test_add_remove_get() -> None:
    pool = Pool()
    backend = pool.add(URLS[0])
    assert backend.id in pool
    assert pool[backend.id] is backend
    assert pool.get(backend.id) is backend
    assert pool.find(URLS[0] + "/") is backend
    assert len(pool) == 1
    with pytest.raises(BackendExists, match="already in the pool"):
        pool.add(URLS[0] + "/")
    assert pool.remove(backend.id) is backend
    assert backend.id not in pool
    assert pool.get(backend.id) is None
    with pytest.raises(UnknownBackend) as info:
        pool.remove(backend.id)
    assert str(info.value) == f"no backend with id {backend.id!r}"
    with pytest.raises(UnknownBackend):
        pool.drain("nope", 0.0)


def test_bad_url_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="'ftp://x': only http://"):
        Pool(["ftp://x"])


# Each row: an operation, and whether it changes the generation: membership or any state
# (a decision that keeps a client on a DRAINING backend must not outlive the drain).
OPS: list[tuple[str, bool]] = [
    ("drain", True),
    ("mark_down", True),
    ("drain_then_mark_down", True),  # UP -> DRAINING, and DRAINING -> DOWN, each count
    ("request", False),
    ("add", True),
    ("remove", True),
]


@pytest.mark.parametrize(("op", "changes"), OPS)
def test_generation_changes_with_membership_and_state(op: str, changes: bool) -> None:
    pool = Pool(URLS)
    backend = next(iter(pool))
    before = pool.generation
    if op == "drain":
        pool.drain(backend.id, 0.0)
    elif op == "mark_down":
        backend.mark_down("x", 0.0)
    elif op == "drain_then_mark_down":
        pool.drain(backend.id, 0.0)
        after_drain = pool.generation
        backend.mark_down("x", 0.0)
        assert pool.generation == after_drain + 1
    elif op == "request":
        backend.request_started()
        backend.request_finished(failed=False, now=0.0)
    elif op == "add":
        pool.add("http://127.0.0.1:9004")
    elif op == "remove":
        pool.remove(backend.id)
    assert (pool.generation != before) is changes


def test_selectable_is_up_only_sorted_by_id_and_cached() -> None:
    pool = Pool(URLS)
    first = pool.selectable()
    assert [b.id for b in first] == sorted(b.id for b in pool)
    assert pool.selectable() is first
    down = first[0]
    down.mark_down("x", 0.0)
    assert pool.selectable() == first[1:]


def test_on_change_listener_and_release() -> None:
    seen: list[tuple[str, BackendState, BackendState]] = []
    pool = Pool(URLS, on_change=lambda b, old: seen.append((b.id, old, b.state)))
    backend = next(iter(pool))
    backend.request_started()
    backend.request_finished(failed=True, now=0.0)
    for _ in range(4):
        backend.request_started()
        backend.request_finished(failed=True, now=0.0)
    assert backend.state is BackendState.DOWN
    assert pool.release(10.0) == []
    assert pool.release(30.0) == [backend]
    assert seen == [
        (backend.id, BackendState.UP, BackendState.DOWN),
        (backend.id, BackendState.DOWN, BackendState.UP),
    ]


def test_removed_backend_no_longer_reports() -> None:
    seen: list[Backend] = []
    pool = Pool(URLS, on_change=lambda b, old: seen.append(b))
    backend = pool.remove(next(iter(pool)).id)
    backend.drain(0.0)
    assert seen == []


@pytest.mark.parametrize(
    ("backends", "percent", "ejectable"),
    [(2, 50.0, 1), (3, 50.0, 1), (4, 50.0, 2), (10, 50.0, 5), (10, 10.0, 1), (3, 0.0, 1),
     (3, 100.0, 3)],
)  # fmt: skip
def test_passive_ejection_stops_at_max_ejection_percent(
    backends: int, percent: float, ejectable: int
) -> None:
    policy = BackendPolicy(eject_after=1, max_ejection_percent=percent)
    pool = Pool([f"http://127.0.0.1:{9001 + i}" for i in range(backends)], policy=policy)
    for backend in pool:
        backend.request_started()
        backend.request_finished(failed=True, now=0.0)
    down = [b for b in pool if b.state is BackendState.DOWN]
    assert len(down) == ejectable
    if ejectable == backends:
        return
    # Once the ejected come back, a spared failing backend may take their place.
    pool.release(30.0)
    spared = next(b for b in pool if b.state is BackendState.UP and b not in down)
    spared.request_started()
    spared.request_finished(failed=True, now=31.0)
    assert spared.state is BackendState.DOWN


def test_backups_are_selectable_only_when_no_primary_is_up() -> None:
    pool = Pool(URLS[:1])
    backup = pool.add(URLS[1], backup=True, weight=3)
    (primary,) = [b for b in pool if not b.backup]
    assert pool.selectable() == (primary,)
    primary.drain(0.0)
    assert pool.selectable() == (backup,)
    primary.enable()
    assert pool.selectable() == (primary,)


def test_capped_says_whether_some_backend_has_max_conns() -> None:
    pool = Pool(URLS[:1])
    assert not pool.capped
    capped = pool.add(URLS[1], max_conns=2)
    assert pool.capped
    assert not capped.full
    capped.request_started()
    capped.request_started()
    assert capped.full
    pool.remove(capped.id)
    assert not pool.capped
    with pytest.raises(ValueError, match="max-conns must be an integer >= 0"):
        pool.add(URLS[2], max_conns=-1)
    with pytest.raises(UnknownBackend):
        pool.set_weight("nope", 2)
