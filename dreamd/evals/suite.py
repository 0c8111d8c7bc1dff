"""The run's probe suite: its fixed probe set plus what was measured at the run's start, and
`measure`, which runs one evaluation: forgetting and every probe metric (attention, behaviour,
steering, calibration, code) and the disjointness check in one pass.

Full or cheap (eval.full_every, `full_suite_due`). The FULL suite generates: every greedy reply
it needs (Q1, code answers, arithmetic) comes from ONE engine call (`generate_replies`:
generate_mixed, each reply under its own max_tokens), then every metric. The CHEAP suite
generates nothing and keeps what guards the run every cycle: forget.perplexity / forget.nll
(the perplexity guardrail and the forgetting rule), forget.arith_logprob and
forget.code_logprob (a few short sequences: the continuous signs of forgetting), and the probe
disjointness check (a guardrail). Everything else is the full suite's: what needs generated
replies (q1.*, steer.own_*/separation, forget.arith_em, forget.code_em) and what scores the
probe conversations (margin.* and steer.consistency: 80 sequences with hidden states; q3.*:
eager attention maps; calib.*: twice the verifiable probes). Profiled on the demo, the margins
alone were 70% of a cheap suite that kept them, and q3 + calib most of the rest; on the tiny
model the forward passes over those sequences cost more than a cycle's training (docs/
benchmarks.md "Evaluation share"). So the controller judges change (margins: speed up / slow
down) after full-suite cycles and guards after every cycle. A metric is computed the same way in
both suites: same function, same inputs, same number for the same weights. The full suite
always runs at the run's start (the baseline), whatever full_every says.

It stands above the metric modules (they import Probe and ProbeSet from evals/probes.py, the
ground floor of evals/), so the imports flow one way: suite -> metrics -> probes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreamd.config import EvalConfig
from dreamd.dream.scenario import Scenario
from dreamd.engines.base import Completion, generate_each
from dreamd.evals.attention import attention_maps, attention_metrics, load_baseline, save_baseline
from dreamd.evals.behaviour import behaviour_metrics, q1_probes, q1_sampling
from dreamd.evals.calibration import calibration_metrics, code_answer_metrics, code_sampling
from dreamd.evals.forgetting import arithmetic_probes, arithmetic_sampling, forgetting_metrics
from dreamd.evals.probes import ProbeSet, ProbeSizes, check_disjoint, open_probes, screen_rule
from dreamd.evals.steering import steering_metrics

ATTENTION_BASELINE = "attention_baseline.pt"
Q1_BASELINE = "q1_baseline.json"
FULL_PARTS = ("generate", "forgetting", "attention", "behaviour", "steering", "calibration", "code")
"""The full suite's parts in order (progress, and the seconds per part in probes.seconds)."""
CHEAP_PARTS = ("forgetting", "code")
"""The cheap suite's parts (no generation)."""
"""The parts of `measure`, in the order it runs them (and names them to its progress callback)."""


def full_suite_due(eval_cfg: EvalConfig, number: int | None) -> bool:
    """Whether the evaluation after cycle `number` runs the full suite: the run's start (None,
    the baseline) and every eval.full_every-th cycle. A function of the cycle number alone, so
    a resumed or retried cycle gets the same suite as an uninterrupted run."""
    return number is None or number % eval_cfg.full_every == 0


@dataclass
class Replies:
    """The full suite's generated replies, greedy, made by one engine call."""

    q1: dict[str, Completion]
    """Q1 probe key -> reply (q1_sampling)."""
    code: list[Completion]
    """One per code probe (code_sampling)."""
    arithmetic: list[Completion]
    """One per arithmetic probe (arithmetic_sampling)."""


def generate_replies(engine: Any, probes: ProbeSet, eval_cfg: EvalConfig, seed: int) -> Replies:
    """Every reply of the full suite in ONE engine call (engines.base.generate_each), each
    under the Sampling its metric defines: the same greedy replies the metrics would generate
    one family at a time."""
    q1 = q1_probes(probes)
    code = probes.family("code")
    arithmetic = arithmetic_probes(eval_cfg.arithmetic_n)
    conversations = [p.messages for _, p in q1] + [p.messages for p in code] + [p.messages for p in arithmetic]
    samplings = ([q1_sampling(seed)] * len(q1) + [code_sampling(seed)] * len(code)
                 + [arithmetic_sampling(seed)] * len(arithmetic))
    out = generate_each(engine, conversations, samplings)
    n, m = len(q1), len(q1) + len(code)
    return Replies(q1={k: c for (k, _), c in zip(q1, out[:n])}, code=out[n:m], arithmetic=out[m:])


@dataclass
class Measurement:
    metrics: dict[str, float]
    details: dict[str, Any]
    """metric -> JSON-able detail (add_evals(details=...))."""


