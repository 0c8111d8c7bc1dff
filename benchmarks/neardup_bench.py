"""Near duplicates: dreamd's own MinHash + SQL bands vs datasketch, at 10k and 100k stored.

    .venv/bin/python benchmarks/neardup_bench.py --stored 10000 100000

Texts are template-dreamer scenarios (the real distribution: shared frames, varied slots).
Columns:
  signature_us   one signature from a scenario's text (shingling included); datasketch's
                 MinHash with its default sha1 per shingle, dreamd's numpy universal hashing
  build_s        make the index hold N signatures: dreamd inserts rows into a SQLite store (the
                 cost of a first backfill; a running daemon adds one scenario at a time);
                 datasketch MinHashLSH inserts in memory, and a restart must do it again (it
                 has no SQL storage: rebuild = load N signatures + insert)
  query_ms       one near-duplicate lookup (candidates by band + verification), mean of 500
  add_ms         index one accepted scenario (dreamd: one transaction)
  candidates     mean candidates a query had to verify
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from datasketch import MinHash, MinHashLSH

from dreamd.dream.neardup import NUM_PERM, SCHEME, NearDupIndex, band_keys, shingles, signature, to_bytes
from dreamd.dream.scenario import Scenario
from dreamd.dream.templates import TemplateDreamer
from dreamd.store import Store

KINDS = ("accept", "pushback", "derail", "general")


def scenarios(n: int, seed: int) -> list[Scenario]:
    dreamer, rng = TemplateDreamer(spec="spec", seed=seed), random.Random(seed)
    return [dreamer.dream(KINDS[i % 4], rng) for i in range(n)]


def datasketch_minhash(text: str) -> MinHash:
    m = MinHash(num_perm=NUM_PERM)
    m.update_batch([g.encode() for g in shingles(text)])
    return m


def bench(n_stored: int, sample: list[Scenario], store_dir: Path) -> dict[str, float]:
    t = time.perf_counter()
    stored = scenarios(n_stored, seed=n_stored)
    dream_s = time.perf_counter() - t
    t = time.perf_counter()
    sigs = [signature(s.text) for s in stored]
    own_sig_us = (time.perf_counter() - t) / n_stored * 1e6
    probe = stored[:2000]
    t = time.perf_counter()
    for s in probe:
        datasketch_minhash(s.text)
    ds_sig_us = (time.perf_counter() - t) / len(probe) * 1e6

    # ---- dreamd: rows in a SQLite store (scenario rows first: the tables reference them) ----
    store = Store.open(f"sqlite:///{store_dir / f'bench-{n_stored}.sqlite'}")
    store.upgrade()
    run_id = store.start_run("bench", "{}", "/m", 0)
    cycle_id = store.start_cycle(run_id, 1, 1e-5, 0.25, n_stored)
    from sqlalchemy import insert

    from dreamd.store.tables import ScenarioRow as Row
    rows = [{"run_id": run_id, "cycle_id": cycle_id, "kind": str(s.kind), "source": s.source,
             "content_hash": None, "messages_json": s.messages, "target": s.target, "spec": None,
             "status": "accepted", "meta_json": {}} for s in stored]
    with store.session() as sess:
        sess.execute(insert(Row), rows)
    t = time.perf_counter()
    batch = 2000
    for start in range(0, n_stored, batch):
        store.add_minhashes(SCHEME, [(i + 1, to_bytes(sig), band_keys(sig))
                                     for i, sig in enumerate(sigs[start:start + batch], start)])
    own_build = time.perf_counter() - t
    index = NearDupIndex(store)
    cand, t = [], time.perf_counter()
    for s in sample:
        cand.append(len(store.minhash_candidates(SCHEME, band_keys(signature(s.text)))))
        index.find(s)
    own_query_ms = (time.perf_counter() - t) / len(sample) * 1e3 / 2  # two lookups per loop
    t = time.perf_counter()
    for i, s in enumerate(sample[:100]):
        with store.session() as sess:
            sess.execute(insert(Row), [{**rows[0], "target": f"added {i}"}])
        index.add(s, n_stored + i + 1)
    own_add_ms = (time.perf_counter() - t) / 100 * 1e3
    store.close()

    # ---- datasketch: in-memory LSH (threshold 0.8 picks its own bands: 9 x 13) --------------
    t = time.perf_counter()
    lsh = MinHashLSH(threshold=0.8, num_perm=NUM_PERM)
    for i, sig in enumerate(sigs):
        lsh.insert(i, MinHash(num_perm=NUM_PERM, hashvalues=sig.astype(np.uint64), scheme="affine32"),
                   check_duplication=False)
    ds_build = time.perf_counter() - t
    t = time.perf_counter()
    for s in sample:
        lsh.query(MinHash(num_perm=NUM_PERM, hashvalues=signature(s.text).astype(np.uint64),
                          scheme="affine32"))
    ds_query_ms = (time.perf_counter() - t) / len(sample) * 1e3
    return {"stored": n_stored, "dream_s": dream_s, "own_sig_us": own_sig_us, "ds_sig_us": ds_sig_us,
            "own_build_s": own_build, "ds_build_s": ds_build, "own_query_ms": own_query_ms,
            "ds_query_ms": ds_query_ms, "own_add_ms": own_add_ms, "candidates": statistics.mean(cand)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stored", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--queries", type=int, default=500)
    args = ap.parse_args()
    sample = scenarios(args.queries, seed=12345)
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.stored:
            r = bench(n, sample, Path(tmp))
            print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()),
                  flush=True)


if __name__ == "__main__":
    main()
