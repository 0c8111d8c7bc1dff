"""Does training fit beside the awake engine, or must the engine sleep? Bytes, not guesses.

The decision compares what training will add on the GPU with what is free while the engine is
awake and the trainer's weights are already resident (the state at decision time):

    need = grads + optimizer state + master weights + activations (+ weights if not resident)
    stay awake  if  need + margin <= free

Switching costs dominate small models (one colocated Qwen3-0.6B step: 15.0 s of 18.9 s in
sleep+wake, vllm-project/vime 442), so the engine stays awake whenever training fits. When it
does not, it sleeps at level 2: level 1 would copy the weights to pinned CPU RAM only to have
them overwritten by the push after training.

Estimates, per parameter of shape (m, n) with element size e (the parameter's dtype):
- grads: m*n*e (every parameter trains).
- APOLLO (apollo-torch 1.0.3, proj 'random'/'std'), with dreamd.train.optim's param groups:
  for a low-rank weight with rank r, two Adam moments of the projected gradient
  (r x max(m, n)) and the projection matrix (r x min(m, n)); every other parameter keeps full
  Adam moments (2*m*n*e).
  AdamW: 2*m*n*e for every parameter. Plus a transient of the largest parameter (the update
  projected back to full rank, one tensor at a time).
- fp32 work copies of 16-bit parameters (dreamd.train.bf16): in EVERY bf16_update mode the
  optimizer steps fp32 tensors: 'master' keeps them, 'stochastic'/'nearest' materialise them
  (weight + gradient, 8 bytes per parameter) during optimizer.step(), so the peak holds them
  either way; and the optimizer's moments are fp32 for those parameters.
- activations per layer (Korthikanti et al. 2022, "Reducing Activation Recomputation",
  16-bit activations): s*b*h*34 bytes, plus 5*a*s^2*b for the attention scores when attention
  is 'eager' (sdpa/flash do not keep them); scaled by e/2 for other dtypes. Plus the logits in
  fp32 and their gradient: 2 * b*s*V*4 bytes. Against the bytes autograd really saves
  (dreamd.train.activation_memory) on tiny Llama models: 1.0-1.65x; hybrid models get a
  factor (LINEAR_ATTENTION_FACTOR).
- margin: max(2 GiB, 8% of the device): allocator fragmentation and the CUDA context.
After a cycle has run, the trainer's measured peak (bytes above its resident weights) replaces
the estimate when it is larger.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from dreamd.config import OptimizerConfig
from dreamd.train.optim import param_groups

GiB = 1 << 30
MIN_MARGIN = 2 * GiB
MARGIN_FRACTION = 0.08
KORTHIKANTI_BYTES_PER_SBH = 34  # 16-bit activations, no recomputation, per layer
KORTHIKANTI_SCORES = 5          # 5*a*s^2*b bytes per layer for attention scores/softmax/dropout
# Hybrid (Gated-DeltaNet) models save more per layer than the formula: transformers' reference
# chunked delta rule kept 2.6-2.8x the estimate on tiny Qwen3.5 models (sdpa, CPU); the fused
# kernels keep less. Overestimating only costs a sleep; underestimating costs an OOM.
LINEAR_ATTENTION_FACTOR = 3.0


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes training needs on the device, by kind."""

    weights: int
    grads: int
    optimizer: int
    master_weights: int
    activations: int

    def added_by_training(self, weights_resident: bool = True) -> int:
        """Bytes training adds on top of what is resident when the decision is made."""
        extra = self.grads + self.optimizer + self.master_weights + self.activations
        return extra if weights_resident else extra + self.weights


def optimizer_state_bytes(model: nn.Module, cfg: OptimizerConfig, *, master_weights: bool = False) -> int:
    """Optimizer state bytes once every parameter has taken a step, for the param groups
    dreamd.train.optim builds (see module docstring). With fp32 master weights the optimizer
    steps fp32 copies, so its state is fp32 too."""
    total = largest = 0
    for group in param_groups(model, cfg):
        r = group.get("rank", 0)
        for p in group["params"]:
            e = 4 if master_weights else p.element_size()
            largest = max(largest, p.numel() * e)
            if r:
                m, n = p.shape
                total += (2 * r * max(m, n) + r * min(m, n)) * e
            else:
                total += 2 * p.numel() * e
    return total + (largest if cfg.name == "apollo" else 0)


