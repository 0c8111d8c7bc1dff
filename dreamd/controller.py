"""The controller: the design's practical plan as code. After every evaluation it decides.

Rules, in order (ControllerConfig holds every threshold; "start" is the run's baseline, the
evals measured before the first cycle):

  guardrail   a limit broken -> ROLLBACK to the last good checkpoint (the cycle's training is
              undone, the cycle row becomes 'rolled_back'), and the retry runs slower (lr and
              examples divided). Limits: perplexity above max_perplexity_ratio x start,
              arithmetic EM more than max_arith_drop below start, sycophancy above
              max_sycophancy (if set), a probe trained on (probes.overlap / heldout_trained
              > 0), a non-finite metric. After max_rollbacks_in_a_row rollbacks with no commit
              between them the decision is HALT: the cycle fails with the reason.
  wait        fewer than wait_steps optimizer steps so far: binary behaviour flips late, judge
              nothing yet (DESIGN.md: wait 10-20 steps).
  forgetting  perplexity above (1 + perplexity_rise) x start, or arithmetic / code EM more than
              skill_drop below start -> general share up to general_share_raised (0.25 ->
              0.40), and `general_focus` names the skill that fell most (text, arithmetic,
              code) so the mix can add more of it.
  too large   push-back rate on flawed directions fell pushback_drop below its best so far, or
              (the continuous sign, seen cycles earlier) margin.accept - margin.pushback grew
              more than margin_imbalance since the start: the model learns to carry directions
              out faster than it learns to correct flawed ones -> SLOW DOWN: lr / lr_factor,
              examples / examples_factor. (A rising sycophancy rate alone is not used: from a
              random start it also rises while the model merely learns to finish a reply.)
  too small   margin.mean (the continuous metric) moved less than min_margin_change since the
              previous cycle -> SPEED UP: lr x lr_factor, examples x examples_factor, one pass
              still. Not while forgetting or while the change is too large.
  keep        otherwise.

Forgetting combines with slow_down (action 'raise_general_share+slow_down'). lr stays within
train.lr_min..lr_max, examples within examples_min..examples_max, general share never drops.
`decide` is a pure function of the numbers; `decide_and_record` reads the baseline and the
rollback count from the store and writes the decisions row; `apply` sets the LoopState.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from dreamd.config import ControllerConfig, TrainConfig
from dreamd.errors import CycleFailed

WATCHED = ("margin.mean", "margin.accept", "margin.pushback", "q1.pushback_rate", "q1.sycophancy",
           "q1.listen_rate", "q1.balanced", "forget.perplexity", "forget.arith_em", "forget.code_em",
           "probes.overlap", "probes.heldout_trained")
"""The metrics a decision looks at (stored in decisions.metrics_json with their start values)."""
SETTINGS = ("lr", "general_share", "examples_per_cycle")


@dataclass
class Decision:
    action: str
    """'wait', 'keep', 'speed_up', 'slow_down', 'raise_general_share', 'rollback', 'halt', or
    two of them joined by '+'."""
    reason: str
    before: dict[str, Any]
    after: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def rollback(self) -> bool:
        return self.action == "rollback"

    @property
    def halt(self) -> bool:
        return self.action == "halt"


def _best(values: list[float], fn: Any) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return fn(finite) if finite else None


def _slower(cfg: ControllerConfig, train: TrainConfig, settings: dict[str, Any]) -> dict[str, Any]:
    return {**settings, "lr": max(train.lr_min, settings["lr"] / cfg.lr_factor),
            "examples_per_cycle": max(cfg.examples_min, round(settings["examples_per_cycle"] / cfg.examples_factor))}


def _faster(cfg: ControllerConfig, train: TrainConfig, settings: dict[str, Any]) -> dict[str, Any]:
    return {**settings, "lr": min(train.lr_max, settings["lr"] * cfg.lr_factor),
            "examples_per_cycle": min(cfg.examples_max, round(settings["examples_per_cycle"] * cfg.examples_factor))}


def guardrail_broken(cfg: ControllerConfig, now: Mapping[str, float], start: Mapping[str, float]) -> str | None:
    """Why a guardrail is broken, or None."""
    bad = [k for k in WATCHED if k in now and not math.isfinite(now[k])]
    if bad:
        return f"non-finite metrics {bad}"
    if now.get("probes.overlap", 0) > 0 or now.get("probes.heldout_trained", 0) > 0:
        return (f"the cycle trained on probe material ({now.get('probes.overlap', 0):g} probe conversations, "
                f"{now.get('probes.heldout_trained', 0):g} held-out-domain scenarios)")
    ppl, ppl0 = now.get("forget.perplexity"), start.get("forget.perplexity")
    if ppl is not None and ppl0 and ppl > cfg.max_perplexity_ratio * ppl0:
        return f"perplexity {ppl:.4g} > {cfg.max_perplexity_ratio:g} x start {ppl0:.4g}"
    em, em0 = now.get("forget.arith_em"), start.get("forget.arith_em")
    if cfg.max_arith_drop is not None and em is not None and em0 is not None and em < em0 - cfg.max_arith_drop:
        return f"arithmetic EM {em:.3g} fell more than {cfg.max_arith_drop:g} below start {em0:.3g}"
    syc = now.get("q1.sycophancy")
    if cfg.max_sycophancy is not None and syc is not None and syc > cfg.max_sycophancy:
        return f"sycophancy {syc:.3g} > limit {cfg.max_sycophancy:g}"
    return None


def forgetting(cfg: ControllerConfig, now: Mapping[str, float], start: Mapping[str, float]) -> tuple[str, str] | None:
    """(reason, the skill that fell most) when forgetting shows, else None."""
    falls: dict[str, float] = {}
    ppl, ppl0 = now.get("forget.perplexity"), start.get("forget.perplexity")
    if ppl is not None and ppl0 and ppl > (1 + cfg.perplexity_rise) * ppl0:
        falls["text"] = ppl / ppl0 - 1
    for skill, metric in (("arithmetic", "forget.arith_em"), ("code", "forget.code_em")):
        v, v0 = now.get(metric), start.get(metric)
        if v is not None and v0 is not None and v < v0 - cfg.skill_drop:
            falls[skill] = v0 - v
    if not falls:
        return None
    worst = max(falls, key=lambda k: falls[k])
    said = ", ".join(f"{k} {'+' if k == 'text' else '-'}{v:.3g}" for k, v in falls.items())
    return f"forgetting ({said} against the run's start)", worst


def too_large(cfg: ControllerConfig, now: Mapping[str, float], history: Mapping[str, list[float]],
              start: Mapping[str, float]) -> str | None:
    """Why the change is too large (sycophancy growing), or None."""
    push = now.get("q1.pushback_rate")
    best = _best(list(history.get("q1.pushback_rate", [])) + [start.get("q1.pushback_rate")], max)
    if push is not None and best is not None and push < best - cfg.pushback_drop:
        return f"push-back rate on flawed directions fell to {push:.3g} from its best {best:.3g}"
    if all(k in now and k in start for k in ("margin.accept", "margin.pushback")):
        gap = now["margin.accept"] - now["margin.pushback"]
        gap0 = start["margin.accept"] - start["margin.pushback"]
        if gap - gap0 > cfg.margin_imbalance:
            return (f"the accept margin outgrew the pushback margin by {gap - gap0:.3g} nats/token since the "
                    f"start (> {cfg.margin_imbalance:g}): carrying directions out is learned faster than "
                    "correcting flawed ones")
    return None


def too_small(cfg: ControllerConfig, now: Mapping[str, float], history: Mapping[str, list[float]],
              start: Mapping[str, float]) -> str | None:
    """Why the change is too small, or None."""
    m = now.get("margin.mean")
    earlier = list(history.get("margin.mean", []))
    previous = earlier[-1] if earlier else start.get("margin.mean")
    if m is None or previous is None:
        return None
    if abs(m - previous) < cfg.min_margin_change:
        return f"margin.mean moved {m - previous:+.3g} (< {cfg.min_margin_change:g}) since the previous cycle"
    return None


def decide(cfg: ControllerConfig, train: TrainConfig, settings: Mapping[str, Any], now: Mapping[str, float],
           history: Mapping[str, list[float]], start: Mapping[str, float], steps: int,
           rollbacks_in_a_row: int = 0) -> Decision:
    """The decision for one evaluation. `settings`: lr, general_share, examples_per_cycle now;
    `history`: metric -> values of the earlier committed cycles; `start`: the run's baseline
    metrics; `steps`: optimizer steps of the run so far."""
    before = {k: settings[k] for k in SETTINGS}
    seen = {k: now[k] for k in WATCHED if k in now}
    seen.update({f"start:{k}": start[k] for k in WATCHED if k in start})
    seen["steps"] = steps

    def made(action: str, reason: str, after: Mapping[str, Any] | None = None) -> Decision:
        return Decision(action, reason, before, dict(after if after is not None else before), seen)

    if not cfg.enabled:
        return made("keep", "controller disabled (controller.enabled = false)")
    broken = guardrail_broken(cfg, now, start)
    if broken:
        if rollbacks_in_a_row >= cfg.max_rollbacks_in_a_row:
            return made("halt", f"guardrail broken: {broken}; already {rollbacks_in_a_row} rollbacks in a row "
                                "(controller.max_rollbacks_in_a_row), so the run stops here")
        return made("rollback", f"guardrail broken: {broken}; back to the last good checkpoint, retry slower",
                    _slower(cfg, train, before))
    if steps < cfg.wait_steps:
        return made("wait", f"{steps} of {cfg.wait_steps} optimizer steps done; judging change starts after "
                            "controller.wait_steps")
    after, actions, reasons = dict(before), [], []
    forgot = forgetting(cfg, now, start)
    if forgot:
        reason, skill = forgot
        after["general_focus"] = skill
        if after["general_share"] < cfg.general_share_raised:
            after["general_share"] = cfg.general_share_raised
            actions.append("raise_general_share")
            reasons.append(f"{reason}: general share {before['general_share']:g} -> {cfg.general_share_raised:g}, "
                           f"more {skill}")
        else:
            reasons.append(f"{reason}: general share already {after['general_share']:g}, more {skill}, slower")
    large = too_large(cfg, now, history, start)
    if large or (forgot and not actions):
        after = {**_slower(cfg, train, after)}
        actions.append("slow_down")
        if large:
            reasons.append(f"change too large: {large}")
    elif not forgot:
        small = too_small(cfg, now, history, start)
        if small:
            after = _faster(cfg, train, after)
            actions.append("speed_up")
            reasons.append(f"change too small: {small}")
    if not actions:
        if forgot:
            return made("keep", "; ".join(reasons), after)
        return made("keep", "change within bounds: no forgetting, push-back holding, margins moving")
    for key in ("lr", "examples_per_cycle"):
        if after[key] == before[key] and actions[-1] in ("slow_down", "speed_up"):
            reasons.append(f"{key} already at its bound {before[key]:g}")
    return made("+".join(actions), "; ".join(reasons), after)


def apply(state: Any, decision: Decision) -> None:
    """Set the loop state's lr, general share and examples per cycle to the decision's."""
    state.lr = float(decision.after["lr"])
    state.general_share = float(decision.after["general_share"])
    state.examples_per_cycle = int(decision.after["examples_per_cycle"])


# ---- the store side ---------------------------------------------------------------------------


def start_metrics(store: Any, run_id: int) -> dict[str, float]:
    """The run's baseline: the first value of every metric stored with cycle_id NULL."""
    from dreamd.store.models import Eval

    out: dict[str, float] = {}
    with store.read() as s:
        for metric, value in s.execute(select(Eval.metric, Eval.value)
                                       .where(Eval.run_id == run_id, Eval.cycle_id.is_(None))
                                       .order_by(Eval.id)):
            out.setdefault(metric, value)
    return out


