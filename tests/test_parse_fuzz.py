"""Garbage from the model never crashes a cycle.

Thousands of garbage outputs (tests/scripted_engines.garbage_texts: random bytes, truncated and
mutated valid outputs, empty output, ~10k-token rambles, wrong kinds, NUL bytes, lone
surrogates) go through the parsers, the checker, and the whole model dreamer pipeline into a
real screener and a real store (SQLite file; PostgreSQL too with DREAMD_TEST_PG_URL, which
refuses NUL bytes). The only exception the parsers may raise is ParseError; every candidate
becomes a stored row with a reason. A random-weights tiny model is the second garbage source.
"""

from __future__ import annotations

import random
import re
import time

import pytest
from sqlalchemy import text

from dreamd.config import DEFAULT_SPEC, DreamConfig, EvalConfig, ScreenConfig
from dreamd.dream.checks import check_claim
from dreamd.dream.model_dreamer import ModelDreamer
from dreamd.dream.neardup import NearDupIndex
from dreamd.dream.parse import MAX_OUTPUT_CHARS, ParseError, parse_situation, parse_verdict
from dreamd.dream.screen import Screener
from dreamd.evals.forgetting import screen_rule as forgetting_rule
from dreamd.dream.taxonomy import load_taxonomy
from dreamd.engines.hf import TransformersEngine
from dreamd.store import Store
from tests.fixtures_models import tiny_model, tokenizer  # noqa: F401  (pytest fixture)
from tests.scripted_engines import TAGS, FuzzEngine, garbage_texts

KINDS = ("accept", "pushback", "derail", "self")
RULES = ("parse", "check", "format", "kind", "honesty", "judge", "forgetting_probe", "duplicate",
         "near_duplicate")


def test_parsers_raise_only_parse_errors_on_4000_garbage_outputs() -> None:
    texts = garbage_texts(random.Random(0))
    outcomes = {"parsed": 0, "ParseError": 0}
    kinds_seen = set()
    for i in range(4000):
        out = next(texts)
        kind = KINDS[i % 4]
        try:
            parse_situation(kind, out, needs_check=i % 3 == 0)
            outcomes["parsed"] += 1
        except ParseError as exc:
            outcomes["ParseError"] += 1
            kinds_seen.add(str(exc).split(" ")[0])
        try:
            parse_verdict(out)
        except ParseError:
            pass
    assert outcomes["ParseError"] > 3000 and outcomes["parsed"] > 50  # valid ones still parse
    assert len(kinds_seen) > 10                                        # many different reasons


def test_limits_and_edge_cases() -> None:
    ramble = "<user>" + "word " * 10_000 + "</user>"                    # ~10k tokens, 50k chars
    assert len(ramble) > MAX_OUTPUT_CHARS
    with pytest.raises(ParseError, match="chars >"):
        parse_situation("accept", ramble)
    with pytest.raises(ParseError, match="chars >"):
        parse_verdict("<q1>yes</q1><q2>yes</q2>" + " " * MAX_OUTPUT_CHARS)
    for weird in ("\x00", "\ud800", "<user>\x00</user>", "<user>a\ud800b</user>", "\u202e<user>x</user>"):
        try:
            parse_situation("accept", weird)
        except ParseError:
            pass
    # Deep nesting and pathological regex inputs finish quickly.
    t0 = time.perf_counter()
    for bad in ("<user>" * 5000, "</user>" * 5000, "<" * 40_000, "<user>" + "<a>" * 8000 + "</user>"):
        with pytest.raises(ParseError):
            parse_situation("accept", bad)
    assert time.perf_counter() - t0 < 5


def test_checker_never_raises_on_random_expressions() -> None:
    rng = random.Random(1)
    atoms = ["1", "17", "0", "2.5", "'ab'", "[1, 2]", "(", ")", "+", "-", "*", "/", "//", "%", "**", ",",
             "len", "sorted", "round", "sum", "max", ".upper()", ".split(',')", "[0]", "[::-1]", " ", "=",
             "==", "x", "__import__", ".__class__", "lambda", "if", "else", "not", "and", "10**10",
             "'a'*", "9" * 50, "{", "}", ":", "\x00", "🙂", "range(", "True", "None"]
    def claim(i: int) -> str:
        if i % 3 == 0:  # well-formed arithmetic, claimed value right or off by one
            a, b, op = rng.randrange(1000), rng.randrange(1, 1000), rng.choice("+-*/")
            value = eval(f"{a} {op} {b}") if op != "/" else a / b  # noqa: S307 (our own digits)
            return f"{a} {op} {b} = {value + rng.choice((0, 0, 1)) if op != '/' else round(value, 2)}"
        soup = "".join(rng.choice(atoms) for _ in range(rng.randrange(1, 30)))
        return soup if i % 3 == 1 else f"{soup} = {rng.choice(atoms)}"

    t0 = time.perf_counter()
    results = [check_claim(claim(i)) for i in range(3000)]
    assert time.perf_counter() - t0 < 30
    assert any(r.holds is True for r in results) and any(r.holds is False for r in results)
    assert all(r.holds is None or r.computed is not None for r in results)


