"""The Trainer: step rows, warmup, the non-finite guard, bf16 updates that land, exact resume,
and one training pass of the qwen3.5-style hybrid with the context-frozen gradient."""

from __future__ import annotations

import io
import random
import statistics

import pytest
import torch

from dreamd.config import OptimizerConfig, TrainConfig
from dreamd.dream.scenario import ScenarioKind
from dreamd.errors import CycleFailed
from dreamd.train.mix import make_batches
from dreamd.train.context_frozen import align, reply_nll
from dreamd.train.examples import encode_scenario
from dreamd.train.optim import linear_weight_names
from dreamd.train.trainer import StepResult, Trainer
from tests.fixtures_models import long_scenario, random_example, tiny_model, tokenizer  # noqa: F401

B, G = ScenarioKind.ACCEPT, ScenarioKind.GENERAL


def _batches(seed: int, n: int, size: int = 3) -> list[list]:
    rng = random.Random(seed)
    return [[random_example(rng, rng.randrange(8, 60), rng.randrange(3, 15), G if i == 0 else B,
                            scenario_id=100 * k + i) for i in range(size)] for k in range(n)]


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_step_rows_carry_the_throughput_columns() -> None:
    batch = _batches(0, 1, size=4)[0]
    for layout, padded in (("per_example", False), ("padded", True)):
        trainer = Trainer(tiny_model("llama"), TrainConfig(forward_layout=layout), OptimizerConfig(rank=8))
        (row,) = list(trainer.train_pass([batch]))
        assert isinstance(row, StepResult) and row.step == 0 and not row.skipped
        assert (row.n_behavioral, row.n_general) == (3, 1)
        assert row.scenario_ids == [e.scenario_id for e in batch]
        assert row.tokens == sum(e.n_tokens for e in batch)
        assert (row.pad_fraction > 0) == padded and 0 <= row.pad_fraction < 1
        assert row.tokens_per_s > 0 and row.wall_ms > 0 and row.grad_norm > 0
        assert row.peak_mem_bytes > 0 and row.update_landed is None  # fp32: written directly
        assert row.metrics()["loss"] == row.loss and set(row.metrics()) >= {"pad_fraction", "tokens_per_s"}


def test_both_layouts_give_the_same_step() -> None:
    batch = _batches(1, 1, size=4)[0]
    after = {}
    for layout in ("per_example", "padded"):
        model = tiny_model("qwen3.5")
        # context-frozen, as 'auto' chose for these short examples before frozen_min_context
        # (after one AdamW step, the full path's ~1e-8 gradients would be compared by sign)
        (row,) = list(Trainer(model, TrainConfig(forward_layout=layout, lr=1e-3, context_frozen="on"),
                              OptimizerConfig(name="adamw")).train_pass([batch]))
        after[layout] = (row.loss, _params(model))
    assert abs(after["padded"][0] - after["per_example"][0]) < 1e-5
    for name, p in after["padded"][1].items():
        torch.testing.assert_close(p, after["per_example"][1][name], rtol=1e-4, atol=1e-6, msg=name)


def _one_step(batch, **train) -> tuple[float, dict[str, torch.Tensor], list[tuple[int, bool]]]:
    """Loss and gradient of one step as train_step computes them (each forward the trainer
    chose, its summed NLL over the batch's reply tokens, backward), and the (rows, frozen) of
    those forwards."""
    model = tiny_model("llama")
    trainer = Trainer(model, TrainConfig(**train), OptimizerConfig(name="adamw"))
    n_labels, total, forwards = sum(e.reply_len for e in batch), 0.0, []
    for aligned, frozen in trainer.micro_batches(batch):
        nll = reply_nll(model, aligned, frozen)
        (nll / n_labels).backward()
        total += nll.item()
        forwards.append((aligned.input_ids.shape[0], frozen))
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return total / n_labels, grads, forwards


