"""Mixing examples into batches: one pass, a general share in every batch, similar lengths together.

DESIGN.md: fine-tuning forgets what it does not practise, so EVERY batch (not just the cycle on
average) holds at least ceil(general_share * batch size) general examples. Each example is used
exactly once (one pass over fresh data; multi-epoch training on a static set degrades results).

Length bucketing: behavioural and general examples are sorted by length separately and cut
into consecutive chunks, so a batch pairs the i-th shortest behavioural chunk with the i-th
shortest general chunk; then the batch ORDER is shuffled so training does not run short to long.
"""

from __future__ import annotations

import math
import random

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
