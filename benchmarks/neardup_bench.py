"""Near duplicates: one lookup against 1e3 .. 1e6 stored template scenarios, dreamd's index
(SQLite store) vs datasketch's in-memory MinHashLSH, with recall and false positives.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/neardup_bench.py --stored 1000 10000 100000 1000000
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/neardup_bench.py --interleaved --stored 1000 1000000
    ... --corpus draws          every draw stored, near copies of each other included
    ... --path numpy            size by size: the numpy lookup instead of the compiled one
    ... --read-budget all       the exact lookup (default: the daemon's budget, 64 rows)

The same script measures the code before migration 0006 (SQL bands) when run against that tree:
    git archive 7f58333 dreamd migrations | tar -x -C /tmp/nd-before
    PYTHONPATH=/tmp/nd-before .venv/bin/python benchmarks/neardup_bench.py --stored 1000 10000 100000

Data: one stream of 1.2e6 template-dreamer scenarios (the real distribution: shared frames,
varied slots), signed once and cached with its texts in ~/.cache/dreamd-bench/ (~5-12 min to
build). Stored N (--corpus accepted, the default) is the first N the daemon would have accepted:
the stream screened in order by dreamd's own index, a draw kept when no draw kept before it is
a near duplicate (1e6 accepted of the first 1,087,412 draws; cached as an index list). The
daemon's index never holds two near copies of each other (a run screens every scenario against
its own before accepting it); --corpus draws stores the first N draws as they come, clusters of
near copies included, the store of a run without the near-duplicate rule. The store for each N
is cached there too and holds only what the lookup reads: minimal scenario rows (the signature
rows reference them; no text) and the signatures (before 0006: also the 32 band rows each).
Queries, all from precomputed signatures (signing one is ~200 us for every method alike, not
counted):
  fresh    500 new template draws (another seed): the screening workload
  planted  500 near copies of random stored scenarios, words replaced until the exact Jaccard
           of the word 3-grams is in [0.8, 1.0): each should be found
Columns:
  ms       one lookup (bands, candidates, verification on the signatures): the mean over the
           fresh queries of each one's fastest of 5 interleaved rounds; median_ms likewise
  cand     signatures compared per fresh lookup (since 8ce71c0 a row read through two equal
           bands may be compared twice, unless its lookup screened its candidates)
  rej      share of fresh draws rejected; fp: of those, the share whose exact Jaccard with the
           scenario named is below the threshold (a false positive of the MinHash estimate)
  recall   planted near copies found
  open_s   dreamd: open the index (read every signature, build the bands); rss_mb the process's
           RSS growth doing so. datasketch: build_s inserts N signatures (no storage).
datasketch (optional: `pip install datasketch`) picks its own bands for 0.8 (9 x 13) and its
candidates are verified on the signatures in memory, like dreamd's.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from dreamd.config import ScreenConfig
from dreamd.dream import neardup
from dreamd.dream.neardup import NUM_PERM, SCHEME, jaccard, shingles, signature, to_bytes
from dreamd.dream.templates import TemplateDreamer
from dreamd.store import Store

KINDS = ("accept", "pushback", "derail", "general")
CACHE = Path.home() / ".cache" / "dreamd-bench"
CORPUS_N, CORPUS_SEED, QUERY_SEED = 1_200_000, 1_000_000, 12345   # 1.2e6 draws: 1e6 accepted
ROUNDS = 5
NEW = hasattr(neardup, "bands_needed")   # False: the tree before migration 0006 (SQL bands)
IMPL = "memory-bands" if NEW else "sql-bands"
PATH = "compiled"      # --path: NearDupIndex's lookup path (compiled where numba is installed, or numpy)
BUDGET: int | None = None   # --read-budget: NearDupIndex's read_budget (the daemon's default unless given)


def draw(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    dreamer, rng = TemplateDreamer(spec="spec", seed=seed), random.Random(seed)
    sigs, texts = np.zeros((n, NUM_PERM), dtype=np.uint32), []
    for i in range(n):
        text = dreamer.dream(KINDS[i % 4], rng).text
        texts.append(text)
        sig = signature(text)
        if sig is not None:
            sigs[i] = sig
    return sigs, texts


def raw_corpus() -> tuple[np.ndarray, list[str]]:
    base = CACHE / f"templates-s{CORPUS_SEED}-n{CORPUS_N}"
    sig_path, text_path = Path(f"{base}.sig.npy"), Path(f"{base}.txt.gz")
    if not (sig_path.exists() and text_path.exists()):
        print(f"building the corpus cache {base}.* (once, ~12 min)", flush=True)
        sigs, texts = draw(CORPUS_N, CORPUS_SEED)
        CACHE.mkdir(parents=True, exist_ok=True)
        np.save(sig_path, sigs)
        with gzip.open(text_path, "wt") as f:
            json.dump(texts, f)
    with gzip.open(text_path, "rt") as f:
        texts = json.load(f)
    return np.load(sig_path), texts


class _Signatures:
    """Just enough of a Store for NearDupIndex to screen a stream in memory (no rows kept)."""

    def minhash_page(self, *args, **kwargs) -> list:
        return []

    def add_minhashes(self, scheme: str, rows: list) -> list[int]:
        return [sid for sid, _ in rows]


def accepted(sigs: np.ndarray, threshold: float, want: int) -> np.ndarray:
    """Which draws the daemon would store: the stream screened in order by dreamd's own index
    (a draw is kept when no kept draw before it is a near duplicate), the first `want` kept."""
    path = CACHE / f"templates-s{CORPUS_SEED}-n{CORPUS_N}-accepted-t{threshold:g}.npy"
    if path.exists():
        return np.load(path)
    print(f"screening the corpus into {path} (once)", flush=True)
    index, kept = neardup.NearDupIndex(_Signatures(), threshold=threshold), []
    for i, sig in enumerate(sigs):
        if not sig.any() or index.find_signature(sig) is not None:
            continue
        index.add_signature(i + 1, sig)
        kept.append(i)
        if len(kept) == want:
            break
    if len(kept) < want:
        raise SystemExit(f"only {len(kept)} of {CORPUS_N} draws accepted; raise CORPUS_N")
    np.save(path, np.array(kept, dtype=np.int64))
    return np.load(path)


def corpus(kind: str, threshold: float, want: int) -> tuple[np.ndarray, list[str]]:
    """'draws': every template draw, near copies of each other included (a store without a
    screen); 'accepted': what the daemon stores, each draw screened against those kept before it."""
    sigs, texts = raw_corpus()
    if kind == "draws":
        return sigs[:want], texts[:want]
    keep = accepted(sigs, threshold, want)
    return sigs[keep], [texts[i] for i in keep]


def planted(texts: list[str], n_stored: int, count: int, threshold: float, seed: int) -> list[tuple[int, np.ndarray]]:
    """(original index, signature) of near copies with exact Jaccard in [threshold, 1)."""
    rng, out = random.Random(seed), []
    while len(out) < count:
        i = rng.randrange(n_stored)
        words = re.findall(r"\w+", texts[i])
        if len(words) < 12:
            continue
        original = shingles(texts[i])
        for _ in range(len(words)):
            words[rng.randrange(len(words))] = f"x{rng.randrange(10**6)}"
            j = jaccard(original, shingles(" ".join(words)))
            if j < 1.0 and j >= threshold:
                out.append((i, signature(" ".join(words))))
                break
            if j < threshold:
                break
    return out


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def open_store(n: int, sigs: np.ndarray, kind: str) -> Store:
    path = CACHE / f"neardup-{IMPL}-{kind}-{n}.sqlite"
    fresh = not path.exists()
    store = Store.open(f"sqlite:///{path}")
    if not fresh:
        return store
    print(f"building {path} (once)", flush=True)
    store.upgrade()
    from sqlalchemy import insert

    from dreamd.store.tables import ScenarioRow
    run_id = store.start_run("bench", "{}", "/m", 0)
    cycle_id = store.start_cycle(run_id, 1, 1e-5, 0.25, n)
    batch = 10_000
    for start in range(0, n, batch):
        rows = range(start, min(n, start + batch))
        with store.session() as s:
            s.execute(insert(ScenarioRow), [{"run_id": run_id, "cycle_id": cycle_id, "kind": KINDS[i % 4],
                                             "source": "template", "content_hash": None, "messages_json": [],
                                             "target": "", "spec": None, "status": "accepted", "meta_json": {}}
                                            for i in rows])
        if NEW:
            store.add_minhashes(SCHEME, [(i + 1, to_bytes(sigs[i])) for i in rows])
        else:
            store.add_minhashes(SCHEME, [(i + 1, to_bytes(sigs[i]), neardup.band_keys(sigs[i])) for i in rows])
    return store


class Old:
    """The lookup before 0006 (dreamd.dream.neardup.NearDupIndex.find, from a signature)."""

    def __init__(self, store: Store, threshold: float) -> None:
        self.store, self.threshold, self.last_candidates = store, threshold, 0

    def find_signature(self, sig: np.ndarray) -> tuple[int, float] | None:
        best = None
        found = self.store.minhash_candidates(SCHEME, neardup.band_keys(sig))
        self.last_candidates = len(found)
        for scenario_id, raw in found:
            sim = neardup.similarity(sig, neardup.from_bytes(raw))
            if sim >= self.threshold and (best is None or sim > best[1]):
                best = (scenario_id, sim)
        return best


def run_lookups(find, queries: list[np.ndarray], rounds: int = 1) -> tuple[list[float], list]:
    """Per query: the fastest of `rounds` timings (rounds interleaved: the box is shared, and
    a lookup's own cost is its fastest run), and its result."""
    times, hits = [float("inf")] * len(queries), [None] * len(queries)
    for _ in range(rounds):
        for i, q in enumerate(queries):
            t = time.perf_counter()
            hits[i] = find(q)
            times[i] = min(times[i], time.perf_counter() - t)
    return times, hits


def as_pair(hit) -> tuple[int, float] | None:
    return None if hit is None else (hit.scenario_id, hit.similarity) if hasattr(hit, "scenario_id") else hit


def report(name: str, n: int, times: list[float], cand: list[int], fresh_hits: list, fresh_texts: list[str],
           texts: list[str], plant_hits: list, threshold: float, extra: str) -> float:
    rejected = [(t, h) for t, h in zip(fresh_texts, map(as_pair, fresh_hits)) if h is not None]
    fp = sum(jaccard(shingles(t), shingles(texts[h[0] - 1])) < threshold for t, h in rejected)
    ms = statistics.mean(times) * 1e3
    recall = sum(h is not None for h in plant_hits) / len(plant_hits)
    print(f"{name:<13} stored={n:<8} ms={ms:.4f} median_ms={statistics.median(times) * 1e3:.4f} "
          f"cand={statistics.mean(cand):.2f} rej={len(rejected) / len(fresh_texts):.3f} "
          f"fp={fp / max(1, len(rejected)):.3f} ({fp}/{len(rejected)}) recall={recall:.3f} {extra}", flush=True)
    return ms


def datasketch_lookup(sigs: np.ndarray, n: int, threshold: float):
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    perms = MinHash(num_perm=NUM_PERM).permutations   # shared: not regenerated per MinHash

    def minhash(sig: np.ndarray) -> MinHash:
        return MinHash(num_perm=NUM_PERM, hashvalues=sig.astype(np.uint64), permutations=perms,
                       scheme="affine32")

    t = time.perf_counter()
    with lsh.insertion_session() as session:
        for i in range(n):
            session.insert(i + 1, minhash(sigs[i]), check_duplication=False)
    build_s = time.perf_counter() - t
    cand: list[int] = []

    def find(sig: np.ndarray) -> tuple[int, float] | None:
        ids = lsh.query(minhash(sig))
        cand.append(len(ids))
        if not ids:
            return None
        ids = np.array(ids)
        sims = (sigs[ids - 1] == sig).sum(axis=1) / NUM_PERM
        best = int(np.argmax(sims))
        return (int(ids[best]), float(sims[best])) if sims[best] >= threshold else None

    return find, cand, build_s, lsh


def bench(n: int, sigs: np.ndarray, texts: list[str], fresh: tuple[np.ndarray, list[str]],
          plants: list[tuple[int, np.ndarray]], threshold: float, kind: str) -> dict[str, float]:
    store = open_store(n, sigs, kind)
    size_mb = Path(store.engine.url.database).stat().st_size / 2**20
    rss0, t = rss_mb(), time.perf_counter()
    index = neardup.NearDupIndex(store, threshold=threshold) if NEW else Old(store, threshold)
    if NEW:
        index.compiled = PATH == "compiled"
        index.read_budget = BUDGET
    open_s, rss_grew = time.perf_counter() - t, rss_mb() - rss0
    queries = list(fresh[0])
    run_lookups(index.find_signature, queries[:50])                      # warm the page cache
    cand = []
    for q in queries:
        index.find_signature(q)
        cand.append(index.last_candidates)
    times, hits = run_lookups(index.find_signature, queries, ROUNDS)
    _, plant_hits = run_lookups(index.find_signature, [s for _, s in plants])
    extra = f"store_mb={size_mb:.0f} open_s={open_s:.2f} rss_mb={rss_grew:.0f}"
    if NEW:
        extra += f" index_mb={index.nbytes / 2**20:.0f}"
    own = report(f"dreamd-{IMPL}-{PATH}" if NEW else f"dreamd-{IMPL}", n, times, cand, hits, fresh[1], texts, plant_hits, threshold, extra)
    store.close()
    out = {"own_ms": own}
    try:
        import datasketch  # noqa: F401
    except ImportError:
        print("datasketch    not installed (pip install datasketch): no in-memory LSH column", flush=True)
        return out
    rss0 = rss_mb()
    find, ds_cand, build_s, lsh = datasketch_lookup(sigs, n, threshold)
    rss_grew = rss_mb() - rss0
    run_lookups(find, queries[:50])
    ds_cand.clear()
    times, hits = run_lookups(find, queries, ROUNDS)
    cand = list(ds_cand[:len(queries)])
    _, plant_hits = run_lookups(find, [s for _, s in plants])
    out["ds_ms"] = report("datasketch", n, times, cand, hits, fresh[1], texts, plant_hits, threshold,
                          f"build_s={build_s:.1f} rss_mb={rss_grew:.0f}")
    del lsh
    return out


def budget_losses(index: Any, exact: tuple[bool, None], budgeted: tuple[bool, int], batch: list[np.ndarray],
                  threshold: float) -> tuple[list, list[int]]:
    """The exact lookup's answers for `batch`, and the places where the budgeted lookup (an
    index setting: compiled, read_budget) found nothing the exact one found (never a false hit)."""
    index.compiled, index.read_budget = exact
    want = [index.find_signature(q) for q in batch]
    index.compiled, index.read_budget = budgeted
    got = [index.find_signature(q) for q in batch]
    assert all(g is None or g.similarity >= threshold for g in got), "a false hit"
    return want, [i for i, (g, w) in enumerate(zip(got, want)) if w is not None and g is None]


def interleaved(sizes: list[int], sigs: np.ndarray, texts: list[str], fresh: tuple[np.ndarray, list[str]],
                threshold: float, kind: str) -> None:
    """dreamd's index at every size open at once, the same lookups timed round-robin across the
    sizes and both lookup paths (compiled, numpy; each query's fastest of ROUNDS): the growth
    with the store, and the paths against each other, measured side by side under the same
    load, which the size-by-size runs above are not. The paths' answers are checked equal.
    With a read budget, the exact lookup (no budget, compiled) is timed beside them and each
    size says what the budget lost: fresh draws the exact lookup rejects that it lets pass
    (and of those, how many are near duplicates by the exact Jaccard of their texts, not only
    by the MinHash estimate), planted near copies (500 a size) the exact lookup finds and it
    does not."""
    queries = list(fresh[0])
    indexes = {n: neardup.NearDupIndex(open_store(n, sigs, kind), threshold=threshold) for n in sizes}
    kernel = getattr(neardup, "lsh_kernel", None)      # None: a tree from before the compiled path
    paths = ("compiled", "numpy") if kernel is not None and kernel.kernel() is not None else ("numpy",)
    variants = {path: (path == "compiled", BUDGET) for path in paths}
    if BUDGET is not None:
        variants["exact"] = (paths[0] == "compiled", None)
    for n, index in indexes.items():
        answers = []
        for path in paths:
            index.compiled, index.read_budget = variants[path]
            answers.append([index.find_signature(q) for q in queries])
        assert all(a == answers[0] for a in answers), "the lookup paths disagree"
        if BUDGET is not None:
            plants = [q for _, q in planted(texts, n, len(queries), threshold, seed=n)]
            (fresh_exact, fresh_lost), (plant_exact, plant_lost) = (
                budget_losses(index, variants["exact"], variants[paths[0]], batch, threshold)
                for batch in (queries, plants))
            true = sum(jaccard(shingles(fresh[1][i]), shingles(texts[fresh_exact[i].scenario_id - 1])) >= threshold
                       for i in fresh_lost)
            print(f"interleaved stored={n:<8} read_budget={BUDGET}: fresh rejections lost {len(fresh_lost)} of "
                  f"{sum(e is not None for e in fresh_exact)} ({true} a near duplicate by the exact Jaccard), "
                  f"planted finds lost {len(plant_lost)} of {sum(e is not None for e in plant_exact)}", flush=True)
    times = {(p, n): [float("inf")] * len(queries) for p in variants for n in sizes}
    for _ in range(ROUNDS):
        for path in variants:
            for n, index in indexes.items():
                index.compiled, index.read_budget = variants[path]
                for i, q in enumerate(queries):
                    t = time.perf_counter()
                    index.find_signature(q)
                    times[path, n][i] = min(times[path, n][i], time.perf_counter() - t)
    first = sizes[0]
    for path in variants:
        for n in sizes:
            mean, median = statistics.mean(times[path, n]) * 1e3, statistics.median(times[path, n]) * 1e3
            ranked = sorted(times[path, n])
            body = ranked[:len(ranked) * 9 // 10]                   # all but the slowest 10%
            print(f"interleaved {path:<8} stored={n:<8} ms={mean:.4f} median_ms={median:.4f} = "
                  f"{mean / (statistics.mean(times[path, first]) * 1e3):.2f}x (median "
                  f"{median / (statistics.median(times[path, first]) * 1e3):.2f}x) stored={first}; "
                  f"slowest 10%: {1 - sum(body) / sum(ranked):.2f} of the time, the rest ms={statistics.mean(body) * 1e3:.4f} "
                  f"index_mb={indexes[n].nbytes / 2**20:.0f}", flush=True)
    if len(paths) == 2:
        for n in sizes:
            print(f"interleaved stored={n:<8} compiled / numpy = "
                  f"{statistics.mean(times['compiled', n]) / statistics.mean(times['numpy', n]):.2f}x (mean), "
                  f"{statistics.median(times['compiled', n]) / statistics.median(times['numpy', n]):.2f}x (median)",
                  flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stored", type=int, nargs="+", default=[1000, 10_000, 100_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--interleaved", action="store_true",
                    help="only dreamd, every size open at once, lookups timed round-robin across sizes")
    ap.add_argument("--corpus", choices=("accepted", "draws"), default="accepted",
                    help="accepted: what the daemon stores (each draw screened against those kept before it); "
                         "draws: every draw, near copies of each other included")
    ap.add_argument("--path", choices=("compiled", "numpy"), default="compiled",
                    help="size by size: the lookup path timed (--interleaved times both)")
    ap.add_argument("--read-budget", default=str(ScreenConfig().near_dup_rows),
                    help="NearDupIndex's read_budget (rows), or 'all' for the exact lookup "
                         "(default: the daemon's, screen.near_dup_read_budget)")
    args = ap.parse_args()
    global PATH, BUDGET
    PATH = args.path
    BUDGET = None if args.read_budget in ("all", "None") else int(args.read_budget)
    print(f"impl={IMPL} path={PATH} read_budget={BUDGET} corpus={args.corpus} threshold={args.threshold} queries={args.queries} "
          f"(+{args.queries} planted) OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)
    sigs, texts = corpus(args.corpus, args.threshold, max(args.stored))
    fresh = draw(args.queries, QUERY_SEED)
    if args.interleaved:
        if not NEW:
            raise SystemExit("--interleaved: the tree before migration 0006 has no in-memory index")
        interleaved(args.stored, sigs, texts, fresh, args.threshold, args.corpus)
        return
    results = {}
    for n in args.stored:
        plants = planted(texts, n, args.queries, args.threshold, seed=n)
        results[n] = bench(n, sigs, texts, fresh, plants, args.threshold, args.corpus)
    first = results[args.stored[0]]
    for n, r in results.items():
        line = f"stored={n:<8} dreamd {r['own_ms']:.4f} ms = {r['own_ms'] / first['own_ms']:.2f}x stored={args.stored[0]}"
        if "ds_ms" in r:
            line += f"; datasketch {r['ds_ms']:.4f} ms; dreamd / datasketch = {r['own_ms'] / r['ds_ms']:.2f}x"
        print(line, flush=True)


if __name__ == "__main__":
    main()
