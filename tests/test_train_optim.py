"""APOLLO param groups, a loss that goes down, and a state_dict weights_only can read."""

from __future__ import annotations

import io
import pickle
import random

import pytest
import torch

from dreamd.config import OptimizerConfig
from dreamd.train.context_frozen import align, reply_nll
from dreamd.train.optim import (build_optimizer, linear_weight_names, load_optimizer_state_dict,
                                optimizer_state_dict, param_groups)
from tests.fixtures_models import random_example, tiny_model


def _group_of(groups: list[dict]) -> dict[str, dict]:
    return {name: g for g in groups for name in g["param_names"]}


def test_llama_groups_low_rank_decoder_linears_plain_everything_else() -> None:
    model = tiny_model("llama")
    by_name = _group_of(param_groups(model, OptimizerConfig(rank=128, weight_decay=0.1)))
    assert set(by_name) == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        g = by_name[name]
        if ".layers." in name and p.ndim == 2:
            n = min(p.shape)  # 64 for every tiny-llama linear (hidden 64, mlp 128)
            assert (g["rank"], g["scale"], g["proj"], g["proj_type"]) == (n // 2, n / (n // 2), "random", "std"), name
            assert g["scale_type"] == "channel" and g["update_proj_gap"] == 200
        else:  # embed_tokens, lm_head, every norm
            assert "rank" not in g, name
        assert g["weight_decay"] == (0.1 if p.ndim >= 2 else 0.0), name


def test_hybrid_groups_by_rank_and_scale() -> None:
    model = tiny_model("qwen3.5")
    cfg = OptimizerConfig(rank=16)
    groups = param_groups(model, cfg)
    by_name = _group_of(groups)
    for name, p in model.named_parameters():
        g = by_name[name]
        if name in linear_weight_names(model):
            n = min(p.shape)
            r = min(16, n // 2)
            assert (g["rank"], g["scale"]) == (r, n / r), name
        else:
            assert "rank" not in g, name
    # conv1d (3-D), A_log, dt_bias and the norms are plain; the DeltaNet's 4-row in_proj_a/b get r=2.
    for suffix in ("linear_attn.conv1d.weight", "linear_attn.A_log", "linear_attn.dt_bias", "linear_attn.norm.weight"):
        assert "rank" not in by_name[f"model.layers.0.{suffix}"]
    assert by_name["model.layers.0.linear_attn.in_proj_a.weight"]["rank"] == 2
    # Each low-rank group has ONE (rank, scale): scale is right for every matrix in it.
    low = [g for g in groups if "rank" in g]
    assert len({(g["rank"], g["scale"]) for g in low}) == len(low) >= 2
    # A configured scale overrides n/r everywhere.
    assert {g["scale"] for g in param_groups(model, OptimizerConfig(rank=16, scale=128.0)) if "rank" in g} == {128.0}


def test_adamw_has_no_low_rank_groups() -> None:
    opt = build_optimizer(tiny_model("llama"), OptimizerConfig(name="adamw"), lr=1e-3)
    assert isinstance(opt, torch.optim.AdamW) and not any("rank" in g for g in opt.param_groups)


@pytest.mark.parametrize("name", ["apollo", "adamw"])
def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(name: str) -> None:
    model = tiny_model("llama")
    batch = align([random_example(random.Random(0), 40, 12), random_example(random.Random(1), 20, 8)], 0)
    opt = build_optimizer(model, OptimizerConfig(name=name, rank=8), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = reply_nll(model, batch, frozen=True) / 20
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_apollo_state_dict_loads_with_weights_only_and_keeps_the_projection_sequence() -> None:
    model = tiny_model("llama")
    batch = align([random_example(random.Random(0), 30, 10)], 0)
    opt = build_optimizer(model, OptimizerConfig(rank=8, update_proj_gap=2), lr=1e-3)
    for _ in range(3):
        reply_nll(model, batch, frozen=True).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    buf = io.BytesIO()
    torch.save(optimizer_state_dict(opt), buf)
    # The plain state_dict holds GradientProjector objects, which weights_only refuses.
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.save(opt.state_dict(), b := io.BytesIO())
        b.seek(0)
        torch.load(b, weights_only=True)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)

    fresh = build_optimizer(model, OptimizerConfig(rank=8, update_proj_gap=2), lr=1e-3)
    load_optimizer_state_dict(fresh, loaded)
    projected = 0
    for p in model.parameters():
        old, new = opt.state[p], fresh.state[p]
        assert old.keys() == new.keys()
        if "projector" in old:
            projected += 1
            a, b = old["projector"], new["projector"]
            assert type(a) is type(b) and (a.seed, a.rank, a.update_proj_gap, a.scale) == (b.seed, b.rank, b.update_proj_gap, b.scale)
            assert torch.equal(a.ortho_matrix, b.ortho_matrix)
        assert torch.equal(old["exp_avg"], new["exp_avg"]) and old["step"] == new["step"]
    assert projected == len(linear_weight_names(model))