def activation_bytes(*, layers: int, hidden: int, heads: int, vocab: int, batch_size: int,
                     seq_len: int, element_size: int, eager_attention: bool) -> int:
    """Activation bytes of one training step (Korthikanti et al. 2022, see module docstring)."""
    s, b, h = seq_len, batch_size, hidden
    per_layer = KORTHIKANTI_BYTES_PER_SBH * s * b * h
    if eager_attention:
        per_layer += KORTHIKANTI_SCORES * heads * s * s * b
    per_layer = per_layer * element_size // 2
    logits = 2 * b * s * vocab * 4
    return layers * per_layer + logits


def estimate_training_memory(model: nn.Module, optimizer: OptimizerConfig, *, batch_size: int, seq_len: int,
                             eager_attention: bool) -> TrainingMemory:
    """Byte estimates for training `model` (a transformers causal LM) one step at a time."""
    params = list(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    text = model.config.get_text_config()
    elem = max((p.element_size() for p in params), default=4)
    acts = activation_bytes(layers=int(text.num_hidden_layers), hidden=int(text.hidden_size),
                            heads=int(text.num_attention_heads), vocab=int(text.vocab_size),
                            batch_size=batch_size, seq_len=seq_len, element_size=elem,
                            eager_attention=eager_attention)
    if "linear_attention" in (getattr(text, "layer_types", None) or []):
        acts = int(acts * LINEAR_ATTENTION_FACTOR)
    low = sum(p.numel() for p in params if p.requires_grad and p.element_size() < 4)
    return TrainingMemory(
        weights=weights, grads=grads,
        optimizer=optimizer_state_bytes(model, optimizer, master_weights=low > 0),
        master_weights=8 * low,
        activations=acts)


def default_margin(total_bytes: int | None) -> int:
    return max(MIN_MARGIN, int(MARGIN_FRACTION * total_bytes)) if total_bytes else MIN_MARGIN


@dataclass(frozen=True)
class SleepDecision:
    sleep: bool
    level: int
    """vLLM sleep level when sleeping (always 2, see module docstring); 0 when awake."""
    need_bytes: int
    free_bytes: int | None
    margin_bytes: int
    reason: str


def decide_sleep(memory: TrainingMemory, free_bytes: int | None, *,
                 policy: Literal["auto", "always", "never"] = "auto", weights_resident: bool = True,
                 total_bytes: int | None = None, margin_bytes: int | None = None,
                 measured_peak_bytes: int | None = None, engine_can_sleep: bool = True) -> SleepDecision:
    """Whether the engine must sleep while training; a pure function of the numbers.

    free_bytes: device memory free now (engine awake), None without CUDA (never sleeps: there is
    no device memory to share). measured_peak_bytes: the trainer's measured peak above its
    resident weights in an earlier cycle; used when larger than the estimate.
    engine_can_sleep: False where the engine has no sleep mode (vLLM's CPU platform): awake.
    """
    need = memory.added_by_training(weights_resident)
    if measured_peak_bytes is not None:
        need = max(need, measured_peak_bytes)
    margin = default_margin(total_bytes) if margin_bytes is None else margin_bytes
    gib = f"need {need / GiB:.2f} GiB + margin {margin / GiB:.2f} GiB"
    if not engine_can_sleep:
        return SleepDecision(False, 0, need, free_bytes, margin,
                             "the engine has no sleep mode on this platform (vLLM's CPU build): it stays "
                             "awake while training")
    if free_bytes is None:
        return SleepDecision(False, 0, need, None, margin, "no CUDA device: nothing to share")
    have = f"free {free_bytes / GiB:.2f} GiB"
    if policy == "always":
        return SleepDecision(True, 2, need, free_bytes, margin, f"engine.sleep = 'always' ({gib}, {have})")
    if policy == "never":
        fits = need + margin <= free_bytes
        note = "fits" if fits else "does NOT fit; training may run out of memory"
        return SleepDecision(False, 0, need, free_bytes, margin, f"engine.sleep = 'never' ({gib}, {have}: {note})")
    if need + margin <= free_bytes:
        return SleepDecision(False, 0, need, free_bytes, margin, f"training fits beside the engine ({gib} <= {have})")
    return SleepDecision(True, 2, need, free_bytes, margin, f"training does not fit beside the engine ({gib} > {have})")
