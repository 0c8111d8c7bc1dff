"""Near duplicates: MinHash signatures and LSH bands, persisted in the store.

    index = NearDupIndex(store, threshold=cfg.screen.near_dup_threshold, run_id=run_id,
                         read_budget=cfg.screen.near_dup_rows)
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

LSH: the signature is cut into BANDS = 32 bands of ROWS = 4, each hashed to a key. A stored
scenario is compared with the query when at least `k` of its 32 band keys are equal, k fitted to
the threshold by pigeonhole (dreamd/dream/lsh.py): signatures that agree in m = ceil(128 t) of
128 positions differ in at most 128 - m, so at least m - 96 bands are equal; k = m - 96 (7 at
0.8) finds EVERY pair the signature check accepts (the same recall as comparing all signatures)
while pairs that share a band or two through common frame words (J ~ 0.3-0.6) are never
compared. Below t = 0.76, k = 1 (any equal band: P = 1 - (1 - J^4)^32, 0.988 at J = 0.6, 0.87
at 0.5). The bands do not depend on the threshold; only k does.

Read budget. All of the above holds with read_budget=None. The daemon's default budget (64
rows, screen.near_dup_read_budget) caps what a query reads from heavy buckets (more than 8
stored scenarios on one band key: a template's frame words) past the k - 1 largest it never
reads: a stored scenario whose k equal bands all fall in frame buckets beyond the budget is
missed. At 1e6 stored template scenarios that lost none of 480 planted near copies nor of 48
fresh draws the exact lookup rejects, and keeps the lookup's time flat (docs/benchmarks.md).

Persistence: `minhash_signatures` (scenario id -> 512-byte signature, scheme) is the index's
only storage, so the check holds across restarts and across runs. When the index opens it reads
every signature into memory (512 bytes, 64 of its nibbles, ~4 of scratch and ~220 of bands a
scenario: ~0.8 GB at 1e6 stored) and builds the band index (`lsh.BandIndex`); a lookup is then
a read of its 32 buckets, a count of the rows read and a comparison of the candidates'
signatures (a frame-heavy query's hundreds screened first on their nibbles), without touching
the store: one compiled call (dreamd/dream/lsh_kernel.py, numba) or, where numba does not
import, numpy (BandIndex.candidates, then `_screen` and one vectorised comparison), with the
same answer. An accepted scenario is written to the store and added
in memory; `refresh()` reads what another process stored since. Scenarios accepted before the
signature table existed (or signed under another SCHEME) are signed by `backfill()`.
tests/test_neardup.py and benchmarks/neardup_bench.py measure it against datasketch.
"""

from __future__ import annotations

import math
import re
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from dreamd.dream import lsh_kernel
from dreamd.dream.lsh import BandIndex
from dreamd.dream.scenario import Scenario, normalize_text

NUM_PERM = 128
BANDS = 32
ROWS = 4
SHINGLE = 3
SEED = 0x4E44_5550  # "NDUP": fixed for ever, or stored signatures stop being comparable
MERSENNE_61 = np.uint64((1 << 61) - 1)
SCHEME = f"w{SHINGLE}-crc32-p{NUM_PERM}-s{SEED:x}"
"""Stored with every signature; signatures of another scheme are never compared (backfill()
signs those scenarios again). Migration 0006 renamed the earlier 'w3-crc32-p128-b32r4-s4e445550'
(the same signatures; its bands were stored, these are not)."""

assert BANDS * ROWS == NUM_PERM

_rng = np.random.default_rng(SEED)
_A = _rng.integers(1, 1 << 32, size=NUM_PERM, dtype=np.uint64)[:, None]
_B = _rng.integers(0, 1 << 32, size=NUM_PERM, dtype=np.uint64)[:, None]
_WORD = re.compile(r"\w+")
_MASK32 = np.uint64(0xFFFFFFFF)
# Band keys: vector multiply-shift hashing of each band's 4 values (random 64-bit multipliers);
# lsh.BandIndex finds buckets by bits 32-62 of each key. Computed in memory only, so changing it needs no migration.
_band_rng = np.random.default_rng(SEED + 1)
_BAND_MUL = _band_rng.integers(1, 1 << 63, size=(BANDS, ROWS), dtype=np.uint64) | np.uint64(1)
_BAND_ADD = _band_rng.integers(0, 1 << 63, size=BANDS, dtype=np.uint64)
_BAND_MUL_FLAT = _BAND_MUL.reshape(-1)


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


