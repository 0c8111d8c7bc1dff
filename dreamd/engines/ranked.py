"""vLLM colocated per rank under torchrun: every rank drives its own in-process vLLM (vLLM's
external_launcher, engines.vllm_compat.external_launcher_kwargs), kept in step by rank 0.

Rank 0 stays the only dreamer: it screens, stores and evaluates, and its engine is a
RankedEngine. Each engine call rank 0 makes goes out to every rank over the broadcast channel
that train/distributed.py's `follow` listens on (("engine", op, payload)); every rank runs it on
its own vLLM (`RankSide.run`) and rank 0 gathers the answers:

- generate / generate_mixed: data-parallel. Conversation i goes to data-parallel rank
  i % dp_size (`share`), which generates it with its own seed stream (`rank_seed`: the call's
  seed on data-parallel rank 0, seed + dp_rank x RANK_SEED_STRIDE on the others: the same
  completions for the same world and engine.tensor_parallel_size); rank 0 puts them back in
  the call's order (`merge`). The ranks of one tensor-parallel group
  (engine.tensor_parallel_size > 1) hold slices of one model, run the same share with the same
  seed and give the same answer; rank 0 takes the group's first.
- prompt_logprobs: every rank scores every prompt on its own engine. `prompt_logprobs_by_rank`
  returns all of them: the canary compares each rank's engine with the trainer, and a mismatch
  on any rank fails the cycle (rank 0 raises; its rollback runs on every rank).
- load_weights: from the FSDP2 shards on every rank. Each parameter is gathered whole
  (`full_tensor()`, a collective all ranks join), handed to this rank's vLLM and dropped, then
  the next (VLLMEngine.load_weights_streamed): no rank holds the whole model at once for the
  push. Rank 0's argument (its serving model) is not read: the shards are the one source.
- sleep / wake: on every rank.

A failure on any rank comes back to rank 0 as one line and is raised there; the other ranks
stay in their loop, so the rollback and the next call find them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dreamd.dream.scenario import Message
from dreamd.engines.base import Completion, GenerationMeter, Sampling
from dreamd.errors import UsageError
from dreamd.log import get_logger

log = get_logger("dreamd.engines")

RANK_SEED_STRIDE = 1_000_003
"""Data-parallel rank d samples with seed + d x this (a prime: streams of nearby seeds do not meet)."""


@dataclass(frozen=True)
class RankGroups:
    """This rank's place in vLLM's groups: tensor-parallel groups of consecutive ranks, one
    data-parallel rank per group (vLLM's own numbering under external_launcher)."""

    rank: int
    size: int
    tensor_parallel_size: int

    @classmethod
    def of(cls, rank: int, size: int, tensor_parallel_size: int) -> RankGroups:
        if tensor_parallel_size < 1 or size % tensor_parallel_size:
            raise UsageError(f"engine.tensor_parallel_size = {tensor_parallel_size} does not divide the "
                             f"torchrun world of {size} ranks; set it to a divisor of --nproc-per-node x "
                             "--nnodes (1: every rank its own engine, data-parallel dreaming)")
        return cls(rank=rank, size=size, tensor_parallel_size=tensor_parallel_size)

    @property
    def dp_size(self) -> int:
        return self.size // self.tensor_parallel_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tensor_parallel_size


def share(items: list[Any], dp_rank: int, dp_size: int) -> list[Any]:
    """The items data-parallel rank `dp_rank` handles: every dp_size-th, from its own index."""
    return items[dp_rank::dp_size]


def merge(parts: list[list[Any]]) -> list[Any]:
    """Undo `share`: parts[d] is data-parallel rank d's answers, in its share's order."""
    out: list[Any] = []
    for i in range(max((len(p) for p in parts), default=0)):
        out.extend(p[i] for p in parts if i < len(p))
    return out


def rank_seed(seed: int | None, dp_rank: int) -> int | None:
    return seed if seed is None or dp_rank == 0 else seed + dp_rank * RANK_SEED_STRIDE


@dataclass
class Shards:
    """Where this rank's push comes from: the sharded trainer's parameters, gathered one by one."""

    rank: int
    size: int
    """This rank and the world's size (torchrun's RANK, WORLD_SIZE)."""
    names: list[str]
    """Every parameter name `gather` yields (checked for completeness before the push)."""
    gather: Callable[[], Iterator[tuple[str, torch.Tensor]]]
    """Yields (name, full tensor) per parameter; every rank must iterate it to the end."""

    @classmethod
    def of(cls, trainer: Any) -> Shards:
        """A ShardedTrainer's (train/distributed.py): its world, its gather (full_tensors)."""
        return cls(rank=trainer.world.rank, size=trainer.world.size, gather=trainer.full_tensors,
                   names=[name for name, _ in trainer.model.named_parameters()])


class RankSide:
    """One rank's engine and what it runs for rank 0's calls (rank 0 included)."""

    def __init__(self, groups: RankGroups, shards: Shards) -> None:
        self.groups = groups
        self.shards = shards
        self.engine: Any = None

    @classmethod
    def of(cls, trainer: Any, tensor_parallel_size: int) -> RankSide:
        """Ranks 1..: the side of this rank's ShardedTrainer (built at rank 0's first call)."""
        shards = Shards.of(trainer)
        return cls(RankGroups.of(shards.rank, shards.size, tensor_parallel_size), shards)

    def run(self, op: str, payload: Any) -> Any:
        g = self.groups
        if op == "create":
            from dreamd.engines.vllm import VLLMEngine  # noqa: PLC0415  (imports vLLM: seconds)

            self.engine = VLLMEngine.build(**payload, launcher=(g.tensor_parallel_size, g.dp_size))
            return None
        if self.engine is None:
            raise RuntimeError(f"engine call {op!r} before the engine was built")
        if op == "generate":
            conversations, sampling = payload
            mine = share(conversations, g.dp_rank, g.dp_size)
            return self.engine.generate(mine, replace(sampling, seed=rank_seed(sampling.seed, g.dp_rank)))
        if op == "generate_mixed":
            conversations, samplings = payload
            return self.engine.generate_mixed(share(conversations, g.dp_rank, g.dp_size),
                                              share(samplings, g.dp_rank, g.dp_size))
        if op == "prompt_logprobs":
            return self.engine.prompt_logprobs(payload)
        if op == "push":
            source = self.shards.gather()
            try:
                self.engine.load_weights_streamed(source, self.shards.names)
            finally:
                for _ in source:   # join the gathers the other ranks still make
                    pass
            return self.engine.last_push
        if op == "sleep":
            return self.engine.sleep(payload)
        if op == "wake":
            return self.engine.wake(payload)
        raise RuntimeError(f"unknown engine call {op!r}")

    def answer(self, op: str, payload: Any) -> tuple[str, Any]:
        """run(), with a failure as ('error', one line) instead of an exception."""
        try:
            return "ok", self.run(op, payload)
        except Exception as exc:  # every rank must reach the gather below, failed or not
            first = (str(exc).strip().splitlines() or [""])[0]
            return "error", f"rank {self.groups.rank}: {type(exc).__name__}: {first}"

    def close(self) -> None:
        """At exit, last: this rank's vLLM, and with it torch.distributed (vllm_compat.shutdown)."""
        if self.engine is not None:
            self.engine.close()

    def follow(self, op: str, payload: Any) -> None:
        """Ranks 1..: run rank 0's call, send the answer back."""
        dist.gather_object(self.answer(op, payload), None, dst=0)


class RankedEngine:
    """Rank 0's engine under torchrun: implements dreamd.engines.base.Engine by running each
    call on every rank's vLLM (module docstring)."""

    def __init__(self, side: RankSide) -> None:
        self.side = side
        self.meter = GenerationMeter()
        self.last_generated_tokens = 0

    @classmethod
    def open(cls, groups: RankGroups, shards: Shards, *, model_path: Path, config: Any, dtype: torch.dtype,
             stop_ids: list[int], tokenizer: Any, engine_cfg: Any, seed: int,
             threads: int | None) -> RankedEngine:
        """Every rank builds its vLLM (all at once: vLLM builds its groups collectively), then
        every rank's first push from the shards. The canary is the caller's (select.make_engine)."""
        engine = cls(RankSide(groups, shards))
        engine._everywhere("create", dict(model_path=model_path, config=config, dtype=dtype, stop_ids=stop_ids,
                                          tokenizer=tokenizer, engine_cfg=engine_cfg, seed=seed,
                                          threads=threads))
        engine.load_weights(())
        return engine

    def _everywhere(self, op: str, payload: Any) -> list[Any]:
        """Run `op` on every rank; the answers by rank, or RuntimeError naming each failed rank."""
        dist.broadcast_object_list([("engine", op, payload)], src=0)
        answers: list[Any] = [None] * self.side.groups.size
        dist.gather_object(self.side.answer(op, payload), answers, dst=0)
        errors = [text for status, text in answers if status == "error"]
        if errors:
            raise RuntimeError(f"engine call {op!r} failed on {len(errors)} of {len(answers)} ranks: "
                               + "; ".join(errors))
        return [value for _, value in answers]

    def _by_dp_rank(self, answers: list[Any]) -> list[Any]:
        """The answer of each data-parallel rank: its tensor-parallel group's first rank's."""
        return answers[::self.side.groups.tensor_parallel_size]

    def __getattr__(self, name: str) -> Any:  # tokenizer, dtype, api, weights_valid, pushes, ...
        if name == "side":
            raise AttributeError(name)
        return getattr(self.side.engine, name)

    @property
    def can_sleep(self) -> bool:
        return bool(self.side.engine.can_sleep)

    def generate(self, conversations: list[list[Message]], sampling: Sampling) -> list[list[Completion]]:
        t0 = time.perf_counter()
        result = merge(self._by_dp_rank(self._everywhere("generate", (conversations, sampling))))
        self._count(sum(len(c.token_ids) for comps in result for c in comps), t0)
        return result

    def generate_mixed(self, conversations: list[list[Message]], samplings: list[Sampling]) -> list[Completion]:
        t0 = time.perf_counter()
        result = merge(self._by_dp_rank(self._everywhere("generate_mixed", (conversations, samplings))))
        self._count(sum(len(c.token_ids) for c in result), t0)
        return result

    def _count(self, tokens: int, t0: float) -> None:
        self.last_generated_tokens = tokens
        self.meter.add(tokens, time.perf_counter() - t0)

    def prompt_logprobs_by_rank(self, token_ids: list[list[int]]) -> list[list[list[float]]]:
        """Every rank's engine's prompt_logprobs of the same prompts (the canary per rank)."""
        return self._everywhere("prompt_logprobs", token_ids)

    def prompt_logprobs(self, token_ids: list[list[int]]) -> list[list[float]]:
        return self.prompt_logprobs_by_rank(token_ids)[0]

    def sleep(self, level: int = 1) -> None:
        self._everywhere("sleep", level)

    def wake(self, tags: list[str] | None = None) -> None:
        self._everywhere("wake", tags)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Every rank pushes into its own vLLM from the shards (module docstring); the serving
        model's tensors passed here are not read."""
        reports = self._everywhere("push", None)
        log.info("engine.push", ranks=len(reports), sent=[r.sent for r in reports],
                 loaded=[r.loaded for r in reports], reload=reports[0].reload)
