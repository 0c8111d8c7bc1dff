"""Forgetting metrics on real tiny models: perplexity by hand, training lowers it, fixed probes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dreamd.config import EvalConfig, ModelConfig
from dreamd.engines.base import Sampling
from dreamd.chat import encode_chat
from dreamd.engines.hf import TransformersEngine
from dreamd.errors import UsageError
from dreamd.evals.forgetting import (
    ArithmeticProbe,
    answer_logprobs,
    arithmetic_probes,
    forgetting_metrics,
    forgetting_prompts,
    heldout_nll,
    heldout_text,
    parse_answer,
    touches_forgetting_probe,
)
from dreamd.models import load_model
from dreamd.tiny import bundled_corpus, write_tiny_model_dir


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {arch: write_tiny_model_dir(tmp_path_factory.mktemp(arch.replace(".", "")), arch)
            for arch in ("llama", "qwen3.5")}


def _load(model_dirs: dict[str, Path], arch: str) -> tuple:
    model, tok = load_model(ModelConfig(path=model_dirs[arch]), "cpu")
    return model, tok, TransformersEngine(model, tok)


@pytest.mark.parametrize("arch", ["llama", "qwen3.5"])
def test_perplexity_is_exp_mean_nll_by_hand(model_dirs: dict[str, Path], arch: str) -> None:
    model, tok, engine = _load(model_dirs, arch)
    text = heldout_text(EvalConfig())
    nll, count = heldout_nll(model, tok, text, max_tokens=300, window=128)
    # By hand: the same 300 tokens cut into windows of 128, each token's log-prob given its
    # window prefix from the engine (one forward per window, a separate code path).
    ids = tok(text, add_special_tokens=False)["input_ids"][:300]
    windows = [ids[i:i + 128] for i in range(0, 300, 128)]
    logprobs = [lp for per_window in engine.prompt_logprobs(windows) for lp in per_window]
    assert count == len(logprobs) == 300 - len(windows)
    assert nll == pytest.approx(-sum(logprobs) / len(logprobs), rel=1e-6)
    metrics = forgetting_metrics(model, tok, engine, EvalConfig(perplexity_max_tokens=300, arithmetic_n=3), 0)
    assert metrics["forget.nll"] == pytest.approx(heldout_nll(model, tok, text, 300)[0])
    assert metrics["forget.perplexity"] == pytest.approx(math.exp(metrics["forget.nll"]))
    # A random model is near uniform over its 4096-token vocabulary.
    assert 1000 < metrics["forget.perplexity"] < 20000


def test_training_on_the_heldout_text_lowers_perplexity(model_dirs: dict[str, Path]) -> None:
    model, tok, _ = _load(model_dirs, "llama")
    text = heldout_text(EvalConfig())
    before, _ = heldout_nll(model, tok, text, max_tokens=256)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"][:256]])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(8):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    after, _ = heldout_nll(model, tok, text, max_tokens=256)
    assert after < before - 1.0, (before, after)  # e^-1: the perplexity falls by over 60%
    assert heldout_nll(model, tok, text, max_tokens=256) == (after, 255), "deterministic"


def test_probes_are_fixed_distinct_and_independent_of_the_run_seed() -> None:
    first = arithmetic_probes(64)
    assert first == arithmetic_probes(64) and arithmetic_probes(16) == first[:16]
    assert len(set(first)) == 64 and {p.op for p in first} == {"+", "-", "*"}
    assert all(p.answer >= 0 for p in first)
    assert forgetting_prompts(EvalConfig(arithmetic_n=64)) == [p.prompt for p in first]
    assert forgetting_prompts()[0].startswith("What is ") and forgetting_prompts()[0].endswith(
        "? Answer with the number only.")
    assert [p.op for p in first[:6]] == ["+", "-", "*", "+", "-", "*"]
    assert ArithmeticProbe(37, "+", 58).prompt == "What is 37 + 58? Answer with the number only."


def test_probe_sequence_is_pinned() -> None:
    """Changing PROBE_SEED or the recipe makes old runs incomparable with new ones: this fails."""
    assert [(p.a, p.op, p.b, p.answer) for p in arithmetic_probes(4)] == [
        (10, "+", 31, 41), (79, "-", 25, 54), (5, "*", 7, 35), (40, "+", 79, 119)]


@pytest.mark.parametrize("reply, expected", [
    ("95", 95), ("95.", 95), (" The answer is 95.", 95), ("37 + 58 = 95", 95),
    ("37+58=95, I think", 95), ("-12", -12), ("\u221212", -12), ("1,234", 1234),
    ("It is 1,234,567!", 1234567), ("95\n<|im_end|>", 95), ("no idea", None), ("", None),
    ("= ", None), ("4 apples, then 12", 4), ("x = -3", -3),
])
def test_parse_answer(reply: str, expected: int | None) -> None:
    assert parse_answer(reply) == expected


def test_touches_forgetting_probe() -> None:
    p = arithmetic_probes(32)[0]
    assert touches_forgetting_probe(f"Compute {p.a}{p.op}{p.b} for me")
    assert touches_forgetting_probe(f"what's {p.a} {p.op} {p.b}?")
    assert not touches_forgetting_probe(f"{p.a} apples and {p.b} pears")
    assert not touches_forgetting_probe("What is 1000 + 1? Answer with the number only.")
    mul = next(q for q in arithmetic_probes(32) if q.op == "*")
    assert touches_forgetting_probe(f"{mul.a} \u00d7 {mul.b}") and touches_forgetting_probe(f"{mul.a}x{mul.b}")


def test_answer_logprob_matches_unbatched_engine_logprobs(model_dirs: dict[str, Path]) -> None:
    model, tok, engine = _load(model_dirs, "qwen3.5")
    probes = arithmetic_probes(5) + [ArithmeticProbe(2, "*", 3)]  # answers of 1..4 tokens
    batched = answer_logprobs(model, tok, probes)
    for probe, got in zip(probes, batched):
        prompt = encode_chat(tok, probe.messages)
        answer = tok(str(probe.answer), add_special_tokens=False)["input_ids"]
        [lps] = engine.prompt_logprobs([prompt + answer])
        assert got == pytest.approx(sum(lps[len(prompt) - 1:]), abs=1e-4)


def test_metrics_move_when_the_answers_are_taught(model_dirs: dict[str, Path]) -> None:
    """EM through the engine and the answer log-prob both see a model that learned the answers."""
    model, tok, engine = _load(model_dirs, "llama")
    cfg = EvalConfig(perplexity_max_tokens=128, arithmetic_n=3)
    before = forgetting_metrics(model, tok, engine, cfg, seed=0)
    assert before["forget.arith_em"] == 0.0
    rows = []
    for probe in arithmetic_probes(3):
        prompt = encode_chat(tok, probe.messages)
        rows.append((prompt, tok(str(probe.answer), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]))
    width = max(len(p) + len(t) for p, t in rows)
    ids = torch.tensor([p + t + [tok.pad_token_id] * (width - len(p) - len(t)) for p, t in rows])
    labels = torch.tensor([[-100] * len(p) + t + [-100] * (width - len(p) - len(t)) for p, t in rows])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)  # 1e-2 oscillates between the answers
    for _ in range(50):
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    after = forgetting_metrics(model, tok, engine, cfg, seed=0)
    assert after["forget.arith_em"] == 1.0
    assert after["forget.arith_logprob"] > before["forget.arith_logprob"] + 5
    assert [c[0].text for c in engine.generate([p.messages for p in arithmetic_probes(3)], Sampling())] == [
        str(p.answer) for p in arithmetic_probes(3)]


def test_heldout_text_is_disjoint_from_the_tokenizer_corpus() -> None:
    heldout = [p.strip() for p in heldout_text(EvalConfig()).split("\n\n") if len(p.strip()) > 80]
    corpus = bundled_corpus()
    assert len(heldout) > 50
    assert sum(p in corpus for p in heldout) == 0


def test_custom_heldout_text_and_its_errors(tmp_path: Path, model_dirs: dict[str, Path]) -> None:
    f = tmp_path / "mine.txt"
    f.write_text("Some text of my own.\n" * 40)
    assert heldout_text(EvalConfig(heldout_text=f)).startswith("Some text")
    with pytest.raises(UsageError, match="eval.heldout_text"):
        heldout_text(EvalConfig(heldout_text=tmp_path / "missing.txt"))
    model, tok, _ = _load(model_dirs, "llama")
    with pytest.raises(ValueError, match="at least 2"):
        heldout_nll(model, tok, "a", max_tokens=64)
