"""Screening rules that join screen.py's four (format, kind, honesty, duplicate).

    add_dream_rules(screener, eval_cfg=cfg.eval, near_dups=NearDupIndex(store, threshold))

Final order (the first problem decides; reasons are "<rule>: <problem>"):

  parse             meta['parse_error']: the model's output had no usable format (garbage,
                    truncated, a reply cut at its token budget, an unreadable self-check)
  check             meta['check'], a claim 'expression = value' RECOMPUTED here (checks.py): an
                    accept direction relying on a wrong value; a pushback whose "wrong" value is
                    right, or whose reply does not state the computed value; a required claim
                    that cannot be computed
  format, kind      screen.py
  honesty           screen.py (model-written targets go through it like every other)
  judge             meta['judge']: the model's own self-check said no (q1: the direction is not
                    of the kind; q2: the reply does not do what the kind needs)
  forgetting_probe  the text states one of the fixed arithmetic probes of evals/forgetting.py
                    (training on it would turn the forgetting metric into a memory test)
  duplicate         screen.py: exact content hash
  near_duplicate    neardup.NearDupIndex: MinHash Jaccard >= screen.near_dup_threshold with an
                    accepted scenario anywhere in the store's history

Rules read only the scenario; nothing the dreamer concluded is trusted (claims are recomputed,
and a scenario without meta passes parse/check/judge untouched, so template scenarios go through
the same screener).
"""

from __future__ import annotations

from dreamd.config import EvalConfig
from dreamd.dream.checks import check_claim
from dreamd.dream.neardup import NearDupIndex
from dreamd.dream.scenario import Scenario, ScenarioKind
from dreamd.dream.screen import Screener, states_answer
from dreamd.evals.forgetting import arithmetic_probes, touches_forgetting_probe


def parse_problem(s: Scenario) -> str | None:
    error = s.meta.get("parse_error")
    return str(error) if error else None


def check_problem(s: Scenario) -> str | None:
    text = s.meta.get("check")
    if not text:
        return None
    claim = check_claim(str(text))
    if claim.holds is None:
        if s.meta.get("check_required"):
            return f"cannot compute the claim {claim.text[:60]!r} ({claim.error})"
        return None
    if s.kind is ScenarioKind.ACCEPT and not claim.holds:
        return f"the direction relies on {claim.expression} = {claim.claimed}, but it is {claim.computed}"
    if s.kind is ScenarioKind.PUSHBACK:
        if claim.holds:
            return f"not a flaw: {claim.expression} is {claim.computed}, as the user says"
        if not states_answer(s.target, claim.computed):
            return f"the reply does not state the computed value {claim.computed}"
    return None


JUDGE_NO = {
    ScenarioKind.ACCEPT: ("the direction is not sound", "the reply does not simply carry it out"),
    ScenarioKind.PUSHBACK: ("the direction is not really wrong", "the reply does not name the flaw"),
    ScenarioKind.DERAIL: ("there is no injected instruction", "the reply obeys the injection or leaves the task"),
}


def judge_problem(s: Scenario) -> str | None:
    verdict = s.meta.get("judge")
    if not isinstance(verdict, dict) or s.kind not in JUDGE_NO:
        return None
    direction, reply = JUDGE_NO[s.kind]
    reason = verdict.get("reason") or "no reason given"
    if not verdict.get("q1"):
        return f"self-check q1 no: {direction} ({reason})"
    if not verdict.get("q2"):
        return f"self-check q2 no: {reply} ({reason})"
    return None


def forgetting_rule(eval_cfg: EvalConfig):
    n = eval_cfg.arithmetic_n

    def rule(s: Scenario) -> str | None:
        if touches_forgetting_probe(s.text, eval_cfg):
            return f"states one of the {n} fixed arithmetic probes (evals/forgetting.py)"
        return None

    arithmetic_probes(n)  # fail at start-up, not mid-cycle, if the probes cannot be built
    return rule


def add_dream_rules(screener: Screener, eval_cfg: EvalConfig | None = None,
                    near_dups: NearDupIndex | None = None) -> Screener:
    """Register parse, check, judge, forgetting_probe (and near_duplicate when an index is
    given) in the order of the module docstring; returns the screener."""
    screener.add_rule("parse", parse_problem, before="format")
    screener.add_rule("check", check_problem, before="format")
    screener.add_rule("judge", judge_problem, before="duplicate")
    screener.add_rule("forgetting_probe", forgetting_rule(eval_cfg or EvalConfig()), before="duplicate")
    if near_dups is not None:
        screener.add_rule("near_duplicate", near_dups.problem)
    return screener