def test_the_path_is_chosen_by_length() -> None:
    """'auto' (the default): a short batch is one padded full forward, a long one one
    context-frozen forward per example; the thresholds move the choice."""
    rng = random.Random(7)
    short = [random_example(rng, c, r) for c, r in [(40, 20), (50, 12), (60, 30), (30, 25)]]
    long = [random_example(rng, c, r) for c, r in [(600, 20), (300, 40), (160, 30), (40, 10)]]
    assert _one_step(short)[2] == [(4, False)]
    assert _one_step(long)[2] == [(1, True), (1, True), (1, True), (1, False)]  # 40 < frozen_min_context
    assert _one_step(short + [random_example(rng, 90, 30)])[2] == [(1, True), (4, False)]
    assert _one_step(long, padded_max_tokens=1000)[2] == [(3, True), (1, False)]
    assert _one_step(short, frozen_min_context=50, padded_max_tokens=50)[2] == \
        [(1, False), (1, True), (1, True), (1, False)]


def test_the_chosen_path_gives_the_other_paths_step() -> None:
    """Whatever 'auto' chooses, the step is the one the other paths take: the layout changes
    nothing but rounding (loss within 1e-5, every gradient within rtol 1e-4 / atol 1e-7, fp32);
    the context-frozen path has the same loss, and the same gradient on the parameters the
    context's activations do not feed (lm_head, the final norm), while the rest differ by design
    (context_frozen.py: the path back through the context is cut)."""
    rng = random.Random(8)
    short = [random_example(rng, c, r) for c, r in [(40, 20), (50, 12), (60, 30), (30, 25)]]
    loss, grads, _ = _one_step(short)
    for other in ({"forward_layout": "per_example"}, {"forward_layout": "per_example", "context_frozen": "off"},
                  {"forward_layout": "padded", "context_frozen": "off"}):
        other_loss, other_grads, _ = _one_step(short, **other)
        assert abs(other_loss - loss) < 1e-5, other
        assert other_grads.keys() == grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(other_grads[name], g, rtol=1e-4, atol=1e-7, msg=f"{other} {name}")
    frozen_loss, frozen_grads, forwards = _one_step(short, context_frozen="on", forward_layout="per_example")
    assert forwards == [(1, True)] * 4 and abs(frozen_loss - loss) < 1e-5
    for name in ("lm_head.weight", "model.norm.weight"):
        torch.testing.assert_close(frozen_grads[name], grads[name], rtol=1e-4, atol=1e-7, msg=name)
    up = "model.layers.0.mlp.up_proj.weight"
    assert not torch.allclose(frozen_grads[up], grads[up], rtol=1e-2, atol=1e-6)
    long = [random_example(rng, c, r) for c, r in [(600, 20), (300, 40), (160, 30), (200, 10)]]
    loss, grads, forwards = _one_step(long)
    assert forwards == [(1, True)] * 4
    padded_loss, padded_grads, forwards = _one_step(long, forward_layout="padded")
    assert forwards == [(4, True)] and abs(padded_loss - loss) < 1e-5
    for name, g in grads.items():
        torch.testing.assert_close(padded_grads[name], g, rtol=1e-4, atol=1e-7, msg=name)


def test_warmup_over_the_run_and_set_lr() -> None:
    trainer = Trainer(tiny_model("llama"), TrainConfig(lr=1e-3, warmup_steps=4), OptimizerConfig(rank=8))
    lrs = [r.lr for r in trainer.train_pass(_batches(2, 3))]
    trainer.set_lr(2e-3)  # the controller, between cycles: warmup continues where the run is
    lrs += [r.lr for r in trainer.train_pass(_batches(3, 2))]
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 2e-3, 2e-3])
    assert trainer.step == 5


def test_non_finite_steps_are_skipped_then_the_pass_fails() -> None:
    model = tiny_model("llama")
    trainer = Trainer(model, TrainConfig(max_nonfinite_steps=3, lr=1e-3), OptimizerConfig(rank=8))
    good_row = model.lm_head.weight[5].detach().clone()
    with torch.no_grad():
        model.lm_head.weight[5] = float("nan")  # every logit row's softmax becomes nan
    before = {n: p.view(torch.int32).clone() for n, p in _params(model).items()}

    rows = trainer.train_pass(_batches(4, 6))
    first, second = next(rows), next(rows)
    assert first.skipped and second.skipped and first.update_landed is None
    after = {n: p.view(torch.int32) for n, p in _params(model).items()}
    assert all(torch.equal(before[n], after[n]) for n in before), "a skipped step changes no weight"
    with torch.no_grad():
        model.lm_head.weight[5] = good_row  # recovers: the count of steps in a row resets
    third = next(rows)
    assert not third.skipped and trainer.nonfinite_in_a_row == 0

    with torch.no_grad():
        model.lm_head.weight[5] = float("nan")
    seen = []
    with pytest.raises(CycleFailed, match="3 steps in a row"):
        for row in rows:
            seen.append(row)  # every skipped row reaches the caller before the failure
    assert len(seen) == 3 and all(r.skipped for r in seen) and [r.step for r in seen] == [3, 4, 5]


