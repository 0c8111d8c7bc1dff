"""One training pass over a cycle's batches, one optimizer step at a time.

The caller (the cycle) iterates `Trainer.train_pass(batches)`: every optimizer step yields a
StepResult at once, so the row reaches the store before the next step starts and a pause or
stop lands on a step boundary. Per step:

  lr      base lr times linear warmup over the first train.warmup_steps steps of the RUN
  loss    summed NLL of the reply tokens / number of reply tokens in the batch; the batch is
          split into micro-forwards (context-frozen ones, full ones) that each run backward at
          once, so only one micro-forward's activations are alive at a time
  clip    global grad norm to train.grad_clip (norm before clipping is reported)
  step    APOLLO or AdamW; bf16 weights take the update through LowPrecisionWeights
  guard   non-finite loss or grad norm: no update, StepResult.skipped; after
          train.max_nonfinite_steps in a row the pass raises CycleFailed (after yielding the row)

Reproducible: same model, config, seed and batches give bit-identical losses and weights on
CPU, and `state_dict()` -> torch.save -> torch.load(weights_only=True) -> `load_state_dict()`
continues exactly (APOLLO's projector state included).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from dreamd.config import OptimizerConfig, TrainConfig
from dreamd.errors import CycleFailed
from dreamd.train.activation_memory import SavedTensorMeter
from dreamd.train.mix import batch_counts
from dreamd.train.bf16 import LowPrecisionWeights
from dreamd.train.context_frozen import AlignedBatch, align, per_example, reply_nll, wants_frozen
from dreamd.train.examples import Encoded
from dreamd.train.optim import build_optimizer, load_optimizer_state_dict, optimizer_state_dict


@dataclass
class StepResult:
    """What one optimizer step did; `metrics()` is a train_steps row."""

    step: int
    """Index of this step in the run (0-based; skipped steps count, they are rows too)."""
    loss: float
    """Mean NLL per reply token of the batch (nan/inf when skipped)."""
    grad_norm: float
    """Global gradient norm before clipping."""
    lr: float
    """Learning rate used (after warmup)."""
    tokens: int
    """Real (non-pad) tokens processed, context and reply."""
    n_behavioral: int
    n_general: int
    wall_ms: float
    """Forward + backward + optimizer step, wall clock."""
    tokens_per_s: float
    pad_fraction: float
    """Share of padded slots among all slots the forwards processed."""
    peak_mem_bytes: int | None
    """CUDA: torch.cuda.max_memory_allocated during the step. CPU: activation bytes saved for
    backward by the largest micro-forward (activation_memory.SavedTensorMeter)."""
    update_landed: float | None
    """bf16 weights: fraction of the intended update that landed (see bf16.py). None for fp32
    weights (the optimizer writes them directly) and for skipped steps."""
    skipped: bool
    scenario_ids: list[int] = field(default_factory=list)

    def metrics(self) -> dict[str, Any]:
        """The columns of a train_steps row."""
        return asdict(self)


class Trainer:
    """Owns the optimizer (and bf16 work weights) of one model for a whole run."""

    def __init__(self, model: PreTrainedModel, train_cfg: TrainConfig, opt_cfg: OptimizerConfig, *,
                 seed: int = 0) -> None:
        self.model = model
        self.cfg = train_cfg
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError("the model has no trainable parameters (requires_grad is False everywhere)")
        self.device = next(iter(self.params.values())).device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        # bf16/fp16 weights are stepped through fp32 work copies; fp32 ones (a model may keep a
        # few, e.g. via _keep_in_fp32_modules) are stepped directly.
        low = {n: p for n, p in self.params.items() if p.dtype in (torch.bfloat16, torch.float16)}
        self.low_precision = LowPrecisionWeights(low, train_cfg.bf16_update, self.generator) if low else None
        self.opt_params = {n: self.low_precision.work[n] if n in low else p for n, p in self.params.items()}
        self.optimizer = build_optimizer(model, opt_cfg, train_cfg.lr, self.opt_params)
        self.pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        self.meter = SavedTensorMeter(model)
        self.step = 0
        self.base_lr = train_cfg.lr
        self.nonfinite_in_a_row = 0

    @property
    def last_step(self) -> int | None:
        """The number of the last optimizer step trained (train_steps.step, 0-based), None before
        the first: the one step number dreamd shows everywhere (log, status, events; docs/sql.md).
        `step` is the count of steps trained, i.e. the next step's number."""
        return self.step - 1 if self.step > 0 else None

    # ---- learning rate ------------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        """The controller sets the base lr between cycles; warmup still scales it."""
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.base_lr = lr

    def current_lr(self) -> float:
        warm = self.cfg.warmup_steps
        return self.base_lr * (min(1.0, (self.step + 1) / warm) if warm > 0 else 1.0)

    # ---- the pass -----------------------------------------------------------------------
    def train_pass(self, batches: Iterable[list[Encoded]]) -> Iterator[StepResult]:
        """One optimizer step per batch, yielding each StepResult as soon as the step is done."""
        self.model.train()
        for batch in batches:
            yield self.train_step(batch)
            if self.nonfinite_in_a_row >= self.cfg.max_nonfinite_steps:
                raise CycleFailed(f"{self.nonfinite_in_a_row} steps in a row had a non-finite loss or "
                                  f"gradient (last at step {self.step - 1}, lr {self.current_lr():.3g}); "
                                  "rolling back")

    def micro_batches(self, batch: list[Encoded]) -> list[tuple[AlignedBatch, bool]]:
        """The forwards of one step, chosen by length (context_frozen.per_example and
        wants_frozen): one per example, or the context-frozen examples padded together and the
        rest padded together."""
        cfg = self.cfg
        frozen = {id(e): wants_frozen(e, cfg.context_frozen, cfg.frozen_min_context) for e in batch}
        if per_example(batch, cfg.forward_layout, cfg.padded_max_tokens):
            return [(align([e], self.pad_id, self.device), frozen[id(e)]) for e in batch]
        groups = ([e for e in batch if frozen[id(e)]], True), ([e for e in batch if not frozen[id(e)]], False)
        return [(align(group, self.pad_id, self.device), is_frozen) for group, is_frozen in groups if group]

    def train_step(self, batch: list[Encoded]) -> StepResult:
        assert batch, "an empty batch"
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        lr = self.current_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        n_labels = sum(e.reply_len for e in batch)
        nll_total, peak_saved, real, slots = self.forward_backward(batch, n_labels)
        loss = nll_total / n_labels

        if self.low_precision:
            self.low_precision.prepare()
        grad_norm = self.clip_grads()
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        landed = None
        if skipped:
            self.nonfinite_in_a_row += 1
            if self.low_precision:
                self.low_precision.discard_grads()
        else:
            self.nonfinite_in_a_row = 0
            self.optimizer_step()
            if self.low_precision:
                landed = self.low_precision.write_back()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)

        if cuda:
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - start
        n_beh, n_gen = batch_counts(batch)
        result = StepResult(
            step=self.step, loss=loss, grad_norm=grad_norm, lr=lr, tokens=real, n_behavioral=n_beh,
            n_general=n_gen, wall_ms=wall * 1000, tokens_per_s=real / wall, pad_fraction=1 - real / slots,
            peak_mem_bytes=torch.cuda.max_memory_allocated(self.device) if cuda else peak_saved,
            update_landed=landed, skipped=skipped,
            scenario_ids=[e.scenario_id for e in batch if e.scenario_id is not None],
        )
        self.step += 1
        return result

    # ---- the parts of a step that a sharded trainer (train/distributed.py) replaces -----------
    def forward_backward(self, batch: list[Encoded], n_labels: int) -> tuple[float, int, int, int]:
        """Every micro-forward of `batch` and its backward (loss scaled by 1 / n_labels):
        (summed reply NLL, peak saved-activation bytes, real tokens, slots)."""
        nll_total, peak_saved, real, slots = 0.0, 0, 0, 0
        for aligned, frozen in self.micro_batches(batch):
            nll_total += self.micro_step(aligned, frozen, n_labels)
            peak_saved = max(peak_saved, self.meter.bytes)
            real, slots = real + aligned.n_real_tokens, slots + aligned.n_slots
        return nll_total, peak_saved, real, slots

    def micro_step(self, aligned: AlignedBatch, frozen: bool, n_labels: int) -> float:
        """One micro-forward (activations metered) and its backward; its summed reply NLL."""
        with self.meter:
            nll = reply_nll(self.model, aligned, frozen)
        (nll / n_labels).backward()
        return nll.item()

    def clip_grads(self) -> float:
        """Clip the global gradient norm to train.grad_clip; the norm before clipping."""
        grads = [p for p in self.opt_params.values() if p.grad is not None]
        return float(torch.nn.utils.clip_grad_norm_(grads, self.cfg.grad_clip))

    def optimizer_step(self) -> None:
        self.optimizer.step()

    # ---- exact resume -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly, readable by torch.load(weights_only=True)."""
        return {
            "step": self.step,
            "base_lr": self.base_lr,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "optimizer": optimizer_state_dict(self.optimizer),
            "low_precision": self.low_precision.state_dict() if self.low_precision else None,
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if (sd["low_precision"] is None) != (self.low_precision is None):
            raise ValueError("checkpoint and model disagree on weight precision (bf16 work weights "
                             "present in one, absent in the other); load the model in the dtype it was trained in")
        self.step = sd["step"]
        self.base_lr = sd["base_lr"]
        self.nonfinite_in_a_row = sd["nonfinite_in_a_row"]
        if self.low_precision:
            self.low_precision.load_state_dict(sd["low_precision"])
        if sd["optimizer"] is not None:    # None: a sharded run's checkpoint (its optimizer is
            load_optimizer_state_dict(self.optimizer, sd["optimizer"])   # in the DCP shards)
        self.generator.set_state(sd["generator"])
        torch.set_rng_state(sd["torch_rng"])
        if sd["cuda_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(sd["cuda_rng"], self.device)