def band_keys(sigs: np.ndarray) -> np.ndarray:
    """(n, BANDS) uint64 band keys of (n, NUM_PERM) signatures (one signature: (1, BANDS))."""
    sigs = np.asarray(sigs)
    if sigs.size == NUM_PERM:        # a lookup: fewest numpy calls
        return np.add.reduce((sigs.astype(np.uint64) * _BAND_MUL_FLAT).reshape(1, BANDS, ROWS), axis=2) + _BAND_ADD
    rows = sigs.reshape(-1, BANDS, ROWS)
    if len(rows) <= 64:
        return (rows.astype(np.uint64) * _BAND_MUL).sum(axis=2, dtype=np.uint64) + _BAND_ADD
    keys = np.broadcast_to(_BAND_ADD, (len(rows), BANDS)).copy()
    for r in range(ROWS):            # column by column: no (n, 32, 4) uint64 temporary
        keys += rows[:, :, r].astype(np.uint64) * _BAND_MUL[:, r]
    return keys


def nibbles(sigs: np.ndarray) -> np.ndarray:
    """The low 4 bits of each signature value, two to a byte ((..., NUM_PERM // 2) uint8): a
    quarter of the signature's memory, and equal wherever the signatures are (two different
    values agree in them once in 16), so counting equal nibbles bounds the equal positions from
    above. Where the candidates are many, that bound discards most of them from a read of 64
    bytes each instead of 512."""
    low = np.asarray(sigs).astype(np.uint8) & np.uint8(0x0F)
    return low[..., 0::2] | (low[..., 1::2] << np.uint8(4))


_NIBBLE_BIT0 = np.uint64(0x1111_1111_1111_1111)


def positions_needed(threshold: float) -> int:
    """Equal signature positions of a pair with similarity >= threshold."""
    return math.ceil(threshold * NUM_PERM - 1e-9)


