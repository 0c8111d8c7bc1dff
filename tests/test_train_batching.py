"""Mixing: a general share in every batch, each example once, similar lengths together."""

from __future__ import annotations

import math
import random

import pytest

from dreamd.dream.scenario import ScenarioKind
from dreamd.train.mix import batch_counts, batch_sizes, make_batches
from dreamd.train.context_frozen import align
from tests.fixtures_models import random_example

KINDS = [ScenarioKind.ACCEPT, ScenarioKind.PUSHBACK, ScenarioKind.DERAIL]


def _pool(rng: random.Random, n_behavioral: int, n_general: int) -> list:
    out = [random_example(rng, rng.randrange(5, 200), rng.randrange(2, 40), rng.choice(KINDS), scenario_id=i)
           for i in range(n_behavioral)]
    out += [random_example(rng, rng.randrange(5, 200), rng.randrange(2, 40), ScenarioKind.GENERAL,
                           scenario_id=n_behavioral + i) for i in range(n_general)]
    rng.shuffle(out)
    return out


def test_every_batch_holds_the_general_share_and_every_example_once() -> None:
    for seed in range(60):
        rng = random.Random(seed)
        batch_size, share = rng.randrange(2, 9), rng.choice([0.25, 0.3, 0.4, 0.5])
        n = rng.randrange(1, 60)
        sizes = batch_sizes(n, batch_size)
        need = sum(math.ceil(share * s - 1e-9) for s in sizes)
        n_general = rng.randrange(need, n + 1)
        pool = _pool(rng, n - n_general, n_general)
        for bucket in (False, True):
            batches = make_batches(pool, batch_size, share, bucket, random.Random(seed))
            ids = sorted(e.scenario_id for b in batches for e in b)
            assert ids == list(range(n)), "each example exactly once"
            assert all(1 <= len(b) <= batch_size for b in batches)
            assert max(map(len, batches)) - min(map(len, batches)) <= 1
            for b in batches:
                assert batch_counts(b)[1] >= math.ceil(share * len(b) - 1e-9), (seed, bucket, batch_counts(b))


def test_too_few_general_examples_is_an_error() -> None:
    pool = _pool(random.Random(0), 10, 2)  # 12 examples at 4: 3 batches need 3 general ones
    with pytest.raises(ValueError, match="needs >= 3 general examples"):
        make_batches(pool, 4, 0.25, True, random.Random(0))


def test_sizes_spread_evenly() -> None:
    assert batch_sizes(10, 4) == [4, 3, 3]
    assert batch_sizes(8, 4) == [4, 4]
    assert batch_sizes(1, 4) == [1]


def test_same_seed_same_batches_and_the_order_is_shuffled() -> None:
    pool = _pool(random.Random(1), 30, 12)
    a = make_batches(pool, 4, 0.25, True, random.Random(5))
    b = make_batches(pool, 4, 0.25, True, random.Random(5))
    assert [[e.scenario_id for e in x] for x in a] == [[e.scenario_id for e in x] for x in b]
    lengths = [max(e.n_tokens for e in x) for x in a]
    assert lengths != sorted(lengths), "batch order is shuffled, not short-to-long"


def test_bucketing_cuts_padding() -> None:
    pool = _pool(random.Random(2), 90, 30)

    def pad_fraction(batches) -> float:
        aligned = [align(b, pad_id=0) for b in batches]
        return 1 - sum(a.n_real_tokens for a in aligned) / sum(a.n_slots for a in aligned)

    plain = pad_fraction(make_batches(pool, 4, 0.25, False, random.Random(0)))
    bucketed = pad_fraction(make_batches(pool, 4, 0.25, True, random.Random(0)))
    assert bucketed < 0.6 * plain, (plain, bucketed)


def test_empty_pool_and_bad_arguments() -> None:
    assert make_batches([], 4, 0.25, True, random.Random(0)) == []
    with pytest.raises(ValueError, match="batch_size"):
        make_batches(_pool(random.Random(0), 3, 1), 0, 0.25, True, random.Random(0))