def fuzz_screener(store: Store, run_id: int) -> Screener:
    return Screener(ScreenConfig(), seen=lambda h: store.hash_exists(run_id, h) is not None,
                    forgetting=forgetting_rule(EvalConfig()), near_dups=NearDupIndex(store).problem)


def test_fuzzed_dreamer_pipeline_stores_every_candidate_with_a_reason(store: Store) -> None:
    """1,200 candidates: FuzzEngine garbage through write_batch -> screen -> store."""
    dreamer = ModelDreamer(FuzzEngine(seed=2), spec=DEFAULT_SPEC, config=DreamConfig(batch_size=25),
                           taxonomy=load_taxonomy())
    run_id = store.start_run("fuzz", "{}", "/m", 0)
    screener, rng = fuzz_screener(store, run_id), random.Random(2)
    cycle_id = store.start_cycle(run_id, 1, 1e-5, 0.25, 8)
    from transformers import LlamaConfig
    config = LlamaConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=1000)
    reasons = []
    for i in range(1200):
        s = dreamer.dream(KINDS[i % 4], rng, model_config=config)
        verdict = screener(s)
        saved = store.add_scenario(run_id, cycle_id, s, "accepted" if verdict.ok else "rejected",
                                   reject_reason=verdict.reason, temperature=s.meta.get("temperature"))
        dreamer.observe(s, verdict.ok and saved.duplicate_of is None)
        reasons.append(verdict.reason)
    with store.read() as sess:
        n = sess.execute(text("SELECT COUNT(*) FROM scenarios WHERE source = 'model'")).scalar()
        rules = sess.execute(text("SELECT reject_reason FROM scenarios WHERE status = 'rejected'")).scalars().all()
    assert n == 1200
    assert all(re.match(rf"({'|'.join(RULES)}): ", r) for r in rules), [r for r in rules if ":" not in r][:3]
    by_rule = {r.split(":")[0] for r in reasons if r}
    assert {"parse", "format"} <= by_rule                  # garbage and structurally broken output
    assert sum(r is not None and r.startswith("parse:") for r in reasons) > 900


def test_random_tiny_model_garbage_never_crashes(store: Store, tokenizer) -> None:  # noqa: F811
    model = tiny_model("llama", tokenizer=tokenizer, seed=3)
    engine = TransformersEngine(model, tokenizer)
    cfg = DreamConfig(batch_size=8, situation_max_tokens=32, reply_max_tokens=32, judge_max_tokens=16)
    dreamer = ModelDreamer(engine, spec=DEFAULT_SPEC, config=cfg, taxonomy=load_taxonomy())
    run_id = store.start_run("tiny", "{}", "/m", 0)
    screener, rng = fuzz_screener(store, run_id), random.Random(3)
    cycle_id = store.start_cycle(run_id, 1, 1e-5, 0.25, 8)
    for i in range(64):
        s = dreamer.dream(KINDS[i % 4], rng, model_config=model.config)
        verdict = screener(s)
        assert not verdict.ok and verdict.rule == "parse", verdict
        store.add_scenario(run_id, cycle_id, s, "rejected", reject_reason=verdict.reason,
                           temperature=s.meta["temperature"])
        dreamer.observe(s, False)
    assert dreamer.temperature("accept") < 0.9                 # the failures cooled it down
    with store.read() as sess:
        assert sess.execute(text("SELECT COUNT(*) FROM scenarios")).scalar() == 64


def test_garbage_tags_in_tag_soup_are_all_known() -> None:
    # The fuzz alphabet covers every tag the parser knows, so unknown/known mixes are both hit.
    from dreamd.dream.parse import ALL_TAGS
    assert all(f"<{t}>" in TAGS for t in ALL_TAGS)


HOSTILE_CLAIMS = {  # each once ran for minutes inside a cycle; now refused before the work
    "sum([range(1000)]*1000, []) = 0": "repetition longer than 10000 items",
    "sum([[1]*100, [2]*100], []) = 0": "sum() adds numbers only",
    "len(str([[0]*99]*99)) = 1": "value longer than 10000 items",
    "len([['x'*5000, 'y'*5000+'z']]) = 1": "value longer than 10000 items",
}


def test_hostile_claims_are_refused_before_the_work() -> None:
    for text, reason in HOSTILE_CLAIMS.items():
        claim = check_claim(text)
        assert claim.holds is None and reason in claim.error, (text, claim.error)


def test_the_clock_is_the_last_line(monkeypatch) -> None:
    """Whatever still makes a claim slow, the interpreter refuses it at its deadline."""
    import dreamd.dream.checks as checks

    monkeypatch.setattr(checks, "MAX_SECONDS", -1.0)  # already past: the first node refuses
    claim = check_claim("17 * 23 = 391")
    assert claim.holds is None and "took longer than" in claim.error
