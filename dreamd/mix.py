"""How many scenarios of each kind a cycle needs.

The general share is a per-BATCH floor (DESIGN.md: >= 25% general data in every batch), so the
general quota is counted batch by batch: a cycle of 24 examples in batches of 4 at share 0.25
needs ceil(0.25 * 4) = 1 general example in each of its 6 batches (batch sizes as
train/batching.py forms them, so the quota and the batches always agree). The rest is behavioural,
split by the configured kind weights with the largest-remainder rule (deterministic, and the
counts always add up).
"""

from __future__ import annotations

import math

from dreamd.config import MixConfig
from dreamd.dream.scenario import ScenarioKind
from dreamd.train.batching import batch_sizes


def general_quota(n_examples: int, batch_size: int, general_share: float) -> int:
    """General examples needed so that each batch `make_batches` will form holds its share."""
    return sum(math.ceil(general_share * size - 1e-9) for size in batch_sizes(n_examples, batch_size))


def kind_quotas(mix: MixConfig, batch_size: int, n_examples: int | None = None,
                general_share: float | None = None) -> dict[ScenarioKind, int]:
    """Examples to accept per kind this cycle; sums to n_examples."""
    n = mix.examples_per_cycle if n_examples is None else n_examples
    share = mix.general_share if general_share is None else general_share
    n_general = general_quota(n, batch_size, share)
    weights = {ScenarioKind.ACCEPT: mix.accept, ScenarioKind.PUSHBACK: mix.pushback,
               ScenarioKind.DERAIL: mix.derail, ScenarioKind.SELF: mix.self_facts}
    total = sum(weights.values())
    n_behavioral = n - n_general
    exact = {k: n_behavioral * w / total for k, w in weights.items()}
    quotas = {k: math.floor(v) for k, v in exact.items()}
    short = n_behavioral - sum(quotas.values())
    for k in sorted(exact, key=lambda k: (exact[k] - quotas[k], weights[k]), reverse=True)[:short]:
        quotas[k] += 1
    quotas[ScenarioKind.GENERAL] = n_general
    return {k: v for k, v in quotas.items() if v > 0}
