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

    def generate_mixed(self, conversations: list[list[Message]], samplings: list[Sampling]) -> list[Completion]:
        """One greedy completion per conversation, each under its own Sampling (its own
        max_tokens), in as few batches as the engine allows: the evaluation's one generation
        call (`generate_each` below). Greedy only: every Sampling has temperature 0 and n 1."""

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


def check_mixed(conversations: list[list[Message]], samplings: list[Sampling]) -> None:
    """generate_mixed's contract: one greedy Sampling (n 1, temperature 0, one seed) per conversation."""
    if len(samplings) != len(conversations):
        raise ValueError(f"generate_mixed needs one Sampling per conversation, got {len(samplings)} for "
                         f"{len(conversations)}")
    if any(s.n != 1 or s.temperature != 0.0 or s.max_tokens < 1 for s in samplings):
        raise ValueError("generate_mixed is greedy: every Sampling needs n = 1, temperature = 0, max_tokens >= 1")
    if len({s.seed for s in samplings}) > 1:
        raise ValueError("generate_mixed takes one seed for the whole call")


def generate_each(engine: object, conversations: list[list[Message]], samplings: list[Sampling]) -> list[Completion]:
    """One greedy completion per conversation under its own Sampling: ONE engine call when the
    engine batches mixed budgets (generate_mixed: both real engines), else one generate() call
    per distinct Sampling (engines that only generate, e.g. the tests' scripted ones)."""
    if not conversations:
        return []
    mixed = getattr(engine, "generate_mixed", None)
    if mixed is not None:
        return mixed(conversations, samplings)
    check_mixed(conversations, samplings)
    out: list[Completion | None] = [None] * len(conversations)
    for sampling in dict.fromkeys(samplings):
        idx = [i for i, s in enumerate(samplings) if s == sampling]
        for i, got in zip(idx, engine.generate([conversations[i] for i in idx], sampling)):  # type: ignore[attr-defined]
            out[i] = got[0]
    return [c for c in out if c is not None]


# ---- the sleep/wake state machine -------------------------------------------------------------

SLEEP_TAGS = ("weights", "kv_cache")
"""What an engine frees when it sleeps, and wakes by name."""


class SleepState:
    """The sleep/wake state machine of an engine: ONE for engines/hf.py and engines/vllm.py, so
    the two cannot disagree. vLLM's rules (its real engine enforces them): sleep(level) only
    when fully awake, level 1 or 2, and level 2 leaves the weights invalid until a full push;
    wake(tags) only what sleeps; generating needs every tag awake. An engine calls
    begin_* before acting (it raises before anything changes) and slept/woke after."""

    def __init__(self, *, weights_valid: bool) -> None:
        self.asleep: set[str] = set()
        self.weights_valid = weights_valid

    def begin_sleep(self, level: int, unavailable: str | None = None) -> None:
        """Refuse a bad sleep(level): a level other than 1 or 2, `unavailable` (why this engine
        cannot sleep here), or an engine already (partly) asleep."""
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level}")
        if unavailable:
            raise RuntimeError(unavailable)
        if self.asleep:
            raise RuntimeError(f"sleep called while {sorted(self.asleep)} already sleep; wake first")

    def slept(self, level: int) -> None:
        self.asleep = set(SLEEP_TAGS)
        if level == 2:
            self.weights_valid = False  # the memory comes back with garbage in it

    def begin_wake(self, tags: list[str] | None) -> list[str]:
        """The tags to wake (all when None); refuses unknown tags and tags not asleep."""
        wanted = list(SLEEP_TAGS if tags is None else tags)
        if unknown := set(wanted) - set(SLEEP_TAGS):
            raise ValueError(f"unknown wake tags {sorted(unknown)}; use {list(SLEEP_TAGS)}")
        if not_asleep := set(wanted) - self.asleep:
            raise RuntimeError(f"wake({wanted}) but {sorted(not_asleep)} is not asleep")
        return wanted

    def woke(self, wanted: list[str]) -> None:
        self.asleep -= set(wanted)

    def require_awake(self, what: str) -> None:
        if self.asleep:
            raise RuntimeError(f"{what} called while the engine sleeps ({sorted(self.asleep)}); call wake() first")
