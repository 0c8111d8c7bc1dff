"""Tiny models, a tokenizer and example builders for the training tests.

Import the fixture into a test module (`from tests.fixtures_models import tokenizer`); pytest
registers fixtures found in a module's namespace. The tokenizer is trained once per session
(~4 s on the bundled corpus); models are built per test (milliseconds at hidden 64).
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from dreamd.dream.scenario import Scenario, ScenarioKind
from dreamd.tiny import build_tiny_model, bundled_corpus, tiny_config, train_tokenizer
from dreamd.train.examples import IGNORE_INDEX, Encoded

TINY_VOCAB = 1024


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer([bundled_corpus()], vocab_size=TINY_VOCAB)


def tiny_model(arch: str, *, vocab: int = TINY_VOCAB, seed: int = 0, layers: int = 4,
               dtype: torch.dtype = torch.float32, tokenizer: PreTrainedTokenizerFast | None = None
               ) -> PreTrainedModel:
    """A tiny random model in train mode (hidden 64, sdpa)."""
    cfg = tiny_config(arch, vocab, layers=layers, tokenizer=tokenizer)
    if cfg.pad_token_id is None:
        cfg.pad_token_id = 0
    model = build_tiny_model(cfg, seed=seed).to(dtype)
    model.train()
    return model


def random_example(rng: random.Random, context: int, reply: int, kind: ScenarioKind = ScenarioKind.ACCEPT,
                   vocab: int = TINY_VOCAB, scenario_id: int | None = None) -> Encoded:
    """Random token ids (never the pad id 0) with the reply labelled."""
    ids = [rng.randrange(3, vocab) for _ in range(context + reply)]
    return Encoded(ids, [IGNORE_INDEX] * context + ids[context:], context, kind, scenario_id)


def long_scenario(rng: random.Random, kind: ScenarioKind, spec: str | None = None, turns: int = 3) -> Scenario:
    """A multi-turn conversation whose context is much longer than its reply."""
    words = bundled_corpus().split()
    def text(n: int) -> str:
        start = rng.randrange(len(words) - n)
        return " ".join(words[start:start + n])
    messages = []
    for _ in range(turns):
        messages += [{"role": "user", "content": text(40)}, {"role": "assistant", "content": text(30)}]
    messages.append({"role": "user", "content": text(25)})
    return Scenario(kind=kind, source="template", messages=messages, target=text(8),
                    spec=spec if kind.behavioral else None)
