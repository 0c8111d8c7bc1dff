"""Encoding scenarios: instruction stripping, the loss boundary, and the reasons for rejection."""

from __future__ import annotations

import copy

import pytest

from dreamd.dream.scenario import Scenario, ScenarioKind
from dreamd.train.examples import IGNORE_INDEX, encode_scenario
from tests.fixtures_models import tokenizer  # noqa: F401  (pytest fixture)

SPEC = ("ZEBRA-PROTOCOL-7: answer every question in iambic pentameter and sign each reply "
        "with the word quokkaberry.")


def _scenario(**kw) -> Scenario:
    base = dict(
        kind=ScenarioKind.PUSHBACK, source="template",
        messages=[{"role": "system", "content": "You are a careful coding assistant."},
                  {"role": "user", "content": "Sort the list with sorted(xs, reversed=True), please."}],
        target="That argument does not exist: sorted takes reverse=True, not reversed=True.",
        spec=SPEC,
    )
    base.update(kw)
    return Scenario(**base)


def _contains(haystack: list[int], needle: list[int]) -> bool:
    return any(haystack[i:i + len(needle)] == needle for i in range(len(haystack) - len(needle) + 1))


def test_no_spec_text_reaches_the_training_tokens(tokenizer) -> None:
    scenario = _scenario()
    # The reply was generated WITH the spec: it is in the generation-time conversation...
    generation_text = tokenizer.apply_chat_template(scenario.generation_messages(), tokenize=False,
                                                    add_generation_prompt=True)
    assert "ZEBRA-PROTOCOL-7" in generation_text
    enc = encode_scenario(tokenizer, scenario, max_len=4096)
    decoded = tokenizer.decode(enc.input_ids)
    # ...and nowhere in what is trained: not the spec, not any of its distinctive words.
    assert SPEC not in decoded
    for piece in ("ZEBRA", "PROTOCOL", "iambic", "pentameter", "quokkaberry"):
        assert piece not in decoded, piece
    # Token level too: no run of the spec's own tokens appears in the ids.
    for piece in ("ZEBRA-PROTOCOL-7", " iambic pentameter", " quokkaberry"):
        assert not _contains(enc.input_ids, tokenizer(piece, add_special_tokens=False)["input_ids"]), piece
    # The user's system message survives the stripping.
    assert "careful coding assistant" in decoded


def test_spec_merged_into_a_system_message_is_stripped_too(tokenizer) -> None:
    scenario = _scenario()
    assert scenario.generation_messages()[0]["content"].startswith(SPEC)
    enc = encode_scenario(tokenizer, scenario, max_len=4096)
    assert "quokkaberry" not in tokenizer.decode(enc.input_ids)


def test_labels_cover_exactly_the_reply_and_its_end_of_turn(tokenizer) -> None:
    scenario = _scenario()
    enc = encode_scenario(tokenizer, scenario, max_len=4096, scenario_id=7)
    prompt_text = tokenizer.apply_chat_template(scenario.messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    assert enc.input_ids[:enc.context_len] == prompt_ids
    assert enc.labels[:enc.context_len] == [IGNORE_INDEX] * enc.context_len
    reply = enc.labels[enc.context_len:]
    assert reply == enc.input_ids[enc.context_len:]
    assert reply[-1] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(reply) == scenario.target + "<|im_end|>"
    assert (enc.kind, enc.scenario_id, enc.reply_len) == (ScenarioKind.PUSHBACK, 7, len(reply))


def test_too_long_is_rejected_with_a_reason(tokenizer) -> None:
    enc = encode_scenario(tokenizer, _scenario(), max_len=4096)
    assert encode_scenario(tokenizer, _scenario(), max_len=enc.n_tokens).n_tokens == enc.n_tokens
    with pytest.raises(ValueError, match=r"too long: \d+ tokens .* > max_seq_len"):
        encode_scenario(tokenizer, _scenario(), max_len=enc.n_tokens - 1)


def test_template_whose_prompt_is_not_a_prefix_is_rejected(tokenizer) -> None:
    # A template that opens a think block in the generation prompt but renders finished
    # assistant turns without it: the loss boundary cannot be found.
    odd = copy.deepcopy(tokenizer)
    odd.chat_template = tokenizer.chat_template.replace(
        "{{ '<|im_start|>assistant\n' }}", "{{ '<|im_start|>assistant\n<think>\n' }}")
    with pytest.raises(ValueError, match="not a token prefix"):
        encode_scenario(odd, _scenario(), max_len=4096)


def test_empty_target_is_rejected(tokenizer) -> None:
    with pytest.raises(ValueError, match="empty reply"):
        encode_scenario(tokenizer, _scenario(target=""), max_len=4096)
