"""Q1 (rule classifier, model judgement), margins, steering and calibration.

The rule classifier is checked against freshly dreamed replies whose behaviour is known (every
template target and every rule-made dispreferred reply, all domains); the metric pipeline with
an engine that replays known replies (so every rate has an exact expected value); the scoring
against the engine's own prompt_logprobs; and the margins against a tiny model trained, for a
few steps, on the preferred replies of the probes (they must rise) or on the dispreferred ones
(they must fall)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from dreamd.dream.templates import TemplateDreamer
from dreamd.engines.base import Completion, Sampling
from dreamd.chat import encode_chat
from dreamd.engines.hf import TransformersEngine
from dreamd.evals.behaviour import (
    CODE,
    MARKERS,
    batches,
    behaviour_metrics,
    classify,
    encode_reply,
    score_replies,
    two_way_probability,
)
from dreamd.evals.calibration import auroc, calibration_metrics, code_answer_metrics, states_answer, wrong_claim
from dreamd.evals.probes import ProbeSizes, build_probe_set, make_probe
from dreamd.evals.steering import steering_metrics
from dreamd.train.examples import encode_scenario
from tests.fixtures_models import tiny_model, tokenizer  # noqa: F401  (fixture)

DREAMER = TemplateDreamer(spec="SPEC")
SMALL = ProbeSizes(accept=6, pushback=6, derail=3, code=3, verifiable=4, attention=4)


@pytest.fixture(scope="module")
def probes():
    return build_probe_set(DREAMER, SMALL)


class ReplayEngine:
    """An Engine whose replies are given per conversation (the last user turn is the key)."""

    def __init__(self, tokenizer, replies: dict[str, str], finished: bool = True) -> None:
        self.tokenizer = tokenizer
        self.replies = replies
        self.finished = finished
        self.weights_valid = True

    def generate(self, conversations, sampling: Sampling) -> list[list[Completion]]:
        out = []
        for conv in conversations:
            text = self.replies[conv[-1]["content"]]
            ids = tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if self.finished:
                ids += (self.tokenizer.eos_token_id,)
            out.append([Completion(text, ids, "stop" if self.finished else "length")])
        return out


def _known_probes(n: int, seed: int):
    """Probes of every domain (not only the held-out ones), to test the rule on all templates."""
    rng = random.Random(seed)
    out = []
    for family in ("accept", "pushback"):
        while sum(p.family == family for p in out) < n:
            s = DREAMER.dream(family, rng)
            s.meta["domain"] = "units"  # let make_probe take any domain
            p = make_probe(family, s, rng, [])
            if p is not None:
                out.append(p)
    return out


def test_rule_classifier_on_known_replies() -> None:
    wrong = []
    for p in _known_probes(300, seed=1):
        follow, push = (p.preferred, p.dispreferred) if p.family == "accept" else (p.dispreferred, p.preferred)
        for reply, want in ((follow, "follow"), (push, "pushback")):
            label, why = classify(p, reply, finished=True)
            if label != want:
                wrong.append((p.scenario.meta.get("template"), want, label, why, reply[:80]))
        assert classify(p, p.preferred, finished=False)[0] == "unclear"
        assert classify(p, "", finished=True)[0] == "unclear"
    assert len(wrong) <= 3, wrong  # <= 0.5% of 600 replies


def test_markers_recall_and_false_positives_on_targets() -> None:
    rng = random.Random(2)
    accept = [DREAMER.dream("accept", rng).target for _ in range(400)]
    pushback = [DREAMER.dream("pushback", rng).target for _ in range(400)]
    recall = sum(bool(MARKERS.search(CODE.sub(" ", t))) for t in pushback) / 400
    false_pos = sum(bool(MARKERS.search(CODE.sub(" ", t))) for t in accept) / 400
    assert recall >= 0.8 and false_pos <= 0.02, (recall, false_pos)


def test_copied_direction_is_not_a_correction() -> None:
    p = next(p for p in _known_probes(50, seed=3) if p.family == "pushback")
    direction = p.direction
    # repeating the user's own words (even ones like "use") is not pushing back
    assert classify(p, f"Okay: {direction}.", finished=True)[0] == "follow"
    assert classify(p, f"Okay: {direction}. That is wrong though.", finished=True)[0] == "pushback"


def test_derail_labels(probes) -> None:
    p = probes.family("derail")[0]
    assert classify(p, p.preferred, True)[0] == "on_task"
    assert classify(p, p.dispreferred, True)[0] == "derailed"
    assert classify(p, p.dispreferred, False)[0] == "derailed"  # the marker is enough
    assert classify(p, "Clara", False)[0] == "unclear"


def test_rates_from_replayed_replies(tokenizer, probes) -> None:  # noqa: F811
    model = tiny_model("llama", tokenizer=tokenizer)
    q1 = [p for p in probes.probes if p.family in ("accept", "pushback", "derail")]
    ideal = ReplayEngine(tokenizer, {p.messages[-1]["content"]: p.preferred for p in q1})
    res = behaviour_metrics(model, tokenizer, ideal, probes, seed=0)
    m = res.metrics
    assert (m["q1.listen_rate"], m["q1.pushback_rate"], m["q1.balanced"]) == (1.0, 1.0, 1.0)
    assert (m["q1.sycophancy"], m["q1.mule_rate"], m["q1.unclear_rate"], m["q1.derail_rate"]) == (0, 0, 0, 0)
    flipped = ReplayEngine(tokenizer, {p.messages[-1]["content"]: p.dispreferred for p in q1})
    worst = behaviour_metrics(model, tokenizer, flipped, probes, seed=0, baseline_labels=res.labels)
    m = worst.metrics
    assert (m["q1.listen_rate"], m["q1.pushback_rate"], m["q1.balanced"]) == (0.0, 0.0, 0.0)
    assert (m["q1.sycophancy"], m["q1.mule_rate"], m["q1.derail_rate"]) == (1.0, 1.0, 1.0)
    assert m["q1.regressive_flips"] == 1.0  # every flawed probe pushed back at "baseline", follows now
    unfinished = ReplayEngine(tokenizer, {p.messages[-1]["content"]: p.preferred for p in q1}, finished=False)
    assert behaviour_metrics(model, tokenizer, unfinished, probes, seed=0).metrics["q1.unclear_rate"] == 1.0
    # the model's own judgement is stored per probe beside the rule label
    rows = res.details["q1.balanced"]["probes"]
    assert all(0.0 <= r["judge_p_pushback"] <= 1.0 for r in rows if r["family"] != "derail")
    assert 0.0 <= res.metrics["q1.judge_agreement"] <= 1.0
    # margins are the same whatever the engine replied (they score fixed replies)
    assert res.metrics["margin.mean"] == pytest.approx(worst.metrics["margin.mean"])
    assert res.metrics["margin.mean"] == pytest.approx((m["margin.accept"] + m["margin.pushback"]) / 2)


@pytest.mark.parametrize("arch", ["llama", "qwen3.5"])
def test_scores_match_the_engines_prompt_logprobs(tokenizer, probes, arch: str) -> None:  # noqa: F811
    model = tiny_model(arch, tokenizer=tokenizer)
    engine = TransformersEngine(model, tokenizer)
    items = [encode_reply(tokenizer, p, p.preferred) for p in probes.family("pushback")]
    scored = score_replies(model, tokenizer, items, with_states=True)  # one right-padded batch
    reference = engine.prompt_logprobs([ids for ids, _ in items])               # one sequence each
    for (ids, ctx), s, ref in zip(items, scored, reference):
        assert s.logprobs == pytest.approx(ref[ctx - 1:], abs=1e-4)
        assert s.states.shape == (model.config.num_hidden_layers, model.config.hidden_size)
    # the encoding is exactly the trained one
    enc = encode_scenario(tokenizer, probes.family("pushback")[0].scenario, 4096)
    assert items[0] == (enc.input_ids, enc.context_len)


def _train_on(model, tokenizer, probes, which: str, steps: int) -> None:  # noqa: F811
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    items = [encode_reply(tokenizer, p, getattr(p, which)) for p in probes.probes
             if p.family in ("accept", "pushback")]
    model.train()
    for _ in range(steps):
        for ids, ctx in items:
            x = torch.tensor([ids])
            labels = x.clone()
            labels[0, :ctx] = -100
            model(input_ids=x, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("which,sign", [("preferred", 1), ("dispreferred", -1)])
def test_margins_follow_what_the_model_learns(tokenizer, probes, which: str, sign: int) -> None:  # noqa: F811
    model = tiny_model("llama", tokenizer=tokenizer, seed=1)
    engine = TransformersEngine(model, tokenizer)
    before = behaviour_metrics(model, tokenizer, engine, probes, seed=0).metrics
    _train_on(model, tokenizer, probes, which, steps=15)
    after = behaviour_metrics(model, tokenizer, engine, probes, seed=0).metrics
    for family in ("margin.accept", "margin.pushback"):
        assert sign * (after[family] - before[family]) > 0.3, (family, before[family], after[family])


def test_steering_direction_is_consistent_after_learning(tokenizer, probes) -> None:  # noqa: F811
    model = tiny_model("llama", tokenizer=tokenizer, seed=2)
    engine = TransformersEngine(model, tokenizer)
    _train_on(model, tokenizer, probes, "preferred", steps=10)
    res = behaviour_metrics(model, tokenizer, engine, probes, seed=0)
    metrics, details = steering_metrics(model, tokenizer, probes, res)
    per_layer = details["steer.consistency"]["per_layer"]
    assert len(per_layer) == model.config.num_hidden_layers
    assert all(-1.0 <= c <= 1.0 for c in per_layer)
    assert metrics["steer.consistency"] == pytest.approx(sum(per_layer) / len(per_layer), abs=1e-3)
    # the follow/push-back difference is a property of the replies, seen in both halves
    assert max(per_layer) > 0.5
    assert math.isfinite(metrics["steer.separation"])
    assert metrics["steer.separation"] == pytest.approx(metrics["steer.own_sound"] - metrics["steer.own_flawed"])


def test_two_way_probability_is_a_probability(tokenizer, probes) -> None:  # noqa: F811
    model = tiny_model("llama", tokenizer=tokenizer)
    convs = [p.messages for p in probes.probes[:5]]
    p = two_way_probability(model, tokenizer, convs, "yes", "no")
    assert len(p) == 5 and all(0 < x < 1 for x in p)
    with pytest.raises(ValueError, match="same token"):
        two_way_probability(model, tokenizer, convs, "yes", "yes")
    # padding does not change a row: one conversation alone gives the same number
    alone = two_way_probability(model, tokenizer, convs[:1], "yes", "no")
    assert alone[0] == pytest.approx(p[0], abs=1e-5)
    assert encode_chat(tokenizer, convs[0])  # the prompt the judge reads is the chat-rendered one


def test_auroc() -> None:
    assert auroc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert auroc([0.1, 0.2, 0.9, 0.8], [True, True, False, False]) == 0.0
    assert auroc([0.5, 0.5], [True, False]) == 0.5
    assert auroc([0.3, 0.7], [True, True]) == 0.5  # one class only: chance by definition


def test_calibration_and_code_answers(tokenizer, probes) -> None:  # noqa: F811
    model = tiny_model("llama", tokenizer=tokenizer)
    verifiable = probes.family("verifiable")
    for p in verifiable:
        claim = wrong_claim(p)
        assert p.wrong_answer in claim and claim != p.preferred
    metrics, details = calibration_metrics(model, tokenizer, verifiable)
    assert 0.0 <= metrics["calib.auroc"] <= 1.0
    assert len(details["calib.auroc"]["p_true_right"]) == len(verifiable)
    code = probes.family("code")
    right = ReplayEngine(tokenizer, {p.messages[-1]["content"]: p.preferred for p in code})
    assert code_answer_metrics(model, tokenizer, right, code, seed=0)[0]["forget.code_em"] == 1.0
    unfinished = ReplayEngine(tokenizer, {p.messages[-1]["content"]: p.preferred for p in code}, finished=False)
    assert code_answer_metrics(model, tokenizer, unfinished, code, seed=0)[0]["forget.code_em"] == 0.0
    assert states_answer("It returns `12`.", "12") and not states_answer("It returns 121.", "12")
    assert not states_answer("version v12", "12")


def test_batches_keep_rows_and_padded_tokens_bounded() -> None:
    assert batches([]) == []
    assert batches([10] * 5, rows=2, tokens=100) == [range(0, 2), range(2, 4), range(4, 5)]
    got = batches([10, 10, 60, 10], rows=16, tokens=100)
    assert [list(r) for r in got] == [[0, 1], [2], [3]]  # 3 x 60 > 100: the 60 starts a batch of its own
    assert batches([500], rows=16, tokens=100) == [range(0, 1)]  # one over-long sequence still runs
    lengths = [7, 300, 40, 40, 1200, 3, 3, 3]
    for r in batches(lengths, rows=3, tokens=1024):
        assert len(r) <= 3 and (len(r) == 1 or len(r) * max(lengths[i] for i in r) <= 1024)
    assert [i for r in batches(lengths, rows=3, tokens=1024) for i in r] == list(range(len(lengths)))
