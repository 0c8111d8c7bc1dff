"""The engine interface: what the loop needs from whatever serves generation.

Two implementations: `engines.hf.TransformersEngine` (CPU and anywhere vLLM is absent) and
`engines.vllm.VLLMEngine` (GPU boxes, in-process offline LLM). The cycle only talks to this
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


@runtime_checkable
class Engine(Protocol):
    tokenizer: object
    """The model's tokenizer; `apply_chat_template` renders conversations."""

    @property
    def weights_valid(self) -> bool:
        """False between sleep(level=2)/wake and the next full weight push."""

    def generate(self, conversations: list[list[Message]], sampling: Sampling) -> list[list[Completion]]:
        """One list of `sampling.n` completions per conversation, rendered with the chat
        template (generation prompt added) and stopped at end of turn."""

    def prompt_logprobs(self, token_ids: list[list[int]]) -> list[list[float]]:
        """Log-prob of every token after the first, given its prefix (the canary uses it)."""

    def sleep(self, level: int = 1) -> None:
        """Free accelerator memory for training (level 1: weights offloaded; 2: discarded)."""

    def wake(self, tags: list[str] | None = None) -> None:
        """Undo sleep; tags as vLLM's wake_up: 'weights', 'kv_cache'."""

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy trained weights in place, by HF parameter name."""
