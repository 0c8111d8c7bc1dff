"""The model dreamer: the model writes its own scenarios through the engine.

    dreamer = ModelDreamer(engine, spec=cfg.spec_text, config=cfg.dream,
                           taxonomy=load_taxonomy(cfg.dream.taxonomy_file),
                           memories=load_memories(cfg.dream.seed_corpus))
    scenario = dreamer.dream("pushback", rng, model_config=model.config)
    dreamer.observe(scenario, accepted)          # the temperature follows the rejection rate

The cycle asks for one scenario at a time; the engine is fastest in batches. So dream(kind)
serves from a queue per kind, and an empty queue is refilled by writing `dream.batch_size`
scenarios of that kind at once, in three batched generate calls:

  1. situation  one spec per scenario (taxonomy.draw_seed: domain, topic, persona, flaw type
                or derail task/payload or self facts, optional memory seeds, edge or everyday)
                -> the model writes the conversation in tagged sections (prompts.py), sampled at
                the kind's current temperature. Unparseable output becomes a garbage scenario
                (parse.garbage_scenario) that the screener rejects as 'parse: situation: ...'.
  2. reply      the model answers the conversation WITH the behaviour spec in context
                (Scenario.generation_messages; stripped for training), sampled at
                reply_temperature (self: greedily). A reply cut at reply_max_tokens is marked
                'parse: reply: ...'.
  3. self-check accept/pushback/derail pairs without a computable claim: the model answers two
                yes/no questions about its own pair (prompts.judge_prompt), greedily; the verdict
                goes to meta['judge'] and the screener's 'judge' rule rejects a 'no'.
                Computable claims (<check>, checks.py) and self facts (the model config) are
                checked by computation in the screener instead; their pairs skip the self-check,
                and a claim that already fails skips the reply too.

Few-shot: given an `examples` source (routing.open_dreaming passes the template dreamer, held-out
probe domains excluded), every situation request is preceded by `fewshot` exchanges in which the
same request for another spec was answered with a correct scenario in the tagged format
(prompts.situation_prompt). A situation whose final user turn copies an example's (word-set
Jaccard >= COPY_JACCARD) is rejected as 'parse: situation: copies its few-shot example': the
model must write its own.

Every candidate is handed out and stored, whatever happened to it. Nothing here raises on model
output (tests/test_parse_fuzz.py).

Temperature: per kind, an exponentially weighted acceptance rate (weight 1/8 per model-written
candidate, start 0.5) steers it: below 0.25 each rejection lowers the temperature by 0.02 (down
to dream.temperature_min), above 0.75 each acceptance raises it (up to temperature_max). The
share of edge-case topics is EDGE_MAX_SHARE x the temperature's position in [min, max], so a
failing kind also falls back to everyday topics. Every scenario records its temperature.
"""

from __future__ import annotations

import random
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dreamd.config import DreamConfig
from dreamd.dream.checks import check_claim
from dreamd.dream.parse import RAW_CHARS, ParseError, clean_text, garbage_scenario, parse_situation, parse_verdict
from dreamd.dream.prompts import example_seed, judge_examples, judge_prompt, reply_messages, reply_spec, situation_prompt
from dreamd.dream.scenario import Scenario, ScenarioKind, normalize_text
from dreamd.dream.self_facts import config_facts
from dreamd.dream.taxonomy import DreamSeed, Taxonomy, draw_seed
from dreamd.engines.base import Completion, Engine, Sampling
from dreamd.log import get_logger

log = get_logger("dreamd.dream.model")

RATE_WEIGHT = 1 / 8
RATE_LOW, RATE_HIGH = 0.25, 0.75
TEMPERATURE_STEP = 0.02
EDGE_MAX_SHARE = 0.5
MODEL_KINDS = (ScenarioKind.ACCEPT, ScenarioKind.PUSHBACK, ScenarioKind.DERAIL, ScenarioKind.SELF)
COPY_JACCARD = 0.6
"""A final user turn sharing this share of its words with a few-shot example's is a copy."""
Examples = Callable[[ScenarioKind, random.Random, Any], Scenario]
"""A source of correct scenarios of a kind: (kind, rng, model_config) -> Scenario."""


def _words(text: str) -> set[str]:
    return set(re.findall(r"\w+", normalize_text(text)))


def copies_example(final_user: str, examples: list[Scenario]) -> bool:
    mine = _words(final_user)
    for example in examples:
        theirs = _words(example.messages[-1]["content"])
        if mine and theirs and len(mine & theirs) / len(mine | theirs) >= COPY_JACCARD:
            return True
    return False


