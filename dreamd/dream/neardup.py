"""Near duplicates: MinHash signatures and LSH bands, persisted in the store.

    index = NearDupIndex(store, threshold=cfg.screen.near_dup_threshold)
    Screener(..., near_dups=index.problem)               # "Jaccard ~0.86 with scenario 17 ..."
    index.add(scenario, scenario_id)                      # only ACCEPTED scenarios, once stored

What is compared: the scenario's whole text (messages + target), normalised like the content
hash (NFKC, case-folded, whitespace collapsed), split into words (\\w+), as the set of word
3-grams. Two scenarios are near duplicates when the Jaccard similarity of those sets reaches
the threshold (default 0.8).

MinHash: NUM_PERM = 128 universal hashes h(x) = (a*x + b) mod (2^61 - 1), truncated to 32 bits,
of each 3-gram's CRC32; the signature is the minimum of each over the 3-grams, and the share of
equal positions estimates the Jaccard similarity (standard error sqrt(J(1-J)/128): 0.035 at
J = 0.8). a and b are below 2^32, so a*x + b never overflows uint64 and the family is exactly
universal (datasketch lets the product wrap).

LSH: the signature is cut into BANDS = 32 bands of ROWS = 4; two texts become candidates when
any band is equal, P = 1 - (1 - J^4)^32: 0.9998 at J = 0.7, 0.988 at 0.6, 0.87 at 0.5, 0.23 at
0.3. The bands are fixed (not derived from the threshold), so a store's bands stay valid when
the threshold changes; candidates are then verified on the full signature against the
threshold. A threshold below 0.6 loses recall (allowed down to 0.5).

Persistence: `minhash_signatures` (scenario id -> 512-byte signature) and `minhash_bands`
(scenario id, band, 64-bit key; indexed by key) in the store, so the check holds across
restarts and across runs. A query is one indexed `key IN (32 keys)` lookup plus the candidates'
signatures. Scenarios accepted before the tables existed are indexed by `backfill()`.
tests/test_neardup.py and benchmarks/neardup_bench.py measure it against datasketch.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from dreamd.dream.scenario import Scenario, normalize_text

NUM_PERM = 128
BANDS = 32
ROWS = 4
SHINGLE = 3
SEED = 0x4E44_5550  # "NDUP": fixed for ever, or stored signatures stop being comparable
MERSENNE_61 = np.uint64((1 << 61) - 1)
SCHEME = f"w{SHINGLE}-crc32-p{NUM_PERM}-b{BANDS}r{ROWS}-s{SEED:x}"
"""Stored with every signature; signatures of another scheme are never compared."""

assert BANDS * ROWS == NUM_PERM

_rng = np.random.default_rng(SEED)
_A = _rng.integers(1, 1 << 32, size=NUM_PERM, dtype=np.uint64)[:, None]
_B = _rng.integers(0, 1 << 32, size=NUM_PERM, dtype=np.uint64)[:, None]
_WORD = re.compile(r"\w+")
_MASK32 = np.uint64(0xFFFFFFFF)


def shingles(text: str) -> set[str]:
    """Word 3-grams of the normalised text (a text of 1-2 words is one shingle; none: empty)."""
    words = _WORD.findall(normalize_text(text))
    if len(words) < SHINGLE:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i:i + SHINGLE]) for i in range(len(words) - SHINGLE + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    """Exact Jaccard similarity of two shingle sets (1.0 for two empty sets)."""
    return len(a & b) / len(a | b) if a or b else 1.0


def signature(text: str) -> np.ndarray | None:
    """The MinHash signature (NUM_PERM uint32) of `text`, or None when it has no words."""
    grams = shingles(text)
    if not grams:
        return None
    x = np.fromiter((zlib.crc32(g.encode()) for g in grams), dtype=np.uint64, count=len(grams))
    hashed = ((_A * x[None, :] + _B) % MERSENNE_61) & _MASK32
    return hashed.min(axis=1).astype(np.uint32)


def band_keys(sig: np.ndarray) -> list[int]:
    """One signed 64-bit key per band (BIGINT-safe); the band number is part of the key."""
    rows = sig.astype("<u4").reshape(BANDS, ROWS)
    return [int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8, salt=band.to_bytes(16, "little"))
                           .digest(), "little", signed=True)
            for band, row in enumerate(rows)]


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Estimated Jaccard similarity: the share of equal signature positions."""
    return float(np.count_nonzero(a == b)) / NUM_PERM


def to_bytes(sig: np.ndarray) -> bytes:
    return sig.astype("<u4").tobytes()


def from_bytes(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype="<u4").astype(np.uint32)


@dataclass(frozen=True)
class NearDup:
    scenario_id: int
    similarity: float


class NearDupIndex:
    """Near-duplicate lookups against every accepted scenario in `store` (a dreamd Store, or
    anything with add_minhashes / minhash_candidates / accepted_without_minhash)."""

    CACHE = 256  # signatures kept between the screening rule and add() (same content hash)

    def __init__(self, store: Any, threshold: float = 0.8) -> None:
        if not 0.5 <= threshold <= 1.0:
            raise ValueError(f"near-duplicate threshold must be in [0.5, 1.0], got {threshold}")
        self.store = store
        self.threshold = threshold
        self._cache: OrderedDict[str, np.ndarray | None] = OrderedDict()

    def _signature(self, scenario: Scenario) -> np.ndarray | None:
        key = scenario.content_hash
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        sig = signature(scenario.text)
        self._cache[key] = sig
        if len(self._cache) > self.CACHE:
            self._cache.popitem(last=False)
        return sig

    def find(self, scenario: Scenario) -> NearDup | None:
        """The most similar stored scenario at or above the threshold, or None."""
        sig = self._signature(scenario)
        if sig is None:
            return None
        best: NearDup | None = None
        for scenario_id, raw in self.store.minhash_candidates(SCHEME, band_keys(sig)):
            sim = similarity(sig, from_bytes(raw))
            if sim >= self.threshold and (best is None or sim > best.similarity):
                best = NearDup(scenario_id, sim)
        return best

    def problem(self, scenario: Scenario) -> str | None:
        """Screening rule: why `scenario` is a near duplicate, or None."""
        hit = self.find(scenario)
        if hit is None:
            return None
        return (f"Jaccard ~{hit.similarity:.2f} with scenario {hit.scenario_id} "
                f"(threshold {self.threshold:g})")

    def add(self, scenario: Scenario, scenario_id: int) -> bool:
        """Index an accepted, stored scenario. False when it has no words (nothing to index)."""
        sig = self._signature(scenario)
        if sig is None:
            return False
        self.store.add_minhashes(SCHEME, [(scenario_id, to_bytes(sig), band_keys(sig))])
        return True

    def backfill(self, batch: int = 500) -> int:
        """Index accepted scenarios that have no signature yet (stored before migration 0002,
        or by a process that crashed between storing and indexing). Returns how many."""
        done = 0
        while True:
            missing = self.store.accepted_without_minhash(SCHEME, limit=batch)
            if not missing:
                return done
            rows = []
            for scenario_id, scenario in missing.items():
                sig = signature(scenario.text)
                # No words: an empty signature without bands marks it done (never a candidate).
                rows.append((scenario_id, b"", []) if sig is None
                            else (scenario_id, to_bytes(sig), band_keys(sig)))
            self.store.add_minhashes(SCHEME, rows)  # one transaction per batch
            done += len(rows)
