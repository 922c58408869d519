"""Maglev consistent hashing (Eisenbud et al., NSDI 2016), deterministic across processes.

Chosen over a ring and rendezvous hashing for its balance at the cost of one lookup
(docs/architecture.md, "Measured facts"; benchmarks/hashing.py). Every process that builds a
table from the same names and size gets the same table: the names are sorted first, and the
permutations come from sha256, never from Python's per-process salted `hash()`.

Weights (`--backend URL weight=N`) follow Envoy's weighted Maglev (source/common/upstream/
maglev_lb.cc): in round r a backend of weight w takes its next slot only when r x w has
reached its target, which then grows by the largest weight; so the heaviest takes a slot
every round, one of a third its weight every third round, and each one's share of the
slots is its share of the total weight. A backend still fills its slots from its own
permutation, so a change of one weight moves only the keys of the slots that change hands
(about |delta share| of them), as a backend joining or leaving does. Equal weights build
the unweighted table exactly (every backend takes a slot every round).
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Sequence

__all__ = ["DEFAULT_TABLE_SIZE", "TableCache", "build_table", "is_prime", "key_hash", "walk"]

# A prime well above 100 x the number of backends, as the paper advises (section 3.4):
# a bigger table makes the shares more even and costs only memory.
DEFAULT_TABLE_SIZE = 65537
# Tables kept for recent sets of names, so a flapping backend (or an ejection ending) does
# not cost a rebuild each time.
TABLES_KEPT = 8


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    d = 3
    while d * d <= n:
        if n % d == 0:
            return False
        d += 2
    return True


def key_hash(key: bytes) -> int:
    """A stable 32-bit hash of a routing key (session cookie, client IP, backend id).

    CRC-32 is C-fast (~0.1 us) and the same in every process; a client can only steer
    its own requests with a crafted key, so a keyed hash would buy nothing here.
    """
    return zlib.crc32(key)


def build_table(
    names: Sequence[str], size: int = DEFAULT_TABLE_SIZE, weights: Sequence[int] | None = None
) -> list[int]:
    """The Maglev lookup table: `size` entries, each an index into `names`.

    `names` must be distinct and already in a canonical order (the router sorts the ids),
    since the table depends on the order. `size` must be a prime (so that every skip is
    coprime with it and each permutation visits every slot). `weights`, one integer >= 1
    per name (None: all equal), share the slots in proportion (module docstring). Raises
    ValueError otherwise. Cost: about M ln(M) steps for M = size; ~0.1 s for 65537 in
    CPython; with weights, a round more per max(weights) / sum(weights) of M.
    """
    if not is_prime(size):
        raise ValueError(f"Maglev table size must be a prime, got {size}")
    if len(set(names)) != len(names):
        raise ValueError("Maglev names must be distinct")
    n = len(names)
    if weights is not None:
        if len(weights) != n:
            raise ValueError(f"Maglev weights: {len(weights)} for {n} names")
        if any(w < 1 for w in weights):
            raise ValueError(f"Maglev weights must be integers >= 1, not {list(weights)!r}")
    if n == 0:
        return []
    positions: list[int] = []
    skips: list[int] = []
    for name in names:
        digest = hashlib.sha256(name.encode()).digest()
        positions.append(int.from_bytes(digest[:8], "big") % size)
        skips.append(int.from_bytes(digest[8:16], "big") % (size - 1) + 1)
    # Equal weights (or none): every backend takes a slot each round, the paper's Populate,
    # so the table is the unweighted one exactly.
    shares = [1] * n if weights is None else list(weights)
    most = max(shares)
    targets = [0] * n
    entry = [-1] * size
    filled = 0
    rounds = 0
    # Each backend in turn takes the next free slot of its own permutation (position,
    # position + skip, ... mod size), in round r only once r x its weight has reached its
    # target, which then grows by the largest weight (Envoy's weighted Maglev, in integers
    # so every process agrees).
    while True:
        rounds += 1
        for i in range(n):
            if rounds * shares[i] < targets[i]:
                continue
            targets[i] += most
            c = positions[i]
            skip = skips[i]
            while entry[c] >= 0:
                c += skip
                if c >= size:
                    c -= size
            entry[c] = i
            c += skip
            positions[i] = c - size if c >= size else c
            filled += 1
            if filled == size:
                return entry


class TableCache:
    """The Maglev tables of the last `kept` sets of names (one `size`), the least recently
    used forgotten first. The router's and the client transport's one cache."""

    def __init__(self, size: int = DEFAULT_TABLE_SIZE, kept: int = TABLES_KEPT) -> None:
        if not is_prime(size):
            raise ValueError(f"table_size must be a prime, not {size!r}")
        self.size = size
        self._kept = kept
        self._tables: dict[tuple[tuple[str, ...], tuple[int, ...] | None], list[int]] = {}

    def __len__(self) -> int:
        return len(self._tables)

    def get(self, names: tuple[str, ...], weights: tuple[int, ...] | None = None) -> list[int]:
        """`build_table(names, size, weights)`, built at most once while it stays among the
        kept. Pass None rather than equal weights: the same table, one entry."""
        tables = self._tables
        key = (names, weights)
        table = tables.pop(key, None)
        if table is None:
            table = build_table(names, self.size, weights)
            if len(tables) >= self._kept:
                del tables[next(iter(tables))]
        tables[key] = table  # the most recently used last
        return table


def walk(table: list[int], names: Sequence[str], h: int, exclude: frozenset[str]) -> int:
    """The index into `names` that `table` (`build_table(names)`) gives hash `h`, moving
    forward slot by slot past names in `exclude` (a retry's next choice, the same in every
    process); -1 when the table is empty or every name is excluded."""
    size = len(table)
    if size == 0:
        return -1
    slot = h % size
    index = table[slot]
    if not exclude or names[index] not in exclude:
        return index
    if all(name in exclude for name in names):
        return -1
    while names[index] in exclude:
        slot = slot + 1 if slot + 1 < size else 0
        index = table[slot]
    return index
