"""Q3, attention shift: which full-attention heads changed how they read a direction.

On the 20 fixed direction-giving probe conversations (probes.py: 10 accept, 10 pushback), the
prompt up to the generation prompt goes through the model with eager attention (sdpa returns
no maps). Only full-attention layers have maps: every layer of a Llama, one in four
of a Qwen3.5 hybrid (models.model_facts names them). For every head:

  shift     L2 distance between its attention rows now and at the run's start, averaged over
            the last QUERY_ROWS query positions and the 20 conversations. A row is a probability
            distribution, so the distance is in [0, sqrt(2)]: 0 unchanged, sqrt(2) moved all its
            weight to other tokens.
  mass      attention weight on the direction span (the direction clause of the final user
            turn) from the reply's starting positions (the tokens after the user's turn: end of
            turn and the assistant header), averaged over conversations.

Metrics: q3.shift_mean (over heads), q3.shift_max, q3.direction_mass (mean over heads, now),
q3.direction_mass_delta (now - start). The top heads by shift, with their masses, are in
evals.detail_json of q3.shift_max. The start maps are saved once (`save_baseline`, a .pt under
the run's state dir) so "now vs start" survives a restart.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dreamd.chat import eval_mode, render_text
from dreamd.evals.probes import Probe
from dreamd.models import model_facts

QUERY_ROWS = 32
"""Query positions kept per conversation (the end of the prompt: the direction's end, the end
of the user turn and the assistant header, where the reply is decided). Keeping all rows would
cost 20 x layers x heads x T^2 values; 32 rows keep the baseline file ~50 MB for an 8B model."""
TOP_HEADS = 10


@contextmanager
def eager_attention(model: Any) -> Iterator[None]:
    """Switch the model to eager attention (the only kernel that returns maps) and back."""
    before = model.config._attn_implementation
    if before != "eager":
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if before != "eager":
            model.set_attn_implementation(before)


@dataclass
class AttentionInput:
    ids: list[int]
    span: tuple[int, int]
    """Token range [start, end) of the direction clause."""
    reply_start: int
    """First token after the user's turn content (end of turn + assistant header follow)."""


def attention_input(tokenizer: Any, probe: Probe) -> AttentionInput:
    """The chat-rendered prompt and where the direction and the reply start are in it."""
    assert probe.direction, "attention probes carry a direction"
    text = render_text(tokenizer, probe.messages, add_generation_prompt=True)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    content = probe.messages[-1]["content"]
    at = text.rfind(content)
    start = at + content.rfind(probe.direction)
    end, after = start + len(probe.direction), at + len(content)
    offsets = enc["offset_mapping"]
    tokens = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
    reply_start = next(i for i, (s, e) in enumerate(offsets) if s >= after)
    return AttentionInput(list(enc["input_ids"]), (tokens[0], tokens[-1] + 1), reply_start)


@torch.no_grad()
def attention_maps(model: Any, tokenizer: Any, probes: list[Probe]) -> list[dict[int, torch.Tensor]]:
    """Per conversation: {full-attention layer index: [heads, rows, T] fp16 maps of the last
    QUERY_ROWS query positions}. One conversation per forward: no padding in the maps."""
    full = model_facts(model.config)["full_attention_layers"]
    layers = model.config.get_text_config().num_hidden_layers
    device = next(model.parameters()).device
    out: list[dict[int, torch.Tensor]] = []
    with eval_mode(model), eager_attention(model):
        for probe in probes:
            inp = attention_input(tokenizer, probe)
            res = model(input_ids=torch.tensor([inp.ids], device=device), output_attentions=True, use_cache=False)
            maps = [a for a in res.attentions if a is not None]
            index = full if len(maps) == len(full) else list(range(layers))
            assert len(maps) == len(index), (len(maps), full)
            rows = min(QUERY_ROWS, len(inp.ids))
            out.append({layer: a[0, :, -rows:, :].to(torch.float16).cpu()
                        for layer, a in zip(index, maps) if layer in full})
    return out


def direction_mass(maps: dict[int, torch.Tensor], inp: AttentionInput) -> dict[int, torch.Tensor]:
    """{layer: [heads]} attention on the direction span from the reply's starting rows."""
    out = {}
    for layer, a in maps.items():
        total = a.shape[-1]
        first_row = inp.reply_start - (total - a.shape[1])  # row index inside the kept rows
        rows = a[:, max(0, first_row):, inp.span[0]:inp.span[1]].float()
        out[layer] = rows.sum(-1).mean(-1)
    return out


def save_baseline(path: Path, maps: list[dict[int, torch.Tensor]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"format": 1, "maps": maps}, tmp)
    tmp.replace(path)


def load_baseline(path: Path) -> list[dict[int, torch.Tensor]]:
    return torch.load(path, weights_only=True)["maps"]


def attention_metrics(model: Any, tokenizer: Any, probes: list[Probe], baseline: list[dict[int, torch.Tensor]],
                      now: list[dict[int, torch.Tensor]] | None = None) -> tuple[dict[str, float], dict[str, Any]]:
    """Q3 metrics of the model now against the baseline maps (same probes, same order). `now`:
    this model's maps when already computed (the run's first evaluation: they are the baseline)."""
    if now is None:
        now = attention_maps(model, tokenizer, probes)
    assert len(now) == len(baseline), "baseline maps were made on another probe set"
    inputs = [attention_input(tokenizer, p) for p in probes]
    shift: dict[int, torch.Tensor] = {}
    mass_now: dict[int, torch.Tensor] = {}
    mass_start: dict[int, torch.Tensor] = {}
    for maps, base, inp in zip(now, baseline, inputs):
        m_now, m_start = direction_mass(maps, inp), direction_mass(base, inp)
        for layer, a in maps.items():
            d = (a.float() - base[layer].float()).norm(dim=-1).mean(-1)  # [heads]
            shift[layer] = shift.get(layer, 0) + d / len(probes)
            mass_now[layer] = mass_now.get(layer, 0) + m_now[layer] / len(probes)
            mass_start[layer] = mass_start.get(layer, 0) + m_start[layer] / len(probes)
    heads = [(layer, h, float(shift[layer][h]), float(mass_now[layer][h]), float(mass_start[layer][h]))
             for layer in sorted(shift) for h in range(shift[layer].shape[0])]
    shifts = [x[2] for x in heads]
    ranked = sorted(heads, key=lambda x: -x[2])[:TOP_HEADS]
    metrics = {
        "q3.shift_mean": sum(shifts) / len(shifts),
        "q3.shift_max": max(shifts),
        "q3.direction_mass": sum(x[3] for x in heads) / len(heads),
        "q3.direction_mass_delta": sum(x[3] - x[4] for x in heads) / len(heads),
    }
    details = {
        "q3.shift_max": {"top_heads": [{"layer": l, "head": h, "shift": round(s, 5), "mass": round(m, 5),
                                        "mass_start": round(m0, 5)} for l, h, s, m, m0 in ranked],
                         "max_possible": math.sqrt(2)},
        "q3.shift_mean": {"per_layer": {str(l): [round(float(v), 5) for v in shift[l]] for l in sorted(shift)}},
    }
    return metrics, details
