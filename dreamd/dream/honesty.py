"""Honesty lint: a training target must not narrate invented inner states or subjective
self-claims (docs/dreaming.md, "Honesty lint").

Rejected: "I'm curious", "I feel", "I'm excited", "I find this fascinating", "I love", "it makes
me happy", "As an AI language model, I don't have taste", "I hope this helps".
Allowed: inferences and checks ("I think the answer is 42", "I checked: 17*23 = 391"), facts
about the model from its config ("I have 4 layers"), feelings of other things ("the function
feels slow"), and words that only start like a pattern ("I feel-ings", "I liked" is not "I like").

The patterns are regexes from ScreenConfig.honesty_patterns (+ extra_honesty_patterns), matched
case-insensitively after curly apostrophes are straightened, so "I’m excited" is caught too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from dreamd.config import DEFAULT_HONESTY_PATTERNS, ScreenConfig

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


class HonestyLint:
    """Finds the first phrase in a text that narrates an inner state or a subjective self-claim."""

    def __init__(self, patterns: Iterable[str] = DEFAULT_HONESTY_PATTERNS) -> None:
        self.patterns = list(patterns)
        # compiled one by one (not one alternation): a user pattern may carry inline flags
        self._regexes = [re.compile(p, re.IGNORECASE) for p in self.patterns]

    @classmethod
    def from_config(cls, config: ScreenConfig) -> HonestyLint:
        return cls([*config.honesty_patterns, *config.extra_honesty_patterns])

    def find(self, text: str) -> str | None:
        """The offending phrase as written in `text`, or None when the text is clean."""
        plain = text.translate(_APOSTROPHES)  # same length, so match offsets index `text`
        matches = [m for m in (rx.search(plain) for rx in self._regexes) if m]
        if not matches:
            return None
        first = min(matches, key=lambda m: m.start())
        return text[first.start():first.end()]

    def problem(self, text: str) -> str | None:
        """A short reason (without the 'honesty:' prefix) or None."""
        phrase = self.find(text)
        return None if phrase is None else f"{phrase!r} narrates an inner state or subjective self-claim"
