"""The in-memory LSH band index behind dreamd/dream/neardup.py: which stored signatures share
enough bands with a query to be worth comparing.

    bands = BandIndex(n_bands=32)
    rows = bands.add(keys)               # keys: (n, 32) uint64 band keys (neardup.band_keys);
                                         # rows 0, 1, 2, ... in the order added
    bands.candidates(query_keys, k=7)    # rows sharing >= 7 of the 32 band keys (int64 array)

Layout: one sorted uint64 array with one entry per (row, band):
`band (5 bits) | band key (27 bits) | row (32 bits)`. A bucket (rows whose band b has key h) is
one contiguous run of that array. A directory of offsets by the entry's top bits (about 8
entries per slot) finds a bucket's start in one step and a window of WINDOW entries its bounds;
buckets of more than HEAVY entries are looked up in a small table of their own: no binary
search over the whole array (a cache miss per level at 1e6). Per row a 16-bit fingerprint of
each band key (`_fp`) counts its equal bands without searching. 8 + 2 bytes per band per row,
plus the directory: ~330 bytes a scenario at 32 bands, no Python object per entry.

Adds go to a small dict (`_recent`) and are merged into the sorted array when it holds more
than an eighth of it (amortised O(log n) per add); a query reads both.

k of 32: a pair whose signatures agree in at least m of 128 positions differs in at most
128 - m, so at least 32 - (128 - m) of the 32 bands of 4 rows are equal (pigeonhole). At the
0.8 threshold (m = 103) that is 7 bands: requiring 7 equal bands loses no pair the signature
check would accept, and drops the many template pairs that share a band or two through their
common frame words (J ~ 0.3-0.6). It also lets a query skip its k - 1 largest buckets when
collecting ids (a pair with k equal bands is in one of the others) and only test its
candidates' fingerprints against them: the frame-word buckets that grow with the store are
never expanded. Fingerprints only over-count (a 1 in 65,536 chance per band), so a row with k
equal bands is never dropped; the caller verifies the rows on their signatures.
"""

from __future__ import annotations

import math

import numpy as np

KEY_BITS = 27
ROW_BITS = 32
ROW_MASK = np.uint64((1 << ROW_BITS) - 1)
_BUCKET = np.uint64(1 << ROW_BITS)  # one key step: [prefix, prefix + _BUCKET) is one bucket
WINDOW = 16                          # entries read after a directory slot's start
HEAVY = 8                            # a bucket with more entries is in the heavy table
_END = np.iinfo(np.uint64).max       # padding after the last entry (never a real entry)


