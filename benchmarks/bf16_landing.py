"""How much of each update reaches bf16 weights: nearest vs stochastic rounding vs fp32 masters.

    .venv/bin/python benchmarks/bf16_landing.py

The tiny llama (hidden 64, 4 layers) starts from the same weights in fp32 and in bf16 and
trains --steps APOLLO steps on the same random batches. Columns:
  landed      mean per-step update_landed = <dW_actual, dW_intended> / ||dW_intended||^2
  cumulative  <W_bf16 - W_0, W_fp32 - W_0> / ||W_fp32 - W_0||^2 after all steps: how much of
              the fp32 run's total displacement the bf16 run achieved (the fp32 reference starts
              from the same bf16-representable weights, so W_0 is shared)
  noise       ||(W_bf16 - W_0) - cumulative * (W_fp32 - W_0)|| / ||W_fp32 - W_0||: the part of
              the bf16 displacement that is not along the fp32 one (rounding noise + drift)
  moved       share of bf16 weight elements that changed at all
"""

from __future__ import annotations

import argparse
import random
import statistics

import torch

from dreamd.config import OptimizerConfig, TrainConfig
from dreamd.dream.scenario import ScenarioKind
from dreamd.tiny import build_tiny_model, tiny_config
from dreamd.train.examples import IGNORE_INDEX, Encoded
from dreamd.train.trainer import Trainer

VOCAB = 1024


def _batches(n: int, seed: int = 0) -> list[list[Encoded]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        batch = []
        for _ in range(4):
            c, r = rng.randrange(20, 80), rng.randrange(5, 20)
            ids = [rng.randrange(3, VOCAB) for _ in range(c + r)]
            batch.append(Encoded(ids, [IGNORE_INDEX] * c + ids[c:], c, ScenarioKind.ACCEPT))
        out.append(batch)
    return out


def _start_model() -> torch.nn.Module:
    """The shared start: the tiny llama's init rounded to bf16, so both runs start equal."""
    cfg = tiny_config("llama", VOCAB)
    cfg.pad_token_id = 0
    return build_tiny_model(cfg, seed=0).to(torch.bfloat16)


def _train(dtype: torch.dtype, mode: str, lr: float, batches: list) -> tuple[dict, list[float]]:
    model = _start_model().to(dtype)
    trainer = Trainer(model, TrainConfig(lr=lr, warmup_steps=0, bf16_update=mode), OptimizerConfig(rank=8), seed=0)
    landed = [r.update_landed for r in trainer.train_pass(batches)]
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}, landed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-5, 1e-4])
    args = parser.parse_args()
    torch.set_num_threads(1)
    batches = _batches(args.steps)
    start = {n: p.detach().float() for n, p in _start_model().named_parameters()}
    print(f"tiny llama, APOLLO rank 8, {args.steps} steps of 4 examples, CPU\n")
    print("| lr | bf16_update | landed (mean per step) | cumulative | noise | moved |")
    print("|---:|---|---:|---:|---:|---:|")
    for lr in args.lrs:
        ref, _ = _train(torch.float32, "stochastic", lr, batches)
        ref_d = torch.cat([(ref[n] - start[n]).flatten() for n in ref])
        for mode in ("nearest", "stochastic", "master"):
            final, landed = _train(torch.bfloat16, mode, lr, batches)
            d = torch.cat([(final[n] - start[n]).flatten() for n in final])
            cumulative = float(d @ ref_d / (ref_d @ ref_d))
            noise = float((d - cumulative * ref_d).norm() / ref_d.norm())
            moved = float((d != 0).double().mean())
            print(f"| {lr:g} | {mode} | {statistics.mean(landed):.3f} | {cumulative:.3f} | {noise:.3f} | "
                  f"{moved:.3f} |", flush=True)


if __name__ == "__main__":
    main()
