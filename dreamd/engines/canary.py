"""The canary after every weight push: the engine must score a fixed probe as the trainer does.

Both sides compute the log-prob of every probe token after the first, given its prefix: the
engine through `Engine.prompt_logprobs` (vLLM: SamplingParams(prompt_logprobs=0)), the trainer
with one forward pass of its own model. The mean |difference| must be within a tolerance set
by the dtype. A missed or partial push leaves garbage (after sleep level 2) or the previous
weights in the engine; either moves log-probs by whole nats, far beyond these tolerances.

Tolerances (mean |delta logprob| over the probe, per token): float32 2e-3, float16 2e-2,
bfloat16 5e-2. bf16 has 8 mantissa bits (relative spacing ~0.4%), and vLLM's fused kernels
round in a different order than transformers' eager ones; these are starting values to be
replaced by the spread measured on the GPU host (docs/benchmarks.md). engine.canary_atol
overrides them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from transformers import PreTrainedModel

from dreamd.engines.base import Engine
from dreamd.chat import prompt_logprobs
from dreamd.errors import CycleFailed

DEFAULT_ATOL = {torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}

# A fixed conversation: arithmetic, a fact and code, so every layer and the head take part.
PROBE_MESSAGES = [
    {"role": "user", "content": "Add 17 and 25, name the capital of France, and write a Python "
                                "function that returns the square of x."},
    {"role": "assistant", "content": "17 + 25 = 42. The capital of France is Paris.\n"
                                     "def square(x):\n    return x * x"},
]
PROBE_MAX_TOKENS = 96


def canary_probe(tokenizer) -> list[int]:
    """Token ids of the fixed probe, rendered with the model's chat template."""
    ids = tokenizer.apply_chat_template(PROBE_MESSAGES, tokenize=True, add_generation_prompt=False)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    ids = [int(i) for i in ids][:PROBE_MAX_TOKENS]
    if len(ids) < 2:
        raise ValueError("the canary probe renders to fewer than 2 tokens; check the chat template")
    return ids


@torch.no_grad()
def trainer_prompt_logprobs(model: PreTrainedModel, token_ids: list[int]) -> list[float]:
    """Log-prob of token i given tokens < i, for i >= 1, from the trainer's model (fp32 softmax)."""
    return prompt_logprobs(model, token_ids)


@dataclass(frozen=True)
class CanaryResult:
    ok: bool
    mean_abs_diff: float
    max_abs_diff: float
    atol: float
    tokens: int
    engine_logprobs: tuple[float, ...]
    trainer_logprobs: tuple[float, ...]
    rank: int | None = None
    """Under torchrun (engines/ranked.py): the rank whose engine these numbers are, the worst
    of all ranks' (a mismatch on any rank fails the cycle). None: one process."""
    per_rank: tuple[float, ...] = ()
    """Under torchrun: every rank's mean |delta logprob|, by rank. Empty: one process."""

    def to_json(self) -> dict:
        """Plain numbers for the store."""
        return asdict(self)


class CanaryMismatch(CycleFailed):
    """The engine does not score the probe as the trainer does; `.result` holds the numbers."""

    def __init__(self, result: CanaryResult) -> None:
        where = "" if result.rank is None else f" on rank {result.rank}"
        super().__init__(f"canary mismatch after weight push{where}: mean |delta logprob| "
                         f"{result.mean_abs_diff:.4g} > atol {result.atol:.3g} (max {result.max_abs_diff:.4g}, "
                         f"{result.tokens} tokens); the engine is not serving the trained weights")
        self.result = result


def default_atol(dtype: torch.dtype) -> float:
    return DEFAULT_ATOL.get(dtype, DEFAULT_ATOL[torch.bfloat16])


def compare(engine_lp: list[float], trainer_lp: list[float], atol: float) -> CanaryResult:
    if len(engine_lp) != len(trainer_lp):
        raise ValueError(f"canary: engine gave {len(engine_lp)} log-probs, trainer {len(trainer_lp)}")
    diffs = [abs(a - b) for a, b in zip(engine_lp, trainer_lp)]
    mean = sum(diffs) / len(diffs)
    finite = all(d == d and d != float("inf") for d in diffs)  # NaN != NaN
    return CanaryResult(ok=finite and mean <= atol, mean_abs_diff=mean, max_abs_diff=max(diffs),
                        atol=atol, tokens=len(diffs), engine_logprobs=tuple(engine_lp),
                        trainer_logprobs=tuple(trainer_lp))


def run_canary(engine: Engine, model: PreTrainedModel, probe: list[int], atol: float | None = None) -> CanaryResult:
    """Compare engine and trainer on `probe`; raise CanaryMismatch (a CycleFailed) on mismatch.

    The numbers come back either way (on the exception as `.result`) so the caller stores them.
    """
    if atol is None:
        # The coarser of the two sides' dtypes sets the tolerance (an fp32 trainer may feed a
        # bf16 engine).
        dtypes = [next(model.parameters()).dtype, getattr(engine, "dtype", None)]
        atol = max(default_atol(d) for d in dtypes if isinstance(d, torch.dtype))
    trainer_lp = trainer_prompt_logprobs(model, probe)
    by_rank = getattr(engine, "prompt_logprobs_by_rank", None)   # vLLM on every torchrun rank
    if by_rank is None:
        result = compare(list(engine.prompt_logprobs([probe])[0]), trainer_lp, atol)
    else:
        results = [replace(compare(list(lp[0]), trainer_lp, atol), rank=rank)
                   for rank, lp in enumerate(by_rank([probe]))]
        result = replace(max(results, key=lambda r: (not r.ok, r.mean_abs_diff)),
                         per_rank=tuple(r.mean_abs_diff for r in results))
    if not result.ok:
        raise CanaryMismatch(result)
    return result
