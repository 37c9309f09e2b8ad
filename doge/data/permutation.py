"""A keyed pseudo-random permutation of 0..n-1 that is evaluated per index, in O(1) memory.

A 6-round Feistel network on the smallest even bit width covering n, with cycle walking to stay
inside [0, n). Shuffling a 50M-row epoch this way needs no 400 MB index array and no state: the
position of any sample is computed from (key, index) alone, which is what lets training resume
from a sample count on any number of ranks.
"""
import hashlib

import numpy as np

ROUNDS = 6
_M1, _M2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def round_keys(*parts) -> np.ndarray:
    """ROUNDS 64-bit keys derived from any printable parts (seed, source id, epoch)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    digest += hashlib.sha256(digest).digest()
    return np.frombuffer(digest[: 8 * ROUNDS], dtype=np.uint64).copy()


def permute(index: np.ndarray, n: int, keys: np.ndarray) -> np.ndarray:
    """Images of `index` (values in [0, n)) under the permutation selected by `keys`."""
    index = np.asarray(index, dtype=np.uint64)
    if n <= 1:
        return np.zeros_like(index)
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    out = _feistel(index, half, keys)
    outside = out >= np.uint64(n)
    while outside.any():  # cycle walking: at most a few steps since 4**half < 4n
        out[outside] = _feistel(out[outside], half, keys)
        outside = out >= np.uint64(n)
    return out


def _feistel(x: np.ndarray, half: int, keys: np.ndarray) -> np.ndarray:
    shift, mask = np.uint64(half), np.uint64((1 << half) - 1)
    left, right = x >> shift, x & mask
    for key in keys:
        left, right = right, left ^ (_mix(right ^ key) & mask)
    return (left << shift) | right


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: every input bit affects every output bit."""
    with np.errstate(over="ignore"):
        z = z + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))
