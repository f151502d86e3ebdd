"""Near-duplicate detection: MinHash signatures of character 5-grams and an LSH index over them."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from distillery.tasks.record import normalise_text

_MERSENNE = (1 << 61) - 1
_SHIFT = np.uint64(32)
_BASE = np.uint64(0x100000001B3)  # the FNV prime, the polynomial base of a k-gram's hash


def shingle_hashes(text: str, k: int = 5) -> np.ndarray:
    """32-bit hashes of the character k-grams of the normalised, case-folded text."""
    text = normalise_text(text).casefold()
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    n = max(1, len(codes) - k + 1)
    h = np.zeros(n, dtype=np.uint64)
    for j in range(min(k, len(codes))):
        h = h * _BASE + codes[j : j + n]
    # splitmix64's finaliser: every bit of the k-gram reaches the 32 bits kept
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    return h >> _SHIFT


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """Bands and rows a band that minimise the false positive + false negative probability mass
    around `threshold` (datasketch's MinHashLSH choice, equal weights)."""
    best, best_error = (1, num_perm), math.inf
    below, above = np.linspace(0.0, threshold, 201), np.linspace(threshold, 1.0, 201)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            false_positive = float(np.trapezoid(1 - (1 - below**r) ** b, below))
            false_negative = float(np.trapezoid((1 - above**r) ** b, above))
            if false_positive + false_negative < best_error:
                best, best_error = (b, r), false_positive + false_negative
    return best


class NearDuplicateIndex:
    """MinHash LSH over character 5-grams of context + question; reports the highest similarity.

    Signatures live in one uint32 array and each band table maps a 64-bit key of its band to row
    numbers: an indexed row costs about 1.2 KB (datasketch's MinHash objects: 4 KB), and a
    signature takes a few numpy operations (~0.1 ms a row; datasketch: 0.6 ms).
    """

    NUM_PERM = 64

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        rng = np.random.RandomState(1)
        full = np.iinfo(np.uint64).max
        self._a = (rng.randint(0, full, self.NUM_PERM, dtype=np.uint64) | np.uint64(1))[:, None]
        self._b = rng.randint(0, full, self.NUM_PERM, dtype=np.uint64)[:, None]
        self.bands, self.rows = lsh_bands(threshold, self.NUM_PERM)
        self._mix = rng.randint(1, _MERSENNE, self.rows, dtype=np.uint64)
        self._signatures = np.empty((1024, self.NUM_PERM), dtype=np.uint32)
        self._size = 0
        self._keys: set[str] = set()
        self._row_keys: list[str] = []  # the key of each row, in the order added
        self._tables: list[dict[int, int | list[int]]] = [{} for _ in range(self.bands)]

    def minhash(self, text: str) -> np.ndarray:
        """The text's MinHash signature: NUM_PERM uint32 values."""
        hashes = shingle_hashes(text)
        # Multiply-add-shift (Dietzfelbinger), a strongly universal hash of 32-bit values, per
        # permutation; a repeated k-gram changes no minimum.
        permuted = (self._a * hashes + self._b) >> _SHIFT
        signature: np.ndarray = permuted.min(axis=1).astype(np.uint32)
        return signature

    def _band_keys(self, signature: np.ndarray) -> list[int]:
        used = signature[: self.bands * self.rows].reshape(self.bands, self.rows)
        keys: list[int] = (used.astype(np.uint64) * self._mix).sum(axis=1).tolist()
        return keys

    def _candidates(self, signature: np.ndarray) -> set[int]:
        candidates: set[int] = set()
        for table, key in zip(self._tables, self._band_keys(signature), strict=True):
            found = table.get(key)
            if isinstance(found, int):
                candidates.add(found)
            elif found is not None:
                candidates.update(found)
        return candidates

    def _max_similarity(self, signature: np.ndarray, candidates: set[int]) -> float:
        if not candidates:
            return 0.0
        rows = self._signatures[np.fromiter(candidates, dtype=np.intp, count=len(candidates))]
        return float((rows == signature).mean(axis=1).max())

    def check(self, text: str) -> tuple[float, np.ndarray]:
        """Max estimated Jaccard similarity to an indexed row (0.0 when none is close)."""
        signature = self.minhash(text)
        return self._max_similarity(signature, self._candidates(signature)), signature

    def closest(self, signature: np.ndarray) -> tuple[float, str | None]:
        """Max estimated similarity of a signature to an indexed row, and that row's key (0.0 and
        None when none is close)."""
        candidates = self._candidates(signature)
        if not candidates:
            return 0.0, None
        rows = np.fromiter(sorted(candidates), dtype=np.intp, count=len(candidates))
        shares = (self._signatures[rows] == signature).mean(axis=1)
        best = int(shares.argmax())
        return float(shares[best]), self._row_keys[int(rows[best])]

    def nearest(self) -> list[float]:
        """Each indexed row's max estimated similarity to another indexed row, in the order added
        (0.0 when none is close)."""
        return [
            self._max_similarity(signature, self._candidates(signature) - {row})
            for row, signature in enumerate(self._signatures[: self._size])
        ]

    def add(self, key: str, signature: np.ndarray) -> None:
        """Index a signature (from minhash or check) under `key`; a key already indexed is kept."""
        if key in self._keys:
            return
        self._keys.add(key)
        self._row_keys.append(key)
        if self._size == len(self._signatures):
            self._signatures = np.concatenate([self._signatures, np.empty_like(self._signatures)])
        row = self._size
        self._signatures[row] = signature
        self._size += 1
        for table, key_ in zip(self._tables, self._band_keys(signature), strict=True):
            found = table.setdefault(key_, row)
            if isinstance(found, list):
                found.append(row)
            elif found != row:
                table[key_] = [found, row]


def example_text(user_context: str, question: str) -> str:
    """The text an example is compared on: its context and question, a line apart."""
    return f"{user_context}\n{question}"


def nearest_similarities(texts: Iterable[str], threshold: float) -> list[float]:
    """Each text's max estimated similarity to another text of the set, in order (0.0 when none
    is close): LSH finds the pairs at about `threshold` and above."""
    index = NearDuplicateIndex(threshold)
    for i, text in enumerate(texts):
        index.add(str(i), index.minhash(text))
    return index.nearest()
