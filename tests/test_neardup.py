"""Near duplicates: MinHash accuracy against exact Jaccard, LSH recall, the in-memory band index
against brute force, the persisted index on a real store (SQLite file / PostgreSQL), the
configurable threshold, only accepted scenarios indexed, backfill, stores from before migration
0006 and signatures of another scheme, the dream_summary view, and the check holding across a
restart."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text

from dreamd.config import EvalConfig, ScreenConfig
from dreamd.config_file import load_config
from dreamd.cycle import run_cycle
from dreamd.dream import lsh_kernel
from dreamd.dream.lsh import PREFIX, BandIndex
from dreamd.dream.neardup import (
    BANDS,
    NUM_PERM,
    SCHEME,
    NearDupIndex,
    band_keys,
    bands_needed,
    jaccard,
    shingles,
    signature,
    similarity,
    to_bytes,
)
from dreamd.dream.scenario import Scenario
from dreamd.dream.screen import Screener
from dreamd.evals.forgetting import screen_rule as forgetting_rule
from dreamd.dream.templates import TemplateDreamer
from dreamd.run import open_run
from dreamd.store import Store

WORDS = [f"w{i}" for i in range(5000)]


def words_text(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(WORDS) for _ in range(n)]


def scenario_of(body: str, target: str = "Done.") -> Scenario:
    return Scenario(kind="accept", source="template", messages=[{"role": "user", "content": body}],
                    target=target, spec="spec")


def edited(words: list[str], rng: random.Random, n_changes: int) -> list[str]:
    out = list(words)
    for i in rng.sample(range(len(out)), n_changes):
        out[i] = rng.choice(WORDS)
    return out


# ---- the estimator --------------------------------------------------------------------------


def test_shingles_are_word_trigrams_of_the_normalised_text() -> None:
    assert shingles("The  CAT sat\non the mat") == {"the cat sat", "cat sat on", "sat on the", "on the mat"}
    assert shingles("Hello, World") == {"hello world"}
    assert shingles(" ... ") == set() and signature("?!") is None


def test_minhash_estimates_exact_jaccard() -> None:
    rng = random.Random(0)
    errors = []
    for _ in range(200):
        base = words_text(rng, rng.randrange(60, 300))
        other = edited(base, rng, rng.randrange(0, len(base) // 2))
        a, b = " ".join(base), " ".join(other)
        exact = jaccard(shingles(a), shingles(b))
        errors.append(abs(similarity(signature(a), signature(b)) - exact))
    # Standard error of a 128-permutation estimate is <= sqrt(0.25/128) = 0.044.
    assert sum(errors) / len(errors) < 0.03
    assert max(errors) < 0.16


def test_lsh_bands_find_near_duplicates_and_skip_distant_texts() -> None:
    rng = random.Random(1)
    found_close = found_far = 0
    for _ in range(300):
        base = words_text(rng, 200)
        close = edited(base, rng, 4)            # ~4 words of 200 changed: J ~ 0.89
        far = edited(base, rng, 80)             # J ~ 0.15
        keys = band_keys(signature(" ".join(base)))
        found_close += bool((keys == band_keys(signature(" ".join(close)))).any())
        found_far += bool((keys == band_keys(signature(" ".join(far)))).any())
    assert found_close == 300
    assert found_far <= 10
    assert band_keys(signature("a b c d")).shape == (1, BANDS)


def test_template_stream_has_almost_no_near_duplicates_at_08() -> None:
    """The grammar's variety: 2,000 template scenarios, pairwise via LSH + signatures."""
    dreamer = TemplateDreamer(spec="spec", seed=3)
    rng = random.Random(3)
    kinds = ["accept", "pushback", "derail", "general"]
    sigs = np.stack([signature(dreamer.dream(kinds[i % 4], rng).text) for i in range(2000)])
    equal = (sigs[:, None, :] == sigs[None, :, :]).sum(axis=2)      # every pair, no LSH
    near = {i for i in range(len(sigs)) if (equal[i, :i] >= 0.8 * NUM_PERM).any()}
    assert len(near) / len(sigs) < 0.01, len(near)


# ---- the band index -------------------------------------------------------------------------