def test_bf16_updates_land_with_stochastic_rounding_and_not_with_nearest() -> None:
    landed: dict[str, list[float]] = {"stochastic": [], "nearest": []}
    for mode in landed:
        for seed in (0, 1):
            model = tiny_model("llama", seed=seed, dtype=torch.bfloat16)
            trainer = Trainer(model, TrainConfig(lr=1e-5, warmup_steps=0, bf16_update=mode),
                              OptimizerConfig(rank=8), seed=seed)
            landed[mode] += [r.update_landed for r in trainer.train_pass(_batches(seed, 3))]
            # Between steps the fp32 work tensors are released: 4 B/param only during a step.
            assert all(w.numel() == 0 for w in trainer.low_precision.work.values())
    assert statistics.mean(landed["stochastic"]) >= 0.95, landed
    assert statistics.mean(landed["nearest"]) < 0.5, landed  # measured 0.19-0.31: only near-zero weights move


def test_bf16_master_weights_stay_in_fp32_and_round_into_the_model() -> None:
    model = tiny_model("llama", dtype=torch.bfloat16)
    trainer = Trainer(model, TrainConfig(lr=1e-5, bf16_update="master"), OptimizerConfig(rank=8))
    initial = _params(model)
    list(trainer.train_pass(_batches(5, 4)))
    moved = 0
    for name, p in model.named_parameters():
        master = trainer.low_precision.work[name]
        assert master.dtype == torch.float32 and torch.equal(p.detach(), master.detach().to(torch.bfloat16))
        moved += int((master.detach() != initial[name].float()).sum())
    assert moved > 0.5 * sum(p.numel() for p in model.parameters()), "the masters accumulate the small steps"


def _run(arch: str, dtype: torch.dtype, batches: list, start: dict | None = None) -> tuple:
    train_cfg = TrainConfig(lr=3e-3 if dtype == torch.float32 else 1e-4, warmup_steps=5)
    opt_cfg = OptimizerConfig(rank=8, update_proj_gap=3)
    model = tiny_model(arch, seed=0 if start is None else 99, dtype=dtype)
    trainer = Trainer(model, train_cfg, opt_cfg, seed=7 if start is None else 1234)
    if start is not None:  # a fresh process would do exactly this, from the checkpoint files
        model.load_state_dict(torch.load(io.BytesIO(start["weights"]), weights_only=True))
        trainer.load_state_dict(torch.load(io.BytesIO(start["trainer"]), weights_only=True))
    losses = [r.loss for r in trainer.train_pass(batches)]
    return losses, model, trainer


def _checkpoint(model, trainer) -> dict[str, bytes]:
    out = {}
    for key, sd in (("weights", model.state_dict()), ("trainer", trainer.state_dict())):
        buf = io.BytesIO()
        torch.save(sd, buf)
        out[key] = buf.getvalue()
    return out


def _seeds(trainer) -> list[int]:
    return [s["projector"].seed for s in trainer.optimizer.state.values() if "projector" in s]


@pytest.mark.parametrize("arch,dtype", [("llama", torch.float32), ("qwen3.5", torch.float32),
                                        ("llama", torch.bfloat16)])