def bands_needed(threshold: float) -> int:
    """k: equal bands every pair with similarity >= threshold has (pigeonhole; at least 1)."""
    return max(1, BANDS - (NUM_PERM - positions_needed(threshold)))


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
    """Near-duplicate lookups against every accepted scenario of a run (or of every run) in `store` (a dreamd Store, or
    anything with add_minhashes / minhash_page / accepted_without_minhash). Opening it reads
    every stored signature of SCHEME into memory: the signatures (512 bytes each, compared
    vectorised), their nibbles (64) and their band index (~220); a lookup does not touch the
    store. One lookup at a time (a scratch array is shared between lookups)."""

    SCREEN_ABOVE = 16  # numpy path: candidates above this many are screened on their nibbles first
    compiled = True    # False: the numpy path even where numba is installed (tests compare the two)
    CACHE = 256  # signatures kept between the screening rule and add() (same content hash)
    PAGE = 50_000  # signatures per read while loading
    REFRESH_S = 60.0  # find() reads other processes' additions at most this often

    def __init__(self, store: Any, threshold: float = 0.8, run_id: int | None = None,
                 read_budget: int | None = None) -> None:
        if not 0.5 <= threshold <= 1.0:
            raise ValueError(f"near-duplicate threshold must be in [0.5, 1.0], got {threshold}")
        if read_budget is not None and read_budget < 0:
            raise ValueError(f"near-duplicate read budget must be >= 0 or None, got {read_budget}")
        self.read_budget = read_budget
        """Heavy-bucket rows a lookup reads at most past the k - 1 largest (None: every one:
        the same answers as comparing every signature)."""
        self.store = store
        self.run_id = run_id
        """The run whose scenarios are compared (None: every run in the store). One run never
        repeats its own scenarios; another run's are not its concern (docs/sql.md, "Several
        runs in one store")."""
        self.threshold = threshold
        self.k = bands_needed(threshold)
        self.bands = BandIndex(BANDS)      # bands of row r -> r
        self._ids = np.empty(0, dtype=np.int64)              # row -> scenario id
        self._sigs = np.empty((0, NUM_PERM), dtype=np.uint32)  # row -> signature
        self._nibbles = np.empty((0, NUM_PERM // 2), dtype=np.uint8)  # row -> nibbles(signature)
        self._last_seen = np.zeros(0, dtype=np.int32)   # scratch: row -> its place in a lookup's rows
        self.size = 0
        self._cache: OrderedDict[str, np.ndarray | None] = OrderedDict()
        self._loaded_up_to = 0            # highest scenario id read from the store
        self._added_above: set[int] = set()  # ids this process added above that (refresh skips them)
        self.last_candidates = 0          # signatures the last lookup compared (benchmarks)
        self.last_read = 0                # bucket entries the last lookup read (benchmarks)
        self._refreshed_at = 0.0
        self.refresh()
        if self.compiled:   # compile or load the kernel now (0.1-4 s, once a process), not in a cycle
            self.find_signature(np.zeros(NUM_PERM, dtype=np.uint32))

    def refresh(self) -> int:
        """Read signatures stored since the last read (at open: all of them), e.g. by another
        process writing to the same store. Returns how many were added to the index."""
        added, self._refreshed_at = 0, time.monotonic()
        while True:
            page = self.store.minhash_page(SCHEME, after_id=self._loaded_up_to, limit=self.PAGE,
                                           run_id=self.run_id)
            if not page:
                break
            self._loaded_up_to = page[-1][0]
            rows = [(sid, raw) for sid, raw in page if raw and sid not in self._added_above]
            if rows:
                ids = np.fromiter((sid for sid, _ in rows), dtype=np.int64, count=len(rows))
                sigs = np.frombuffer(b"".join(raw for _, raw in rows), dtype="<u4").reshape(-1, NUM_PERM)
                self._append(ids, sigs, bulk=True)
                added += len(rows)
        self._added_above = {i for i in self._added_above if i > self._loaded_up_to}
        self.bands.finish_loading()
        return added

    def _append(self, ids: np.ndarray, sigs: np.ndarray, bulk: bool = False) -> None:
        """New rows (capacity doubles: pages never written are not resident)."""
        end = self.size + len(ids)
        if end > len(self._ids):
            cap = max(end, 2 * len(self._ids), 1024)
            grown_ids, grown_sigs = np.empty(cap, dtype=np.int64), np.empty((cap, NUM_PERM), dtype=np.uint32)
            grown_nibbles = np.empty((cap, NUM_PERM // 2), dtype=np.uint8)
            grown_ids[:self.size], grown_sigs[:self.size] = self._ids[:self.size], self._sigs[:self.size]
            grown_nibbles[:self.size] = self._nibbles[:self.size]
            self._ids, self._sigs, self._nibbles = grown_ids, grown_sigs, grown_nibbles
            self._last_seen = np.zeros(cap, dtype=np.int32)
        self._ids[self.size:end], self._sigs[self.size:end] = ids, sigs
        self._nibbles[self.size:end] = nibbles(sigs)
        self.bands.add(band_keys(sigs), bulk=bulk)   # rows self.size .. end - 1, the same order
        self.size = end

    @property
    def nbytes(self) -> int:
        """Memory held for the stored signatures: signatures, their nibbles, ids, the scratch
        array and bands."""
        return self.size * (NUM_PERM * 4 + NUM_PERM // 2 + 8 + 4) + self.bands.nbytes

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
        """The most similar stored scenario at or above the threshold, or None. Reads what
        other processes stored first, when the last read is REFRESH_S old (one indexed query)."""
        if time.monotonic() - self._refreshed_at >= self.REFRESH_S:
            self.refresh()
        sig = self._signature(scenario)
        return None if sig is None else self.find_signature(sig)

    def find_signature(self, sig: np.ndarray) -> NearDup | None:
        """find() for a signature already computed: compiled where numba is installed
        (dreamd/dream/lsh_kernel.py), in numpy otherwise; the same answer either way."""
        lookup = lsh_kernel.kernel() if self.compiled else None
        if lookup is None:
            return self._find_numpy(sig)
        sig = np.ascontiguousarray(sig, dtype=np.uint32)
        max_differ = NUM_PERM - positions_needed(self.threshold)
        row, equal, self.last_candidates, self.last_read, _ = lookup(
            sig, _BAND_MUL_FLAT, _BAND_ADD, *self.bands.layout(), self.k, self._sigs,
            self._nibbles.view(np.uint64), self._ids, max_differ,
            -1 if self.read_budget is None else self.read_budget)
        recent = self.bands.recent_candidates(band_keys(sig), self.k) if self.bands.has_recent else ()
        if len(recent):                    # added since the last merge: compared here
            self.last_candidates += len(recent)
            counts = np.add.reduce(self._sigs[recent] == sig, axis=1)
            for r, c in zip(recent.tolist(), counts.tolist()):
                if NUM_PERM - c <= max_differ and (c > equal or (c == equal and self._ids[r] < self._ids[row])):
                    row, equal = r, c
        if row < 0:
            return None
        return NearDup(int(self._ids[row]), equal / NUM_PERM)

    def _find_numpy(self, sig: np.ndarray) -> NearDup | None:
        """find_signature() in numpy (no numba): BandIndex.candidates, then the comparison."""
        rows, self.last_read = self.bands.candidates(band_keys(sig), self.k, self.read_budget)
        if rows.size > self.SCREEN_ABOVE:   # many (frame-heavy): each once, then their nibbles
            rows = self._screen(rows, sig)
        self.last_candidates = rows.size
        if not rows.size:
            return None
        equal = np.add.reduce(self._sigs[rows] == sig, axis=1)   # a row read twice: compared twice
        best = int(np.maximum.reduce(equal))
        if best / NUM_PERM < self.threshold:
            return None
        return NearDup(int(self._ids[rows][equal == best].min()), best / NUM_PERM)  # ties: lowest id

    def _screen(self, rows: np.ndarray, sig: np.ndarray) -> np.ndarray:
        """`rows` once each (without sorting: each row's last place in `rows`, through a
        scratch array only this lookup's rows are read from), less those whose equal nibbles (an
        upper bound of the equal positions) fall short of the threshold's."""
        order = np.arange(rows.size, dtype=np.int32)
        self._last_seen[rows] = order                # a repeated row: its last place wins
        rows = rows[self._last_seen[rows] == order]
        differ = self._nibbles[rows].view(np.uint64) ^ nibbles(sig).view(np.uint64)   # (n, 8)
        differ |= differ >> np.uint64(1)
        differ |= differ >> np.uint64(2)             # bit 0 of a nibble: it differs
        count = np.bitwise_count(differ & _NIBBLE_BIT0)
        count = count[:, 0::2] + count[:, 1::2]      # pairwise: a reduction along 8 is slower
        count = count[:, 0::2] + count[:, 1::2]
        return rows[count[:, 0] + count[:, 1] <= NUM_PERM - positions_needed(self.threshold)]

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
        self.add_signature(scenario_id, sig)
        return True

    def add_signature(self, scenario_id: int, sig: np.ndarray) -> None:
        """add() for a signature already computed."""
        self._index([(scenario_id, sig)])

    def _index(self, rows: list[tuple[int, np.ndarray | None]]) -> None:
        """Store signatures (None: a scenario without words, stored empty, never a candidate)
        in one transaction; put the ones newly stored into the band index."""
        new = set(self.store.add_minhashes(SCHEME, [(sid, b"" if sig is None else to_bytes(sig))
                                                    for sid, sig in rows]))
        fresh = [(sid, sig) for sid, sig in rows if sid in new and sig is not None]
        if fresh:
            self._append(np.array([sid for sid, _ in fresh]), np.stack([sig for _, sig in fresh]))
            self._added_above.update(sid for sid, _ in fresh if sid > self._loaded_up_to)

    def backfill(self, batch: int = 500) -> int:
        """Index accepted scenarios that have no signature of SCHEME yet (stored before
        migration 0002, under another scheme, or by a process that crashed between storing and
        indexing). Returns how many."""
        done = 0
        while True:
            missing = self.store.accepted_without_minhash(SCHEME, limit=batch, run_id=self.run_id)
            if not missing:
                return done
            self._index([(sid, signature(sc.text)) for sid, sc in missing.items()])
            done += len(missing)
