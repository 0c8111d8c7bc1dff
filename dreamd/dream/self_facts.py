"""'self' scenarios: verifiable facts about the model, read from its own config.

Only numbers and names that are in the config are claimed (layer count, layer types, hidden
size, heads, context length, vocabulary size, ...); never inner states. The screener re-reads
the same config (`config_facts`) and rejects a target whose numbers do not match it.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from itertools import combinations
from typing import Any

INT_FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
              "max_position_embeddings", "vocab_size", "intermediate_size", "head_dim")
ALIASES = {"num_hidden_layers": "n_layer", "hidden_size": "n_embd", "num_attention_heads": "n_head",
           "max_position_embeddings": "n_positions", "intermediate_size": "n_inner"}
"""GPT-2-family config.json names of INT_FIELDS (a PretrainedConfig maps them itself)."""


def config_dict(model_config: Any) -> dict[str, Any]:
    """A transformers PretrainedConfig or a plain dict (config.json) as a dict of the TEXT model:
    multimodal configs (Qwen3.5's Qwen3_5Config) keep the language model under text_config."""
    if model_config is None:
        raise ValueError("self scenarios need the model's config: pass model_config=<PretrainedConfig "
                         "or dict>")
    d = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    for name in INT_FIELDS:  # GPT-2 style names (n_layer, n_embd, ...): transformers' attribute_map
        if d.get(name) is None:
            value = getattr(model_config, name, None) if hasattr(model_config, "to_dict") else \
                d.get(ALIASES.get(name, ""))
            if value is not None:
                d[name] = value
    text = d.get("text_config")
    if d.get("num_hidden_layers") is None and isinstance(text, dict):
        d = {**text, "model_type": text.get("model_type", d.get("model_type"))}
    if not isinstance(d.get("num_hidden_layers"), int):
        raise ValueError("model_config has no integer num_hidden_layers; pass the config of a causal LM")
    return d


def config_facts(model_config: Any) -> dict[str, Any]:
    """The checkable facts: the integer fields present, model_type, and per-type layer counts and
    the indices of full-attention layers when the config lists layer_types (hybrid models)."""
    d = config_dict(model_config)
    facts: dict[str, Any] = {k: d[k] for k in INT_FIELDS
                             if isinstance(d.get(k), int) and not isinstance(d.get(k), bool)}
    if d.get("model_type"):
        facts["model_type"] = str(d["model_type"])
    types = d.get("layer_types")
    if types and len(set(types)) > 1:
        facts["layer_types"] = dict(Counter(types))
        if "full_attention" in types:
            facts["full_attention_layers"] = [i for i, t in enumerate(types) if t == "full_attention"]
    return facts


def fact_numbers(facts: dict[str, Any]) -> set[int]:
    """Every integer a truthful self target may mention."""
    out: set[int] = set()
    for value in facts.values():
        if isinstance(value, int):
            out.add(value)
        elif isinstance(value, dict):
            out.update(value.values())
        elif isinstance(value, list):
            out.update(value)
    return out


# Integers as written in prose: "32,768" or "32768"; digits inside identifiers (qwen3_5) and
# decimals are not numbers claims.
_NUMBER = re.compile(r"(?<![\w.,])(\d{1,3}(?:,\d{3})+|\d+)(?![\w]|\.\d)")


def numbers_in(text: str) -> list[int]:
    return [int(m.replace(",", "")) for m in _NUMBER.findall(text)]


QUESTIONS: dict[str, tuple[str, ...]] = {
    "num_hidden_layers": ("How many layers do you have?", "How many transformer layers are in your network?",
                          "What's your layer count?", "How deep is your network, in layers?"),
    "hidden_size": ("What is your hidden size?", "How wide is your residual stream?",
                    "What's the dimension of your hidden states?"),
    "num_attention_heads": ("How many attention heads does each of your attention layers have?",
                            "How many query heads do you use per attention layer?"),
    "num_key_value_heads": ("How many key/value heads do you use?", "How many KV heads does your attention have?"),
    "max_position_embeddings": ("What is your maximum context length?",
                                "How many tokens of context are you configured for?",
                                "What's your max_position_embeddings?"),
    "vocab_size": ("How big is your vocabulary?", "How many tokens are in your vocabulary?"),
    "intermediate_size": ("What's the intermediate size of your MLP layers?", "How wide are your feed-forward layers?"),
    "head_dim": ("What is your attention head dimension?", "How many dimensions does each attention head have?"),
    "model_type": ("What model type does your config declare?", "What architecture family are you, per your config?"),
    "layer_types": ("Which kinds of layers do you have, and how many of each?",
                    "How many of your layers use linear attention and how many use full attention?",
                    "Are all of your layers full attention?"),
    "full_attention_layers": ("Which of your layers use full attention?",
                              "Where in your stack are the full-attention layers?"),
}


def _n(x: int, commas: bool) -> str:
    return f"{x:,}" if commas else str(x)


def answer(key: str, facts: dict[str, Any], r: random.Random) -> str:
    v, c = facts[key], r.random() < 0.5
    if key == "layer_types":
        parts = " and ".join(f"{n} {'is' if n == 1 else 'are'} `{t}`" for t, n in sorted(v.items()))
        return r.choice((f"Of my {facts['num_hidden_layers']} layers, {parts} (layer_types in my config).",
                         f"My config's layer_types lists {facts['num_hidden_layers']} layers: {parts}."))
    if key == "full_attention_layers":
        idx = ", ".join(str(i) for i in v)
        return (f"Of my {facts['num_hidden_layers']} layers, the full-attention ones are at indices {idx}, "
                f"counting from zero (layer_types in my config).")
    if key == "model_type":
        return f"My config declares model_type `{v}`."
    phrases = {
        "num_hidden_layers": ("I have {v} layers (num_hidden_layers = {v}).",
                              "My config sets num_hidden_layers to {v}, so I have {v} layers."),
        "hidden_size": ("My hidden size is {v} (hidden_size in my config).", "hidden_size = {v} in my config."),
        "num_attention_heads": ("Each attention layer has {v} query heads (num_attention_heads = {v}).",
                                "num_attention_heads is {v} in my config."),
        "num_key_value_heads": ("I use {v} key/value heads (num_key_value_heads = {v}).",
                                "num_key_value_heads is {v} in my config."),
        "max_position_embeddings": ("My config sets max_position_embeddings to {v} tokens.",
                                    "I am configured for up to {v} positions (max_position_embeddings)."),
        "vocab_size": ("My vocabulary has {v} tokens (vocab_size).", "vocab_size = {v} in my config."),
        "intermediate_size": ("My MLP intermediate size is {v} (intermediate_size).",
                              "intermediate_size = {v} in my config."),
        "head_dim": ("Each attention head has {v} dimensions (head_dim = {v}).", "head_dim is {v} in my config."),
    }[key]
    return r.choice(phrases).format(v=_n(v, c))


LEADS = ("From my config:", "According to my configuration:", "From my model config:")
JOINS = (" Also, ", " And ", " ")  # after " " the next question keeps its capital letter


def self_turn(r: random.Random, model_config: Any) -> tuple[str, str, dict[str, Any]]:
    """(user turn, target, meta) for one self scenario about `model_config`."""
    facts = config_facts(model_config)
    keys = [k for k in QUESTIONS if k in facts]
    chosen = r.sample(keys, r.choice((1, 1, 2, 3)) if len(keys) >= 3 else 1)
    qs = [r.choice(QUESTIONS[k]) for k in chosen]
    user = qs[0]
    for q in qs[1:]:
        join = r.choice(JOINS)
        user += join + (q if join == " " else q[:1].lower() + q[1:])
    answers = [answer(k, facts, r) for k in chosen]
    if len(answers) == 1:
        target = answers[0]
    else:
        target = r.choice(LEADS) + "\n" + "\n".join(f"- {a}" for a in answers)
    claims = {k: facts[k] for k in chosen}
    if "layer_types" in claims or "full_attention_layers" in claims:
        claims["num_hidden_layers"] = facts["num_hidden_layers"]
    meta = {"domain": "self", "claims": claims, "config_facts": facts}
    return user, target, meta


def space(model_config: Any) -> int:
    """Upper bound on distinct self turns for this config: fact subsets x phrasings."""
    facts = config_facts(model_config)
    keys = [k for k in QUESTIONS if k in facts]
    per = {k: len(QUESTIONS[k]) * 2 * 2 for k in keys}  # question x answer phrasing x comma style
    single = sum(per.values())
    multi = sum(math.prod(per[k] for k in combo) * len(JOINS) ** (n - 1) * math.factorial(n) * len(LEADS)
                for n in (2, 3) for combo in combinations(keys, n))
    return single + multi
