"""The in-memory LSH band index behind dreamd/dream/neardup.py: which stored signatures share
enough bands with a query to be worth comparing.

    bands = BandIndex(n_bands=32)
    rows = bands.add(keys)               # keys: (n, 32) uint64 band keys (neardup.band_keys);
                                         # rows 0, 1, 2, ... in the order added
    bands.candidates(query_keys, k=7)    # every row sharing >= 7 of the 32 band keys, and
                                         # some sharing fewer where heavy buckets go unread
                                         # (uint64 array, not deduplicated; the caller verifies)

Layout. A bucket is the rows whose band b has key h; its prefix is 31 bits of the band key
(`PREFIX`: bits 32-62; the band keys of different bands are different hashes, so the band needs
no bits of its own: two bands' keys meet in the same prefix once in 2^31, and that only adds a
candidate the signatures reject). Two kinds of bucket:
- light (at most HEAVY rows): one uint64 entry `prefix | row` per row, in one sorted array,
  `_main`;
- heavy (more: frame words that many template scenarios share): their rows in `_heavy_rows`
  (uint32, grouped by bucket), and ONE entry `prefix | FLAG | heavy id` in `_main` in their place.
A directory of offsets by the prefix's top bits (~ENTRIES_PER_SLOT entries a slot) gives where
a slot starts in `_main`, and the longest slot how far a bucket can reach from there: a lookup
reads, for the 32 band keys at once, that many entries after each slot start (one gather through a
strided view), subtracts the query's prefix and keeps what falls below 2^32. What is left is the
rows of the query's light buckets and the ids of its heavy ones: no search, no per-band bounds,
about ten numpy calls whatever the store's size. 8 bytes per light entry, 4 per heavy one,
plus the directory (4 bytes a slot).

dreamd/dream/lsh_kernel.py reads the same layout in compiled code (BandIndex.candidates is the
numpy path, and the reference the tests hold it to).

Adds go to a small dict (`_recent`) and are merged (the whole index rebuilt, one sort) when it
holds more than an eighth of the rest (amortised O(log n) per add); a query reads both.

k of 32: a pair whose signatures agree in at least m of 128 positions differs in at most
128 - m, so at least 32 - (128 - m) of the 32 bands of 4 rows are equal (pigeonhole). At the
0.8 threshold (m = 103) that is 7 bands: requiring 7 equal bands loses no pair the signature
check would accept, and drops the many template pairs that share a band or two through their
common frame words (J ~ 0.3-0.6). A row is read once per equal band, so:
- a query with at most k - 1 heavy buckets reads none of them; a row with k equal bands is
  then read at least k - (its heavy buckets) times from the light ones, and only rows read that
  often are candidates (one sort of the 0-256 rows read, no per-row lookup);
- a query with more reads its heavy buckets but the k - 1 largest (a row with k equal bands is
  in one of the others), and every row read is a candidate: the frame-heavy tail, where the
  caller screens the candidates (neardup.NearDupIndex._screen) before comparing signatures.
Nothing is dropped that has k equal bands; what is kept beyond that, the caller's comparison of
the signatures rejects.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import as_strided

ROW_BITS = 32
ROW_MASK = np.uint64((1 << ROW_BITS) - 1)
PREFIX = np.uint64(((1 << 31) - 1) << ROW_BITS)  # the key bits a bucket is found by (top bit 0)
BUCKET = np.uint64(1 << ROW_BITS)  # entry - prefix < BUCKET: the entry is in the prefix's bucket
FLAG = 1 << 31                     # row field >= FLAG: a heavy bucket's id (rows stay below)
HEAVY = 8                          # a bucket with more rows is a heavy one
ENTRIES_PER_SLOT = 8               # the directory: ~1 uint32 per 8 entries of _main
_END = np.iinfo(np.uint64).max     # padding after the last entry (never a prefix: top bit 1)


class BandIndex:
    """Rows by LSH band key, in memory (rebuilt from the store's signatures at start)."""

    def __init__(self, n_bands: int) -> None:
        if not 1 <= n_bands <= 32:
            raise ValueError(f"n_bands must be 1..32, got {n_bands}")
        self.n_bands = n_bands
        self._recent: dict[int, list[int]] = {}
        self._recent_entries = 0
        self._pending: list[np.ndarray] = []
        self.size = 0
        self._build(np.empty(0, dtype=np.uint64))

    @property
    def nbytes(self) -> int:
        return int(self._padded.nbytes + self._dir.nbytes + self._heavy_rows.nbytes + self._heavy_bounds.nbytes
                   + self._heavy_prefix.nbytes) + self._recent_entries * 8

    @staticmethod
    def prefixes(keys: np.ndarray) -> np.ndarray:
        """The bucket prefix of each band key: its bits 32-62, where they are (the row bits zero)."""
        return np.asarray(keys, dtype=np.uint64) & PREFIX

    def add(self, keys: np.ndarray, bulk: bool = False) -> np.ndarray:
        """Index new rows by their band `keys` ((n, n_bands)); returns their row numbers.
        bulk: sorted in at finish_loading() (loading at start), not one by one."""
        keys = np.asarray(keys, dtype=np.uint64).reshape(-1, self.n_bands)
        rows = np.arange(self.size, self.size + len(keys), dtype=np.uint64)
        if not len(rows):
            return rows.astype(np.int64)
        if self.size + len(rows) > FLAG:
            raise ValueError(f"more than {FLAG} rows in a band index")
        entries = self.prefixes(keys) | rows[:, None]
        self.size += len(rows)
        if bulk:
            self._pending.append(entries.reshape(-1))
            return rows.astype(np.int64)
        for entry in entries.reshape(-1).tolist():
            self._recent.setdefault(entry & ~int(ROW_MASK), []).append(entry & int(ROW_MASK))
        self._recent_entries += entries.size
        if self._recent_entries > max(4096, (len(self._main) + len(self._heavy_rows)) // 8):
            self._merge()
        return rows.astype(np.int64)

    def finish_loading(self) -> None:
        """Sort in what bulk adds left pending (one sort for a whole load)."""
        if self._pending:
            self._merge()

    def _entries(self) -> np.ndarray:
        """Every indexed (prefix | row) entry of the sorted part, heavy buckets' included."""
        light = self._main[self._main & ROW_MASK < FLAG]
        sizes = self._heavy_bounds[1:] - self._heavy_bounds[:-1]
        heavy = np.repeat(self._heavy_prefix, sizes) | self._heavy_rows.astype(np.uint64)
        return np.concatenate([light, heavy])

    def _merge(self) -> None:
        recent = [prefix | i for prefix, rows in self._recent.items() for i in rows]
        merged = np.concatenate([self._entries(), *self._pending, np.array(recent, dtype=np.uint64)])
        self._recent, self._recent_entries, self._pending = {}, 0, []
        merged.sort(kind="stable")  # radix sort for integers: O(n)
        self._build(merged)

    def _build(self, merged: np.ndarray) -> None:
        """The layout from every entry, sorted."""
        # Heavy buckets: entry i starts one when entry i + HEAVY has its prefix (in chunks: memory).
        found = [np.empty(0, dtype=np.uint64)]
        for a in range(0, max(0, len(merged) - HEAVY), 1 << 22):
            top = merged[a:a + (1 << 22) + HEAVY] & PREFIX
            found.append(np.unique(top[:-HEAVY][top[:-HEAVY] == top[HEAVY:]]))
        heavy_prefix = np.unique(np.concatenate(found))
        lo, hi = np.searchsorted(merged, heavy_prefix), np.searchsorted(merged, heavy_prefix + BUCKET)
        inside = np.zeros(len(merged) + 1, dtype=np.int8)    # +1 where a heavy bucket starts, -1 after
        inside[lo] = 1
        inside[hi] -= 1
        inside = np.cumsum(inside[:-1], dtype=np.int8).view(bool)
        self._heavy_rows = (merged[inside] & ROW_MASK).astype(np.uint32)
        self._heavy_bounds = np.concatenate([[0], np.cumsum(hi - lo)]).astype(np.int64)
        self._heavy_prefix = heavy_prefix
        light = merged[~inside]
        del merged, inside
        refs = heavy_prefix | (np.uint64(FLAG) + np.arange(len(heavy_prefix), dtype=np.uint64))
        main = np.insert(light, np.searchsorted(light, refs), refs)
        del light
        # Directory: the prefix's top `bits` bits (below its always-zero top bit) -> slot start.
        bits = min(30, max(0, math.ceil(math.log2(max(1.0, len(main) / ENTRIES_PER_SLOT)))))
        self._shift = np.uint64(63 - bits)
        counts = np.bincount((main >> self._shift).astype(np.intp), minlength=1 << bits)
        self._dir = np.concatenate([[0], np.cumsum(counts)]).astype(np.uint32 if len(main) < 1 << 32 else np.int64)
        width = max(1, int(counts.max()) if len(counts) else 1)
        self._padded = np.concatenate([main, np.full(width, _END, dtype=np.uint64)])
        self._main = self._padded[:len(main)]
        # Row i of _window: the `width` entries from i on (a view: no copy).
        self._window = as_strided(self._padded, shape=(len(main) + 1, width), strides=(8, 8), writeable=False)
        self._layout = (self._dir, self._shift, self._padded, self._heavy_bounds, self._heavy_rows)

    def layout(self) -> tuple[np.ndarray, np.uint64, np.ndarray, np.ndarray, np.ndarray]:
        """The sorted layout, for the compiled lookup (dreamd/dream/lsh_kernel.py): directory,
        its shift, the padded entries, heavy bounds, heavy rows (pending bulk adds sorted in
        first; the recent adds are not in it: recent_candidates)."""
        if self._pending:
            self.finish_loading()
        return self._layout

    @property
    def has_recent(self) -> bool:
        """Whether rows were added since the last merge (they are outside the sorted layout)."""
        return bool(self._recent)

    def _recent_rows(self, prefix: np.ndarray) -> list[int]:
        """The recent adds read through the query's bucket `prefix`es, once per equal band."""
        return [i for p in prefix.tolist() for i in self._recent.get(p, ())]

    def candidates(self, keys: np.ndarray, k: int, budget: int | None = None) -> tuple[np.ndarray, int]:
        """Rows that may have `k` (>= 1) of the query's band `keys` equal: every row that has,
        and, when the query leaves heavy buckets unread, rows that share fewer (the caller
        verifies the signatures); in no order, possibly repeated. And how many bucket entries
        the query read (the work it did). A read `budget` (rows) caps the heavy buckets read
        past k - 1 of them (_read_heavy): a row whose k equal bands are all in heavy buckets
        may then be missed; None reads every one it must."""
        k = max(1, min(k, self.n_bands))
        if self._pending:
            self.finish_loading()
        prefix = keys.reshape(-1) & PREFIX
        found = self._window[self._dir[prefix >> self._shift]] - prefix[:, None]
        rows = found[found < BUCKET]                   # light rows, heavy bucket ids (+ FLAG)
        if self._recent:
            recent = self._recent_rows(prefix)
            if recent:
                rows = np.concatenate([rows, np.array(recent, dtype=np.uint64)])
        if not rows.size:
            return rows, 0
        rows.sort()                                    # heavy bucket ids (>= FLAG) sort last
        light = int(rows.searchsorted(FLAG))
        heavy = rows.size - light
        if heavy > k - 1:                              # read all but the k - 1 largest
            rows = self._read_heavy(rows[:light], rows[light:], k, budget)
            return rows, rows.size                     # at most k - 1 equal bands unread: any row
        # A row is read once per equal band in a light bucket, and at most `heavy` of its equal
        # bands are in the heavy buckets left unread: one with k equal bands is read at least
        # `need` times. (A heavy id is there once: never a run of 2.)
        need = k - heavy
        if need > 1:
            return rows[need - 1:][rows[need - 1:] == rows[:1 - need]], light   # runs of >= need
        return rows[:light], light

    def recent_candidates(self, keys: np.ndarray, k: int) -> np.ndarray:
        """The rows among the recent adds (not yet merged into the sorted layout) that have `k`
        of the query's band `keys` equal, each once: the part of a lookup the compiled path
        (dreamd/dream/lsh_kernel.py) leaves to Python. A row is in the recent adds or in the
        sorted layout, never both."""
        if not self._recent:
            return np.empty(0, dtype=np.int64)
        read = self._recent_rows(keys.reshape(-1) & PREFIX)
        if len(read) < k:
            return np.empty(0, dtype=np.int64)
        rows, counts = np.unique(np.array(read, dtype=np.int64), return_counts=True)
        return rows[counts >= max(1, k)]

    def _read_heavy(self, light: np.ndarray, refs: np.ndarray, k: int, budget: int | None) -> np.ndarray:
        """The `light` rows and those of the heavy buckets `refs` (FLAG + id, sorted) but the
        k - 1 largest (a row with k equal bands is in one of the others); with a `budget`, of
        those only the smallest whose rows add up to at most `budget` (ties: the lower id)."""
        ids = (refs - np.uint64(FLAG)).astype(np.intp)
        lo, hi = self._heavy_bounds[ids], self._heavy_bounds[ids + 1]
        read = np.argsort(hi - lo, kind="stable")[:len(ids) - (k - 1)]
        if budget is not None:
            read = read[:int(np.searchsorted(np.cumsum((hi - lo)[read]), budget, side="right"))]
        parts = (self._heavy_rows[a:b] for a, b in zip(lo[read].tolist(), hi[read].tolist()))
        return np.concatenate([light, *parts])
