"""The in-memory LSH band index behind dreamd/dream/neardup.py: which stored signatures share
enough bands with a query to be worth comparing.

    bands = BandIndex(n_bands=32)
    bands.add(ids, keys)                 # keys: (n, 32) uint64 band keys (neardup.band_keys)
    bands.candidates(query_keys, k=7)    # ids sharing >= 7 of the 32 band keys (int64 array)

Layout: one sorted uint64 array with one entry per (scenario, band):
`band (5 bits) | band key (27 bits) | scenario id (32 bits)`. A bucket (scenarios whose band b
has key h) is one contiguous run of that array, its ids in order, found by two binary searches;
all 32 buckets of a query come from ONE vectorised searchsorted. 8 bytes per band per scenario:
256 bytes a scenario at 32 bands (256 MB at 1e6 stored), no Python object per entry.

Adds go to a small dict (`_recent`) and are merged into the sorted array when it holds more
than an eighth of it (amortised O(log n) per add); a query reads both.

k of 32: a pair whose signatures agree in at least m of 128 positions differs in at most
128 - m, so at least 32 - (128 - m) of the 32 bands of 4 rows are equal (pigeonhole). At the
0.8 threshold (m = 103) that is 7 bands: requiring 7 equal bands loses no pair the signature
check would accept, and drops the many template pairs that share a band or two through their
common frame words (J ~ 0.3-0.6). It also lets a query skip its k - 1 largest buckets when
collecting ids (a pair with k equal bands is in one of the others) and only test its
candidates' membership in them: the frame-word buckets that grow with the store are never
expanded.
"""

from __future__ import annotations

import numpy as np

KEY_BITS = 27
ID_BITS = 32
ID_MASK = np.uint64((1 << ID_BITS) - 1)
_BUCKET = np.uint64(1 << ID_BITS)  # one key step: [prefix, prefix + _BUCKET) is one bucket


class BandIndex:
    """Scenario ids by LSH band key, in memory (rebuilt from the store's signatures at start)."""

    def __init__(self, n_bands: int) -> None:
        if not 1 <= n_bands <= 32:
            raise ValueError(f"n_bands must be 1..32, got {n_bands}")
        self.n_bands = n_bands
        self._band_prefix = np.arange(n_bands, dtype=np.uint64) << np.uint64(KEY_BITS + ID_BITS)
        self._sorted = np.empty(0, dtype=np.uint64)
        self._recent: dict[int, list[int]] = {}
        self._recent_entries = 0
        self._pending: list[np.ndarray] = []
        self.size = 0

    @property
    def nbytes(self) -> int:
        return int(self._sorted.nbytes) + self._recent_entries * 8

    def prefixes(self, keys: np.ndarray) -> np.ndarray:
        """(n, n_bands) uint64: each band key cut to KEY_BITS bits, placed above the id bits
        with the band number on top."""
        keys = np.asarray(keys, dtype=np.uint64).reshape(-1, self.n_bands)
        return self._band_prefix | ((keys >> np.uint64(64 - KEY_BITS)) << np.uint64(ID_BITS))

    def add(self, ids: np.ndarray, keys: np.ndarray, bulk: bool = False) -> None:
        """Index scenarios `ids` (each once: the caller adds an id only the first time) by their
        band `keys` ((n, n_bands)). bulk: straight into the sorted array (loading at start)."""
        ids = np.asarray(ids, dtype=np.uint64).reshape(-1)
        if not len(ids):
            return
        if int(ids.max()) > int(ID_MASK):
            raise ValueError(f"scenario id {int(ids.max())} does not fit in {ID_BITS} bits")
        entries = self.prefixes(keys) | ids[:, None]
        self.size += len(ids)
        if bulk:
            self._pending.append(entries.reshape(-1))
            return
        for row in entries:
            for entry in row.tolist():
                self._recent.setdefault(entry & ~int(ID_MASK), []).append(entry & int(ID_MASK))
        self._recent_entries += entries.size
        if self._recent_entries > max(4096, len(self._sorted) // 8):
            self._merge()

    def _merge(self) -> None:
        recent = [prefix | i for prefix, ids in self._recent.items() for i in ids]
        merged = np.concatenate([self._sorted, *self._pending, np.array(recent, dtype=np.uint64)])
        merged.sort(kind="stable")  # radix sort for integers: O(n)
        self._sorted = merged
        self._recent, self._recent_entries, self._pending = {}, 0, []

    def finish_loading(self) -> None:
        """Sort in what bulk adds left pending (one sort for a whole load)."""
        if self._pending:
            self._merge()

    def candidates(self, keys: np.ndarray, k: int) -> tuple[np.ndarray, int]:
        """Ids of indexed scenarios with at least `k` (>= 1) of the query's band `keys` equal,
        ascending, and how many bucket entries the query read (the work it did)."""
        k = max(1, min(k, self.n_bands))
        self.finish_loading()
        prefix = self.prefixes(keys)[0]
        arr = self._sorted
        bounds = np.searchsorted(arr, np.concatenate([prefix, prefix + _BUCKET]))
        lo, hi = bounds[:self.n_bands], bounds[self.n_bands:]
        sizes = hi - lo
        order = np.argsort(sizes, kind="stable")
        # The k - 1 largest buckets are not expanded: a scenario with k equal bands has one of
        # them among the others. Only worth it for big buckets.
        skip = [b for b in order[self.n_bands - (k - 1):] if sizes[b] > 32] if k > 1 else []
        expand = np.ones(self.n_bands, dtype=bool)
        expand[skip] = False
        n = sizes[expand]
        total = int(n.sum())
        if total:
            starts = np.repeat(lo[expand] - np.concatenate([[0], np.cumsum(n)[:-1]]), n)
            ids = arr[np.arange(total) + starts] & ID_MASK
        else:
            ids = np.empty(0, dtype=np.uint64)
        if self._recent:
            recent = [i for p in prefix.tolist() for i in self._recent.get(p, ())]
            if recent:
                ids = np.concatenate([ids, np.array(recent, dtype=np.uint64)])
        if not len(ids):
            return np.empty(0, dtype=np.int64), total
        uniq, counts = np.unique(ids, return_counts=True)
        if skip:
            keep = counts >= k - len(skip)   # the others can still make it k
            uniq, counts = uniq[keep], counts[keep]
            needles = (prefix[skip][:, None] | uniq[None, :]).reshape(-1)
            at = np.searchsorted(arr, needles)
            found = at < len(arr)
            found[found] = arr[at[found]] == needles[found]
            counts = counts + found.reshape(len(skip), -1).sum(axis=0)
        return uniq[counts >= k].astype(np.int64), total + len(skip) * len(uniq)
