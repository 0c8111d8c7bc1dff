"""The near-duplicate lookup compiled (numba), for NearDupIndex.find_signature.

    lookup = kernel()          # None where numba does not import: the numpy path is used
    row, equal, compared, read, _ = lookup(sig, mul, add, dir, shift, padded, heavy_bounds,
                                           heavy_rows, k, sigs, nibbles, ids, max_differ, budget)

Why compiled. The numpy lookup (lsh.BandIndex.candidates, then the comparison in neardup.py)
is 12-15 numpy calls of ~1 us each whatever the store's size, and a frame-heavy query adds a
dozen more. One compiled call does the same work: ~2.5-3 us at 1e3 stored, ~5.5-10 us at 1e6,
against ~9-13 and ~28-45 (two machines; docs/benchmarks.md, "Near duplicates").

What it computes: the stored row most similar to `sig` with at most `max_differ` of its NUM_PERM
positions different (ties: the lowest scenario id), as comparing every signature of the sorted
layout would (the recent adds, still in BandIndex._recent, are the caller's). The candidates are
those of lsh.py, by the same pigeonhole: the band keys; the 32 buckets read through the
directory (light rows, heavy bucket ids); with at most k - 1 heavy buckets none is read and a
row is a candidate when read at least k - (heavy buckets) times; with more, all but the k - 1
largest are read and every row read is a candidate (a repeat is screened again, from cache:
cheaper than deduplicating through a row-indexed array, measured). With a read `budget` >= 0,
of those only the smallest whose rows add up to at most `budget` (ties: the lower bucket id),
as lsh.BandIndex._read_heavy; -1: no budget. Each candidate is screened
on its nibbles (the low 4 bits of each position, one cache line: equal nibbles bound the equal
positions from above) and the rest compared on all NUM_PERM positions, both without branches
(faster than stopping early, measured). Each phase first touches what it will read for every
band or candidate in a loop of independent loads, so their cache misses overlap.

Returns (row or -1, its equal positions, candidates screened, bucket entries read, and the xor
of the touched words, returned so the compiler keeps those loads). Compiled on the first call
(~4 s with numba's import) and cached by numba (beside this file, or in ~/.cache/numba where
the package directory is read-only: ~0.5 s in later processes; with no writable place, compiled
in every process). tests/test_neardup.py holds it to the numpy path and to comparing every
signature.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from dreamd.dream.lsh import BUCKET, FLAG, HEAVY, PREFIX

_kernel: Callable[..., tuple[int, int, int, int, int]] | None = None
_tried = False


def kernel() -> Callable[..., tuple[int, int, int, int, int]] | None:
    """The compiled lookup, or None where numba is not installed, does not import or is turned
    off (NUMBA_DISABLE_JIT=1): the numpy path then."""
    global _kernel, _tried
    if not _tried:
        _tried = True
        try:
            import numba
        except Exception:   # noqa: BLE001 - not installed, or built for another numpy
            return None
        if numba.config.DISABLE_JIT:   # NUMBA_DISABLE_JIT=1: the kernel would run as Python
            return None
        globals()["_popcount"] = _popcount_intrinsic()
        try:   # compiled once, then cached beside this file or in ~/.cache/numba where writable
            _kernel = numba.njit(nogil=True, cache=True)(_lookup)
        except RuntimeError:   # no writable place: compiled in every process (~4 s)
            _kernel = numba.njit(nogil=True, cache=False)(_lookup)
    return _kernel


_PREFIX = np.uint64(PREFIX)
_BUCKET = np.uint64(BUCKET)
_FLAG = np.uint64(FLAG)
_NIBBLE_BIT0 = np.uint64(0x1111_1111_1111_1111)
_ONE, _TWO = np.uint64(1), np.uint64(2)


def _popcount(x: Any) -> Any:
    """The set bits of a uint64 (replaced by the CPU's popcount instruction when compiled)."""
    return np.uint64(int(x).bit_count())


def _popcount_intrinsic() -> Any:
    """llvm.ctpop.i64 for the compiled kernel: one instruction where the CPU has popcnt, where
    the multiply-and-shift count it replaced cost the frame-heavy lookups ~17% more (measured,
    docs/benchmarks.md)."""
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def popcount(typingctx: Any, x: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.call(builder.module.declare_intrinsic("llvm.ctpop", [ir.IntType(64)]), [args[0]])
        return types.uint64(types.uint64), codegen

    return popcount


def _lookup(sig: Any, mul: Any, add: Any, dir_: Any, shift: Any, padded: Any, heavy_bounds: Any,
            heavy_rows: Any, k: int, sigs: Any, nibbles: Any, ids: Any,
            max_differ: int, budget: int) -> tuple[int, int, int, int, int]:
    n_bands = add.shape[0]
    per_band = sig.shape[0] // n_bands
    prefixes = np.empty(n_bands, dtype=np.uint64)
    starts = np.empty(n_bands, dtype=np.int64)
    for b in range(n_bands):
        key = add[b]
        for r in range(per_band):
            key += np.uint64(sig[b * per_band + r]) * mul[b * per_band + r]
        prefixes[b] = key & _PREFIX
    for b in range(n_bands):
        starts[b] = np.int64(dir_[np.int64(prefixes[b] >> shift)])
    touched = np.uint64(0)
    last = padded.shape[0] - 1
    for b in range(n_bands):                          # a slot's entries span 1-2 cache lines
        touched ^= padded[starts[b]] ^ padded[min(starts[b] + 7, last)]
    light = np.empty(n_bands * HEAVY, dtype=np.int64)  # a light bucket holds at most HEAVY rows
    heavy = np.empty(n_bands, dtype=np.int64)
    n_light = n_heavy = 0
    for b in range(n_bands):
        prefix, i = prefixes[b], starts[b]
        end = prefix + _BUCKET                          # the padding after the last entry stops it
        while padded[i] < end:
            entry = padded[i]
            if entry >= prefix:
                row = entry - prefix
                if row >= _FLAG:
                    heavy[n_heavy] = np.int64(row - _FLAG)
                    n_heavy += 1
                else:
                    if n_light == light.shape[0]:          # never: lsh._build's HEAVY rule
                        raise ValueError("a light bucket of more than HEAVY rows")
                    light[n_light] = np.int64(row)
                    n_light += 1
            i += 1
    # Past k - 1 heavy buckets, read all but the k - 1 largest, and every row read is a
    # candidate (not deduplicated: a repeat is screened again from cache). Otherwise none is
    # read, and a row is a candidate when read at least k - (heavy buckets) times.
    if n_heavy > k - 1:
        sizes = np.empty(n_heavy, dtype=np.int64)
        for j in range(n_heavy):              # sorted by size, then id (insertion: at most 32)
            h, at = heavy[j], j
            size = heavy_bounds[h + 1] - heavy_bounds[h]
            while at and (sizes[at - 1] > size or (sizes[at - 1] == size and heavy[at - 1] > h)):
                sizes[at], heavy[at] = sizes[at - 1], heavy[at - 1]
                at -= 1
            sizes[at], heavy[at] = size, h
        n_read = n_heavy - (k - 1)                   # the smallest
        total = n_light
        for j in range(n_read):
            if budget >= 0 and total - n_light + sizes[j] > budget:
                n_read = j
                break
            total += sizes[j]
        cand = np.empty(total, dtype=np.int64)
        cand[:n_light] = light[:n_light]
        n_cand = n_light
        for j in range(n_read):
            for i in range(heavy_bounds[heavy[j]], heavy_bounds[heavy[j] + 1]):
                cand[n_cand] = heavy_rows[i]
                n_cand += 1
    else:
        need = k - n_heavy
        rows = light[:n_light]
        for j in range(1, n_light):                   # sorted in place (insertion: at most 256)
            row, at = rows[j], j
            while at and rows[at - 1] > row:
                rows[at] = rows[at - 1]
                at -= 1
            rows[at] = row
        cand = np.empty(n_light, dtype=np.int64)
        n_cand = j = 0
        while j < n_light:
            run = 1
            while j + run < n_light and rows[j + run] == rows[j]:
                run += 1
            if run >= need:
                cand[n_cand] = rows[j]
                n_cand += 1
            j += run
    read = n_light if n_heavy <= k - 1 else cand.shape[0]
    # Screen on the nibbles, then compare the signatures of the rest.
    for j in range(n_cand):
        touched ^= nibbles[cand[j], 0]
    n_perm, words = sig.shape[0], nibbles.shape[1]
    query = np.zeros(words, dtype=np.uint64)          # the query's nibbles, 16 to a word
    for p in range(n_perm):
        query[p // 16] |= np.uint64(sig[p] & 15) << np.uint64(4 * (p % 16))
    kept = 0
    for j in range(n_cand):
        row, differ = cand[j], 0
        for w in range(words):
            x = nibbles[row, w] ^ query[w]
            x |= x >> _ONE
            x |= x >> _TWO                              # bit 0 of a nibble: any of its bits differs
            differ += np.int64(_popcount(x & _NIBBLE_BIT0))
        if differ <= max_differ:
            cand[kept] = row
            kept += 1
    for j in range(kept):
        touched ^= np.uint64(sigs[cand[j], 0])
    best_row, best_equal, best_id = -1, -1, 0
    for j in range(kept):
        row, differ = cand[j], 0
        for p in range(n_perm):
            differ += sigs[row, p] != sig[p]
        if differ <= max_differ:
            equal = n_perm - differ
            if equal > best_equal or (equal == best_equal and ids[row] < best_id):
                best_row, best_equal, best_id = row, equal, ids[row]
    return best_row, best_equal, n_cand, read, touched
