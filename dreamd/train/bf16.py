"""Updates that land in bf16 weights, without touching apollo-torch's algorithm.

bf16 keeps 8 mantissa bits: the spacing of representable values is 2^-7 relative (0.78%), so
an update smaller than half of that rounds away. A 0.02-sized weight has a spacing of 1.2e-4;
Adam-type steps at lr 1e-5 move it by ~1e-5, and round-to-nearest drops the step entirely.
Measured on the tiny llama in tests: ~0.1% of the intended update lands.

How dreamd steps a bf16 model: the optimizer never sees the bf16 tensors. It steps fp32 WORK
parameters (one persistent nn.Parameter per model parameter, so optimizer state keys are stable
across steps and resumes). Around each step:
  prepare():    work.grad = model.grad in fp32; for 'stochastic'/'nearest' the work tensor is
                materialised from the bf16 weight just now (4 B/param exist only during the step)
  (clip, optimizer.step() on the work params: apollo-torch or AdamW unchanged)
  write_back(): bf16 weight = round(work); 'stochastic' adds uniform random bits below the bf16
                mantissa, then truncates (E[rounded] = work, so updates land in expectation);
                'nearest' rounds to nearest; the work tensor is released again.
'master' keeps the work tensors as persistent fp32 master weights (4 B/param always; the bf16
weight is round-to-nearest of the master, which accumulates the small steps exactly).

Only the low-precision parameters go through here; fp32 parameters of the same model are
stepped directly (their updates land exactly and are left out of update_landed).

Measured per step: update_landed = <dW_actual, dW_intended> / ||dW_intended||^2 summed over all
parameters, dW_intended = work after step - work before, dW_actual = bf16 after - bf16 before.
1.0 means the whole intended update reached the model's weights.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

Bf16Update = Literal["stochastic", "master", "nearest"]

_LOW_MANTISSA = (1 << 16) - 1  # the 16 fp32 mantissa bits below bf16's 7 stored ones
_KEEP_HIGH = -(1 << 16)        # int32 mask 0xFFFF0000


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """fp32 -> bf16, rounding up with probability equal to the dropped fraction.

    Adding uniform random bits to the 16 low bits of the fp32 pattern and truncating them rounds
    the magnitude up exactly when the random number exceeds (spacing - remainder): unbiased for
    both signs, because IEEE floats store sign and magnitude separately. Truncation is exact, so
    the final .to(bfloat16) does no rounding of its own.
    """
    assert x.dtype == torch.float32
    noise = torch.randint(0, _LOW_MANTISSA + 1, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    bits = (x.view(torch.int32) + noise) & _KEEP_HIGH
    return bits.view(torch.float32).to(torch.bfloat16)


class LowPrecisionWeights:
    """fp32 work parameters for a bf16 (or fp16) model's trainable parameters; see module doc."""

    def __init__(self, params: dict[str, nn.Parameter], mode: Bf16Update, generator: torch.Generator) -> None:
        dtypes = {p.dtype for p in params.values()}
        if mode == "stochastic" and dtypes != {torch.bfloat16}:
            raise ValueError(f"train.bf16_update = 'stochastic' rounds to bfloat16, but the weights are "
                             f"{sorted(map(str, dtypes))}; use 'master' for float16 weights")
        self.model_params = params
        self.mode = mode
        self.generator = generator
        self.work: dict[str, nn.Parameter] = {}
        for name, p in params.items():
            data = p.detach().float().clone() if mode == "master" else torch.empty(0, device=p.device)
            self.work[name] = nn.Parameter(data)
        self._before: dict[str, torch.Tensor] = {}

    def prepare(self) -> None:
        """Move the model's grads onto the work params in fp32 (freeing the low-precision grads)
        and, unless 'master', materialise the work tensors from the current weights."""
        for name, p in self.model_params.items():
            w = self.work[name]
            if self.mode == "master":
                self._before[name] = w.detach().clone()
            else:
                w.data = p.detach().float()
            w.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def write_back(self) -> float | None:
        """Round the stepped work tensors into the model's weights; return update_landed."""
        device = next(iter(self.model_params.values())).device
        dot = torch.zeros((), dtype=torch.float64, device=device)  # summed on device: one sync
        norm2 = torch.zeros((), dtype=torch.float64, device=device)
        for name, p in self.model_params.items():
            w = self.work[name]
            old = p.detach().float()
            before = self._before.pop(name) if self.mode == "master" else old
            new = stochastic_round_to_bf16(w.detach(), self.generator) if self.mode == "stochastic" else w.detach().to(p.dtype)
            intended = w.detach() - before
            actual = new.float() - old
            dot += (actual.double() * intended.double()).sum()
            norm2 += intended.double().pow(2).sum()
            p.copy_(new)
            w.grad = None
            if self.mode != "master":
                w.data = torch.empty(0, device=p.device)  # release the 4 B/param until next step
        dot, norm2 = float(dot), float(norm2)
        return dot / norm2 if norm2 > 0 else None

    def discard_grads(self) -> None:
        """A skipped step: drop grads and the work tensors without touching the weights."""
        for name, p in self.model_params.items():
            p.grad = None
            w = self.work[name]
            w.grad = None
            if self.mode != "master":
                w.data = torch.empty(0, device=p.device)
        self._before.clear()

    def state_dict(self) -> dict[str, Any]:
        """The fp32 masters in 'master' mode (otherwise the work tensors are empty between
        steps). The rounding generator is the trainer's and saved with it."""
        masters = {n: w.detach().clone() for n, w in self.work.items()} if self.mode == "master" else {}
        return {"mode": self.mode, "masters": masters}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd["mode"] != self.mode:
            raise ValueError(f"checkpoint was trained with bf16_update={sd['mode']!r}, config says {self.mode!r}")
        for name, t in sd["masters"].items():
            self.work[name].data = t.to(device=self.model_params[name].device, dtype=torch.float32)