def test_exact_resume(arch: str, dtype: torch.dtype) -> None:
    """N steps straight == K steps, checkpoint (weights_only), fresh model + Trainer, N-K more.
    APOLLO with update_proj_gap 3 refreshes its projection at step 6, inside the resumed
    window; the bf16 case also resumes the stochastic-rounding generator."""
    N, K = 8, 4
    batches = _batches(6, N)
    straight, model_a, _ = _run(arch, dtype, batches)
    first, model_b, trainer_b = _run(arch, dtype, batches[:K])
    seeds_at_k = _seeds(trainer_b)
    rest, model_c, trainer_c = _run(arch, dtype, batches[K:], start=_checkpoint(model_b, trainer_b))
    assert straight == first + rest
    for (name, a), c in zip(model_a.named_parameters(), model_c.parameters()):
        assert torch.equal(a, c), name
    assert trainer_c.step == N
    seeds_at_n = _seeds(trainer_c)
    assert len(seeds_at_n) == len(seeds_at_k) == len(linear_weight_names(model_c)), "every decoder linear is low-rank"
    assert all(a != b for a, b in zip(seeds_at_k, seeds_at_n)), "a refresh happened after resume"


def test_one_training_pass_on_the_hybrid_model_with_the_context_frozen_gradient(tokenizer) -> None:  # noqa: F811
    """The demo: real scenarios, spec-stripped and chat-templated, mixed with general data,
    trained for one pass on the qwen3.5-style model (3 Gated DeltaNet layers + 1 attention)."""
    rng = random.Random(0)
    scenarios = [long_scenario(rng, kind, spec="Follow sound directions; push back on wrong ones.")
                 for kind in (ScenarioKind.ACCEPT, ScenarioKind.PUSHBACK, ScenarioKind.DERAIL) * 2]
    scenarios += [long_scenario(rng, ScenarioKind.GENERAL) for _ in range(4)]
    examples = [encode_scenario(tokenizer, s, max_len=2048, scenario_id=i) for i, s in enumerate(scenarios)]
    assert all(e.context_len > 5 * e.reply_len for e in examples)
    batches = make_batches(examples, batch_size=4, general_share=0.25, bucket_by_length=True, rng=rng)

    model = tiny_model("qwen3.5", vocab=len(tokenizer), tokenizer=tokenizer)
    trainer = Trainer(model, TrainConfig(lr=2e-3, warmup_steps=0), OptimizerConfig(rank=8, update_proj_gap=2))
    assert all(frozen for b in batches for _, frozen in trainer.micro_batches(b)), "'auto' freezes these"

    def mean_loss() -> float:
        with torch.no_grad():
            return sum(reply_nll(model, align([e], 0), True).item() for e in examples) / sum(e.reply_len for e in examples)

    before_loss, before = mean_loss(), _params(model)
    rows = list(trainer.train_pass(batches))
    assert len(rows) == 3 and not any(r.skipped for r in rows)
    assert sorted(i for r in rows for i in r.scenario_ids) == list(range(10))
    assert all(r.n_general >= 1 for r in rows)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    # The gradient reached the DeltaNet's own parameters, not just attention and MLP.
    for suffix in ("linear_attn.A_log", "linear_attn.dt_bias", "linear_attn.conv1d.weight",
                   "linear_attn.in_proj_qkv.weight"):
        assert f"model.layers.0.{suffix}" in changed, suffix
    assert mean_loss() < before_loss


def test_fp32_parameters_of_a_bf16_model_are_stepped_directly() -> None:
    model = tiny_model("qwen3.5", dtype=torch.bfloat16)
    for layer in model.model.layers[:3]:  # as a checkpoint that keeps A_log in fp32 would load
        layer.linear_attn.A_log.data = layer.linear_attn.A_log.data.float()
    before = model.model.layers[0].linear_attn.A_log.detach().clone()
    trainer = Trainer(model, TrainConfig(lr=1e-3, warmup_steps=0), OptimizerConfig(rank=8))
    assert "model.layers.0.linear_attn.A_log" not in trainer.low_precision.work
    rows = list(trainer.train_pass(_batches(7, 2)))
    after = model.model.layers[0].linear_attn.A_log.detach()
    assert after.dtype == torch.float32 and not torch.equal(after, before)
    # fp32 precision kept: the change is not a multiple of bf16's spacing.
    assert not torch.equal(after, after.to(torch.bfloat16).float())
    assert all(r.update_landed is not None and r.update_landed > 0.9 for r in rows)
