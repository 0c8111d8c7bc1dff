"""One dream cycle, top to bottom: dream, screen, mix, train, evaluate, decide, commit.

Everything a cycle needs lives in a `Parts` (built once per process by `dreamd.loop`), and all
state that carries from cycle to cycle lives in `LoopState`, which is saved whole in every
checkpoint. Rows are written to the store as things happen: a crash loses nothing committed.

A stop request (SIGTERM) is honoured at a step boundary: the cycle checkpoints with its
remaining batches in `LoopState.pending` and its row becomes 'stopped'; the next start trains
exactly those batches and goes on (so N steps straight equal K steps + stop + resume).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from dreamd.controller import apply as apply_decision
from dreamd.controller import decide_and_record, roll_back
from dreamd.dream.scenario import Scenario, ScenarioKind
from dreamd.errors import CycleFailed
from dreamd.log import get_logger
from dreamd.mix import kind_quotas
from dreamd.train.batching import make_batches
from dreamd.train.examples import Encoded, encode_scenario

if TYPE_CHECKING:
    from dreamd.loop import Parts

log = get_logger("dreamd.cycle")


class StopRequested(Exception):
    """Raised inside a cycle when a stop arrived before any training step (nothing to keep)."""


@dataclass
class LoopState:
    """Everything that carries across cycles; restored whole on resume."""

    run_id: int
    cycle: int = 0                 # number of the last committed cycle
    lr: float = 1e-5
    general_share: float = 0.25
    examples_per_cycle: int = 24
    history: dict[str, list[float]] = field(default_factory=dict)  # metric -> per-cycle values
    pending: dict[str, Any] | None = None
    """A cycle stopped mid-train: {'cycle_id', 'number', 'batches': [[scenario ids]]} left to train."""

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class CycleResult:
    number: int
    cycle_id: int
    status: str                    # 'committed', 'stopped' or 'rolled_back' (the controller)
    steps: int = 0
    accepted: dict[str, int] = field(default_factory=dict)
    rejected: int = 0
    mean_loss: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------
# dream + screen


def dream_and_screen(parts: Parts, state: LoopState, cycle_id: int, rng: random.Random) -> tuple[list[Encoded], int]:
    """Dream candidates per kind until each quota is accepted; every candidate is stored.

    Returns the accepted examples (encoded for training) and the number rejected.
    """
    cfg = parts.cfg
    quotas = kind_quotas(cfg.mix, cfg.train.batch_size, state.examples_per_cycle, state.general_share)
    accepted: list[Encoded] = []
    rejected = 0
    for kind, need in quotas.items():
        got, attempts = 0, 0
        budget = need * cfg.dream.max_attempts_factor
        while got < need:
            if parts.should_stop():
                raise StopRequested(f"stop requested while dreaming {kind} ({got}/{need})")
            if attempts >= budget:
                raise CycleFailed(f"dream: only {got}/{need} {kind} scenarios passed screening after "
                                  f"{attempts} candidates; see scenarios.reject_reason for why")
            attempts += 1
            scenario = parts.dreamer.dream(kind, rng, model_config=parts.model_config)
            verdict = parts.screener.screen(scenario)
            encoded, reason = None, verdict.reason
            if verdict.ok:
                try:
                    encoded = encode_scenario(parts.tokenizer, scenario, cfg.model.max_seq_len)
                except ValueError as exc:
                    reason = f"encode: {exc}"
            saved = parts.store.add_scenario(state.run_id, cycle_id, scenario,
                                             status="accepted" if encoded else "rejected",
                                             reject_reason=None if encoded else reason,
                                             temperature=scenario.meta.get("temperature"))
            ok = encoded is not None and saved.duplicate_of is None
            parts.dreamer.observe(scenario, ok)    # the model dreamer adapts its temperature
            if not ok:
                rejected += 1
                continue
            encoded.scenario_id = saved.id
            accepted.append(encoded)
            got += 1
    return accepted, rejected


def reload_batches(parts: Parts, batch_ids: list[list[int]]) -> list[list[Encoded]]:
    """The batches of a stopped cycle, re-encoded from their stored scenarios (deterministic)."""
    scenarios = parts.store.load_scenarios([sid for batch in batch_ids for sid in batch])
    out = []
    for batch in batch_ids:
        out.append([encode_scenario(parts.tokenizer, scenarios[sid], parts.cfg.model.max_seq_len,
                                    scenario_id=sid) for sid in batch])
    return out


# ---------------------------------------------------------------------------------------------
# the cycle


def run_cycle(parts: Parts, state: LoopState) -> CycleResult:
    cfg, store = parts.cfg, parts.store
    t0 = time.perf_counter()
    resumed = state.pending
    if resumed is None:
        number = state.cycle + 1
        cycle_id = store.start_cycle(state.run_id, number, lr=state.lr, general_share=state.general_share,
                                     n_examples=state.examples_per_cycle)
    else:
        number, cycle_id = resumed["number"], resumed["cycle_id"]
        store.reopen_cycle(cycle_id)
    log.info("cycle.start", cycle=number, cycle_id=cycle_id, lr=state.lr, general_share=state.general_share,
             examples=state.examples_per_cycle, resumed=resumed is not None)
    # The dream RNG is derived from (seed, cycle, cycle row id): a re-run after a crash draws a
    # different stream, and the store's unique content hash keeps anything from repeating.
    rng = random.Random(f"{cfg.run.seed}/{number}/{cycle_id}")
    rejected = 0
    try:
        if resumed is None:
            # ---- dream + screen ---------------------------------------------------------
            meter, dream_started = parts.engine.meter.copy(), datetime.now(timezone.utc)
            with parts.phase(cycle_id, "dream"):
                examples, rejected = dream_and_screen(parts, state, cycle_id, rng)
            record_generation(parts, cycle_id, dream_started, parts.engine.meter.since(meter))
            # ---- mix --------------------------------------------------------------------
            batches = make_batches(examples, cfg.train.batch_size, state.general_share,
                                   cfg.train.bucket_by_length, rng)
        else:
            batches = reload_batches(parts, resumed["batches"])
            state.pending = None

        # ---- train: one pass, every optimizer step a row as it happens ----------------------
        # The engine sleeps around training only when both do not fit (engines/window.py);
        # afterwards every weight is pushed into it and the canary checks engine == trainer.
        parts.trainer.set_lr(state.lr)
        window = parts.window = open_window(parts)
        losses: list[float] = []
        done = 0
        window.before_train()
        with parts.phase(cycle_id, "train"):
            for res in parts.trainer.train_pass(batches):
                store.add_train_step(state.run_id, cycle_id, res.step, step_row(res), res.scenario_ids)
                done += 1
                if res.peak_mem_bytes is not None:
                    parts.peak_step_bytes = max(parts.peak_step_bytes or 0, res.peak_mem_bytes)
                if not res.skipped:
                    losses.append(res.loss)
                parts.on_step(res)             # pause blocks here; stop is checked below
                if parts.should_stop() and done < len(batches):
                    break
        if done < len(batches):
            return stop_mid_train(parts, state, number, cycle_id, batches[done:], t0)
        try:
            window.after_train(parts.model)    # wake, push ALL weights, canary (raises on mismatch)
        finally:
            record_window(parts, cycle_id, window)

        # ---- evaluate: forgetting and every probe metric (Q1, margins, Q3, steering, ...) -----
        with parts.phase(cycle_id, "evaluate"):
            metrics, details = parts.evaluate(cycle_id)
        store.add_evals(state.run_id, cycle_id, metrics, details=details)

        # ---- decide: the controller keeps, speeds up, slows down or rolls back; reason stored --
        decision = decide_and_record(cfg, store, state.run_id, cycle_id, state, metrics, parts.trainer.step)
        if decision.rollback or decision.halt:
            roll_back(parts, state, cycle_id, decision)    # a halt raises ControllerHalt (a CycleFailed)
            log.info("cycle.rolled_back", cycle=number, reason=decision.reason)
            return CycleResult(number=number, cycle_id=cycle_id, status="rolled_back", steps=len(batches),
                               metrics=metrics, seconds=time.perf_counter() - t0)
        apply_decision(state, decision)

        # ---- commit: checkpoint, then the cycle row -----------------------------------------
        state.cycle = number
        for name, value in metrics.items():
            state.history.setdefault(name, []).append(value)
        with parts.phase(cycle_id, "checkpoint"):
            parts.checkpoint(cycle_id, state, metrics)
        store.finish_cycle(cycle_id, "committed")
    except StopRequested as exc:
        store.finish_cycle(cycle_id, "stopped", error=f"{exc}; nothing trained, a new attempt runs at next start")
        raise
    except CycleFailed as exc:
        store.finish_cycle(cycle_id, "failed", error=str(exc))
        log.error("cycle.failed", cycle=number, error=str(exc))
        raise
    except BaseException as exc:
        # Crashed mid-cycle: the row says so; nothing it wrote is lost. A restart resumes from
        # the last checkpoint and supersedes this cycle's steps.
        store.finish_cycle(cycle_id, "failed", error=f"{type(exc).__name__}: {exc}")
        raise
    kinds = Counter(e.kind.value for batch in batches for e in batch)
    result = CycleResult(number=number, cycle_id=cycle_id, status="committed", steps=len(batches),
                         accepted=dict(kinds), rejected=rejected,
                         mean_loss=sum(losses) / len(losses) if losses else None, metrics=metrics,
                         seconds=time.perf_counter() - t0)
    log.info("cycle.committed", cycle=number, steps=result.steps, accepted=result.accepted,
             rejected=rejected, mean_loss=result.mean_loss, seconds=round(result.seconds, 2), **metrics)
    return result


def open_window(parts: Parts) -> Any:
    """The sleep/wake/push/canary sequence around this cycle's training (engines/window.py)."""
    from dreamd.engines.ledger import PhaseLedger
    from dreamd.engines.window import TrainingWindow

    return TrainingWindow.for_config(parts.cfg, parts.engine, parts.model, parts.tokenizer, PhaseLedger(),
                                     measured_peak_bytes=parts.peak_above_weights())


