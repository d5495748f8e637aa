"""MinHash signatures of conversations (near-duplicate filtering), vectorised in numpy."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Everything is uint64 arithmetic that wraps on purpose: polynomial word hashes from prefix sums,
# and one-permutation hashing for the signature (no per-word Python loop, one hash per shingle).
_P = np.uint64(0x100000001B3)  # odd, so it has an inverse mod 2**64
_P_INV = np.uint64(pow(int(_P), -1, 1 << 64))
_MIX = np.uint64(0x9E3779B97F4A7C15)


_pow_tables: dict[str, np.ndarray] = {}


def _powers(base: np.uint64, n: int) -> np.ndarray:
    """base**0 .. base**(n-1) mod 2**64, from a table grown on demand (shared by all calls)."""
    key = str(int(base))
    table = _pow_tables.get(key)
    if table is None or len(table) < n:
        size = max(n, 1 << 15)
        table = np.full(size, base, dtype=np.uint64)
        table[0] = 1
        with np.errstate(over="ignore"):
            table = np.cumprod(table, dtype=np.uint64)
        _pow_tables[key] = table
    return table[:n]


def word_hashes(text: str) -> np.ndarray:
    """A 64-bit hash of every whitespace-separated word of `text`, lower-cased, vectorized."""
    raw = np.frombuffer(text.lower().encode("utf-8", "ignore"), dtype=np.uint8)
    n = len(raw)
    if n == 0:
        return np.zeros(1, dtype=np.uint64)
    ws = raw <= 32  # space and control characters separate words
    word = ~ws
    starts = np.flatnonzero(word & np.concatenate(([True], ws[:-1])))
    ends = np.flatnonzero(word & np.concatenate((ws[1:], [True]))) + 1
    if len(starts) == 0:
        return np.zeros(1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        prefix = np.zeros(n + 1, dtype=np.uint64)
        np.cumsum(raw.astype(np.uint64) * _powers(_P, n), dtype=np.uint64, out=prefix[1:])
        return (prefix[ends] - prefix[starts]) * _powers(_P_INV, n)[starts]


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: spreads structured 64-bit hashes over all bits."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


_EMPTY = np.uint64(np.iinfo(np.uint64).max)
_ROTATE = np.uint64(0x9E3779B97F4A7C15)


def minhash_signature(text: str, num_perm: int = 128, shingle: int = 5) -> np.ndarray:
    """A MinHash signature of the word `shingle`-grams of `text` (lower-cased), `num_perm` uint64s.

    One-permutation hashing with rotation densification (Shrivastava & Li, 2014): every shingle
    is hashed once and lands in one of `num_perm` bins, whose minimum is that bin's value; empty
    bins borrow from the next filled bin. Two signatures agree per position with probability close
    to the Jaccard similarity, like classic MinHash, at 1/num_perm of its hashing cost.
    """
    hv = word_hashes(text)
    n = max(1, len(hv) - shingle + 1)
    with np.errstate(over="ignore"):
        h = hv[:n].copy()
        for k in range(1, min(shingle, len(hv))):
            h = h * _MIX + hv[k : k + n]
        x = _mix64(h)
        perm = np.uint64(num_perm)
        sig = np.full(num_perm, _EMPTY, dtype=np.uint64)
        np.minimum.at(sig, (x % perm).astype(np.intp), x // perm)
        empty = sig == _EMPTY
        if empty.any():
            filled = np.flatnonzero(~empty)
            idx = np.arange(num_perm)
            nxt = filled[np.searchsorted(filled, idx) % len(filled)]
            dist = ((nxt - idx) % num_perm).astype(np.uint64)
            sig = sig[nxt] + dist * _ROTATE
    return sig


def signature_text(conv: Sequence[dict[str, str]], max_chars: int) -> str:
    return "\n".join(t["value"] for t in conv)[:max_chars]


class NearDuplicateIndex:
    """MinHash LSH banding, keeping the first of each near-duplicate group.

    The (bands, rows) split is datasketch's optimum for the threshold (taken from `MinHashLSH`);
    the buckets are plain dicts of band bytes, since building datasketch `MinHash` objects per
    record costs more than the whole signature. Candidates are confirmed on the signature.
    """

    def __init__(self, threshold: float, num_perm: int) -> None:
        from datasketch import MinHashLSH

        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.threshold = threshold
        self.bands, self.rows = lsh.b, lsh.r
        self.buckets: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]
        self.sigs: list[np.ndarray] = []

    def seen(self, sig: np.ndarray) -> bool:
        """True when a kept record is at least `threshold` similar; otherwise index this one."""
        keys = [sig[i * self.rows : (i + 1) * self.rows].tobytes() for i in range(self.bands)]
        checked: set[int] = set()
        for bucket, key in zip(self.buckets, keys, strict=True):
            for other in bucket.get(key, ()):
                if other not in checked:
                    checked.add(other)
                    if float(np.mean(self.sigs[other] == sig)) >= self.threshold:
                        return True
        idx = len(self.sigs)
        self.sigs.append(sig)
        for bucket, key in zip(self.buckets, keys, strict=True):
            bucket.setdefault(key, []).append(idx)
        return False
