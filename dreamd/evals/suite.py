"""The run's probe suite: its fixed probe set plus what was measured at the run's start, and
`measure`, which runs every probe metric (attention, behaviour, steering, calibration, code)
and the disjointness check in one pass.

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

from dreamd.dream.scenario import Scenario
from dreamd.evals.attention import attention_maps, attention_metrics, load_baseline, save_baseline
from dreamd.evals.behaviour import behaviour_metrics
from dreamd.evals.calibration import calibration_metrics, code_answer_metrics
from dreamd.evals.probes import ProbeSet, ProbeSizes, check_disjoint, open_probes, screen_rule
from dreamd.evals.steering import steering_metrics

ATTENTION_BASELINE = "attention_baseline.pt"
Q1_BASELINE = "q1_baseline.json"
PROBE_PARTS = ("attention", "behaviour", "steering", "calibration", "code")
"""The parts of `measure`, in the order it runs them (and names them to its progress callback)."""


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
                run_id: int | None = None, cycle_id: int | None = None,
                progress: Callable[[str, int], None] | None = None) -> Measurement:
        """Every probe metric of the model now. The first call of a run (no baseline on disk)
        saves the start maps and labels, so its Q3 shift is 0 by definition. With a store and
        a cycle id, also checks that the cycle trained nothing of the probes (probes.*).
        `progress(part, parts_done)` is called as each of PROBE_PARTS starts."""
        metrics: dict[str, float] = {}
        details: dict[str, Any] = {}
        seconds: dict[str, float] = {}
        started = time.perf_counter()

        def part(name: str, t0: float, result: tuple[dict[str, float], dict[str, Any]]) -> None:
            metrics.update(result[0])
            details.update(result[1])
            seconds[name] = round(time.perf_counter() - t0, 3)
            if progress is not None and len(seconds) < len(PROBE_PARTS):
                progress(PROBE_PARTS[len(seconds)], len(seconds))

        if progress is not None:
            progress(PROBE_PARTS[0], 0)

        first = not self.has_baseline
        attention_probes = self.probe_set.attention
        t0 = time.perf_counter()
        if first:
            save_baseline(self.dir / ATTENTION_BASELINE, attention_maps(model, tokenizer, attention_probes))
        part("attention", t0, attention_metrics(model, tokenizer, attention_probes,
                                                load_baseline(self.dir / ATTENTION_BASELINE)))
        t0 = time.perf_counter()
        labels = None if first else json.loads((self.dir / Q1_BASELINE).read_text())
        behaviour = behaviour_metrics(model, tokenizer, engine, self.probe_set, seed, labels)
        if first:
            (self.dir / Q1_BASELINE).write_text(json.dumps(behaviour.labels))
        part("behaviour", t0, (behaviour.metrics, behaviour.details))
        t0 = time.perf_counter()
        part("steering", t0, steering_metrics(model, tokenizer, self.probe_set, behaviour))
        t0 = time.perf_counter()
        part("calibration", t0, calibration_metrics(model, tokenizer, self.probe_set.family("verifiable")))
        t0 = time.perf_counter()
        part("code", t0, code_answer_metrics(model, tokenizer, engine, self.probe_set.family("code"), seed))
        if store is not None and run_id is not None and cycle_id is not None:
            check = check_disjoint(store, run_id, cycle_id, self.probe_set)
            metrics["probes.overlap"] = float(len(check.overlaps))
            metrics["probes.heldout_trained"] = float(len(check.heldout))
            details["probes.overlap"] = {"checked": check.checked, "overlaps": check.overlaps[:50],
                                         "heldout": check.heldout[:50]}
        metrics["probes.seconds"] = time.perf_counter() - started
        details["probes.seconds"] = seconds
        return Measurement(metrics, details)
