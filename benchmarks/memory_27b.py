"""Memory arithmetic for a 27B model on 8 H200s (docs/operations.md, "More than one GPU").

    PYTHONPATH=$PWD .venv/bin/python benchmarks/memory_27b.py            # the table
    PYTHONPATH=$PWD .venv/bin/python benchmarks/memory_27b.py --measure  # + per-layer activations

The model is Gemma-2-27B's published shape (transformers Gemma2Config: 46 layers, hidden 4608,
32 query heads, 16 KV heads, head_dim 128, MLP 36864, vocab 256000, tied embeddings). Its
parameters are counted exactly on the meta device; the APOLLO state uses dreamd's own rules
(dreamd/train/optim.py: which weights are low-rank, r = min(rank, min(m, n) // 2)) and
apollo-torch's projector (moments of r x max(m, n), a projection of r x min(m, n), fp32).
--measure builds one and two full-width decoder layers (small vocab, bf16, 4.0 GB peak RSS, one
torch thread) and counts the bytes autograd saves per token with dreamd's SavedTensorMeter: the
difference is one layer's activations per token with gradient.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, Gemma2Config

from dreamd.train.optim import linear_weight_names, low_rank_rank

GIB = 2**30
H200_USABLE_GIB = 139
GPUS = 8
SHAPE = dict(num_hidden_layers=46, hidden_size=4608, intermediate_size=36864, num_attention_heads=32,
             num_key_value_heads=16, head_dim=128, vocab_size=256000, sliding_window=4096,
             query_pre_attn_scalar=144, tie_word_embeddings=True)


def model_on_meta(**overrides: int) -> torch.nn.Module:
    cfg = Gemma2Config(**{**SHAPE, **overrides})
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)


def optimizer_bytes(model: torch.nn.Module, rank: int) -> tuple[int, int]:
    """(APOLLO state bytes at `rank`, AdamW state bytes): fp32 moments (and projections)."""
    low_rank = linear_weight_names(model)
    apollo = adamw = 0
    for name, p in model.named_parameters():
        adamw += 2 * 4 * p.numel()
        r = low_rank_rank(p.shape, rank) if name in low_rank else 0
        if r == 0:
            apollo += 2 * 4 * p.numel()
        else:
            m, n = p.shape
            apollo += 4 * (2 * r * max(m, n) + r * min(m, n))
    return apollo, adamw


def measured_layer_bytes_per_token(tokens: int = 64) -> float:
    """Bytes autograd saves per token for ONE full-width Gemma-2-27B decoder layer (bf16, sdpa)."""
    from dreamd.train.activation_memory import SavedTensorMeter

    torch.set_num_threads(1)
    saved = []
    for layers in (1, 2):
        cfg = Gemma2Config(**{**SHAPE, "num_hidden_layers": layers, "vocab_size": 256},
                           attn_implementation="sdpa")
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        ids = torch.randint(0, 256, (1, tokens))
        with SavedTensorMeter(model) as meter:
            model(input_ids=ids, use_cache=False).logits.float().sum()
        saved.append(meter.bytes)
        del model
    return (saved[1] - saved[0]) / tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--measure", action="store_true")
    parser.add_argument("--context", type=int, default=4096, help="context tokens per example")
    parser.add_argument("--reply", type=int, default=512, help="reply tokens per example")
    parser.add_argument("--batch", type=int, default=4, help="examples per rank per micro-batch")
    parser.add_argument("--kv-tokens", type=int, default=64 * 4096, help="vLLM KV cache, tokens in all")
    args = parser.parse_args()

    model = model_on_meta()
    params = sum(p.numel() for p in model.parameters())
    c = model.config
    kv_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 2
    rows: list[tuple[str, str, float]] = []

    def row(what: str, how: str, nbytes: float) -> None:
        rows.append((what, how, nbytes))

    print(f"Gemma-2-27B shape: {params / 1e9:.2f} B parameters; KV bytes per token = "
          f"2 * {c.num_hidden_layers} layers * {c.num_key_value_heads} kv heads * {c.head_dim} * 2 B "
          f"= {kv_per_token} B ({kv_per_token / 2**10:.0f} KiB)")
    row("weights bf16", "2 B x P", 2 * params)
    row("gradients bf16 (after backward)", "2 B x P", 2 * params)
    row("step: fp32 work weights + fp32 grads", "8 B x P, only during optimizer.step (bf16.py)", 8 * params)
    row("AdamW state (m, v fp32)", "8 B x P", optimizer_bytes(model, 1)[1])
    for rank in (256, 128, 1):
        row(f"APOLLO state, rank {rank}", "fp32: 2 r max(m,n) + r min(m,n) per decoder linear; "
            "full Adam for embeddings and norms", optimizer_bytes(model, rank)[0])
    row("vLLM weights bf16", "2 B x P", 2 * params)
    row(f"vLLM KV cache, {args.kv_tokens} tokens", f"{kv_per_token} B x tokens", kv_per_token * args.kv_tokens)
    width = max(len(r[0]) for r in rows)
    print(f"\nstate, sharded over {GPUS} GPUs (FSDP2 for the trainer, tensor parallel {GPUS} for vLLM)")
    print(f"{'what':<{width}}  {'total GiB':>10}  {'per GPU':>10}  how")
    for what, how, nbytes in rows:
        print(f"{what:<{width}}  {nbytes / GIB:>10.2f}  {nbytes / GIB / GPUS:>10.2f}  {how}")
    print(f"H200 usable: {H200_USABLE_GIB} GiB each, {H200_USABLE_GIB * GPUS} GiB on {GPUS}.")
    if not args.measure:
        return
    layer = measured_layer_bytes_per_token()
    logits = 6 * c.vocab_size  # bf16 logits + the fp32 copy the loss reads, per predicted token
    per_reply = layer * c.num_hidden_layers + logits
    b, ctx, rep = args.batch, args.context, args.reply
    print(f"\nactivations per rank (not sharded: each rank trains its own micro-batch of {b} examples)")
    print(f"one decoder layer, one token with gradient (measured, bf16, sdpa): {layer / 2**10:.0f} KiB")
    print(f"one reply token: {c.num_hidden_layers} layers + logits 6 B x {c.vocab_size} = {per_reply / 2**20:.1f} MiB")
    print(f"one context token, context frozen (its K/V under no_grad): {kv_per_token / 2**10:.0f} KiB")
    frozen = b * (rep * per_reply + ctx * kv_per_token)
    full = b * ((ctx + rep) * layer * c.num_hidden_layers + rep * logits)
    print(f"{b} x ({ctx} context + {rep} reply), context frozen: {frozen / GIB:.1f} GiB "
          f"(reply {b * rep * per_reply / GIB:.1f} + context K/V {b * ctx * kv_per_token / GIB:.1f})")
    print(f"{b} x ({ctx} context + {rep} reply), full forward:   {full / GIB:.1f} GiB")
    print(f"1 x ({ctx} context + {rep} reply), context frozen: {frozen / b / GIB:.1f} GiB")

if __name__ == "__main__":
    main()
