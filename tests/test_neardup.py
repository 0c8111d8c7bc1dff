"""Near duplicates: MinHash accuracy against exact Jaccard, LSH recall, the persisted index on a
real store (SQLite file / PostgreSQL), the configurable threshold, only accepted scenarios
indexed, backfill, the dream_summary view, and the check holding across a restart."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from sqlalchemy import text

from dreamd.config import EvalConfig, ScreenConfig
from dreamd.config_file import load_config
from dreamd.cycle import run_cycle
from dreamd.dream.neardup import (
    BANDS,
    SCHEME,
    NearDupIndex,
    band_keys,
    jaccard,
    shingles,
    signature,
    similarity,
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
        keys = set(band_keys(signature(" ".join(base))))
        found_close += bool(keys & set(band_keys(signature(" ".join(close)))))
        found_far += bool(keys & set(band_keys(signature(" ".join(far)))))
    assert found_close == 300
    assert found_far <= 10
    assert len(band_keys(signature("a b c d"))) == BANDS


def test_template_stream_has_almost_no_near_duplicates_at_08() -> None:
    """The grammar's variety: 2,000 template scenarios, pairwise via LSH + signatures."""
    dreamer = TemplateDreamer(spec="spec", seed=3)
    rng = random.Random(3)
    kinds = ["accept", "pushback", "derail", "general"]
    sigs = [signature(dreamer.dream(kinds[i % 4], rng).text) for i in range(2000)]
    buckets: dict[int, list[int]] = {}
    near = set()
    for i, sig in enumerate(sigs):
        for key in band_keys(sig):
            for j in buckets.get(key, []):
                if similarity(sig, sigs[j]) >= 0.8:
                    near.add(i)
            buckets.setdefault(key, []).append(i)
    assert len(near) / len(sigs) < 0.01, len(near)


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
        bands = s.execute(text("SELECT COUNT(*) FROM minhash_bands")).scalar()
        schemes = {r[0] for r in s.execute(text("SELECT DISTINCT scheme FROM minhash_signatures"))}
    assert ids == set(accepted) and rejected not in ids
    assert bands == 7 * BANDS and schemes == {SCHEME}


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

    # A new process: new store connection, new screener, new index; same state dir.
    parts2, _ = open_run(load_config(setup_dir / "dreamd.toml", environ=env))
    copy = Scenario(kind=original.kind, source="template", spec=original.spec, meta=dict(original.meta),
                    messages=[dict(m) for m in original.messages], target=original.target + " Done.")
    verdict = parts2.screener(copy)
    assert verdict.rule == "near_duplicate" and f"scenario {first_id}" in verdict.reason
    parts2.store.close()
