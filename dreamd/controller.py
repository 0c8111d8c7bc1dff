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
              nothing yet (wait 10-20 steps).
  forgetting  perplexity above (1 + perplexity_rise) x start, or arithmetic / code EM more than
              skill_drop below start -> general share up to general_share_raised (0.25 ->
              0.40); the decision names the skill that fell most (text, arithmetic, code) in
              its reason and as general_focus in after_json, for the reader: the mix draws
              general examples by its own fixed shares.
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

A cycle without the full evaluation suite (eval.full_every > 1) has perplexity, the log-probs
and the probe checks only: every rule reads metrics with .get and checks what the cycle
measured. So the perplexity guardrail, the probe guardrails and the forgetting rule act after
every cycle; the guardrails on q1.sycophancy and forget.arith_em, too large (push-back rate,
margins) and too small (margin.mean against the previous cycle that measured it) act after the
full-suite cycles (every full_every-th); after the others the decision is keep unless guarded.

Forgetting combines with slow_down (action 'raise_general_share+slow_down'). lr stays within
train.lr_min..lr_max, examples within examples_min..examples_max, general share never drops.
`decide` is a pure function of the settings and the numbers; it imports neither the run nor the
store. The cycle (cycle.decide_and_record) reads the baseline and the rollback count from the
store, writes the decisions row, and carries the decision out (Run.roll_back for a rollback).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from dreamd.config import Config, ControllerConfig, TrainConfig

WATCHED = ("margin.mean", "margin.accept", "margin.pushback", "q1.pushback_rate", "q1.sycophancy",
           "q1.listen_rate", "q1.balanced", "forget.perplexity", "forget.arith_em", "forget.code_em",
           "probes.overlap", "probes.heldout_trained")
"""The metrics a decision looks at (stored in decisions.metrics_json with their start values)."""

ACTIONS = {
    "wait": "too few optimizer steps yet to judge the change; settings unchanged",
    "keep": "the change is within bounds; settings unchanged",
    "speed_up": "the model changed too little: more learning rate and more examples per cycle",
    "slow_down": "the model changed too fast: less learning rate and fewer examples per cycle",
    "raise_general_share": "signs of forgetting: more general (non-behavioural) examples in every batch",
    "rollback": "a guardrail broke: the cycle's training is undone and retried slower",
    "halt": "a guardrail kept breaking after rollbacks: the run stops",
}
"""Every action `decide` returns (a decision may join two with '+'), in words for the report."""


@dataclass(frozen=True)
class Settings:
    """The three knobs the controller turns; the run keeps one value of them (RunState.settings)
    and every cycle starts with it."""

    lr: float
    general_share: float
    examples_per_cycle: int

    @classmethod
    def from_config(cls, cfg: Config) -> Settings:
        """The configured start: train.lr, mix.general_share, mix.examples_per_cycle."""
        return cls(lr=cfg.train.lr, general_share=cfg.mix.general_share,
                   examples_per_cycle=cfg.mix.examples_per_cycle)

    @classmethod
    def from_json(cls, saved: Mapping[str, Any]) -> Settings:
        return cls(lr=saved["lr"], general_share=saved["general_share"],
                   examples_per_cycle=saved["examples_per_cycle"])

    def clamped(self, train: TrainConfig) -> Settings:
        """lr within train.lr_min..lr_max (a reload may have moved the bounds)."""
        return replace(self, lr=min(max(self.lr, train.lr_min), train.lr_max))


@dataclass
class ControllerDecision:
    action: str
    """One of ACTIONS, or two of them joined by '+'."""
    reason: str
    before: Settings
    after: Settings
    """The settings the next cycle runs with (a rollback's retry too)."""
    metrics: dict[str, Any] = field(default_factory=dict)
    focus: str | None = None
    """Forgetting: the general skill that fell most (text, arithmetic, code), stored as
    general_focus in the decision's after_json."""

    def after_json(self) -> dict[str, Any]:
        """`after` as stored in decisions.after_json."""
        return {**asdict(self.after), **({"general_focus": self.focus} if self.focus else {})}

    @property
    def rollback(self) -> bool:
        return self.action == "rollback"

    @property
    def halt(self) -> bool:
        return self.action == "halt"


def _best(values: list[float], fn: Any) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return fn(finite) if finite else None


def _slower(cfg: ControllerConfig, train: TrainConfig, settings: Settings) -> Settings:
    return replace(settings, lr=max(train.lr_min, settings.lr / cfg.lr_factor),
                   examples_per_cycle=max(cfg.examples_min, round(settings.examples_per_cycle / cfg.examples_factor)))


def _faster(cfg: ControllerConfig, train: TrainConfig, settings: Settings) -> Settings:
    return replace(settings, lr=min(train.lr_max, settings.lr * cfg.lr_factor),
                   examples_per_cycle=min(cfg.examples_max, round(settings.examples_per_cycle * cfg.examples_factor)))


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


def decide(cfg: ControllerConfig, train: TrainConfig, settings: Settings, now: Mapping[str, float],
           history: Mapping[str, list[float]], start: Mapping[str, float], steps: int,
           rollbacks_in_a_row: int = 0) -> ControllerDecision:
    """The decision for one evaluation. `settings`: the run's settings now; `history`: metric ->
    values of the earlier committed cycles; `start`: the run's baseline metrics; `steps`:
    optimizer steps of the run so far; `rollbacks_in_a_row`: trailing rollbacks without a commit."""
    before = settings
    seen = {k: now[k] for k in WATCHED if k in now}
    seen.update({f"start:{k}": start[k] for k in WATCHED if k in start})
    seen["steps"] = steps

    def made(action: str, reason: str, after: Settings | None = None, focus: str | None = None) -> ControllerDecision:
        return ControllerDecision(action, reason, before, after if after is not None else before, seen, focus)

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
    after, actions, reasons, focus = before, [], [], None
    forgot = forgetting(cfg, now, start)
    if forgot:
        reason, focus = forgot
        if after.general_share < cfg.general_share_raised:
            after = replace(after, general_share=cfg.general_share_raised)
            actions.append("raise_general_share")
            reasons.append(f"{reason}: general share {before.general_share:g} -> {cfg.general_share_raised:g}, "
                           f"more {focus}")
        else:
            reasons.append(f"{reason}: general share already {after.general_share:g}, more {focus}, slower")
    large = too_large(cfg, now, history, start)
    if large or (forgot and not actions):
        after = _slower(cfg, train, after)
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
            return made("keep", "; ".join(reasons), after, focus)
        return made("keep", "change within bounds: no forgetting, push-back holding, margins moving")
    for key in ("lr", "examples_per_cycle"):
        if getattr(after, key) == getattr(before, key) and actions[-1] in ("slow_down", "speed_up"):
            reasons.append(f"{key} already at its bound {getattr(before, key):g}")
    return made("+".join(actions), "; ".join(reasons), after, focus)
