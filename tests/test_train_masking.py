"""The loss is masked to the reply: a change to a context token's label changes nothing, a
change to a reply token's label does (both the full and the context-frozen forward)."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from dreamd.train.context_frozen import align, reply_nll
from tests.fixtures_models import random_example, tiny_model


@pytest.mark.parametrize("frozen", [False, True])
def test_context_labels_change_nothing_reply_labels_do(frozen: bool) -> None:
    model = tiny_model("llama")
    example = random_example(random.Random(0), context=24, reply=8)

    def loss(e):
        with torch.no_grad():
            return reply_nll(model, align([e], 0, torch.device("cpu")), frozen=frozen).item()

    base = loss(example)
    context_relabelled = list(example.labels)
    context_relabelled[5] = example.input_ids[6]          # a real target on a context token
    context_relabelled[example.context_len - 1] = 7
    assert loss(replace(example, labels=context_relabelled)) == base

    reply_relabelled = list(example.labels)
    k = example.context_len + 3
    reply_relabelled[k] = (reply_relabelled[k] + 1) % 500 + 3
    assert loss(replace(example, labels=reply_relabelled)) != base
