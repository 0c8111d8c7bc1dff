"""The context-frozen gradient: same loss as the masked full forward, backward on the hybrid
model, which gradients match, batching, and memory that follows the reply."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from dreamd.train.activation_memory import SavedTensorMeter
from dreamd.train.context_frozen import ContextFrozenCache, align, per_example, reply_nll, wants_frozen
from tests.fixtures_models import random_example, tiny_model

ARCHS = ["llama", "qwen3.5"]


def _plain_full_loss(model, example) -> torch.Tensor:
    """The textbook masked full forward: no padding, no cache, labels shifted by one."""
    ids = torch.tensor([example.input_ids])
    logits = model(input_ids=ids).logits[0, :-1].float()
    return F.cross_entropy(logits, torch.tensor(example.labels[1:]), ignore_index=-100, reduction="sum")


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_frozen_loss_equals_masked_full_forward(arch: str) -> None:
    model = tiny_model(arch)
    rng = random.Random(0)
    for context, reply in [(40, 6), (150, 20), (3, 30), (70, 1)]:
        ex = random_example(rng, context, reply)
        reference = _plain_full_loss(model, ex).item() / reply
        full = reply_nll(model, align([ex], 0), frozen=False).item() / reply
        frozen_nll = reply_nll(model, align([ex], 0), frozen=True)
        frozen_nll.backward()  # a 1-token reply takes the models' single-token decode paths
        model.zero_grad(set_to_none=True)
        frozen = frozen_nll.item() / reply
        assert abs(full - reference) < 1e-5 and abs(frozen - reference) < 1e-5, (context, reply, reference, full, frozen)


def test_transformers_cache_breaks_backward_on_the_hybrid_model_and_ours_does_not() -> None:
    """Pins the root cause (context_frozen.py): transformers' cache copy_()s the new recurrent
    state into the tensor the reply's graph saved. If this starts passing with DynamicCache,
    transformers changed and ContextFrozenCache may be dropped."""
    model = tiny_model("qwen3.5")
    ids = torch.tensor([random_example(random.Random(1), 40, 8).input_ids])
    for cache_cls, breaks in ((DynamicCache, True), (ContextFrozenCache, False)):
        cache = cache_cls(config=model.config)
        with torch.no_grad():
            model(input_ids=ids[:, :39], past_key_values=cache, use_cache=True)
        loss = model(input_ids=ids[:, 39:], past_key_values=cache, use_cache=True).logits.float().logsumexp(-1).sum()
        if breaks:
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                loss.backward()
        else:
            loss.backward()
            assert all(p.grad is not None for p in model.parameters())
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_which_gradients_match_the_full_forward(arch: str) -> None:
    """Same loss as a function of the weights, but the path back through the context's
    activations is cut. So: every parameter still gets a gradient; the ones that only act on
    the reply's positions get exactly the full forward's gradient; the rest differ."""
    model = tiny_model(arch)
    rng = random.Random(2)
    ex = random_example(rng, 60, 10)
    reply_nll(model, align([ex], 0), frozen=False).backward()
    full = _grads(model)
    reply_nll(model, align([ex], 0), frozen=True).backward()
    frozen = _grads(model)

    nonzero = lambda g: {n for n, t in g.items() if t.abs().sum() > 0}  # noqa: E731
    assert nonzero(frozen) == nonzero(full) == {n for n, p in model.named_parameters()}

    last = f"model.layers.{model.config.num_hidden_layers - 1}."
    reply_only = ["lm_head.weight", "model.norm.weight", last + "self_attn.q_proj.weight",
                  last + "self_attn.o_proj.weight", last + "mlp.gate_proj.weight", last + "mlp.up_proj.weight",
                  last + "mlp.down_proj.weight", last + "post_attention_layernorm.weight"]
    for name in reply_only:
        torch.testing.assert_close(frozen[name], full[name], rtol=1e-4, atol=1e-6, msg=name)
    # Embedding rows of tokens fed only in the grad pass ([last context token] + reply[:-1]).
    grad_pass = set(ex.input_ids[ex.context_len - 1:-1])
    only_there = sorted(grad_pass - set(ex.input_ids[:ex.context_len - 1]))
    assert only_there
    emb = "model.embed_tokens.weight"
    torch.testing.assert_close(frozen[emb][only_there], full[emb][only_there], rtol=1e-4, atol=1e-6)
    # Context-path parameters: gradient present but different (the cut is real).
    first_kv = "model.layers.0.self_attn.k_proj.weight" if arch == "llama" else "model.layers.0.linear_attn.in_proj_qkv.weight"
    assert not torch.allclose(frozen[first_kv], full[first_kv], rtol=1e-3, atol=1e-7)
    assert not torch.allclose(frozen[last + "self_attn.k_proj.weight"], full[last + "self_attn.k_proj.weight"],
                              rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_batch_equals_single_examples(arch: str) -> None:
    """Several conversations of different context AND reply lengths in one forward: left-padded
    contexts, right-padded replies, positions from the mask. Loss and grads equal the sum of
    one-example forwards."""
    model = tiny_model(arch)
    rng = random.Random(3)
    examples = [random_example(rng, c, r) for c, r in [(30, 5), (90, 12), (7, 20), (130, 3)]]
    for frozen in (True, False):
        singles = 0.0
        for ex in examples:
            nll = reply_nll(model, align([ex], 0), frozen)
            nll.backward()
            singles += nll.item()
        g_single = _grads(model)
        batch = align(examples, 0)
        assert batch.input_ids.shape == (4, 130 + 20)
        nll = reply_nll(model, batch, frozen)
        nll.backward()
        g_batch = _grads(model)
        assert abs(nll.item() - singles) < 1e-5 * singles
        for name in g_single:
            torch.testing.assert_close(g_batch[name], g_single[name], rtol=2e-3, atol=2e-6, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_activation_memory_follows_the_reply(arch: str) -> None:
    model = tiny_model(arch)
    meter = SavedTensorMeter(model)
    saved = {}
    for context in (256, 1024):
        ex = random_example(random.Random(4), context, 16)
        for frozen in (False, True):
            with meter:
                reply_nll(model, align([ex], 0), frozen).backward()
            model.zero_grad(set_to_none=True)
            saved[context, frozen] = meter.bytes
    # Full: grows with the context (x4 context -> more than x3 memory). Frozen: far below
    # full at 1k; what remains of the context is the attention layers' K/V cache.
    assert saved[1024, False] > 3 * saved[256, False]
    assert saved[1024, True] < 0.35 * saved[1024, False], saved


def test_auto_freezes_a_long_enough_context_longer_than_the_reply() -> None:
    rng = random.Random(5)
    long_ctx, long_reply = random_example(rng, 50, 10), random_example(rng, 10, 50)
    assert wants_frozen(long_ctx, "auto", 50) and not wants_frozen(long_reply, "auto", 1)
    assert not wants_frozen(long_ctx, "auto", 51)  # below train.frozen_min_context: full forward
    assert wants_frozen(long_reply, "on", 1000) and not wants_frozen(long_ctx, "off", 1)


def test_auto_pads_a_batch_while_its_longest_example_is_short() -> None:
    rng = random.Random(6)
    batch = [random_example(rng, 50, 10), random_example(rng, 100, 28)]
    assert not per_example(batch, "auto", 128) and per_example(batch, "auto", 127)
    assert per_example(batch, "per_example", 10**6) and not per_example(batch, "padded", 1)
