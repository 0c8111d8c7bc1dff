"""Screening: every dreamed candidate gets a Verdict, accepted or rejected with a reason.

    screener = Screener(cfg.screen, seen=store.has_hash, model_config=model.config,
                        probe=probes.screen_rule(), forgetting=forgetting_rule(cfg.eval),
                        near_dups=index.problem, encode=encode)
    verdict = screener(scenario)    # Verdict(ok=False, reason="honesty: 'I feel' narrates ...")
    verdict.encoded                 # the training example, when accepted and `encode` was given

THE ORDER (the first problem decides; a reason is "<rule>: <problem>", short and stable, so
rejections can be counted by rule in SQL; cheap rules come first):

  parse             the model's output had no usable format          screen_rules.parse_problem
  check             a stated claim, recomputed, does not hold          screen_rules.check_problem
  format            structure and character limits                    screen_rules.format_problem
  probe             (the run's) a held-out probe domain or conversation  evals/probes.py
  kind              the kind really holds                             screen_rules.kind_problem
  honesty           honesty.HonestyLint on the target
  judge             the model's own self-check said no                screen_rules.judge_problem
  forgetting_probe  (the run's) states a fixed arithmetic probe       evals/forgetting.py
  duplicate         exact content hash seen before (the store's `seen`, plus this screener's
                    own accepted hashes, so two equal candidates in one cycle cannot both pass)
  near_duplicate    (the run's) MinHash Jaccard >= screen.near_dup_threshold    neardup.py
  encode            (the run's) the chat template renders it as a training example within
                    model.max_seq_len tokens (train/examples.py), and screen.max_tokens

A rule the caller does not pass is skipped. The store enforces uniqueness again when the
scenario is written (last line of defence); the screener is where a duplicate is rejected with
its reason. The screener holds no SQL: the store passes `seen`, the index its lookup.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dreamd.config import ScreenConfig
from dreamd.dream.honesty import HonestyLint
from dreamd.dream.scenario import Scenario
from dreamd.dream.screen_rules import (check_problem, format_problem, judge_problem, kind_problem,
                                       parse_problem)
from dreamd.dream.self_facts import config_facts

Rule = Callable[[Scenario], "str | None"]
Encode = Callable[[Scenario], Any]
"""Scenario -> training example (with `n_tokens`); raises ValueError with the reason."""


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str | None = None
    """None when accepted; "<rule>: <problem>" when rejected."""
    encoded: Any = None
    """The training example the `encode` rule built (accepted verdicts, when one was given)."""

    @property
    def rule(self) -> str | None:
        return self.reason.split(":", 1)[0] if self.reason else None


class Screener:
    """Runs the rules in the module docstring's order; `screen(s)` (or `screener(s)`) returns
    a Verdict. `rules` is that list as (name, rule), the run's own rules included."""

    def __init__(self, config: ScreenConfig | None = None, *, seen: Callable[[str], bool] | None = None,
                 model_config: Any = None, probe: Rule | None = None, forgetting: Rule | None = None,
                 near_dups: Rule | None = None, encode: Encode | None = None) -> None:
        self.config = config or ScreenConfig()
        self.seen = seen
        self.lint = HonestyLint.from_config(self.config)
        self.facts = config_facts(model_config) if model_config is not None else None
        self.encode = encode
        markers = [re.compile(p) for p in self.config.role_markers]
        phrases = self.config.alternative_phrases
        alternatives = (re.compile(r"\b(?:" + "|".join(re.escape(p) for p in phrases) + r")\b", re.IGNORECASE)
                        if phrases else None)
        self.accepted_hashes: set[str] = set()
        ordered: list[tuple[str, Rule | None]] = [
            ("parse", parse_problem),
            ("check", check_problem),
            ("format", lambda s: format_problem(s, self.config, markers)),
            ("probe", probe),
            ("kind", lambda s: kind_problem(s, alternatives, self.facts)),
            ("honesty", lambda s: self.lint.problem(s.target)),
            ("judge", judge_problem),
            ("forgetting_probe", forgetting),
            ("duplicate", self._duplicate),
            ("near_duplicate", near_dups),
        ]
        self.rules: list[tuple[str, Rule]] = [(name, rule) for name, rule in ordered if rule is not None]

    def _duplicate(self, s: Scenario) -> str | None:
        h = s.content_hash
        if h in self.accepted_hashes or (self.seen is not None and self.seen(h)):
            return "same content hash as an earlier scenario"
        return None

    def _encode(self, s: Scenario) -> tuple[Any, str | None]:
        if self.encode is None:
            return None, None
        try:
            encoded = self.encode(s)
        except ValueError as exc:
            return None, f"encode: {exc}"
        limit = self.config.max_tokens
        if limit is not None and encoded.n_tokens > limit:
            return None, f"encode: {encoded.n_tokens} tokens > max_tokens {limit}"
        return encoded, None

    def screen(self, scenario: Scenario) -> Verdict:
        for name, rule in self.rules:
            problem = rule(scenario)
            if problem:
                return Verdict(False, f"{name}: {problem}")
        encoded, problem = self._encode(scenario)
        if problem:
            return Verdict(False, problem)
        self.accepted_hashes.add(scenario.content_hash)
        return Verdict(True, encoded=encoded)

    __call__ = screen