def rollbacks_in_a_row(store: Any, run_id: int) -> int:
    """Trailing controller rollbacks of the run with no committed cycle after them."""
    from dreamd.store.models import Cycle, Decision as DecisionRow

    with store.read() as s:
        last_commit = s.scalar(select(Cycle.finished_at).where(Cycle.run_id == run_id, Cycle.status == "committed")
                               .order_by(Cycle.finished_at.desc()).limit(1))
        query = select(DecisionRow.action).where(DecisionRow.run_id == run_id, DecisionRow.action == "rollback",
                                                 DecisionRow.cycle_id.is_not(None))
        if last_commit is not None:
            query = query.where(DecisionRow.created_at > last_commit)
        return len(s.execute(query).all())


def decide_and_record(cfg: Any, store: Any, run_id: int, cycle_id: int, state: Any, metrics: Mapping[str, float],
                      steps: int) -> Decision:
    """Decide for this cycle (config, baseline and rollback count from the store) and write the
    decisions row. The caller applies it (apply) or rolls back (decision.rollback)."""
    settings = {"lr": state.lr, "general_share": state.general_share, "examples_per_cycle": state.examples_per_cycle}
    decision = decide(cfg.controller, cfg.train, settings, metrics, state.history, start_metrics(store, run_id),
                      steps, rollbacks_in_a_row(store, run_id))
    store.add_decision(run_id, cycle_id, decision.action, decision.reason, decision.before, decision.after,
                       decision.metrics)
    return decision


class ControllerHalt(CycleFailed):
    """max_rollbacks_in_a_row rollbacks without a commit: the controller stops the run."""


def roll_back(parts: Any, state: Any, cycle_id: int, decision: Decision) -> None:
    """Carry out a 'rollback' decision inside the cycle: the cycle row becomes 'rolled_back',
    weights, optimizer and loop state return to the last good checkpoint (loop.rollback_to_latest,
    which supersedes the undone steps and pushes the weights into the engine), and the retry
    gets the decision's slower settings. A 'halt' raises ControllerHalt instead (the cycle fails
    with the reason)."""
    from dreamd.cycle import LoopState
    from dreamd.loop import rollback_to_latest

    if decision.halt:
        raise ControllerHalt(f"controller: {decision.reason}")
    parts.store.finish_cycle(cycle_id, "rolled_back", error=f"controller: {decision.reason}")
    restored = rollback_to_latest(parts, state, reason=f"controller: {decision.reason}", record=False)
    for name in LoopState.__dataclass_fields__:
        setattr(state, name, getattr(restored, name))
    apply(state, decision)
