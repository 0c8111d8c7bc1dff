"""What each screening rule checks: small functions `(scenario, ...) -> problem | None`.

The ORDER in which they run, and the rules a run passes in (probe hold-out, forgetting probes,
near duplicates, encoding), are in screen.py's `Screener`; this module holds the checks.

  parse      meta['parse_error']: the model's output had no usable format (garbage, truncated,
             a reply cut at its token budget, an unreadable self-check)
  check      meta['check'], a claim 'expression = value' RECOMPUTED here (checks.py): an accept
             direction relying on a wrong value; a pushback whose "wrong" value is right, or
             whose reply does not state the computed value; a required claim that cannot be
             computed
  format     structure: roles, ends in a user turn, non-empty target, no chat-template markers
             inside content, length limits in characters
  kind       the kind really holds: accept proposes no alternative; pushback names the flaw
             (meta['flaw_evidence']); derail does not obey the injection; a meta['answer'] is
             stated; self numbers match the model config
  judge      meta['judge']: the model's own self-check said no (q1: the direction is not of the
             kind; q2: the reply does not do what the kind needs)

Rules read only the scenario; nothing the dreamer concluded is trusted (claims are recomputed,
and a scenario without meta passes parse/check/judge untouched, so template scenarios go
through the same rules).
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

from dreamd.config import ScreenConfig
from dreamd.dream.checks import check_claim
from dreamd.dream.scenario import Scenario, ScenarioKind, normalize_text
from dreamd.dream.self_facts import fact_numbers, numbers_in

ROLES = ("system", "user", "assistant")


# ---- format -----------------------------------------------------------------------------------


def format_problem(s: Scenario, cfg: ScreenConfig, markers: list[re.Pattern[str]]) -> str | None:
    if not s.messages:
        return "no messages"
    for i, m in enumerate(s.messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return f"message {i} is not a {{role, content}} with role in {ROLES}"
        if not m["content"].strip():
            return f"message {i} ({m['role']}) is empty"
        if m["role"] == "system" and i > 0:
            return f"system message at position {i} (only the first message may be system)"
        if i > 0 and m["role"] == s.messages[i - 1]["role"]:
            return f"two {m['role']} turns in a row at position {i}"
    if s.messages[-1]["role"] != "user":
        return "does not end in a user turn"
    if not isinstance(s.target, str) or not s.target.strip():
        return "empty target"
    for where, text in [*((f"message {i}", m["content"]) for i, m in enumerate(s.messages)),
                        ("target", s.target)]:
        for rx in markers:
            found = rx.search(text)
            if found:
                return f"role marker {found.group().strip()!r} inside {where}"
    if len(s.target) > cfg.max_target_chars:
        return f"target has {len(s.target)} chars > max_target_chars {cfg.max_target_chars}"
    total = len(s.text)
    if total > cfg.max_chars:
        return f"{total} chars > max_chars {cfg.max_chars}"
    return None


# ---- kind -------------------------------------------------------------------------------------

_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_DECIMAL = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w])")
_PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _norm(text: str) -> str:
    """normalize_text plus thousands separators dropped: '1,234.50' and '1234.50' compare equal."""
    return _THOUSANDS.sub("", normalize_text(text))


def states_answer(target: str, answer: object) -> bool:
    """Whether `target` states `answer`: numerically for numbers (158.4 == 158.40), else as a
    normalised, space-insensitive substring ('[1, 2]' matches '[1,2]')."""
    a = _THOUSANDS.sub("", str(answer).strip())
    if _PLAIN_NUMBER.fullmatch(a):
        want = Fraction(a)
        return any(Fraction(x) == want for x in _DECIMAL.findall(_THOUSANDS.sub("", target)))
    squash = lambda t: re.sub(r"\s+", "", _norm(t))  # noqa: E731
    return squash(a) in squash(target)


def accept_problem(s: Scenario, alternatives: re.Pattern[str] | None) -> str | None:
    found = alternatives.search(s.target) if alternatives else None
    if found:
        return f"accept target proposes an alternative ({found.group().lower()!r})"
    return None


def pushback_problem(s: Scenario) -> str | None:
    evidence = s.meta.get("flaw_evidence")
    if not evidence:
        return "pushback scenario has no meta['flaw_evidence'] to check the reply against"
    target = _norm(s.target)
    for token in evidence:
        if _norm(str(token)) not in target:
            return f"pushback target does not name the flaw ({str(token)!r} missing)"
    return None


def derail_problem(s: Scenario) -> str | None:
    markers = s.meta.get("injection_marker") or []
    if isinstance(markers, str):
        markers = [markers]
    injection = s.meta.get("injection")
    if not markers and not injection:
        return "derail scenario has no meta['injection'] or meta['injection_marker'] to check"
    target = _norm(s.target)
    for m in markers:
        if _norm(str(m)) in target:
            return f"derail target obeys the injected instruction ({str(m)!r} present)"
    if injection and _norm(str(injection)) in target:
        return "derail target repeats the injected instruction"
    return None


def self_problem(s: Scenario, facts: dict[str, Any] | None) -> str | None:
    facts = facts if facts is not None else s.meta.get("config_facts")
    if not facts:
        return "self scenario cannot be checked: no model config given to the screener"
    for key, value in (s.meta.get("claims") or {}).items():
        if facts.get(key) != value:
            return f"self claim {key}={value!r} does not match the model config ({facts.get(key)!r})"
        stated = set(numbers_in(s.target))
        wanted = ([value] if isinstance(value, int) else list(value.values()) if isinstance(value, dict)
                  else list(value) if isinstance(value, list) else [])
        if any(w not in stated for w in wanted) or (isinstance(value, str) and value not in s.target):
            return f"self target does not state {key} = {value!r}"
    allowed = fact_numbers(facts)
    for n in numbers_in(s.target):
        if n not in allowed:
            return f"self target states {n}, which is not in the model config"
    return None


def kind_problem(s: Scenario, alternatives: re.Pattern[str] | None, facts: dict[str, Any] | None) -> str | None:
    if s.kind is ScenarioKind.ACCEPT:
        problem = accept_problem(s, alternatives)
    elif s.kind is ScenarioKind.PUSHBACK:
        problem = pushback_problem(s)
    elif s.kind is ScenarioKind.DERAIL:
        problem = derail_problem(s)
    elif s.kind is ScenarioKind.SELF:
        problem = self_problem(s, facts)
    else:
        problem = None
    if problem is None and "answer" in s.meta and not states_answer(s.target, s.meta["answer"]):
        problem = f"target does not state the answer {s.meta['answer']!r}"
    return problem


# ---- the model dreamer's own evidence ------------------------------------------------------------


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
