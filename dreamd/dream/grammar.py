"""The template grammar: slots, templates and the small helpers every domain file shares.

A `Template` is one situation in one domain (e.g. "pandas: sort with ascending='desc'"). It
names its slots (each a finite sequence: a word pool from data/lexicon.json, a `range`, a tuple
of variants) and a `render` function that turns one value per slot into a `Draft`: the user's
direction, the target reply, and what the screener needs to check the reply (flaw evidence,
checkable answer). Every number in a target is COMPUTED from the slot values in `render`, never
typed in, so a target is right by construction.

The reachable space of a template is the product of its slot sizes (`Template.space`); the
dreamer multiplies that by its phrasing choices (system prompt, wrapper, intro, warm-up turn).
That product is an upper bound on distinct scenarios: two draws can still render the same text.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

# Flaw types of pushback scenarios (docs/dreaming.md), plus 'wrong_fact' for a false
# statement about how a tool behaves (HTTP status classes, numpy defaults).
FLAWS = ("wrong_argument", "arithmetic_slip", "constraint", "unsafe", "wrong_fact")


@lru_cache(maxsize=1)
def lexicon() -> dict[str, list[Any]]:
    """The bundled word pools (dreamd/dream/data/lexicon.json), read once."""
    text = resources.files("dreamd.dream").joinpath("data/lexicon.json").read_text(encoding="utf-8")
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


LEX = lexicon()


@dataclass(frozen=True)
class Draft:
    """One rendered situation, before the dreamer wraps it into a conversation."""

    direction: str
    """The user's direction as an imperative clause: lower-case start, no final punctuation
    ("sort `df` by revenue, highest first"). The dreamer wraps it ("Can you ...?")."""
    target: str
    """The reply to train on."""
    setup: str = ""
    """Statements said before the direction in the same turn ("We have 12 boxes of 24.")."""
    after: str = ""
    """A sentence said after the direction ("It's the same as --force-with-lease anyway.")."""
    evidence: tuple[str, ...] = ()
    """Pushback: strings the target must contain (the right number, the wrong argument)."""
    answer: str | None = None
    """A checkable answer (a number or a short string) when the direction asks for one."""
    earlier: tuple[tuple[str, str], ...] = ()
    """Earlier (user, assistant) turns, e.g. the constraint a pushback direction violates."""
    facts: dict[str, Any] = field(default_factory=dict)
    """Extra meta copied into Scenario.meta (e.g. the constraint value)."""


@dataclass(frozen=True)
class Template:
    domain: str
    kind: str
    """'accept' or 'pushback'."""
    flaw: str | None
    render: Callable[[dict[str, Any]], Draft]
    slots: dict[str, Sequence[Any]]

    @property
    def name(self) -> str:
        return self.render.__name__

    @property
    def space(self) -> int:
        return math.prod(len(s) for s in self.slots.values())

    def draw(self, rng: random.Random) -> Draft:
        # dict order is insertion order, so the same rng state gives the same values
        return self.render({name: rng.choice(pool) for name, pool in self.slots.items()})


def template(domain: str, kind: str, flaw: str | None = None, **slots: Sequence[Any]) -> Callable[
        [Callable[[dict[str, Any]], Draft]], Template]:
    """Decorator: turn `render(values) -> Draft` into a Template with these slots."""
    assert kind in ("accept", "pushback") and (flaw is None) == (kind == "accept"), (kind, flaw)
    assert flaw is None or flaw in FLAWS, flaw
    for name, pool in slots.items():
        assert len(pool) > 0, f"empty slot {name}"

    def wrap(render: Callable[[dict[str, Any]], Draft]) -> Template:
        return Template(domain, kind, flaw, render, dict(slots))

    return wrap


# ---- formatting shared by the domain files --------------------------------------------------


def num(x: float, decimals: int = 2) -> str:
    """A number as a reply states it: rounded to `decimals` places, trailing zeros dropped, no
    thousands separator ('1234.5', '12', '0.25')."""
    if isinstance(x, int):
        return str(x)
    text = f"{round(x, decimals):.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def money(x: float) -> str:
    """Money with thousands separators and cents: '12,345.60'."""
    return f"{x:,.2f}"


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def code(block: str, lang: str = "") -> str:
    return f"```{lang}\n{block}\n```"


def pick(values: dict[str, Any], key: str, options: Sequence[Any]) -> Any:
    """The phrasing chosen by an index slot (`v=range(len(options))`), for phrasings that are
    f-strings of values computed in `render`. Keeps all randomness in the slots, so the
    template's `space` counts the phrasings exactly."""
    return options[values[key]]
