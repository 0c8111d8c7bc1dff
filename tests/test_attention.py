"""Q3: attention maps of full-attention layers only (Llama: all, Qwen3.5 hybrid: 1 in 4), the
direction span in tokens, shift 0 for unchanged weights and > 0 after training, and a baseline
that survives a save/load."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dreamd.dream.templates import TemplateDreamer
from dreamd.evals.attention import (
    QUERY_ROWS,
    attention_input,
    attention_maps,
    attention_metrics,
    direction_mass,
    eager_attention,
    load_baseline,
    save_baseline,
)
from dreamd.evals.probes import ProbeSizes, build_probe_set
from dreamd.models import model_facts
from tests.fixtures_models import tiny_model, tokenizer  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def probes():
    return build_probe_set(TemplateDreamer(spec="S"), ProbeSizes(accept=3, pushback=3, derail=1, code=1,
                                                                  verifiable=2, attention=6)).attention


def test_eager_switch_is_undone(tokenizer) -> None:  # noqa: F811
    model = tiny_model("llama", tokenizer=tokenizer)
    assert model.config._attn_implementation == "sdpa"
    with eager_attention(model):
        assert model.config._attn_implementation == "eager"
    assert model.config._attn_implementation == "sdpa"


def test_direction_span_and_reply_start(tokenizer, probes) -> None:  # noqa: F811
    for p in probes:
        inp = attention_input(tokenizer, p)
        span = tokenizer.decode(inp.ids[inp.span[0]:inp.span[1]])
        assert p.direction in span and len(span) <= len(p.direction) + 8  # whole tokens around it
        tail = tokenizer.decode(inp.ids[inp.reply_start:])
        assert tail.startswith("<|im_end|>") and tail.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("arch,full", [("llama", [0, 1, 2, 3]), ("qwen3.5", [3])])
def test_maps_only_for_full_attention_layers(tokenizer, probes, arch: str, full: list[int]) -> None:  # noqa: F811
    model = tiny_model(arch, tokenizer=tokenizer)
    assert model_facts(model.config)["full_attention_layers"] == full
    maps = attention_maps(model, tokenizer, probes)
    heads = model.config.num_attention_heads
    for per_conv, p in zip(maps, probes):
        assert sorted(per_conv) == full
        n = len(attention_input(tokenizer, p).ids)
        for a in per_conv.values():
            assert a.shape == (heads, min(QUERY_ROWS, n), n)
            assert torch.allclose(a.float().sum(-1), torch.ones(a.shape[:2]), atol=2e-3)  # rows are distributions
    mass = direction_mass(maps[0], attention_input(tokenizer, probes[0]))
    assert all(((0 <= m) & (m <= 1)).all() for m in mass.values())


@pytest.mark.parametrize("arch", ["llama", "qwen3.5"])
def test_shift_is_zero_unchanged_and_grows_with_training(tmp_path: Path, tokenizer, probes, arch: str) -> None:  # noqa: F811
    model = tiny_model(arch, tokenizer=tokenizer)
    path = tmp_path / "attention_baseline.pt"
    save_baseline(path, attention_maps(model, tokenizer, probes))
    baseline = load_baseline(path)
    same, details = attention_metrics(model, tokenizer, probes, baseline)
    assert same["q3.shift_max"] < 2e-3  # fp16 storage of the maps only
    assert abs(same["q3.direction_mass_delta"]) < 1e-3
    # train the attention on the probe conversations (next-token loss on the prompts)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(5):
        for p in probes:
            x = torch.tensor([attention_input(tokenizer, p).ids])
            model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    moved, details = attention_metrics(model, tokenizer, probes, baseline)
    assert moved["q3.shift_mean"] > 10 * max(same["q3.shift_mean"], 1e-4)
    assert moved["q3.shift_max"] <= math.sqrt(2)
    top = details["q3.shift_max"]["top_heads"]
    assert top[0]["shift"] == pytest.approx(moved["q3.shift_max"], abs=1e-4)
    assert all(h["layer"] in model_facts(model.config)["full_attention_layers"] for h in top)
    assert [h["shift"] for h in top] == sorted((h["shift"] for h in top), reverse=True)