def test_k_equal_bands_hold_for_every_pair_at_the_threshold() -> None:
    """Pigeonhole: signatures agreeing in >= threshold (>= 0.76) of their positions share >= k bands, also
    when every differing position falls in a band of its own (the worst case)."""
    rng = np.random.default_rng(0)
    for threshold in (0.76, 0.8, 0.9, 1.0):            # below 0.76 k = 1 guarantees nothing
        k = bands_needed(threshold)
        differ_max = NUM_PERM - int(np.ceil(threshold * NUM_PERM - 1e-9))
        base = rng.integers(0, 1 << 32, size=NUM_PERM, dtype=np.uint32)
        for trial in range(50):
            other = base.copy()
            spread = trial % 2 == 0 and differ_max <= BANDS
            where = (np.arange(differ_max) * (NUM_PERM // BANDS) if spread
                     else rng.choice(NUM_PERM, size=differ_max, replace=False))
            other[where] ^= 1
            assert similarity(base, other) >= threshold
            assert (band_keys(base) == band_keys(other)).sum() >= k
    assert bands_needed(0.8) == 7 and bands_needed(0.75) == 1 and bands_needed(1.0) == BANDS


def test_band_index_returns_the_rows_with_k_equal_bands() -> None:
    """Against brute force, with heavy buckets (many signatures sharing bands), rows in the
    sorted array and in the recent adds, before and after merging them, and k from 1 to 32:
    every row with k equal bands; extra rows (the caller verifies signatures) only where the
    query left heavy buckets unread, and sharing at least k - (its heavy buckets) bands."""
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 1 << 32, size=NUM_PERM, dtype=np.uint32)
    sigs = rng.integers(0, 1 << 32, size=(3000, NUM_PERM), dtype=np.uint32)
    for i in range(3000):                           # a shared "frame" in a random share of bands
        share = rng.random(NUM_PERM // 4) < rng.choice([0.05, 0.3, 0.9])
        mask = np.repeat(share, 4)
        sigs[i, mask] = frame[mask]
    keys = band_keys(sigs)
    index = BandIndex(BANDS)
    assert index.add(keys[:2000], bulk=True).tolist() == list(range(2000))
    for i in range(2000, 2900):                      # one by one: some merged, the last ones not
        assert index.add(keys[i:i + 1]).tolist() == [i]
    assert index._recent and index.size == 2900
    queries = np.concatenate([sigs[rng.choice(2900, 40)], frame[None, :],
                              rng.integers(0, 1 << 32, size=(5, NUM_PERM), dtype=np.uint32)])
    heavy_counts = []
    for merged in (False, True):
        if merged:
            index._merge()                           # the recent adds into the sorted layout
            assert not index._recent
        for q in queries:
            equal = (keys[:2900] == band_keys(q)).sum(axis=1)
            heavy_counts.append(np.isin(band_keys(q) & PREFIX, index._heavy_prefix).sum())
            for k in (1, 2, 7, 12, 32):
                got, _ = index.candidates(band_keys(q), k)
                expected = np.flatnonzero(equal >= k)
                assert set(expected) <= set(got.tolist()), k
                # Extras only share fewer bands in the heavy buckets left unread: none without.
                extra = np.setdiff1d(got, expected)
                assert (equal[extra] >= 1).all() and (equal[extra] >= k - heavy_counts[-1]).all(), k
                if heavy_counts[-1] == 0:
                    assert not len(extra)
    # Not vacuous: queries with no heavy bucket, with a few (all skipped at k = 7), with many.
    assert min(heavy_counts) == 0 and any(0 < h < 7 for h in heavy_counts) and max(heavy_counts) > 12


def test_band_index_reads_only_the_heavy_buckets_it_must() -> None:
    """A query whose heavy buckets number at most k - 1 reads none of them; with more, it reads
    the smallest beyond the k - 1 largest, and still finds every row with k equal bands, also
    one whose equal bands are all in heavy buckets."""
    rng = np.random.default_rng(2)
    frame = rng.integers(0, 1 << 32, size=NUM_PERM, dtype=np.uint32)
    sigs = rng.integers(0, 1 << 32, size=(400, NUM_PERM), dtype=np.uint32)
    sigs[:, :40] = frame[:40]                        # bands 0-9: one heavy bucket each, 400 rows
    sigs[:50, 40:44] = frame[40:44]                  # band 10: a heavy bucket of 50 rows
    index = BandIndex(BANDS)
    index.add(band_keys(sigs), bulk=True)
    index.finish_loading()
    assert len(index._heavy_prefix) == 11
    twin = sigs[7].copy()                            # row 7's bands 0-10 (all heavy), nothing else
    twin[44:] = rng.integers(0, 1 << 32, size=NUM_PERM - 44, dtype=np.uint32)
    # Rows 0-49 share its 11 bands 0-10, rows 50-399 its 10 bands 0-9.
    for k, heavy_read, rows in ((12, 0, 0), (11, 50, 50), (10, 50 + 400, 400), (7, 50 + 4 * 400, 400)):
        got, read = index.candidates(band_keys(twin), k)
        assert read == heavy_read, k                  # no light bucket shares a key with it
        assert set(got.tolist()) == set(range(rows)), k
    q = frame.copy()
    q[24:] = rng.integers(0, 1 << 32, size=NUM_PERM - 24, dtype=np.uint32)   # bands 0-5 only
    got, read = index.candidates(band_keys(q), 7)
    assert read == 0 and not got.size                 # 6 heavy buckets <= k - 1: none read
    got, read = index.candidates(band_keys(q), 6)
    assert read == 400 and set(got.tolist()) == set(range(400))
    # A read budget: of the heavy buckets it must read at k = 7 (the 50 and four of 400), only
    # the smallest whose rows fit. Row 7's twin is then missed unless the 50 fit.
    for budget, heavy_read in ((None, 50 + 4 * 400), (10_000, 50 + 4 * 400), (850, 50 + 400 + 400),
                               (849, 50 + 400), (64, 50), (49, 0), (0, 0)):
        got, read = index.candidates(band_keys(twin), 7, budget)
        assert read == heavy_read, budget
        assert set(got.tolist()) == set(range(min(heavy_read, 400))), budget


@pytest.fixture(params=[True, False], ids=["compiled", "numpy"])
def compiled(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Both lookup paths: compiled (dreamd/dream/lsh_kernel.py) and numpy."""
    monkeypatch.setattr(NearDupIndex, "compiled", request.param)
    return request.param


def test_the_compiled_lookup_is_there() -> None:
    """numba is a dependency: the compiled path is the one that runs (not a silent fallback)."""
    assert lsh_kernel.kernel() is not None


def test_both_paths_find_what_comparing_every_signature_finds(compiled: bool) -> None:
    """Random signatures sharing a frame in a random share of their bands (heavy buckets of
    every size), rows in the sorted layout and in the recent adds, exact copies under two ids
    (ties: the lowest id), thresholds from k = 1 to k = 32: the answer of comparing every
    signature, on either path."""
    rng = np.random.default_rng(11)
    frame = rng.integers(0, 1 << 32, size=NUM_PERM, dtype=np.uint32)
    sigs = rng.integers(0, 1 << 32, size=(2500, NUM_PERM), dtype=np.uint32)
    for i in range(2500):
        mask = np.repeat(rng.random(BANDS) < rng.choice([0.05, 0.3, 0.9]), NUM_PERM // BANDS)
        sigs[i, mask] = frame[mask]
    near = sigs[rng.choice(2500, 300)].copy()             # near copies: 0-30 positions changed
    for q in near:
        q[rng.choice(NUM_PERM, rng.integers(0, 31), replace=False)] = rng.integers(0, 1 << 32, dtype=np.uint32)
    ids = np.arange(2500) * 3 + 7
    ids[1000], ids[1001] = 5000, 4000                     # two copies: the lower id answers
    sigs[1001] = sigs[1000]
    index = NearDupIndex(_Memory())
    index._append(ids[:2000], sigs[:2000], bulk=True)
    index.bands.finish_loading()
    for i in range(2000, 2500):
        index.add_signature(int(ids[i]), sigs[i])
    assert index.bands._recent and len(index.bands._heavy_prefix) > 7
    queries = np.concatenate([near, frame[None, :], sigs[[1000]],
                              rng.integers(0, 1 << 32, size=(20, NUM_PERM), dtype=np.uint32)])
    hits = 0
    for merged in (False, True):
        if merged:
            index.bands._merge()
        for threshold in (0.6, 0.8, 0.9, 1.0):
            index.threshold, index.k = threshold, bands_needed(threshold)
            for q in queries:
                equal = (sigs == q).sum(axis=1)
                top = equal.max()
                expected = (int(ids[equal == top].min()), top / NUM_PERM) if top / NUM_PERM >= threshold else None
                hit = index.find_signature(q)
                assert (None if hit is None else (hit.scenario_id, hit.similarity)) == expected, threshold
                hits += hit is not None
    assert hits > 1000 and index.find_signature(sigs[1000]).scenario_id == 4000


def test_a_read_budget_never_gives_a_false_hit_and_both_paths_agree() -> None:
    """With a read budget the lookup reads fewer heavy rows: every answer it gives is still a
    near duplicate (at the threshold by the signatures), the exact answer whenever the rows
    the exact lookup reads from heavy buckets fit in the budget, and the compiled and numpy
    paths give the same answers (the same buckets read: ties on size go to the lower id)."""
    rng = np.random.default_rng(5)
    frames = rng.integers(0, 1 << 32, size=(12, NUM_PERM), dtype=np.uint32)
    share = 0.5 ** np.arange(12)                      # frames of ~1500 rows down to ~1
    sigs = rng.integers(0, 1 << 32, size=(3000, NUM_PERM), dtype=np.uint32)
    for i in range(3000):   # template-like: a frame on a random share of the bands
        mask = np.repeat(rng.random(BANDS) < rng.choice([0.3, 0.6, 0.9]), NUM_PERM // BANDS)
        sigs[i, mask] = frames[rng.choice(12, p=share / share.sum())][mask]
    near = sigs[rng.choice(3000, 400)].copy()
    for q in near:
        q[rng.choice(NUM_PERM, rng.integers(0, 26), replace=False)] = rng.integers(0, 1 << 32, dtype=np.uint32)
    ids = np.arange(3000) * 2 + 1
    index = NearDupIndex(_Memory())
    index._append(ids, sigs, bulk=True)
    index.bands.finish_loading()
    bands = index.bands
    sizes = np.diff(bands._heavy_bounds)

    def heavy_rows_read(q: np.ndarray) -> int:    # by the exact lookup
        prefix = band_keys(q) & PREFIX
        found = np.sort(sizes[np.searchsorted(bands._heavy_prefix, prefix[np.isin(prefix, bands._heavy_prefix)])])
        return int(found[:max(0, len(found) - (index.k - 1))].sum())

    answers = {}
    for path in (True, False):
        index.compiled, index.read_budget = path, None
        exact = [index.find_signature(q) for q in near]
        for budget in (0, 9, 64, 300, 5000):
            index.read_budget = budget
            got = answers[path, budget] = [index.find_signature(q) for q in near]
            for q, hit, want in zip(near, got, exact):
                if hit is not None:           # a true near duplicate, by its signature
                    row = int(np.flatnonzero(ids == hit.scenario_id)[0])
                    assert (sigs[row] == q).sum() / NUM_PERM == hit.similarity >= index.threshold
                if heavy_rows_read(q) <= budget:
                    assert hit == want, budget
        lost = [sum(w is not None and g is None for g, w in zip(answers[path, b], exact))
                for b in (0, 9, 64, 300, 5000)]
        assert lost == sorted(lost, reverse=True) and len(set(lost)) >= 3 and lost[-1] == 0, lost
        assert sum(w is not None for w in exact) > 300
    assert all(answers[True, b] == answers[False, b] for b in (0, 9, 64, 300, 5000))


class _Memory:
    """Just enough of a Store for NearDupIndex: signatures kept nowhere, every add is new."""

    def minhash_page(self, *args: object, **kwargs: object) -> list:
        return []

    def add_minhashes(self, scheme: str, rows: list) -> list[int]:
        return [sid for sid, _ in rows]


def test_index_finds_what_brute_force_finds_on_template_scenarios(store: Store, compiled: bool) -> None:
    """The same recall as comparing every signature: planted near copies of stored template
    scenarios and fresh draws, at 0.8 and 0.6 (k = 7 and k = 1), with a family of 200 that
    share one frame of 40 words (heavy buckets: the queries that read them and screen their
    many candidates on nibbles), screening as usual and screening every lookup (numpy path),
    on both paths."""
    run_id = store.start_run("r", "{}", "/m", 0)
    cycle_id = store.start_cycle(run_id, 1, 1e-5, 0.25, 8)
    dreamer, rng = TemplateDreamer(spec="spec", seed=9), random.Random(9)
    kinds = ["accept", "pushback", "derail", "general"]
    pool = [dreamer.dream(kinds[i % 4], rng) for i in range(700)]
    frame = words_text(rng, 40)
    family = [scenario_of(" ".join(frame + words_text(rng, rng.choice([1, 2, 4, 8, 16])))) for _ in range(200)]
    pool += family
    ids = [stored(store, run_id, cycle_id, s) for s in pool]
    index = NearDupIndex(store)
    assert index.backfill() == len(pool)
    sigs = {sid: signature(s.text) for sid, s in zip(ids, pool)}
    matrix, order = np.stack(list(sigs.values())), list(sigs)
    queries = [signature(dreamer.dream(kinds[i % 4], rng).text) for i in range(150)]
    for s in pool[:150] + family[:50]:                          # planted: a few words changed
        words = s.text.split()
        for i in rng.sample(range(len(words)), max(1, len(words) // 40)):
            words[i] = "zz" + words[i]
        queries.append(signature(" ".join(words)))
    queries += [signature(" ".join(frame + words_text(rng, rng.choice([1, 3, 9])))) for _ in range(50)]
    assert len(index.bands._heavy_prefix) > 7
    for threshold, screen_above in ((0.8, 16), (0.8, 0), (0.6, 16), (0.6, 0)):
        index.threshold, index.k, index.SCREEN_ABOVE = threshold, bands_needed(threshold), screen_above
        hits = screened = 0
        for q in queries:
            sims = (matrix == q).sum(axis=1) / NUM_PERM
            best = int(np.argmax(sims))
            expected = (order[best], float(sims[best])) if sims[best] >= threshold else None
            hit = index.find_signature(q)
            assert (None if hit is None else (hit.scenario_id, hit.similarity)) == expected
            hits += hit is not None
            screened += index.last_read > 16
        assert hits >= 150          # most planted ones at least: the test is not vacuous
        assert screened >= 50       # the frame's queries read its heavy buckets


# ---- the persisted index --------------------------------------------------------------------


def stored(store: Store, run_id: int, cycle_id: int, s: Scenario, status: str = "accepted") -> int:
    return store.add_scenario(run_id, cycle_id, s, status,
                              reject_reason=None if status == "accepted" else "kind: test").id


def test_index_rejects_near_copies_and_keeps_the_threshold(store: Store) -> None:
    rng = random.Random(2)
    run_id = store.start_run("r", "{}", "/m", 0)
    cycle_id = store.start_cycle(run_id, 1, 1e-5, 0.25, 8)
    base = words_text(rng, 120)
    original = scenario_of(" ".join(base))
    index = NearDupIndex(store, threshold=0.8)
    assert index.find(original) is None
    sid = stored(store, run_id, cycle_id, original)
    assert index.add(original, sid)

    copy = scenario_of(" ".join(edited(base, rng, 2)))
    hit = index.find(copy)
    assert hit is not None and hit.scenario_id == sid and hit.similarity >= 0.8
    assert index.problem(copy).startswith(f"Jaccard ~") and f"scenario {sid}" in index.problem(copy)

    # J ~ 0.6-0.7: a near duplicate at threshold 0.55, not at 0.8.
    middle = scenario_of(" ".join(edited(base, rng, 12)))
    exact = jaccard(shingles(original.text), shingles(middle.text))
    assert 0.55 < exact < 0.8
    assert index.find(middle) is None
    assert NearDupIndex(store, threshold=0.55).find(middle) is not None
    assert NearDupIndex(store).find(scenario_of(" ".join(words_text(rng, 120)))) is None
    with pytest.raises(ValueError):
        NearDupIndex(store, threshold=0.3)


def test_index_survives_reopening_the_store(store_url: str) -> None:
    rng = random.Random(4)
    body = words_text(rng, 80)
    first = Store.open(store_url)
    first.upgrade()
    run_id = first.start_run("r", "{}", "/m", 0)
    s = scenario_of(" ".join(body))
    sid = stored(first, run_id, first.start_cycle(run_id, 1, 1e-5, 0.25, 8), s)
    NearDupIndex(first).add(s, sid)
    first.close()

    again = Store.open(store_url)                      # a new process would do exactly this
    hit = NearDupIndex(again).find(scenario_of(" ".join(edited(body, rng, 1))))
    assert hit is not None and hit.scenario_id == sid
    again.close()


def test_backfill_indexes_accepted_scenarios_only_once(store: Store) -> None:
    rng = random.Random(5)
    run_id = store.start_run("r", "{}", "/m", 0)
    cycle_id = store.start_cycle(run_id, 1, 1e-5, 0.25, 8)
    accepted = [stored(store, run_id, cycle_id, scenario_of(" ".join(words_text(rng, 40)))) for _ in range(7)]
    rejected = stored(store, run_id, cycle_id, scenario_of(" ".join(words_text(rng, 40))), "rejected")
    index = NearDupIndex(store)
    assert index.backfill(batch=3) == 7
    assert index.backfill() == 0
    with store.read() as s:
        ids = {r[0] for r in s.execute(text("SELECT scenario_id FROM minhash_signatures"))}
        schemes = {r[0] for r in s.execute(text("SELECT DISTINCT scheme FROM minhash_signatures"))}
    assert ids == set(accepted) and rejected not in ids
    assert schemes == {SCHEME} and index.bands.size == 7


def test_a_store_from_before_0006_keeps_its_signatures(store_url: str) -> None:
    """Signatures stored with their bands under the old scheme name: migration 0006 drops the
    bands and renames the scheme (same values), so nothing is signed again and they are found."""
    rng = random.Random(7)
    old = Store.open(store_url)
    old.upgrade("0005")
    run_id = old.start_run("r", "{}", "/m", 0)
    body = words_text(rng, 80)
    s = scenario_of(" ".join(body))
    sid = stored(old, run_id, old.start_cycle(run_id, 1, 1e-5, 0.25, 8), s)
    with old.session() as sess:
        sess.execute(text("INSERT INTO minhash_signatures (scenario_id, scheme, signature) VALUES (:i, :s, :b)"),
                     {"i": sid, "s": "w3-crc32-p128-b32r4-s4e445550", "b": to_bytes(signature(s.text))})
        sess.execute(text("INSERT INTO minhash_bands (scenario_id, band, band_key) VALUES (:i, :b, :k)"),
                     [{"i": sid, "b": b, "k": 1000 + b} for b in range(BANDS)])
    assert old.upgrade().to_revision == "0006"
    with old.read() as sess:
        tables = set(sess.connection().dialect.get_table_names(sess.connection()))
        schemes = [r[0] for r in sess.execute(text("SELECT scheme FROM minhash_signatures"))]
    assert "minhash_bands" not in tables and schemes == [SCHEME]
    index = NearDupIndex(old)
    assert index.backfill() == 0 and index.bands.size == 1
    hit = index.find(scenario_of(" ".join(edited(body, rng, 1))))
    assert hit is not None and hit.scenario_id == sid
    old.close()


def test_signatures_of_another_scheme_are_signed_again(store: Store) -> None:
    """A row of a scheme this code does not compare: backfill replaces it (it used to skip the
    scenario as already indexed and loop for ever) and the scenario is found afterwards."""
    rng = random.Random(8)
    run_id = store.start_run("r", "{}", "/m", 0)
    body = words_text(rng, 80)
    s = scenario_of(" ".join(body))
    sid = stored(store, run_id, store.start_cycle(run_id, 1, 1e-5, 0.25, 8), s)
    assert store.add_minhashes("w5-sha1-p64-s0", [(sid, bytes(256))]) == [sid]
    index = NearDupIndex(store)
    assert index.bands.size == 0 and index.find(s) is None
    assert index.backfill() == 1 and index.backfill() == 0
    with store.read() as sess:
        rows = sess.execute(text("SELECT scheme, signature FROM minhash_signatures")).all()
    assert [(r[0], bytes(r[1])) for r in rows] == [(SCHEME, to_bytes(signature(s.text)))]
    hit = index.find(scenario_of(" ".join(edited(body, rng, 1))))
    assert hit is not None and hit.scenario_id == sid


def test_refresh_reads_what_another_process_indexed(store: Store) -> None:
    rng = random.Random(10)
    run_id = store.start_run("r", "{}", "/m", 0)
    cycle_id = store.start_cycle(run_id, 1, 1e-5, 0.25, 8)
    first, second = NearDupIndex(store), NearDupIndex(store)
    bodies = [words_text(rng, 60) for _ in range(3)]
    for body in bodies:
        s = scenario_of(" ".join(body))
        first.add(s, stored(store, run_id, cycle_id, s))
    near = scenario_of(" ".join(edited(bodies[1], rng, 1)))
    assert first.find(near) is not None and second.find(near) is None
    second.REFRESH_S = 0.0                        # find() reads the store's news itself
    assert second.find(near) is not None and second.bands.size == 3
    assert first.refresh() == 0 and first.bands.size == second.bands.size == 3   # never twice


def test_screener_orders_exact_before_near_duplicates(store: Store) -> None:
    rng = random.Random(6)
    run_id = store.start_run("r", "{}", "/m", 0)
    cycle_id = store.start_cycle(run_id, 1, 1e-5, 0.25, 8)
    index = NearDupIndex(store)
    screener = Screener(ScreenConfig(), seen=lambda h: store.hash_exists(run_id, h) is not None,
                        forgetting=forgetting_rule(EvalConfig()), near_dups=index.problem)
    assert [name for name, _ in screener.rules] == ["parse", "check", "format", "kind", "honesty", "judge",
                                                    "forgetting_probe", "duplicate", "near_duplicate"]
    body = words_text(rng, 60)
    s = scenario_of(" ".join(body))
    assert screener(s).ok
    index.add(s, stored(store, run_id, cycle_id, s))
    assert screener(scenario_of(" ".join(body))).rule == "duplicate"
    near = screener(scenario_of(" ".join(edited(body, rng, 1))))
    assert near.rule == "near_duplicate" and "threshold 0.8" in near.reason


# ---- through real cycles --------------------------------------------------------------------

FAST = {"DREAMD_MIX__EXAMPLES_PER_CYCLE": "8", "DREAMD_EVAL__ARITHMETIC_N": "4",
        "DREAMD_EVAL__PERPLEXITY_MAX_TOKENS": "256"}



def test_near_duplicates_never_pass_after_a_restart(setup_dir: Path, tmp_path: Path) -> None:
    env = dict(FAST, DREAMD_RUN__STATE_DIR=str(tmp_path / "state"))
    parts, state = open_run(load_config(setup_dir / "dreamd.toml", environ=env))
    result = run_cycle(parts, state)
    with parts.store.read() as s:
        accepted = s.execute(text("SELECT COUNT(*) FROM scenarios WHERE status = 'accepted'")).scalar()
        indexed = s.execute(text("SELECT COUNT(*) FROM minhash_signatures")).scalar()
        summary = s.execute(text("SELECT candidates, accepted, near_dup_rate FROM dream_summary "
                                 "WHERE cycle_id = :c"), {"c": result.cycle_id}).one()
        first_id = s.execute(text("SELECT id FROM scenarios WHERE status = 'accepted' "
                                  "ORDER BY LENGTH(target) DESC, id LIMIT 1")).scalar()
    assert accepted == indexed == 8                          # every accepted one, nothing else
    assert summary.accepted == 8 and summary.near_dup_rate == 0.0
    original = parts.store.load_scenarios([first_id])[first_id]
    parts.store.close()

    # A new process: new store connection, new screener, new index; same state dir. Its index
    # reads without a budget, as configured (the first one had the default, 64 rows).
    assert dict(parts.screener.rules)["near_duplicate"].__self__.read_budget == 64
    env["DREAMD_SCREEN__NEAR_DUP_READ_BUDGET"] = "all"
    parts2, _ = open_run(load_config(setup_dir / "dreamd.toml", environ=env))
    assert dict(parts2.screener.rules)["near_duplicate"].__self__.read_budget is None
    copy = Scenario(kind=original.kind, source="template", spec=original.spec, meta=dict(original.meta),
                    messages=[dict(m) for m in original.messages], target=original.target + " Done.")
    verdict = parts2.screener(copy)
    assert verdict.rule == "near_duplicate" and f"scenario {first_id}" in verdict.reason
    parts2.store.close()
