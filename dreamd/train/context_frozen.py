"""The context-frozen gradient: context under no_grad into the cache, the reply with grad on top.

Conversations carry a long context and a short decision (the reply). The masked full forward
keeps every context activation alive for the backward; here the context runs under no_grad
with the model's cache (attention K/V and, for Gated DeltaNet layers, the conv + recurrent
state), and only the reply runs with gradient. The loss is the masked full-forward loss to
float rounding; activation memory grows with the reply, not with the context.

Exactness needs one detail: the logits that predict reply token 0 are those of the LAST
context token. So the frozen part is context[:-1], and the grad pass is [last context token] +
reply[:-1] (the last reply token is only predicted, never fed). Both modes compute logits only
for those R positions (`logits_to_keep`), so the vocabulary projection never costs
context-length memory in either.

What the gradient is: the same weights serve every position (this freezes activations, not
parameters). Gradient flows through everything the reply's own positions compute; what is cut
is the path from the loss back through the context's activations (its K/V, its recurrent
state). So grads are bit-for-bit the full forward's (to rounding) for lm_head, the final norm,
the embedding rows of tokens that occur only in the grad pass, and, in the last layer, the
parameters that act on the reply positions only (q/o projections, MLP, post-attention norm);
every other parameter still gets a nonzero gradient, from the reply positions alone.

Batching: one padded layout for both modes. Row i is [left pad][context_i][reply_i][right pad],
so every context ends at column C-1 and every reply starts at column C: one cache holds the
whole batch. position_ids come from the mask, so padding does not shift positions; the Gated
DeltaNet zeroes padded inputs, so its state stays exactly zero through the left padding. A
batch of one has no padding. Which the trainer runs is chosen per batch by length
(`per_example`, `wants_frozen`; thresholds measured in docs/benchmarks.md): short contexts run
the full forward and short batches one padded forward, where the second forward and the
per-call overhead would cost more than they save.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import LinearAttentionLayer

from dreamd.train.examples import IGNORE_INDEX, Encoded

FrozenMode = Literal["auto", "on", "off"]
Layout = Literal["auto", "per_example", "padded"]


# ---------------------------------------------------------------------------------------------
# The cache
#
# ROOT CAUSE of "one of the variables needed for gradient computation has been modified by an
# inplace operation" on Qwen3.5 (transformers 5.23, cache_utils.py + models/qwen3_5):
# `LinearAttentionLayer.update_recurrent_state` writes the new recurrent state INTO the cached
# tensor with `self.recurrent_states[i].copy_(new)`, to keep a static address for CUDA graphs.
# In the reply pass, `Qwen3_5GatedDeltaNet.forward` reads that cached tensor as `initial_state`;
# `torch_chunk_gated_delta_rule` does `last_recurrent_state = initial_state.to(new_values)`, a
# no-op `.to` that returns the SAME tensor, and autograd saves it for the backward of
# `k_cumdecay @ last_recurrent_state` and `query @ last_recurrent_state`. At the end of the same
# layer call the cache copy_()s the new state into it, bumping its version counter (1 -> 2), so
# backward refuses the saved tensor. (The conv state is also updated with copy_, but its old
# value is consumed by torch.cat, whose backward saves no inputs, so that one is harmless.)
# Fix, in dreamd: the cache we hand to the model OWNS its state by rebinding. Its linear-attention
# layers store the new state as a new tensor instead of writing into the old one, so the tensor
# the reply's graph saved is never modified. Nothing in transformers is patched; this cache is
# used only for training forwards (no CUDA graphs there, so the static address is not needed).


def _update_recurrent_state_by_rebinding(self, recurrent_states: torch.Tensor, state_idx: int = 0,
                                         **kwargs) -> torch.Tensor:
    """LinearAttentionLayer.update_recurrent_state, storing the new state as a new tensor."""
    if not self.is_recurrent_states_initialized[state_idx]:
        self.lazy_initialization(recurrent_states=recurrent_states, state_idx=state_idx)
    self.recurrent_states[state_idx] = recurrent_states
    return recurrent_states


_REBINDING_CLASSES: dict[type, type] = {}


def _rebinding_class(cls: type) -> type:
    """A direct subclass of a linear-attention layer class that overrides only
    update_recurrent_state (a direct subclass keeps the instance layout, so a fresh layer can
    switch class)."""
    if cls not in _REBINDING_CLASSES:
        _REBINDING_CLASSES[cls] = type(f"Rebinding{cls.__name__}", (cls,),
                                       {"update_recurrent_state": _update_recurrent_state_by_rebinding})
    return _REBINDING_CLASSES[cls]


class ContextFrozenCache(DynamicCache):
    """DynamicCache whose linear-attention layers rebind their recurrent state (see ROOT CAUSE
    above), so a grad pass may run on top of a cache filled under no_grad."""

    def __init__(self, config) -> None:
        super().__init__(config=config)
        for layer in self.layers:
            if isinstance(layer, LinearAttentionLayer):
                # The layers are fresh and empty; the subclass only overrides one method.
                layer.__class__ = _rebinding_class(type(layer))


# ---------------------------------------------------------------------------------------------
# The padded layout


@dataclass
class AlignedBatch:
    """Examples padded so that every context ends at column `context_width - 1`."""

    input_ids: torch.Tensor       # [B, C + R] long
    attention_mask: torch.Tensor  # [B, C + R] long, 1 on real tokens
    position_ids: torch.Tensor    # [B, C + R] long, position within the unpadded example
    labels: torch.Tensor          # [B, C + R] long, IGNORE_INDEX except on reply tokens
    context_width: int            # C
    reply_width: int              # R

    @property
    def n_label_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def n_real_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def n_slots(self) -> int:
        return self.input_ids.numel()


def align(examples: list[Encoded], pad_id: int, device: torch.device | str = "cpu") -> AlignedBatch:
    """Left-pad contexts to the longest context, right-pad replies to the longest reply."""
    assert examples, "an empty batch has no layout"
    C = max(e.context_len for e in examples)
    R = max(e.reply_len for e in examples)
    ids, mask, labels = [], [], []
    for e in examples:
        left, right = C - e.context_len, R - e.reply_len
        ids.append([pad_id] * left + e.input_ids + [pad_id] * right)
        mask.append([0] * left + [1] * e.n_tokens + [0] * right)
        labels.append([IGNORE_INDEX] * left + e.labels + [IGNORE_INDEX] * right)
    mask_t = torch.tensor(mask, dtype=torch.long, device=device)
    return AlignedBatch(
        input_ids=torch.tensor(ids, dtype=torch.long, device=device),
        attention_mask=mask_t,
        position_ids=(mask_t.cumsum(dim=1) - 1).clamp(min=0),
        labels=torch.tensor(labels, dtype=torch.long, device=device),
        context_width=C,
        reply_width=R,
    )


def wants_frozen(example: Encoded, mode: FrozenMode, min_context: int) -> bool:
    """'auto': frozen when the context has at least `min_context` tokens (train.frozen_min_context:
    below it the second forward costs more than the skipped backward saves) and is longer than
    the reply (then it saves memory)."""
    if mode == "auto":
        return example.context_len >= min_context and example.context_len > example.reply_len
    return mode == "on"


def per_example(batch: list[Encoded], layout: Layout, padded_max_tokens: int) -> bool:
    """One forward per example, or the batch padded together? 'auto': padded while the batch's
    longest example has at most `padded_max_tokens` tokens (train.padded_max_tokens: short
    forwards are dominated by per-call overhead, long padded ones by the padding and the explicit
    mask), per example above. The gradient is the same either way."""
    if layout == "auto":
        return max(e.n_tokens for e in batch) > padded_max_tokens
    return layout == "per_example"


# ---------------------------------------------------------------------------------------------
# The loss


def reply_nll(model: PreTrainedModel, batch: AlignedBatch, frozen: bool) -> torch.Tensor:
    """Summed negative log-likelihood of the batch's reply tokens (a scalar with grad).

    frozen=False is the masked full forward; frozen=True runs context[:-1] under no_grad into a
    ContextFrozenCache and [last context token] + reply[:-1] with grad. Same value either way.
    """
    C, R = batch.context_width, batch.reply_width
    end = C + R - 1  # the last column is only a target, never an input
    targets = batch.labels[:, C:]  # [B, R]: what logits at columns C-1 .. C+R-2 predict
    if frozen and C > 1:
        cache = ContextFrozenCache(model.config)
        with torch.no_grad():
            model(input_ids=batch.input_ids[:, : C - 1], attention_mask=batch.attention_mask[:, : C - 1],
                  position_ids=batch.position_ids[:, : C - 1], past_key_values=cache, use_cache=True,
                  logits_to_keep=1)
        out = model(input_ids=batch.input_ids[:, C - 1:end], attention_mask=batch.attention_mask[:, :end],
                    position_ids=batch.position_ids[:, C - 1:end], past_key_values=cache, use_cache=True,
                    logits_to_keep=R)
    else:
        out = model(input_ids=batch.input_ids[:, :end], attention_mask=batch.attention_mask[:, :end],
                    position_ids=batch.position_ids[:, :end], use_cache=False, logits_to_keep=R)
    logits = out.logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
