"""The sleep decision's byte estimates (against real optimizer state and real saved
activations) and the decision itself; the phase ledger."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dreamd.config import OptimizerConfig
from dreamd.engines.ledger import PhaseLedger
from dreamd.engines.memory import (
    GiB,
    TrainingMemory,
    activation_bytes,
    decide_sleep,
    default_margin,
    estimate_training_memory,
    optimizer_state_bytes,
)
from dreamd.tiny import build_tiny_model, tiny_config
from dreamd.train.activation_memory import SavedTensorMeter
from dreamd.train.optim import build_optimizer


def _real_state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for state in opt.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and value.numel() > 1:
                total += value.numel() * value.element_size()
            matrix = getattr(value, "ortho_matrix", None) if key == "projector" else None
            if matrix is not None:
                total += matrix.numel() * matrix.element_size()
    return total


@pytest.mark.parametrize("arch", ["llama", "qwen3.5"])
@pytest.mark.parametrize("name", ["apollo", "adamw"])
def test_optimizer_estimate_equals_the_real_state_after_a_step(arch: str, name: str) -> None:
    model = build_tiny_model(tiny_config(arch, 512, hidden=128))
    cfg = OptimizerConfig(name=name, rank=16)
    opt = build_optimizer(model, cfg, lr=1e-3)
    ids = torch.randint(0, 512, (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    transient = max(p.numel() * 4 for p in model.parameters()) if name == "apollo" else 0
    assert optimizer_state_bytes(model, cfg) - transient == _real_state_bytes(opt)


def test_apollo_state_by_hand() -> None:
    """One decoder-layer linear of shape (128, 256), rank 16: moments 2*16*256, projection
    16*128, fp32; plus the transient full-rank update of the largest tensor."""
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(256, 128, bias=False)])

    model = Tiny()
    apollo = optimizer_state_bytes(model, OptimizerConfig(name="apollo", rank=16))
    assert apollo == (2 * 16 * 256 + 16 * 128) * 4 + 128 * 256 * 4
    assert optimizer_state_bytes(model, OptimizerConfig(name="adamw")) == 2 * 128 * 256 * 4
    assert optimizer_state_bytes(model, OptimizerConfig(name="adamw"), master_weights=True) == 2 * 128 * 256 * 4


@pytest.mark.parametrize("arch", ["llama", "qwen3.5"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_activation_estimate_covers_what_autograd_saves(arch: str, attn: str) -> None:
    cfg = tiny_config(arch, 512, hidden=64)
    model = build_tiny_model(cfg)
    model.config._attn_implementation = attn
    ids = torch.randint(0, 512, (2, 128))
    with SavedTensorMeter(model) as meter:
        model(input_ids=ids, labels=ids, use_cache=False)
    est = estimate_training_memory(model, OptimizerConfig(), batch_size=2, seq_len=128,
                                   eager_attention=attn == "eager").activations
    # an estimate, but never below what is really kept, and not wildly above (< 3x)
    assert meter.bytes <= est < 3 * meter.bytes


def test_activation_formula() -> None:
    # Korthikanti et al. 2022: 34*s*b*h (+5*a*s^2*b eager) per layer at 2 bytes, logits 8*b*s*V
    base = dict(layers=2, hidden=1024, heads=8, vocab=1000, batch_size=4, seq_len=512, element_size=2)
    sdpa = activation_bytes(**base, eager_attention=False)
    assert sdpa == 2 * 34 * 512 * 4 * 1024 + 8 * 4 * 512 * 1000
    assert activation_bytes(**base, eager_attention=True) - sdpa == 2 * 5 * 8 * 512 * 512 * 4
    assert activation_bytes(**{**base, "element_size": 4}, eager_attention=False) - sdpa == 2 * 34 * 512 * 4 * 1024


def test_estimate_parts() -> None:
    model = build_tiny_model(tiny_config("llama", 512))
    mem = estimate_training_memory(model, OptimizerConfig(name="adamw"), batch_size=2, seq_len=64,
                                   eager_attention=False)
    n = sum(p.numel() for p in model.parameters())
    assert mem.weights == mem.grads == 4 * n and mem.master_weights == 0 and mem.optimizer == 8 * n
    # bf16 weights: fp32 work copies (weight + grad) and fp32 moments, whatever bf16_update is.
    model = model.to(torch.bfloat16)
    mem = estimate_training_memory(model, OptimizerConfig(name="adamw"), batch_size=2, seq_len=64,
                                   eager_attention=False)
    assert mem.weights == mem.grads == 2 * n and mem.master_weights == 8 * n and mem.optimizer == 8 * n
    assert mem.added_by_training(weights_resident=False) - mem.added_by_training() == mem.weights


MEM = TrainingMemory(weights=16 * GiB, grads=16 * GiB, optimizer=4 * GiB, master_weights=0, activations=6 * GiB)


def test_decide_sleep() -> None:
    total = 141 * GiB
    assert default_margin(total) == int(0.08 * total) and default_margin(None) == 2 * GiB
    # 26 GiB + 11.3 GiB margin: fits in 80 GiB free, not in 30 GiB
    awake = decide_sleep(MEM, 80 * GiB, total_bytes=total)
    assert not awake.sleep and awake.level == 0 and awake.need_bytes == 26 * GiB and "fits" in awake.reason
    asleep = decide_sleep(MEM, 30 * GiB, total_bytes=total)
    assert asleep.sleep and asleep.level == 2 and "does not fit" in asleep.reason
    # the boundary: need + margin == free stays awake, one byte less sleeps
    edge = 26 * GiB + 2 * GiB
    assert not decide_sleep(MEM, edge, margin_bytes=2 * GiB).sleep
    assert decide_sleep(MEM, edge - 1, margin_bytes=2 * GiB).sleep
    # weights not yet resident count too
    assert decide_sleep(MEM, 40 * GiB, margin_bytes=0, weights_resident=False).sleep
    # a measured peak larger than the estimate wins; a smaller one does not lower it
    assert decide_sleep(MEM, 40 * GiB, margin_bytes=0, measured_peak_bytes=41 * GiB).sleep
    assert decide_sleep(MEM, 40 * GiB, margin_bytes=0, measured_peak_bytes=1).need_bytes == 26 * GiB
    assert not decide_sleep(MEM, None).sleep  # CPU
    assert decide_sleep(MEM, 500 * GiB, policy="always").sleep
    never = decide_sleep(MEM, 1 * GiB, policy="never")
    assert not never.sleep and "does NOT fit" in never.reason


def test_ledger_rows_and_overhead() -> None:
    ticks = iter([0.0, 2.0, 2.0, 2.5, 3.0, 13.0, 13.0, 14.0, 20.0, 21.0])
    free = iter(range(100, 0, -1))
    ledger = PhaseLedger(clock=lambda: next(ticks), free_bytes=lambda: next(free), synchronize=lambda: None)
    with ledger.phase("generate") as rec:
        rec.tokens = 400
    with ledger.phase("sleep"):
        pass
    with ledger.phase("train"):
        pass
    with ledger.phase("push"):
        pass
    with pytest.raises(RuntimeError), ledger.phase("wake"):
        raise RuntimeError("a failed phase is still recorded")
    rows = ledger.rows()
    assert [r["name"] for r in rows] == ["generate", "sleep", "train", "push", "wake"]
    assert set(rows[0]) == {"name", "started_at", "seconds", "mem_free_before", "mem_free_after", "tokens_per_s"}
    assert [r["seconds"] for r in rows] == [2.0, 0.5, 10.0, 1.0, 1.0]
    assert rows[0]["tokens_per_s"] == 200.0 and rows[1]["tokens_per_s"] is None
    assert (rows[0]["mem_free_before"], rows[0]["mem_free_after"]) == (100, 99)
    assert rows[0]["started_at"].tzinfo is not None
    assert ledger.wall_seconds() == 21.0
    assert ledger.overhead_share() == pytest.approx(2.5 / 21.0)
    assert ledger.overhead_share(cycle_seconds=25.0) == pytest.approx(0.1)


def test_ledger_on_cpu_has_no_memory_numbers() -> None:
    ledger = PhaseLedger()
    with ledger.phase("checkpoint"):
        sum(range(1000))
    row = ledger.rows()[0]
    if not torch.cuda.is_available():
        assert row["mem_free_before"] is None and row["mem_free_after"] is None
    assert row["seconds"] > 0 and PhaseLedger().overhead_share() is None