class ProbeSuite:
    """The run's probe set plus what was measured at its start (attention maps, Q1 labels),
    kept under <state_dir>/probes/run-<id>/ so "now vs start" survives a restart."""

    def __init__(self, probes: ProbeSet, baseline_dir: Path) -> None:
        self.probe_set = probes
        self.dir = Path(baseline_dir)

    @classmethod
    def open(cls, store: Any, run_id: int, state_dir: Path, dreamer: Any,
             sizes: ProbeSizes = ProbeSizes()) -> ProbeSuite:
        return cls(open_probes(store, run_id, dreamer, sizes), Path(state_dir) / "probes" / f"run-{run_id}")

    def screen_rule(self) -> Callable[[Scenario], str | None]:
        """The screener's 'probe' rule: no training scenario from a held-out domain or asking
        a probe's conversation (evals/probes.py)."""
        return screen_rule(self.probe_set)

    @property
    def has_baseline(self) -> bool:
        return (self.dir / ATTENTION_BASELINE).is_file() and (self.dir / Q1_BASELINE).is_file()

    def measure(self, model: Any, tokenizer: Any, engine: Any, seed: int, store: Any = None,
                run_id: int | None = None, cycle_id: int | None = None, *, eval_cfg: EvalConfig | None = None,
                full: bool = True, progress: Callable[[str, int, int], None] | None = None) -> Measurement:
        """One evaluation of the model now: forgetting and every probe metric; full=False: the
        cheap suite (module docstring). The first call of a run (no baseline on disk) is full
        and saves the start maps and labels, so its Q3 shift is 0 by definition. With a store
        and a cycle id, also checks that the cycle trained nothing of the probes (probes.*).
        `progress(part, parts_done, parts)` is called as each part (FULL_PARTS or CHEAP_PARTS)
        starts."""
        eval_cfg = eval_cfg or EvalConfig()
        metrics: dict[str, float] = {}
        details: dict[str, Any] = {}
        seconds: dict[str, float] = {}
        started = time.perf_counter()

        first = not self.has_baseline
        full = full or first
        parts = FULL_PARTS if full else CHEAP_PARTS

        def say(name: str) -> None:
            if progress is not None:
                progress(name, parts.index(name), len(parts))

        def part(name: str, t0: float, result: tuple[dict[str, float], dict[str, Any]]) -> None:
            metrics.update(result[0])
            details.update(result[1])
            seconds[name] = round(time.perf_counter() - t0, 3)
            following = parts.index(name) + 1
            if following < len(parts):
                say(parts[following])

        say(parts[0])
        t0 = time.perf_counter()
        replies = generate_replies(engine, self.probe_set, eval_cfg, seed) if full else None
        seconds["generate"] = round(time.perf_counter() - t0, 3)
        if full:
            say("forgetting")
        t0 = time.perf_counter()
        part("forgetting", t0, (forgetting_metrics(model, tokenizer, engine, eval_cfg, seed, exact=full,
                                                   replies=replies.arithmetic if replies else None), {}))
        if replies is not None:  # the full suite
            attention_probes = self.probe_set.attention
            t0 = time.perf_counter()
            now = None
            if first:  # the start maps are this model's maps: computed once
                now = attention_maps(model, tokenizer, attention_probes)
                save_baseline(self.dir / ATTENTION_BASELINE, now)
            part("attention", t0, attention_metrics(model, tokenizer, attention_probes,
                                                    load_baseline(self.dir / ATTENTION_BASELINE), now))
            t0 = time.perf_counter()
            labels = None if first else json.loads((self.dir / Q1_BASELINE).read_text())
            behaviour = behaviour_metrics(model, tokenizer, engine, self.probe_set, seed, labels, replies=replies.q1)
            if first:
                (self.dir / Q1_BASELINE).write_text(json.dumps(behaviour.labels))
            part("behaviour", t0, (behaviour.metrics, behaviour.details))
            t0 = time.perf_counter()
            part("steering", t0, steering_metrics(model, tokenizer, self.probe_set, behaviour))
            t0 = time.perf_counter()
            part("calibration", t0, calibration_metrics(model, tokenizer, self.probe_set.family("verifiable")))
        t0 = time.perf_counter()
        part("code", t0, code_answer_metrics(model, tokenizer, engine, self.probe_set.family("code"), seed,
                                             replies=replies.code if replies else None, exact=full))
        if store is not None and run_id is not None and cycle_id is not None:
            check = check_disjoint(store, run_id, cycle_id, self.probe_set)
            metrics["probes.overlap"] = float(len(check.overlaps))
            metrics["probes.heldout_trained"] = float(len(check.heldout))
            details["probes.overlap"] = {"checked": check.checked, "overlaps": check.overlaps[:50],
                                         "heldout": check.heldout[:50]}
        metrics["probes.seconds"] = time.perf_counter() - started
        details["probes.seconds"] = {"suite": "full" if full else "cheap", **seconds}
        return Measurement(metrics, details)
