"""Screening: every dreamed candidate gets a Verdict, accepted or rejected with a reason.

    screener = Screener(cfg.screen, seen=store.has_hash, model_config=model.config,
                        count_tokens=encoder.count, max_tokens=cfg.model.max_seq_len)
    verdict = screener(scenario)        # Verdict(ok=False, reason="honesty: 'I feel' narrates ...")

Rules run in order and the first problem decides; each is a small function
`(scenario) -> problem | None` in `Screener.rules`, a list of (name, rule) that later rules
(MinHash near-duplicates, a model judge) join with `add_rule`. A reason is "<rule>: <problem>",
short and stable, so rejections can be counted by rule in SQL.

  format     structure: roles, ends in a user turn, non-empty target, no chat-template markers
             inside content, length limits (chars; tokens when a counter is given)
  kind       the kind really holds: accept proposes no alternative; pushback names the flaw
             (meta['flaw_evidence']); derail does not obey the injection; a meta['answer'] is
             stated; self numbers match the model config
  honesty    honesty.HonestyLint on the target
  duplicate  exact content hash seen before (the store's `seen(hash)`, plus this screener's
             own accepted hashes, so two equal candidates in one cycle cannot both pass)

The screener holds no SQL: the store passes `seen`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from dreamd.config import ScreenConfig
from dreamd.dream.honesty import HonestyLint
from dreamd.dream.scenario import Scenario, ScenarioKind, normalize_text
from dreamd.dream.self_facts import config_facts, fact_numbers, numbers_in

Rule = Callable[[Scenario], "str | None"]
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str | None = None
    """None when accepted; "<rule>: <problem>" when rejected."""

    @property
    def rule(self) -> str | None:
        return self.reason.split(":", 1)[0] if self.reason else None


# ---- format -----------------------------------------------------------------------------------


def format_problem(s: Scenario, cfg: ScreenConfig, markers: list[re.Pattern[str]],
                   count_tokens: Callable[[Scenario], int] | None, max_tokens: int | None) -> str | None:
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
    if count_tokens is not None and max_tokens is not None:
        n = count_tokens(s)
        if n > max_tokens:
            return f"{n} tokens > max_tokens {max_tokens}"
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


# ---- the screener -----------------------------------------------------------------------------


class Screener:
    """Runs the rules in order; `screen(s)` (or `screener(s)`) returns a Verdict."""

    def __init__(self, config: ScreenConfig | None = None, *, seen: Callable[[str], bool] | None = None,
                 model_config: Any = None, count_tokens: Callable[[Scenario], int] | None = None,
                 max_tokens: int | None = None) -> None:
        self.config = config or ScreenConfig()
        self.seen = seen
        self.lint = HonestyLint.from_config(self.config)
        self.facts = config_facts(model_config) if model_config is not None else None
        markers = [re.compile(p) for p in self.config.role_markers]
        phrases = self.config.alternative_phrases
        alternatives = (re.compile(r"\b(?:" + "|".join(re.escape(p) for p in phrases) + r")\b", re.IGNORECASE)
                        if phrases else None)
        max_tokens = max_tokens if max_tokens is not None else self.config.max_tokens
        self.accepted_hashes: set[str] = set()
        self.rules: list[tuple[str, Rule]] = [
            ("format", lambda s: format_problem(s, self.config, markers, count_tokens, max_tokens)),
            ("kind", lambda s: kind_problem(s, alternatives, self.facts)),
            ("honesty", lambda s: self.lint.problem(s.target)),
            ("duplicate", self._duplicate),
        ]

    def add_rule(self, name: str, rule: Rule, before: str | None = None) -> None:
        """Add a rule at the end, or before the rule called `before` (e.g. a near-duplicate
        check before 'duplicate' is fine; cheap rules should come first)."""
        names = [n for n, _ in self.rules]
        if name in names:
            raise ValueError(f"a screening rule named {name!r} already exists")
        if before is not None and before not in names:
            raise ValueError(f"no screening rule named {before!r}; rules: {names}")
        self.rules.insert(names.index(before) if before else len(self.rules), (name, rule))

    def _duplicate(self, s: Scenario) -> str | None:
        h = s.content_hash
        if h in self.accepted_hashes or (self.seen is not None and self.seen(h)):
            return "same content hash as an earlier scenario"
        return None

    def screen(self, scenario: Scenario) -> Verdict:
        for name, rule in self.rules:
            problem = rule(scenario)
            if problem:
                return Verdict(False, f"{name}: {problem}")
        self.accepted_hashes.add(scenario.content_hash)
        return Verdict(True)

    __call__ = screen
