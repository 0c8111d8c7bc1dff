"""Chat on the ground floor: a conversation as token ids, the tokens that end a turn, and the
log-probs of a prompt under a model. The engines, training, the canary and the evals all use
these, so a prompt is rendered one way everywhere.

Two sets of ending tokens with two meanings: `end_of_turn_ids` is where the chat template ends
an assistant turn (EOS, ChatML's <|im_end|>; a training reply's loss stops there), and
`generation_stop_ids` is where generation stops, which adds the model's generation_config eos
ids (Qwen ships [<|im_end|>, <|endoftext|>]).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from jinja2.exceptions import TemplateError
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dreamd.dream.scenario import Message


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """model.eval() inside, and every submodule's own training flag restored after (a trainer
    may keep some submodules in eval on purpose, so a blanket model.train() would be wrong)."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def fold_system(messages: list[Message]) -> list[Message]:
    """The conversation without a system turn: its content leads the first user turn (what
    Gemma- and Mistral-style templates, which have no system role, expect a caller to do)."""
    if not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0]["content"], messages[1:]
    if rest and rest[0]["role"] == "user":
        return [{"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}, *rest[1:]]
    return [{"role": "user", "content": system}, *rest]


def render_text(tokenizer: PreTrainedTokenizerBase, messages: list[Message], add_generation_prompt: bool) -> str:
    """The conversation rendered with the model's chat template. A template that refuses a
    system turn ("System role not supported") gets it folded into the first user turn; every
    path (training, generation, evaluation) renders through here, so they agree."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as exc:
        if not messages or messages[0]["role"] != "system" or "system" not in str(exc).lower():
            raise
        return tokenizer.apply_chat_template(fold_system(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt)


def render_ids(tokenizer: PreTrainedTokenizerBase, messages: list[Message], add_generation_prompt: bool) -> list[int]:
    """Token ids of a conversation rendered with the chat template. Rendered to text, then
    tokenised without adding BOS/EOS: the template already wrote every special token it wants."""
    text = render_text(tokenizer, messages, add_generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> list[int]:
    """The prompt an engine generates from: the conversation plus the generation prompt."""
    return render_ids(tokenizer, messages, add_generation_prompt=True)


def generation_stop_ids(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> list[int]:
    """Token ids at which generation stops: the tokenizer's eos (<|im_end|> for ChatML models), the
    model's generation_config eos ids (Qwen ships [<|im_end|>, <|endoftext|>]), and <|im_end|>
    when the vocabulary has it."""
    ids: list[int] = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    ids += gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else []
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.append(im_end)
    out = list(dict.fromkeys(int(i) for i in ids))
    if not out:
        raise ValueError("the tokenizer has no eos token and the model's generation_config none; "
                         "generation could never stop at end of turn")
    return out


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Token ids that end an assistant turn in the template: EOS, plus ChatML's <|im_end|> when it
    is a token (not generation_config's extra eos ids: the reply's loss ends at the template's)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return ids


@torch.no_grad()
def prompt_logprobs(model: PreTrainedModel, token_ids: list[int]) -> list[float]:
    """Log-prob of token i given tokens < i, for i >= 1, in fp32 (empty for fewer than two
    tokens). One sequence per forward: no padding, so nothing but the kernels can differ from
    another engine's numbers."""
    if len(token_ids) < 2:
        return []
    with eval_mode(model):
        x = torch.tensor([token_ids], device=next(model.parameters()).device)
        logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
        logprobs = torch.log_softmax(logits, dim=-1).gather(1, x[0, 1:, None])[:, 0]
        return logprobs.tolist()
