"""One dream cycle, top to bottom: dream, screen, mix, train, evaluate, decide, commit.

Everything a cycle needs lives in a `Run` (built once per process by `dreamd.run`), and all
state that carries from cycle to cycle lives in `RunState`, which is saved whole in every
checkpoint. Rows are written to the store as things happen: a crash loses nothing committed.

A stop request (SIGTERM) is honoured at a step boundary: the cycle checkpoints with its
remaining batches in `RunState.pending` and its row becomes 'stopped'; the next start trains
exactly those batches and goes on (so N steps straight equal K steps + stop + resume).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from dreamd.controller import ControllerDecision, decide
from dreamd.errors import ControllerHalt, CycleFailed
from dreamd.log import Progress, get_logger
from dreamd.run import Run, RunState
from dreamd.train.examples import Encoded, encode_scenario
from dreamd.train.mix import kind_quotas, make_batches

if TYPE_CHECKING:
    from dreamd.engines.window import TrainingWindow
    from dreamd.train.trainer import StepResult

log = get_logger("dreamd.cycle")


class StopRequested(Exception):
    """Raised inside a cycle when a stop arrived before any training step (nothing to keep)."""


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


def dream_and_screen(run: Run, state: RunState, cycle_id: int, rng: random.Random) -> tuple[list[Encoded], int]:
    """Dream candidates per kind until each quota is accepted; every candidate is stored.

    Returns the accepted examples (encoded for training) and the number rejected.
    """
    cfg = run.cfg
    settings = state.settings
    quotas = kind_quotas(cfg.mix, cfg.train.batch_size, settings.examples_per_cycle, settings.general_share)
    accepted: list[Encoded] = []
    rejected = 0
    wanted = sum(quotas.values())
    run.hooks.on_progress(Progress("accepted", 0, wanted, note="written 0"))
    for kind, need in quotas.items():
        got, attempts = 0, 0
        budget = need * cfg.dream.max_attempts_factor
        while got < need:
            if run.hooks.should_stop():
                raise StopRequested(f"stop requested while dreaming {kind} ({got}/{need})")
            if attempts >= budget:
                raise CycleFailed(f"dream: only {got}/{need} {kind} scenarios passed screening after "
                                  f"{attempts} candidates; see scenarios.reject_reason for why")
            attempts += 1
            scenario = run.dreamer.dream(kind, rng, model_config=run.model_config)
            verdict = run.screener.screen(scenario)    # rules, then the encoding (dream/screen.py)
            saved = run.store.add_scenario(state.run_id, cycle_id, scenario,
                                           status="accepted" if verdict.ok else "rejected",
                                           reject_reason=verdict.reason,
                                           temperature=scenario.meta.get("temperature"))
            encoded = verdict.encoded
            ok = verdict.ok and saved.duplicate_of is None
            run.dreamer.observe(scenario, ok)    # the model dreamer adapts its temperature
            if ok:
                encoded.scenario_id = saved.id
                accepted.append(encoded)
                got += 1
            else:
                rejected += 1
            run.hooks.on_progress(Progress("accepted", len(accepted), wanted,
                                           note=f"written {len(accepted) + rejected}"))
    return accepted, rejected


def reload_batches(run: Run, batch_ids: list[list[int]]) -> list[list[Encoded]]:
    """The batches of a stopped cycle, re-encoded from their stored scenarios (deterministic)."""
    scenarios = run.store.load_scenarios([sid for batch in batch_ids for sid in batch])
    out = []
    for batch in batch_ids:
        out.append([encode_scenario(run.tokenizer, scenarios[sid], run.cfg.model.max_seq_len,
                                    scenario_id=sid) for sid in batch])
    return out


# ---------------------------------------------------------------------------------------------
# the cycle


def run_cycle(run: Run, state: RunState) -> CycleResult:
    cfg, store = run.cfg, run.store
    t0 = time.perf_counter()
    resumed = state.pending
    if resumed is None:
        number = state.cycle + 1
        cycle_id = store.start_cycle(state.run_id, number, lr=state.settings.lr,
                                     general_share=state.settings.general_share,
                                     n_examples=state.settings.examples_per_cycle)
    else:
        number, cycle_id = resumed["number"], resumed["cycle_id"]
        store.reopen_cycle(cycle_id)
    log.info("cycle.start", cycle=number, cycle_id=cycle_id, lr=state.settings.lr,
             general_share=state.settings.general_share, examples=state.settings.examples_per_cycle,
             resumed=resumed is not None)
    # The dream RNG is derived from (seed, cycle, cycle row id): a re-run after a crash draws a
    # different stream, and the store's unique content hash keeps anything from repeating.
    rng = random.Random(f"{cfg.run.seed}/{number}/{cycle_id}")
    rejected = 0
    try:
        if resumed is None:
            # ---- dream + screen ---------------------------------------------------------
            meter, dream_started = run.engine.meter.copy(), datetime.now(timezone.utc)
            with run.phase(cycle_id, "dream"):
                examples, rejected = dream_and_screen(run, state, cycle_id, rng)
            record_generation(run, cycle_id, dream_started, run.engine.meter.since(meter))
            # ---- mix --------------------------------------------------------------------
            batches = make_batches(examples, cfg.train.batch_size, state.settings.general_share,
                                   cfg.train.bucket_by_length, rng)
        else:
            batches = reload_batches(run, resumed["batches"])
            state.pending = None

        # ---- train: one pass, every optimizer step a row as it happens ----------------------
        # The engine sleeps around training only when both do not fit (engines/window.py);
        # afterwards every weight is pushed into it and the canary checks engine == trainer.
        run.trainer.set_lr(state.settings.lr)
        window = run.open_window()
        losses: list[float] = []
        done = 0
        window.before_train()
        with run.phase(cycle_id, "train"):
            for res in run.trainer.train_pass(batches):
                store.add_train_step(state.run_id, cycle_id, res.step, step_row(res), res.scenario_ids)
                done += 1
                if res.peak_mem_bytes is not None:
                    run.peak_step_bytes = max(run.peak_step_bytes or 0, res.peak_mem_bytes)
                if not res.skipped:
                    losses.append(res.loss)
                run.hooks.on_step(res)             # pause blocks here; stop is checked below
                if run.hooks.should_stop() and done < len(batches):
                    break
        if done < len(batches):
            return stop_mid_train(run, state, number, cycle_id, batches[done:], t0)
        try:
            window.after_train(run.model)    # wake, push ALL weights, canary (raises on mismatch)
        finally:
            record_window(run, cycle_id, window)

        # ---- evaluate: forgetting and the probe metrics (Q1, margins, Q3, steering, ...); the
        # generated ones (Q1, exact match) every eval.full_every-th cycle (evals/suite.py) ------
        with run.phase(cycle_id, "evaluate"):
            metrics, details = run.evaluate(cycle_id, number)
        store.add_evals(state.run_id, cycle_id, metrics, details=details)

        # ---- decide: the controller keeps, speeds up, slows down or rolls back; reason stored --
        decision = decide_and_record(run, state, cycle_id, metrics)
        if decision.halt:
            raise ControllerHalt(f"controller: {decision.reason}")    # a CycleFailed: the cycle fails
        if decision.rollback:
            roll_back(run, state, cycle_id, decision)
            log.info("cycle.rolled_back", cycle=number, reason=decision.reason)
            return CycleResult(number=number, cycle_id=cycle_id, status="rolled_back", steps=len(batches),
                               metrics=metrics, seconds=time.perf_counter() - t0)
        state.settings = decision.after

        # ---- commit: checkpoint, then the cycle row -----------------------------------------
        state.cycle = number
        for name, value in metrics.items():
            state.history.setdefault(name, []).append(value)
        with run.phase(cycle_id, "checkpoint"):
            run.checkpoint(cycle_id, state, metrics)
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
    # One short line per cycle: the headline numbers, 4 significant digits. Every metric is in
    # the store (evals; `dreamd history`, `dreamd report`), not in the log.
    headline = {k.replace(".", "_"): float(f"{metrics[k]:.4g}") for k in HEADLINE_METRICS if k in metrics}
    log.info("cycle.committed", cycle=number, steps=result.steps, accepted=sum(result.accepted.values()),
             rejected=rejected, loss=None if result.mean_loss is None else float(f"{result.mean_loss:.4g}"),
             **headline, decision=decision.action, next_lr=float(f"{state.settings.lr:.3g}"),
             seconds=round(result.seconds, 1))
    return result


HEADLINE_METRICS = ("q1.balanced", "q1.sycophancy", "margin.mean", "forget.perplexity", "forget.arith_em")
"""The metrics the per-cycle log line shows (docs/sql.md "Metric names" has them all)."""


def decide_and_record(run: Run, state: RunState, cycle_id: int, metrics: dict[str, float]) -> ControllerDecision:
    """The controller's decision for this cycle (its baseline and rollback count from the
    store), written as the cycle's decisions row. The caller carries it out."""
    cfg, store = run.cfg, run.store
    decision = decide(cfg.controller, cfg.train, state.settings, metrics, state.history,
                      store.start_metrics(state.run_id), run.trainer.step,
                      store.rollbacks_in_a_row(state.run_id))
    store.add_decision(state.run_id, cycle_id, decision.action, decision.reason, asdict(decision.before),
                       decision.after_json(), decision.metrics)
    return decision


