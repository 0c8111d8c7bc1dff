"""From a Scenario to the token ids and labels that are trained.

Instruction stripping happens here: the reply was generated WITH the behaviour spec in context
(`Scenario.generation_messages()`), but the training example is `Scenario.training_messages()`,
the same conversation WITHOUT the spec. The spec never reaches a training token, so the
behaviour has to come from the weights (context distillation; Askell et al. 2021, Snell et al.
2022).

The loss covers the reply only: every token after the rendered prompt
(`template(messages, add_generation_prompt=True)`) up to and including the end-of-turn token.
Whatever the template writes after end of turn (ChatML's trailing "\\n") is dropped: generation
stops at end of turn, so those tokens are never produced and are not taught.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from dreamd.dream.scenario import Scenario, ScenarioKind
from dreamd.chat import end_of_turn_ids, render_ids

IGNORE_INDEX = -100
"""Label of tokens that carry no loss (torch's cross_entropy default ignore_index)."""


@dataclass
class Encoded:
    """One training example as token ids. `input_ids[:context_len]` is the prompt (context),
    the rest is the reply; `labels` is -100 on the context and the token id on the reply."""

    input_ids: list[int]
    labels: list[int]
    context_len: int
    kind: ScenarioKind
    scenario_id: int | None = None

    def __post_init__(self) -> None:
        assert len(self.input_ids) == len(self.labels), "one label per token"
        assert 0 < self.context_len < len(self.input_ids), "both a context and a reply"

    @property
    def reply_len(self) -> int:
        return len(self.input_ids) - self.context_len

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


def encode_scenario(tokenizer: PreTrainedTokenizerBase, scenario: Scenario, max_len: int,
                    scenario_id: int | None = None) -> Encoded:
    """Tokenise the spec-stripped conversation + target with the chat template.

    Raises ValueError with a reason (stored by screening as the rejection reason) when the
    example is longer than `max_len` tokens, when the rendered prompt is not a token prefix of
    the rendered full conversation (the loss boundary would be wrong), or when the reply is empty.
    """
    full_messages = scenario.training_messages()
    prompt = render_ids(tokenizer, full_messages[:-1], add_generation_prompt=True)
    full = render_ids(tokenizer, full_messages, add_generation_prompt=False)
    if full[: len(prompt)] != prompt:
        raise ValueError("chat template: the rendered prompt is not a token prefix of the rendered "
                         "conversation, so the reply's tokens cannot be separated from the context")
    reply = full[len(prompt):]
    eot = end_of_turn_ids(tokenizer)
    last_eot = max((i for i, t in enumerate(reply) if t in eot), default=None)
    if last_eot is not None:
        reply = reply[: last_eot + 1]
    if not reply or (last_eot == 0):
        raise ValueError("empty reply: the target renders to no tokens before end of turn")
    n = len(prompt) + len(reply)
    if n > max_len:
        raise ValueError(f"too long: {n} tokens (context {len(prompt)} + reply {len(reply)}) > "
                         f"max_seq_len {max_len}")
    return Encoded(
        input_ids=prompt + reply,
        labels=[IGNORE_INDEX] * len(prompt) + reply,
        context_len=len(prompt),
        kind=scenario.kind,
        scenario_id=scenario_id,
    )
