"""The engine interface: what the loop needs from whatever serves generation.

Two implementations: `engines.hf.TransformersEngine` (CPU and anywhere vLLM is absent) and
`engines.vllm.VLLMEngine` (in-process offline LLM; CUDA, or vLLM's CPU build). The cycle only talks to this
interface; it never reaches into vLLM.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from dreamd.dream.scenario import Message


@dataclass(frozen=True)
class Sampling:
    """Sampling settings; names and meanings follow vllm.SamplingParams."""

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # 'stop' (end of turn) or 'length'


@dataclass
class GenerationMeter:
    """Running totals of an engine's generate() calls: the cycle turns the difference over its
    dream phase into a 'generate' phases row with tokens/s."""

    calls: int = 0
    tokens: int = 0
    """Completion tokens produced (every one of the n samples)."""
    seconds: float = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.calls += 1
        self.tokens += tokens
        self.seconds += seconds

    def since(self, before: GenerationMeter) -> GenerationMeter:
        return GenerationMeter(self.calls - before.calls, self.tokens - before.tokens,
                               self.seconds - before.seconds)

    def copy(self) -> GenerationMeter:
        return GenerationMeter(self.calls, self.tokens, self.seconds)


@runtime_checkable
class Engine(Protocol):
    tokenizer: object
    """The model's tokenizer; `apply_chat_template` renders conversations."""
    meter: GenerationMeter
    """Totals over every generate() call (tokens, seconds)."""

    @property
    def weights_valid(self) -> bool:
        """False between sleep(level=2)/wake and the next full weight push."""

    def generate(self, conversations: list[list[Message]], sampling: Sampling) -> list[list[Completion]]:
        """One list of `sampling.n` completions per conversation, rendered with the chat
        template (generation prompt added) and stopped at end of turn."""

    def prompt_logprobs(self, token_ids: list[list[int]]) -> list[list[float]]:
        """Log-prob of every token after the first, given its prefix (the canary uses it)."""

    @property
    def can_sleep(self) -> bool:
        """Whether sleep() is supported here (vLLM's CPU platform has no sleep mode)."""

    def sleep(self, level: int = 1) -> None:
        """Free accelerator memory for training (level 1: weights offloaded; 2: discarded)."""

    def wake(self, tags: list[str] | None = None) -> None:
        """Undo sleep; tags as vLLM's wake_up: 'weights', 'kv_cache'."""

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy trained weights in place, by HF parameter name."""