def roll_back(run: Run, state: RunState, cycle_id: int, decision: ControllerDecision) -> None:
    """Carry out a 'rollback' decision: the cycle row becomes 'rolled_back', and weights,
    optimizer, RNGs and run state return to the last good checkpoint (Run.roll_back, which
    supersedes the undone steps and pushes the weights into the engine); the retry gets the
    decision's slower settings."""
    run.store.finish_cycle(cycle_id, "rolled_back", error=f"controller: {decision.reason}")
    run.roll_back(state, reason=f"controller: {decision.reason}", decision=decision)


def record_generation(run: Run, cycle_id: int, started: datetime, used: Any) -> None:
    """The engine's share of the dream phase as a 'generate' phases row, with tokens/s."""
    if used.calls:
        run.store.add_phase(run.run_id, cycle_id, "generate", started, used.seconds,
                              tokens_per_s=used.tokens / used.seconds if used.seconds > 0 else None)


def record_window(run: Run, cycle_id: int, window: TrainingWindow) -> None:
    """The engine's phases (sleep, wake, push, canary) as phases rows, the canary's numbers as
    evals, and the sleep decision as an event."""
    store = run.store
    for row in window.ledger.rows():
        store.add_phase(run.run_id, cycle_id, **row)
    if window.last_canary is not None:
        canary = window.last_canary
        store.add_evals(run.run_id, cycle_id,
                        {"engine.canary_mean_abs_diff": canary.mean_abs_diff,
                         "engine.canary_max_abs_diff": canary.max_abs_diff},
                        details={"engine.canary_mean_abs_diff": canary.to_json()})
    store.add_event(run.run_id, "engine_window",
                    {"cycle_id": cycle_id, "sleep": window.decision.sleep, "reason": window.decision.reason})


def step_row(res: StepResult) -> dict[str, Any]:
    """A StepResult as train_steps columns (step and the scenario ids are passed separately)."""
    row = res.metrics()
    row.pop("step", None)
    row.pop("scenario_ids", None)
    return row


def stop_mid_train(run: Run, state: RunState, number: int, cycle_id: int,
                   remaining: list[list[Encoded]], t0: float) -> CycleResult:
    """Stop at a step boundary: checkpoint with the batches still to train, mark the cycle."""
    state.pending = {"number": number, "cycle_id": cycle_id,
                     "batches": [[e.scenario_id for e in batch] for batch in remaining]}
    with run.phase(cycle_id, "checkpoint"):
        run.checkpoint(cycle_id, state, {})
    run.store.finish_cycle(cycle_id, "stopped",
                             error=f"stopped after step {run.trainer.last_step}; {len(remaining)} batches "
                                   "resume at next start")
    log.info("cycle.stopped", cycle=number, step=run.trainer.last_step, remaining_batches=len(remaining))
    return CycleResult(number=number, cycle_id=cycle_id, status="stopped",
                       seconds=time.perf_counter() - t0)
