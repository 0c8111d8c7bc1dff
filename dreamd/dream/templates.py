"""The template dreamer: fresh scenarios of every kind from a bundled grammar, no model needed.

    dreamer = TemplateDreamer(spec=cfg.spec_text, seed=cfg.run.seed)
    scenario = dreamer.dream("pushback", rng)             # deterministic given rng's state
    for s in dreamer.stream("general"): ...                # endless, from random.Random(seed)
    dreamer.dream("self", rng, model_config=model.config)  # facts from the model's own config

One draw: take 64 bits from the caller's rng as the scenario's own seed (stored in
meta['seed'], so `from_seed(kind, seed)` rebuilds it exactly), then with a private
random.Random(seed):
  accept / pushback  pick a domain, then a template of that kind in it (grammar.Template), draw
                     its slots -> Draft; wrap it in a conversation: optional system prompt of a
                     persona, optional warm-up turn, the earlier turns that carry a constraint,
                     and the user's direction in one of the wrappers ("Can you ...?")
  derail             derail.derail_turn: a text task with an injected line
  general            procedural.general_turn: arithmetic / code / reasoning with meta['answer']
  self               self_facts.self_turn: facts from model_config

Domains and templates live in tasks_code.py (python, pandas, regex), tasks_ops.py (git, shell,
sql, http), tasks_numbers.py (units, recipes, finance, geometry, physics, statistics) and
tasks_time.py (scheduling, timezones, spreadsheets); word pools in data/lexicon.json.
docs/dreaming.md says how to add a domain.
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Iterator
from typing import Any

from dreamd.dream import derail, procedural, self_facts, tasks_code, tasks_numbers, tasks_ops, tasks_time
from dreamd.dream.grammar import LEX, Draft, Template, cap
from dreamd.dream.scenario import Message, Scenario, ScenarioKind

TEMPLATES: list[Template] = (tasks_code.TEMPLATES + tasks_ops.TEMPLATES + tasks_numbers.TEMPLATES
                             + tasks_time.TEMPLATES)
BY_KIND_DOMAIN: dict[str, dict[str, list[Template]]] = {}
for _t in TEMPLATES:
    BY_KIND_DOMAIN.setdefault(_t.kind, {}).setdefault(_t.domain, []).append(_t)
DOMAINS = sorted({t.domain for t in TEMPLATES})

# Share of conversations with a persona system prompt / a warm-up exchange before the task.
SYSTEM_SHARE = 0.6
WARMUP_SHARE = 0.25


def _fields(text: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(text) if name]


def _fill(text: str, persona: dict[str, str]) -> str:
    return text.format(**persona) if "{" in text else text


def _choices(texts: list[str]) -> int:
    """How many distinct strings a pool of format strings yields with the persona pools."""
    pools = {"company": "companies", "team": "teams", "role": "roles", "a_role": "roles", "person": "people"}
    return sum(math.prod(len(LEX[pools[f]]) for f in set(_fields(t))) for t in texts)


class TemplateDreamer:
    """Procedural dreamer. `spec` is stored on behavioural scenarios (what the reply was written
    under); `seed` seeds `stream()` when no rng is given."""

    source = "template"

    def __init__(self, spec: str, seed: int = 0) -> None:
        self.spec = spec
        self.seed = seed

    # ---- public API ---------------------------------------------------------------------------
    def dream(self, kind: ScenarioKind | str, rng: random.Random, model_config: Any = None) -> Scenario:
        """One scenario of `kind`; the same rng state gives the same scenario."""
        return self.from_seed(kind, rng.getrandbits(64), model_config)

    def observe(self, scenario: Scenario, accepted: bool) -> None:
        """Screening feedback. The grammar's output does not depend on it (its scenarios are
        correct by construction); the model dreamer uses it to adapt its temperature."""

    def stream(self, kind: ScenarioKind | str, rng: random.Random | None = None,
               model_config: Any = None) -> Iterator[Scenario]:
        rng = rng if rng is not None else random.Random(self.seed)
        while True:
            yield self.dream(kind, rng, model_config)

    def from_seed(self, kind: ScenarioKind | str, seed: int, model_config: Any = None) -> Scenario:
        """Rebuild the scenario whose meta['seed'] is `seed`."""
        kind = ScenarioKind(kind)
        r = random.Random(seed)
        role = r.choice(LEX["roles"])
        persona = {"company": r.choice(LEX["companies"]), "team": r.choice(LEX["teams"]), "role": role,
                   "a_role": ("an " if role[0] in "aeiouAEIOS" else "a ") + role,  # "an SRE"
                   "person": r.choice(LEX["people"])}
        messages: list[Message] = []
        with_system = r.random() < SYSTEM_SHARE and kind is not ScenarioKind.GENERAL
        if with_system:
            messages.append({"role": "system", "content": _fill(r.choice(LEX["system_prompts"]), persona)})
        if kind in (ScenarioKind.ACCEPT, ScenarioKind.PUSHBACK):
            turns, target, meta = self._behaviour(kind, r, persona)
        elif kind is ScenarioKind.DERAIL:
            user, target, meta = derail.derail_turn(r)
            turns = self._warmup(r, persona) + [{"role": "user", "content": user}]
        elif kind is ScenarioKind.GENERAL:
            user, target, meta = procedural.general_turn(r)
            turns = [{"role": "user", "content": user}]
        else:
            user, target, meta = self_facts.self_turn(r, model_config)
            turns = self._warmup(r, persona) + [{"role": "user", "content": user}]
        meta.update(seed=seed, persona=role, system_prompt=with_system)
        general = kind is ScenarioKind.GENERAL
        return Scenario(kind=kind, source="procedural" if general else self.source,
                        messages=messages + turns, target=target, spec=None if general else self.spec,
                        meta=meta)

    # ---- accept / pushback ------------------------------------------------------------------
    def _behaviour(self, kind: ScenarioKind, r: random.Random,
                   persona: dict[str, str]) -> tuple[list[Message], str, dict[str, Any]]:
        domains = BY_KIND_DOMAIN[kind.value]
        domain = r.choice(sorted(domains))
        tpl = r.choice(domains[domain])
        draft: Draft = tpl.draw(r)
        turns: list[Message] = []
        if not draft.earlier:
            turns += self._warmup(r, persona)
        for user, assistant in draft.earlier:
            turns += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        direction = r.choice(LEX["wrappers"]).format(d=draft.direction, D=cap(draft.direction))
        final = " ".join(p for p in (draft.setup, direction, draft.after) if p)
        intro = _fill(r.choice(LEX["user_intros"]), persona)
        if turns:
            turns[0] = {"role": "user", "content": intro + turns[0]["content"]}
        else:
            final = intro + final
        turns.append({"role": "user", "content": final})
        meta: dict[str, Any] = {"domain": domain, "template": tpl.name, "flaw": tpl.flaw, **draft.facts}
        if draft.evidence:
            meta["flaw_evidence"] = list(draft.evidence)
        if draft.answer is not None:
            meta["answer"] = draft.answer
        return turns, draft.target, meta

    def _warmup(self, r: random.Random, persona: dict[str, str]) -> list[Message]:
        if r.random() >= WARMUP_SHARE:
            return []
        user, assistant = r.choice(LEX["warmups"])
        return [{"role": "user", "content": _fill(user, persona)}, {"role": "assistant", "content": assistant}]

    # ---- size of the grammar ----------------------------------------------------------------
    @staticmethod
    def space_size(kind: ScenarioKind | str, model_config: Any = None) -> int:
        """Upper bound on distinct scenarios of `kind` (product of choices, summed over
        templates); draws can still coincide, so the reachable count is at most this."""
        kind = ScenarioKind(kind)
        system = 1 + _choices(LEX["system_prompts"])
        warmup = 1 + _choices([u for u, _ in LEX["warmups"]])
        if kind in (ScenarioKind.ACCEPT, ScenarioKind.PUSHBACK):
            frame = system * warmup * len(LEX["wrappers"]) * _choices(LEX["user_intros"])
            return frame * sum(t.space for t in TEMPLATES if t.kind == kind.value)
        if kind is ScenarioKind.DERAIL:
            return system * warmup * derail.space()
        if kind is ScenarioKind.GENERAL:
            return procedural.space()
        return system * warmup * self_facts.space(model_config)


def space_report(model_config: Any = None) -> dict[str, int]:
    """{kind: upper bound on distinct scenarios}; 'self' only when a model config is given."""
    kinds = [k for k in ScenarioKind if k is not ScenarioKind.SELF or model_config is not None]
    return {k.value: TemplateDreamer.space_size(k, model_config) for k in kinds}
