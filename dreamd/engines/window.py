"""The training window: what happens to the engine around one training phase, in order.

    before_train()      engine sleeps (level 2) if the decision says so; empty the allocator cache
    ... train ...
    after_train(model)  empty the cache; wake(['weights']); push ALL weights in place;
                        wake(['kv_cache']); canary (engine vs trainer log-probs on a fixed probe)

When training fits beside the engine (small models, see engines.memory) the engine stays awake
and after_train only pushes and runs the canary. Either way the push goes through
`engine.load_weights`, whose vLLM implementation resets the prefix cache and checks that the
reset happened (cached KV blocks were computed with the old weights). Nothing here ever asks
the engine to reload weights from disk: that would silently undo the training (TRL
issue 5312).

Use as two calls or as a context manager:

    window = TrainingWindow(engine, decision, ledger, probe=canary_probe(tok))
    with window.training(model):
        train(...)
    store(window.last_canary)

If training raises, nothing is pushed: a sleeping engine stays asleep with its weights invalid
(generate raises) until the caller restores a checkpoint and calls `after_train(restored)`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import PreTrainedModel

from dreamd.config import Config
from dreamd.engines.base import Engine
from dreamd.engines.canary import CanaryMismatch, CanaryResult, canary_probe, run_canary
from dreamd.engines.ledger import PhaseLedger, cuda_free_bytes
from dreamd.engines.memory import SleepDecision, decide_sleep, estimate_training_memory


def empty_cuda_cache() -> None:
    """Return the caching allocator's free blocks to the driver, so the other side (engine or
    trainer) can map them. A no-op without a CUDA context."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class TrainingWindow:
    """Runs the sleep / wake / push / canary sequence around training and times each step."""

    def __init__(self, engine: Engine, decision: SleepDecision, ledger: PhaseLedger, *,
                 probe: list[int], canary_atol: float | None = None,
                 empty_cache=empty_cuda_cache) -> None:
        self.engine = engine
        self.decision = decision
        self.ledger = ledger
        self.probe = probe
        self.canary_atol = canary_atol
        self._empty_cache = empty_cache
        self.slept = False
        self.last_canary: CanaryResult | None = None
        """Numbers of the last canary, also set when it failed (store them either way)."""

    @classmethod
    def for_config(cls, cfg: Config, engine: Engine, model: PreTrainedModel, tokenizer, ledger: PhaseLedger, *,
                   measured_peak_bytes: int | None = None) -> TrainingWindow:
        """The window for one cycle: the sleep decision from the config (engine.sleep), byte
        estimates of this model's training, and the free device memory measured now (engine
        awake, trainer weights resident). `measured_peak_bytes`: the trainer's peak above its
        weights in an earlier cycle (torch.cuda.max_memory_allocated minus the weights), which
        replaces the estimate when larger. The decision is kept in `.decision` (store its reason)."""
        memory = estimate_training_memory(
            model, cfg.optimizer, batch_size=cfg.train.batch_size, seq_len=cfg.model.max_seq_len,
            eager_attention=cfg.model.attn_implementation == "eager")
        free = cuda_free_bytes()
        total = torch.cuda.mem_get_info()[1] if free is not None else None
        decision = decide_sleep(memory, free, policy=cfg.engine.sleep, total_bytes=total,
                                measured_peak_bytes=measured_peak_bytes, engine_can_sleep=engine.can_sleep)
        return cls(engine, decision, ledger, probe=canary_probe(tokenizer), canary_atol=cfg.engine.canary_atol)

    def before_train(self) -> None:
        if self.slept:
            raise RuntimeError("before_train called twice without after_train")
        if self.decision.sleep:
            with self.ledger.phase("sleep"):
                self.engine.sleep(level=self.decision.level)
                self._empty_cache()
            self.slept = True

    def after_train(self, model: PreTrainedModel) -> CanaryResult:
        """Bring the engine back with `model`'s weights and check them; returns the canary
        numbers, raises CanaryMismatch (a CycleFailed) when they disagree."""
        if self.slept:
            self._empty_cache()
            with self.ledger.phase("wake"):
                self.engine.wake(["weights"])
        with self.ledger.phase("push"):
            self.engine.load_weights(model.named_parameters())
        if self.slept:
            with self.ledger.phase("wake"):
                self.engine.wake(["kv_cache"])
            self.slept = False
        with self.ledger.phase("canary"):
            try:
                self.last_canary = run_canary(self.engine, model, self.probe, self.canary_atol)
            except CanaryMismatch as exc:
                self.last_canary = exc.result
                raise
        return self.last_canary

    @contextmanager
    def training(self, model: PreTrainedModel) -> Iterator[TrainingWindow]:
        """before_train(); yield; after_train(model) -- the last only if the block succeeded."""
        self.before_train()
        yield self
        self.after_train(model)