class BandIndex:
    """Rows by LSH band key, in memory (rebuilt from the store's signatures at start)."""

    def __init__(self, n_bands: int) -> None:
        if not 1 <= n_bands <= 32:
            raise ValueError(f"n_bands must be 1..32, got {n_bands}")
        self.n_bands = n_bands
        self._band_prefix = np.arange(n_bands, dtype=np.uint64) << np.uint64(KEY_BITS + ROW_BITS)
        self._padded = np.full(WINDOW, _END, dtype=np.uint64)  # the sorted entries, then WINDOW x _END
        self._sorted = self._padded[:0]
        self._shift = np.uint64(64 - 5)
        self._dir = np.zeros(33, dtype=np.uint32)
        self._heavy = np.full(1, _END, dtype=np.uint64)  # prefixes of buckets > HEAVY entries, _END
        self._heavy_lo = self._heavy_hi = np.zeros(1, dtype=np.int64)
        self._fp = np.empty((0, n_bands), dtype=np.uint16)    # row -> band key fingerprints
        self._recent: dict[int, list[int]] = {}
        self._recent_entries = 0
        self._pending: list[np.ndarray] = []
        self.size = 0

    @property
    def nbytes(self) -> int:
        return int(self._padded.nbytes + self._dir.nbytes + self.size * self._fp.itemsize * self.n_bands) \
            + self._recent_entries * 8

    def prefixes(self, keys: np.ndarray) -> np.ndarray:
        """(n, n_bands) uint64: each band key cut to KEY_BITS bits, placed above the row bits
        with the band number on top."""
        keys = np.asarray(keys, dtype=np.uint64).reshape(-1, self.n_bands)
        return self._band_prefix | ((keys >> np.uint64(64 - KEY_BITS)) << np.uint64(ROW_BITS))

    @staticmethod
    def fingerprints(keys: np.ndarray) -> np.ndarray:
        """16 bits of each band key below the KEY_BITS the buckets use."""
        return ((np.asarray(keys, dtype=np.uint64) >> np.uint64(64 - KEY_BITS - 16)) & np.uint64(0xFFFF)) \
            .astype(np.uint16)

    def add(self, keys: np.ndarray, bulk: bool = False) -> np.ndarray:
        """Index new rows by their band `keys` ((n, n_bands)); returns their row numbers.
        bulk: sorted in at finish_loading() (loading at start), not one by one."""
        keys = np.asarray(keys, dtype=np.uint64).reshape(-1, self.n_bands)
        rows = np.arange(self.size, self.size + len(keys), dtype=np.uint64)
        if not len(rows):
            return rows.astype(np.int64)
        if self.size + len(rows) > int(ROW_MASK):
            raise ValueError(f"more than {int(ROW_MASK)} rows in a band index")
        if self.size + len(rows) > len(self._fp):
            grown = np.empty((max(self.size + len(rows), 2 * len(self._fp), 1024), self.n_bands), dtype=np.uint16)
            grown[:self.size] = self._fp[:self.size]
            self._fp = grown
        self._fp[self.size:self.size + len(rows)] = self.fingerprints(keys)
        entries = self.prefixes(keys) | rows[:, None]
        self.size += len(rows)
        if bulk:
            self._pending.append(entries.reshape(-1))
            return rows.astype(np.int64)
        for entry in entries.reshape(-1).tolist():
            self._recent.setdefault(entry & ~int(ROW_MASK), []).append(entry & int(ROW_MASK))
        self._recent_entries += entries.size
        if self._recent_entries > max(4096, len(self._sorted) // 8):
            self._merge()
        return rows.astype(np.int64)

    def _merge(self) -> None:
        recent = [prefix | i for prefix, rows in self._recent.items() for i in rows]
        merged = np.concatenate([self._sorted, *self._pending, np.array(recent, dtype=np.uint64)])
        merged.sort(kind="stable")  # radix sort for integers: O(n)
        self._padded = np.concatenate([merged, np.full(WINDOW, _END, dtype=np.uint64)])
        self._sorted = self._padded[:len(merged)]
        # Directory: the top 5 + bits bits of an entry -> where its slot starts (~8 entries a slot).
        bits = min(KEY_BITS, max(0, math.ceil(math.log2(max(1.0, len(merged) / self.n_bands / 8)))))
        self._shift = np.uint64(64 - 5 - bits)
        slots = np.arange((1 << (5 + bits)) + 1, dtype=np.uint64)
        starts = np.searchsorted(merged, slots[:-1] << self._shift)
        self._dir = np.append(starts, len(merged)).astype(np.uint32 if len(merged) < 1 << 32 else np.int64)
        # Heavy buckets (> HEAVY entries: frame words shared by many rows) by prefix, with their
        # bounds: entry i is in one when entry i + HEAVY has its prefix. In chunks (memory).
        heavy = []
        for a in range(0, max(0, len(merged) - HEAVY), 1 << 22):
            top = merged[a:a + (1 << 22) + HEAVY] >> np.uint64(ROW_BITS)
            heavy.append(np.unique(top[:-HEAVY][top[:-HEAVY] == top[HEAVY:]]))
        heavy_prefixes = (np.unique(np.concatenate(heavy)) << np.uint64(ROW_BITS) if heavy
                          else np.empty(0, dtype=np.uint64))
        self._heavy = np.append(heavy_prefixes, _END)
        self._heavy_lo = np.append(np.searchsorted(merged, heavy_prefixes), 0).astype(np.int64)
        self._heavy_hi = np.append(np.searchsorted(merged, heavy_prefixes + _BUCKET), 0).astype(np.int64)
        self._recent, self._recent_entries, self._pending = {}, 0, []

    def _bounds(self, prefix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[lo, hi) of each bucket in the sorted array: heavy ones from their table, the others
        within a window of WINDOW entries from their directory slot's start; a bucket past its
        window (a slot crowded by a heavy bucket) by binary search."""
        start = self._dir[(prefix >> self._shift).astype(np.int64)].astype(np.int64)
        window = self._padded[start[:, None] + np.arange(WINDOW)]
        end = prefix + _BUCKET
        at = np.searchsorted(self._heavy, prefix)       # a small table, in cache
        heavy = self._heavy[at] == prefix
        lo = np.where(heavy, self._heavy_lo[at], start + (window < prefix[:, None]).sum(axis=1))
        hi = np.where(heavy, self._heavy_hi[at], start + (window < end[:, None]).sum(axis=1))
        past = (window[:, -1] < end) & ~heavy
        if past.any():
            lo[past] = np.searchsorted(self._sorted, prefix[past])
            hi[past] = np.searchsorted(self._sorted, end[past])
        return lo, hi

    def finish_loading(self) -> None:
        """Sort in what bulk adds left pending (one sort for a whole load)."""
        if self._pending:
            self._merge()

    def candidates(self, keys: np.ndarray, k: int) -> tuple[np.ndarray, int]:
        """Rows with at least `k` (>= 1) of the query's band `keys` equal, ascending (and,
        once in 65,536 per band, one the fingerprints over-count), and how many bucket
        entries the query read (the work it did)."""
        k = max(1, min(k, self.n_bands))
        self.finish_loading()
        prefix = self.prefixes(keys)[0]
        lo, hi = self._bounds(prefix)
        sizes = hi - lo
        # The k - 1 largest buckets are not expanded: a row with k equal bands is in another.
        if k > 1:
            sizes[np.argpartition(sizes, self.n_bands - (k - 1))[self.n_bands - (k - 1):]] = 0
        total = int(sizes.sum())
        rows = self._sorted[np.arange(total) + np.repeat(lo - (np.cumsum(sizes) - sizes), sizes)] & ROW_MASK
        if self._recent:
            recent = [i for p in prefix.tolist() for i in self._recent.get(p, ())]
            if recent:
                rows = np.concatenate([rows, np.array(recent, dtype=np.uint64)])
        if not len(rows):
            return np.empty(0, dtype=np.int64), total
        rows = rows.astype(np.int64)
        if k > 1:   # count first (a row appears once per equal band read), deduplicate the few left
            rows = rows[(self._fp[rows] == self.fingerprints(keys)).sum(axis=1) >= k]
        return np.unique(rows), total
