"""A seeded permutation of 0..n-1 that any process evaluates for its own positions in O(1) each.

Why: the batch plan orders an epoch's samples by a seeded permutation. numpy's shuffle needs
the whole n-long array in one process; at 500 M rows that is gigabytes in the driver. This is a
Feistel network (a bijection on [0, 4^h) for h half-bits) with cycle walking down to [0, n):
`to_slot` maps corpus positions to their slot in the epoch's order, `to_position` maps slots
back, both vectorised and exact, so a read task computes its own rows' slots and a rank its own
step's positions, and nothing ever holds the whole permutation.

Determinism: the round keys come from numpy's default_rng seeded by (seed, epoch); the arithmetic
is uint64 with wrap-around, the same on every platform.
"""

from __future__ import annotations

import numpy as np

ROUNDS = 6
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _keys(seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).bit_generator.random_raw(ROUNDS).astype(np.uint64)


def _half_bits(n: int) -> int:
    return max(1, (max(1, int(n - 1).bit_length()) + 1) // 2)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit reaches every output bit."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def _feistel(x: np.ndarray, keys: np.ndarray, h: int, inverse: bool) -> np.ndarray:
    mask, shift = np.uint64((1 << h) - 1), np.uint64(h)
    left, right = x >> shift, x & mask
    if not inverse:
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
    else:
        for k in keys[::-1]:
            left, right = right ^ (_mix(left ^ k) & mask), left
    return (left << shift) | right


def _walk(values: np.ndarray, n: int, seed: int, epoch: int, inverse: bool) -> np.ndarray:
    """The Feistel bijection applied until each value lands in [0, n) (cycle walking keeps it a
    bijection on [0, n): at most 4 rounds are expected, as 4^h < 4n)."""
    x = np.asarray(values, dtype=np.int64)
    if x.size and (x.min() < 0 or x.max() >= n):
        raise ValueError(f"values must lie in [0, {n})")
    keys, h = _keys(seed, epoch), _half_bits(n)
    out = _feistel(x.astype(np.uint64), keys, h, inverse)
    todo = np.flatnonzero(out >= np.uint64(n))
    while todo.size:
        out[todo] = _feistel(out[todo], keys, h, inverse)
        todo = todo[out[todo] >= np.uint64(n)]
    return out.astype(np.int64)


def to_slot(positions: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """Where each corpus position 0..n-1 comes in the seeded order of `epoch`."""
    return _walk(positions, n, seed, epoch, inverse=False)


def to_position(slots: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """The corpus position at each slot of the seeded order of `epoch` (inverse of to_slot)."""
    return _walk(slots, n, seed, epoch, inverse=True)