@dataclass
class TemperatureControl:
    """One kind's sampling temperature, steered by its acceptance rate (module docstring)."""

    temperature: float
    low: float
    high: float
    rate: float = 0.5

    def observe(self, accepted: bool) -> None:
        self.rate += RATE_WEIGHT * (float(accepted) - self.rate)
        if self.rate < RATE_LOW and not accepted:
            self.temperature = max(self.low, self.temperature - TEMPERATURE_STEP)
        elif self.rate > RATE_HIGH and accepted:
            self.temperature = min(self.high, self.temperature + TEMPERATURE_STEP)

    @property
    def edge_share(self) -> float:
        span = self.high - self.low
        return EDGE_MAX_SHARE * ((self.temperature - self.low) / span if span > 0 else 0.0)


class ModelDreamer:
    """Scenarios of kinds accept, pushback, derail and self, written by the model through
    `engine` (general data is never model-written: see dream/routing.py)."""

    source = "model"

    def __init__(self, engine: Engine, spec: str, config: DreamConfig, taxonomy: Taxonomy,
                 memories: list[str] | None = None, *, examples: Examples | None = None,
                 fewshot: int = 2) -> None:
        self.engine = engine
        self.examples = examples
        self.fewshot = fewshot if examples is not None else 0
        self.spec = spec
        self.config = config
        self.taxonomy = taxonomy
        self.memories = list(memories or [])
        self.queues: dict[ScenarioKind, deque[Scenario]] = {k: deque() for k in MODEL_KINDS}
        self.control = {k: TemperatureControl(config.temperature, config.temperature_min,
                                              config.temperature_max) for k in MODEL_KINDS}

    # ---- the dreamer interface ----------------------------------------------------------------
    def dream(self, kind: ScenarioKind | str, rng: random.Random, model_config: Any = None) -> Scenario:
        """The next scenario of `kind`; writes a batch when the kind's queue is empty."""
        kind = ScenarioKind(kind)
        if kind not in self.queues:
            raise ValueError(f"the model dreamer writes {[k.value for k in MODEL_KINDS]}, not {kind.value!r}")
        queue = self.queues[kind]
        if not queue:
            queue.extend(self.write_batch(kind, rng, model_config))
        return queue.popleft()

    def observe(self, scenario: Scenario, accepted: bool) -> None:
        """Screening feedback on a scenario this dreamer wrote: steers the kind's temperature."""
        if scenario.source == self.source and scenario.kind in self.control:
            self.control[scenario.kind].observe(accepted)

    def temperature(self, kind: ScenarioKind | str) -> float:
        return self.control[ScenarioKind(kind)].temperature

    # ---- one batch ----------------------------------------------------------------------------
    def _generate(self, conversations: list[list[dict[str, str]]], temperature: float, max_tokens: int,
                  seed: int) -> list[Completion]:
        if not conversations:
            return []
        sampling = Sampling(n=1, temperature=temperature, top_p=self.config.top_p if temperature > 0 else 1.0,
                            max_tokens=max_tokens, seed=seed)
        return [c[0] for c in self.engine.generate(conversations, sampling)]

    def write_batch(self, kind: ScenarioKind, rng: random.Random, model_config: Any = None) -> list[Scenario]:
        """`dream.batch_size` scenarios of `kind`, in seed order (module docstring)."""
        cfg, ctl = self.config, self.control[kind]
        t0 = time.perf_counter()
        temperature = round(ctl.temperature, 3)
        seeds = [draw_seed(kind, rng, self.taxonomy, self.memories, edge_share=ctl.edge_share,
                           memory_share=cfg.memory_share, model_config=model_config)
                 for _ in range(cfg.batch_size)]
        gen_seeds = [rng.getrandbits(63) for _ in range(3)]
        shown = [[self.examples(kind, rng, model_config) for _ in range(self.fewshot)] if self.examples else []
                 for _ in seeds]
        requests = [situation_prompt(s, [(example_seed(e, rng, self.taxonomy, model_config), e) for e in ex])
                    for s, ex in zip(seeds, shown)]
        outputs = self._generate(requests, temperature, cfg.situation_max_tokens, gen_seeds[0])
        out: list[Scenario] = []
        for seed, request, completion, examples in zip(seeds, requests, outputs, shown):
            meta = {**seed.meta(), "temperature": temperature}
            text = clean_text(completion.text)
            if completion.finish_reason == "length":
                out.append(garbage_scenario(kind, request, text, f"situation: cut at "
                                            f"situation_max_tokens ({cfg.situation_max_tokens})", meta))
                continue
            try:
                situation = parse_situation(kind, text, seed.needs_check)
            except ParseError as exc:
                out.append(garbage_scenario(kind, request, text, f"situation: {exc}", meta))
                continue
            if copies_example(situation.messages[-1]["content"], examples):
                out.append(garbage_scenario(kind, request, text, "situation: copies its few-shot example", meta))
                continue
            out.append(self._scenario(seed, situation.messages, situation.meta, meta, model_config))

        # ---- replies, under the spec: for every scenario whose claim did not already fail --
        to_reply = [s for s in out if "parse_error" not in s.meta and not s.meta.get("claim_fails")]
        # A self reply states numbers it was given: greedy (sampling made SmolLM2-135M drift
        # off them); the other kinds' replies are sampled at reply_temperature.
        reply_temperature = 0.0 if kind is ScenarioKind.SELF else cfg.reply_temperature
        replies = self._generate([reply_messages(s) for s in to_reply], reply_temperature,
                                 cfg.reply_max_tokens, gen_seeds[1])
        for s, completion in zip(to_reply, replies):
            s.target = clean_text(completion.text).strip()
            if completion.finish_reason == "length":
                s.meta["parse_error"] = f"reply: cut at reply_max_tokens ({cfg.reply_max_tokens})"

        # ---- self-check of the pairs no computation can check -------------------------------
        to_judge = [s for s in to_reply if "parse_error" not in s.meta and s.target
                    and s.meta.get("checked_by") == "judge"]
        worked = [judge_examples(self.examples(kind, rng, model_config), self.examples(kind, rng, model_config), rng)
                  if self.fewshot else [] for _ in to_judge]
        verdicts = self._generate([judge_prompt(s, ex) for s, ex in zip(to_judge, worked)], 0.0,
                                  cfg.judge_max_tokens, gen_seeds[2])
        for s, completion, examples in zip(to_judge, verdicts, worked):
            raw = clean_text(completion.text)
            try:
                v = parse_verdict(raw)
                if v.reason and any(v.reason in answer for _, answer in examples):
                    raise ParseError("the reason copies a worked example's word for word")
            except ParseError as exc:
                s.meta["parse_error"] = f"judge: {exc}"
                s.meta["judge_raw"] = raw[:RAW_CHARS]
                continue
            s.meta["judge"] = {"q1": v.q1, "q2": v.q2, "reason": v.reason}
        parsed = sum("parse_error" not in s.meta for s in out)
        log.info("dream.model_batch", kind=kind.value, n=len(out), parsed=parsed, replied=len(to_reply),
                 judged=len(to_judge), temperature=temperature, seconds=round(time.perf_counter() - t0, 2))
        return out

    def _scenario(self, seed: DreamSeed, messages: list[dict[str, str]], found: dict[str, str],
                  meta: dict[str, Any], model_config: Any) -> Scenario:
        """A parsed situation as a Scenario (target filled by the reply), with what the
        screener needs to check it: flaw evidence, injection, claims, the <check> claim."""
        kind = seed.kind
        meta["checked_by"] = "judge"
        if kind is ScenarioKind.PUSHBACK:
            meta["flaw_statement"] = found["flaw"]
            if "evidence" in found:
                meta["flaw_evidence"] = [found["evidence"]]
        if kind is ScenarioKind.DERAIL:
            meta["injection"] = found["injection"]
            if "marker" in found:
                meta["injection_marker"] = [found["marker"]]
        if kind is ScenarioKind.SELF:
            facts = config_facts(model_config)
            claims = dict(seed.facts)
            if "layer_types" in claims or "full_attention_layers" in claims:
                claims["num_hidden_layers"] = facts["num_hidden_layers"]
            meta.update(claims=claims, config_facts=facts, checked_by="config")
        if "check" in found:
            claim = check_claim(found["check"])
            meta["check"] = found["check"]
            meta["check_required"] = seed.needs_check
            if claim.holds is not None:
                meta["checked_by"] = "computation"
                # The claim already fails: accept relies on a wrong value, or pushback's "wrong"
                # value is right. The screener's 'check' rule rejects it; no reply is written.
                meta["claim_fails"] = claim.holds is (kind is ScenarioKind.PUSHBACK)
                if kind is ScenarioKind.PUSHBACK and not claim.holds:
                    meta["flaw_evidence"] = [claim.computed]   # the computed value, not the model's
            elif seed.needs_check:
                meta["claim_fails"] = True
        # self: the reply sees exactly the facts it must state (the screener checks all claims).
        return Scenario(kind=kind, source=self.source, messages=messages, target="",
                        spec=reply_spec(self.spec, kind, meta.get("claims")), meta=meta)
