"""The mix: how many scenarios of each kind a cycle dreams, and how they are cut into batches.
One pass, a general share in every batch, similar lengths together.

Fine-tuning forgets what it does not practise, so EVERY batch (not just the cycle on average)
holds at least ceil(general_share * batch size) general examples (mix.general_share,
docs/config.md). Each example is used exactly once (one pass over fresh data; multi-epoch
training on a static set degrades results).

Quotas (`kind_quotas`): the general quota is counted batch by batch, with the batch sizes
`make_batches` forms, so the quota and the batches always agree: a cycle of 24 examples in
batches of 4 at share 0.25 needs ceil(0.25 * 4) = 1 general example in each of its 6 batches.
The rest is behavioural, split by the configured kind weights with the largest-remainder rule
(deterministic, and the counts always add up).

Length bucketing (`make_batches`): behavioural and general examples are sorted by length
separately and cut into consecutive chunks, so a batch pairs the i-th shortest behavioural chunk
with the i-th shortest general chunk; then the batch ORDER is shuffled so training does not run
short to long.
"""

from __future__ import annotations

import math
import random

from dreamd.config import MixConfig
from dreamd.dream.scenario import ScenarioKind
from dreamd.train.examples import Encoded


def batch_sizes(n: int, batch_size: int) -> list[int]:
    """Split n examples into ceil(n / batch_size) batches whose sizes differ by at most one
    (10 at 4 -> [4, 3, 3], not [4, 4, 2]: a batch of 2 cannot hold a 25% share plus behaviour)."""
    n_batches = math.ceil(n / batch_size)
    return [n // n_batches + (1 if i < n % n_batches else 0) for i in range(n_batches)]


def general_counts(sizes: list[int], n_general: int, general_share: float) -> list[int]:
    """How many general examples each batch gets: its minimum ceil(share * size), then the
    surplus spread one at a time over the batches in turn. ValueError when there are too few."""
    need = [math.ceil(general_share * s - 1e-9) for s in sizes]  # 1e-9: 0.25 * 4 is exactly 1
    if n_general < sum(need):
        raise ValueError(f"general share {general_share} needs >= {sum(need)} general examples for "
                         f"{sum(sizes)} examples in batches of {sizes[0]}, got {n_general}; "
                         "add general data or lower mix.general_share")
    counts, surplus, i = list(need), n_general - sum(need), 0
    while surplus:
        if counts[i] < sizes[i]:
            counts[i] += 1
            surplus -= 1
        i = (i + 1) % len(sizes)
    return counts


def make_batches(examples: list[Encoded], batch_size: int, general_share: float, bucket_by_length: bool,
                 rng: random.Random) -> list[list[Encoded]]:
    """Every example exactly once, in batches of about `batch_size`, each holding at least
    ceil(general_share * len(batch)) general examples. Deterministic for a seeded `rng`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0.0 <= general_share <= 1.0:
        raise ValueError(f"general_share must be in [0, 1], got {general_share}")
    if not examples:
        return []
    general = [e for e in examples if e.kind is ScenarioKind.GENERAL]
    behavioral = [e for e in examples if e.kind is not ScenarioKind.GENERAL]
    sizes = batch_sizes(len(examples), batch_size)
    n_gen = general_counts(sizes, len(general), general_share)
    n_beh = [s - g for s, g in zip(sizes, n_gen)]

    # Shuffle first so that equal lengths fall in random order, then (stable) sort by length.
    rng.shuffle(general)
    rng.shuffle(behavioral)
    if bucket_by_length:
        general.sort(key=lambda e: e.n_tokens)
        behavioral.sort(key=lambda e: e.n_tokens)
    # Consecutive chunks: with sorted lists, batch i holds the i-th shortest of each kind.
    batches: list[list[Encoded]] = []
    gi = bi = 0
    for g, b in zip(n_gen, n_beh):
        batches.append(behavioral[bi:bi + b] + general[gi:gi + g])
        gi, bi = gi + g, bi + b
    assert gi == len(general) and bi == len(behavioral), "every example exactly once"
    rng.shuffle(batches)
    return batches


def batch_counts(batch: list[Encoded]) -> tuple[int, int]:
    """(behavioural, general) examples in a batch."""
    n_general = sum(e.kind is ScenarioKind.GENERAL for e in batch)
    return len(batch) - n_general, n_general


# ---- quotas: how many of each kind a cycle dreams ---------------------------------------------


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