def record_generation(parts: Parts, cycle_id: int, started: datetime, used: Any) -> None:
    """The engine's share of the dream phase as a 'generate' phases row, with tokens/s."""
    if used.calls:
        parts.store.add_phase(parts.run_id, cycle_id, "generate", started, used.seconds,
                              tokens_per_s=used.tokens / used.seconds if used.seconds > 0 else None)


def record_window(parts: Parts, cycle_id: int, window: Any) -> None:
    """The engine's phases (sleep, wake, push, canary) as phases rows, the canary's numbers as
    evals, and the sleep decision as an event."""
    store = parts.store
    for row in window.ledger.rows():
        store.add_phase(parts.run_id, cycle_id, **row)
    if window.last_canary is not None:
        canary = window.last_canary
        store.add_evals(parts.run_id, cycle_id,
                        {"engine.canary_mean_abs_diff": canary.mean_abs_diff,
                         "engine.canary_max_abs_diff": canary.max_abs_diff},
                        details={"engine.canary_mean_abs_diff": canary.to_json()})
    store.add_event(parts.run_id, "engine_window",
                    {"cycle_id": cycle_id, "sleep": window.decision.sleep, "reason": window.decision.reason})


def step_row(res: Any) -> dict[str, Any]:
    """A StepResult as train_steps columns (step and the scenario ids are passed separately)."""
    row = res.metrics()
    row.pop("step", None)
    row.pop("scenario_ids", None)
    return row


def stop_mid_train(parts: Parts, state: LoopState, number: int, cycle_id: int,
                   remaining: list[list[Encoded]], t0: float) -> CycleResult:
    """Stop at a step boundary: checkpoint with the batches still to train, mark the cycle."""
    state.pending = {"number": number, "cycle_id": cycle_id,
                     "batches": [[e.scenario_id for e in batch] for batch in remaining]}
    with parts.phase(cycle_id, "checkpoint"):
        parts.checkpoint(cycle_id, state, {})
    parts.store.finish_cycle(cycle_id, "stopped",
                             error=f"stopped at step {parts.trainer.step}; {len(remaining)} batches "
                                   "resume at next start")
    log.info("cycle.stopped", cycle=number, step=parts.trainer.step, remaining_batches=len(remaining))
    return CycleResult(number=number, cycle_id=cycle_id, status="stopped",
                       seconds=time.perf_counter() - t0)
