"""Few-shot prompting of the model dreamer (prompts.situation_prompt / judge_examples,
routing.fewshot_examples, the copy checks in model_dreamer.write_batch).

Small real models (SmolLM2-135M) wrote no parseable situation from the format description
alone; shown two worked exchanges they mostly do. These tests pin what the examples are (correct,
parseable, never from a held-out probe domain) and that copying an example is rejected.
"""

from __future__ import annotations

import random

import pytest
from transformers import LlamaConfig

from dreamd.config import DEFAULT_SPEC, DreamConfig, EvalConfig, ScreenConfig
from dreamd.dream.model_dreamer import ModelDreamer, copies_example
from dreamd.dream.parse import parse_situation, parse_verdict
from dreamd.dream.prompts import example_seed, judge_examples, judge_prompt, render_situation, situation_prompt
from dreamd.dream.routing import fewshot_examples
from dreamd.dream.scenario import ScenarioKind
from dreamd.dream.screen import Screener
from dreamd.evals.forgetting import screen_rule as forgetting_rule
from dreamd.dream.taxonomy import draw_seed, load_taxonomy
from dreamd.dream.templates import TemplateDreamer
from dreamd.engines.base import Completion
from dreamd.evals.probes import HELDOUT_DOMAINS

CONFIG = LlamaConfig(num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192)
KINDS = [ScenarioKind.ACCEPT, ScenarioKind.PUSHBACK, ScenarioKind.DERAIL, ScenarioKind.SELF]


@pytest.fixture(scope="module")
def examples():
    return fewshot_examples(TemplateDreamer(spec=DEFAULT_SPEC, seed=0), HELDOUT_DOMAINS)


@pytest.mark.parametrize("kind", KINDS)
def test_examples_are_correct_parseable_and_never_held_out(examples, kind):
    rng, taxonomy = random.Random(1), load_taxonomy()
    for _ in range(40):
        ex = examples(kind, rng, CONFIG)
        assert ex.kind is kind and ex.meta.get("domain") not in HELDOUT_DOMAINS
        parsed = parse_situation(kind, render_situation(ex))  # our own parser takes the answer
        turns = [m for m in ex.messages if m["role"] != "system"]
        assert parsed.messages == (turns[-1:] if kind is ScenarioKind.SELF else turns)
        if kind is ScenarioKind.PUSHBACK:
            assert parsed.meta["evidence"] == ex.meta["flaw_evidence"][0] and parsed.meta["flaw"]
        if kind is ScenarioKind.DERAIL:
            assert parsed.meta["injection"] == ex.meta["injection"]
        spec = example_seed(ex, rng, taxonomy, CONFIG)
        assert spec.kind is kind and not spec.needs_check and not spec.memories
        if kind is ScenarioKind.SELF:
            assert spec.facts == ex.meta["claims"]


def test_situation_prompt_shows_the_examples_before_the_request(examples):
    rng, taxonomy = random.Random(2), load_taxonomy()
    seed = draw_seed("accept", rng, taxonomy)
    shown = [examples(ScenarioKind.ACCEPT, rng, None) for _ in range(2)]
    prompt = situation_prompt(seed, [(example_seed(e, rng, taxonomy), e) for e in shown])
    assert [m["role"] for m in prompt] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert prompt[2]["content"] == render_situation(shown[0])
    assert seed.topic in prompt[-1]["content"]
    assert situation_prompt(seed) == [prompt[0], prompt[-1]]  # no examples: the old two messages


@pytest.mark.parametrize("kind", [ScenarioKind.ACCEPT, ScenarioKind.PUSHBACK, ScenarioKind.DERAIL])
def test_judge_examples_show_a_yes_and_a_no(examples, kind):
    rng = random.Random(3)
    firsts = set()
    for _ in range(12):
        right, wrong = examples(kind, rng, None), examples(kind, rng, None)
        pairs = judge_examples(right, wrong, rng)
        verdicts = {(v.q1, v.q2) for v in (parse_verdict(answer) for _, answer in pairs)}
        assert verdicts == {(True, True), (True, False)}
        bad = next(s for s, answer in pairs if parse_verdict(answer).q2 is False)
        assert bad.target != wrong.target and bad.messages == wrong.messages
        firsts.add(parse_verdict(pairs[0][1]).q2)
        prompt = judge_prompt(right, pairs)
        assert [m["role"] for m in prompt] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert firsts == {True, False}  # the order varies: no position tells the answer


class EchoEngine:
    """Answers every request with the last worked example's answer (a model that copies)."""

    def generate(self, conversations, sampling):
        out = []
        for conv in conversations:
            assistant = [m["content"] for m in conv if m["role"] == "assistant"]
            out.append([Completion(assistant[-1] if assistant else "", (), "stop")])
        return out


def test_copying_an_example_is_rejected(examples):
    dreamer = ModelDreamer(EchoEngine(), spec=DEFAULT_SPEC, config=DreamConfig(batch_size=4),
                           taxonomy=load_taxonomy(), examples=examples)
    screener = Screener(ScreenConfig(), model_config=CONFIG, forgetting=forgetting_rule(EvalConfig()))
    copied = "parse: situation: copies its few-shot example"
    for kind in KINDS:
        batch = dreamer.write_batch(kind, random.Random(4), CONFIG)
        reasons = [screener(s).reason for s in batch]
        assert len(batch) == 4 and copied in reasons
        # a pushback spec that demands a <check> fails parsing first (the examples have none)
        assert all(r == copied or (kind is ScenarioKind.PUSHBACK and "no <check> section" in r)
                   for r in reasons)
    assert copies_example("Could you tag the commit as v1.2 and push it?",
                          [TemplateDreamer(spec="").dream("accept", random.Random(0))]) is False


class SituationOkJudgeEchoes(EchoEngine):
    """Writes its own (valid) accept situation and reply, then echoes the judge's example."""

    def generate(self, conversations, sampling):
        out = []
        for conv in conversations:
            if conv[0]["content"].startswith("You write realistic"):
                text = "<user>Please rename the file report_final.txt to report_2031.txt.</user>"
            elif conv[0]["role"] == "system" and conv[0]["content"].startswith("You check"):
                text = [m["content"] for m in conv if m["role"] == "assistant"][-1]
            else:
                text = "mv report_final.txt report_2031.txt"
            out.append([Completion(text, (), "stop")])
        return out


def test_a_verdict_that_echoes_the_worked_example_is_rejected(examples):
    dreamer = ModelDreamer(SituationOkJudgeEchoes(), spec=DEFAULT_SPEC, config=DreamConfig(batch_size=2),
                           taxonomy=load_taxonomy(), examples=examples)
    for s in dreamer.write_batch(ScenarioKind.ACCEPT, random.Random(5)):
        assert s.meta["parse_error"] == "judge: the reason copies a worked example's word for word"


def test_self_replies_are_greedy_other_kinds_sampled():
    from tests.scripted_engines import OracleEngine

    engine = OracleEngine()
    dreamer = ModelDreamer(engine, spec=DEFAULT_SPEC, config=DreamConfig(batch_size=3, reply_temperature=0.6),
                           taxonomy=load_taxonomy(), examples=fewshot_examples(TemplateDreamer(spec="", seed=0), HELDOUT_DOMAINS))
    dreamer.write_batch(ScenarioKind.SELF, random.Random(6), CONFIG)
    dreamer.write_batch(ScenarioKind.DERAIL, random.Random(6), CONFIG)
    replies = [s.temperature for stage, s in engine.calls if stage == "reply"]
    assert replies == [0.0] * 3 + [0.6] * 3
