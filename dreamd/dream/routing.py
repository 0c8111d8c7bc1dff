"""Who writes each candidate: the dreamer the cycle talks to, and how it is built.

    dreamer, near_dups = open_dreaming(cfg, store, run_id, engine, HELDOUT_DOMAINS)   # dreamd.run

`RoutingDreamer.dream(kind, rng)` hands each request to a writer:

  general            always the template dreamer's procedural tasks (docs/dreaming.md: general
                     data is replay, self-replay or procedural; never model-written)
  dream.source       'template': the template dreamer; 'model': the model dreamer; 'mixed': the
                     model for a `mixed_model_share` of the behavioural candidates (a draw from
                     the cycle's rng), the templates for the rest
  fallback           while the model fails at a kind: after `fallback_after` model-written
                     candidates of it in a row were rejected, the next `fallback_span`
                     candidates of the kind come from the template dreamer, each marked
                     meta['fallback'] with the reason, and one 'dream.fallback' event is
                     recorded; then the model gets the kind back. dream.fallback = 'none' turns
                     this off (a model that cannot write a kind then fails the cycle at its
                     dream budget, dream.max_attempts_factor).

Why the numbers keep a cycle alive: a kind that needs n examples may use 20n candidates
(max_attempts_factor 20). In the worst case (the model never passes, the templates always do)
it spends 12 candidates on the model and then fills from the templates: 12 + n <= 20n for every
n >= 1, and 32 template candidates per 12 model ones afterwards.

`observe(scenario, accepted)` passes the verdict to whoever wrote it (the model dreamer steers
its temperature), counts the model's streak, and hands accepted scenarios to `on_accepted`
(the near-duplicate index: only accepted scenarios are indexed).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from dreamd.config import Config, DreamConfig
from dreamd.dream.neardup import NearDupIndex
from dreamd.dream.scenario import Scenario, ScenarioKind
from dreamd.log import get_logger

log = get_logger("dreamd.dream")

DISCLOSURE = "(This conversation is synthetic: {who} wrote it to train an AI assistant.)"
WRITERS = {"model": "a language model", "template": "a program", "procedural": "a program"}


def disclose(scenario: Scenario) -> Scenario:
    """Add the synthetic-disclosure line to the trained conversation (dream.synthetic_disclosure):
    at the start of its system message, or as a system message of its own."""
    line = DISCLOSURE.format(who=WRITERS.get(scenario.source, "a program"))
    first = scenario.messages[0]
    if first["role"] == "system":
        scenario.messages[0] = {"role": "system", "content": f"{line}\n{first['content']}"}
    else:
        scenario.messages.insert(0, {"role": "system", "content": line})
    scenario.meta["synthetic_disclosure"] = True
    return scenario


@dataclass
class KindStreak:
    rejected_in_a_row: int = 0
    fallback_left: int = 0
    reason: str | None = None


class RoutingDreamer:
    """Routes dream() to the template or the model dreamer (module docstring)."""

    def __init__(self, template: Any, model: Any | None, config: DreamConfig, *,
                 on_event: Callable[[str, dict[str, Any]], None] | None = None,
                 on_accepted: Callable[[Scenario], None] | None = None) -> None:
        if config.source != "template" and model is None:
            raise ValueError(f"dream.source = {config.source!r} needs a model dreamer")
        self.template = template
        self.model = model if config.source != "template" else None
        self.config = config
        self.on_event = on_event
        self.on_accepted = on_accepted
        self.streaks: dict[ScenarioKind, KindStreak] = {}

    def _writer(self, kind: ScenarioKind, rng: random.Random) -> tuple[Any, str | None]:
        if self.model is None or kind is ScenarioKind.GENERAL:
            return self.template, None
        if self.config.source == "mixed" and rng.random() >= self.config.mixed_model_share:
            return self.template, None
        streak = self.streaks.setdefault(kind, KindStreak())
        if streak.fallback_left > 0:
            streak.fallback_left -= 1
            return self.template, streak.reason
        return self.model, None

    def dream(self, kind: ScenarioKind | str, rng: random.Random, model_config: Any = None) -> Scenario:
        kind = ScenarioKind(kind)
        writer, fallback = self._writer(kind, rng)
        scenario = writer.dream(kind, rng, model_config=model_config)
        if fallback:
            scenario.meta["fallback"] = fallback
        if self.config.synthetic_disclosure and "parse_error" not in scenario.meta:
            disclose(scenario)
        return scenario

    def observe(self, scenario: Scenario, accepted: bool) -> None:
        by_model = self.model is not None and scenario.source == self.model.source
        (self.model if by_model else self.template).observe(scenario, accepted)
        if accepted and self.on_accepted is not None:
            self.on_accepted(scenario)
        if by_model:
            self._count(scenario.kind, accepted)

    def _count(self, kind: ScenarioKind, accepted: bool) -> None:
        streak = self.streaks.setdefault(kind, KindStreak())
        streak.rejected_in_a_row = 0 if accepted else streak.rejected_in_a_row + 1
        cfg = self.config
        if cfg.fallback == "none" or streak.rejected_in_a_row < cfg.fallback_after:
            return
        streak.reason = (f"template: the model's last {streak.rejected_in_a_row} {kind.value} "
                         f"candidates were all rejected")
        streak.fallback_left = cfg.fallback_span
        streak.rejected_in_a_row = 0
        detail = {"kind": kind.value, "rejected_in_a_row": cfg.fallback_after, "span": cfg.fallback_span,
                  "temperature": round(self.model.temperature(kind), 3)}
        log.warning("dream.fallback", **detail)
        if self.on_event is not None:
            self.on_event("dream.fallback", detail)


def fewshot_examples(template: Any, held_out: Collection[str]) -> Callable[[ScenarioKind, random.Random, Any], Scenario]:
    """Few-shot examples for the model dreamer: template scenarios of the kind (correct by
    construction), never from the `held_out` domains (the probes' own: the model must not be
    shown them; the run passes evals.probes.HELDOUT_DOMAINS)."""

    def draw(kind: ScenarioKind, rng: random.Random, model_config: Any) -> Scenario:
        for _ in range(64):
            example = template.dream(kind, rng, model_config)
            if example.meta.get("domain") not in held_out:
                return example
        raise RuntimeError(f"no {kind.value} template example outside the held-out domains in 64 draws")

    return draw


def open_dreaming(cfg: Config, store: Any, run_id: int, engine: Any,
                  held_out: Collection[str]) -> tuple[RoutingDreamer, NearDupIndex]:
    """The writers of a run (called once by run.open_run, which builds the screener around
    them): the template dreamer, the model dreamer when dream.source asks for it, and the
    near-duplicate index they feed. Accepted scenarios enter the index as the cycle stores
    them; any accepted scenario not yet indexed (a store from before migration 0002, or signed
    under another scheme) is indexed now."""
    from dreamd.dream.model_dreamer import ModelDreamer
    from dreamd.dream.taxonomy import load_memories, load_taxonomy
    from dreamd.dream.templates import TemplateDreamer

    near_dups = NearDupIndex(store, threshold=cfg.screen.near_dup_threshold, run_id=run_id,
                             read_budget=cfg.screen.near_dup_rows)
    indexed = near_dups.backfill()
    if indexed:
        log.info("dream.near_dup_backfill", indexed=indexed)

    def index_accepted(scenario: Scenario) -> None:
        scenario_id = store.hash_exists(run_id, scenario.content_hash)
        if scenario_id is not None:
            near_dups.add(scenario, scenario_id)

    template = TemplateDreamer(spec=cfg.spec_text, seed=cfg.run.seed)
    model = None
    if cfg.dream.source != "template":
        model = ModelDreamer(engine, spec=cfg.spec_text, config=cfg.dream,
                             taxonomy=load_taxonomy(cfg.dream.taxonomy_file),
                             memories=load_memories(cfg.dream.seed_corpus),
                             examples=fewshot_examples(TemplateDreamer(spec=cfg.spec_text, seed=cfg.run.seed), held_out))
    dreamer = RoutingDreamer(template, model, cfg.dream, on_accepted=index_accepted,
                             on_event=lambda kind, detail: store.add_event(run_id, kind, detail))
    return dreamer, near_dups
