"""Tiny random-initialised models and a locally trained tokenizer (no hub, no downloads).

`dreamd init` and the tests use these. Two architectures:
- 'llama': a Llama-style decoder (all layers full attention).
- 'qwen3.5': a Qwen3.5-style hybrid: 3 of every 4 layers Gated DeltaNet (linear attention with
  a conv + recurrent state), every 4th full attention, as in the target family (Qwen3.5).

Both save as ordinary transformers directories (config.json + model.safetensors + tokenizer
files with a chat template), so the real loading path (`from_pretrained` on a local dir) is the
one exercised everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast
from transformers import AutoModelForCausalLM, Qwen3_5TextConfig

Arch = Literal["llama", "qwen3.5"]

VLLM_HEAD_DIM = 32
"""Attention head size of `dreamd init` models: the smallest vLLM's CPU attention supports."""
LINEAR_HEAD_DIM = 64
"""Gated-DeltaNet head size of `dreamd init` hybrids: the smallest vLLM's CPU kernels support."""

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# ChatML, the format of the Qwen family. The reply ends at <|im_end|>, which is also EOS, so
# generation stops at end of turn and the trained reply includes the end-of-turn token.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def bundled_corpus() -> str:
    """English and code-flavoured text shipped with dreamd (CPython stdlib docstrings)."""
    return resources.files("dreamd.data").joinpath("corpus.txt").read_text()


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts`, with ChatML special tokens and chat template.

    Byte-level means any input (garbage included) encodes; nothing is ever <unk>.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        bos_token=None,
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        padding_side="left",  # generation pads on the left; the trainer pads explicitly
        model_max_length=32768,
    )


def tiny_config(arch: Arch, vocab_size: int, *, hidden: int = 64, layers: int = 4,
                max_positions: int = 32768, tokenizer: PreTrainedTokenizerFast | None = None,
                head_dim: int | None = None) -> PretrainedConfig:
    """Config of a tiny model. `layers` must be a multiple of 4 for 'qwen3.5' (3 linear : 1 full).

    head_dim: None keeps the historic shape (heads of 16, which the tests' numbers were taken
    with); `dreamd init` passes VLLM_HEAD_DIM so vLLM's CPU kernels can serve the model: its
    attention takes head sizes 32..512 and its Gated-DeltaNet kernels 64 or 128, which the
    hybrid's linear-attention heads get (wider than hidden / heads when hidden is small).
    """
    special = {}
    if tokenizer is not None:
        special = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.pad_token_id)
    heads = max(2, hidden // (head_dim or 16))
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                  head_dim=head_dim or hidden // heads, max_position_embeddings=max_positions,
                  tie_word_embeddings=False, **special)
    if arch == "llama":
        cfg = LlamaConfig(**common)
        cfg.architectures = ["LlamaForCausalLM"]
        return cfg
    if arch == "qwen3.5":
        if layers % 4:
            raise ValueError(f"qwen3.5-style models need layers divisible by 4, got {layers}")
        layer_types = (["linear_attention"] * 3 + ["full_attention"]) * (layers // 4)
        linear_dim = max(LINEAR_HEAD_DIM, hidden // heads) if head_dim else hidden // heads
        linear_heads = max(1, hidden // linear_dim) if head_dim else heads
        cfg = Qwen3_5TextConfig(**common, layer_types=layer_types,
                                linear_num_key_heads=max(1, linear_heads // 2), linear_num_value_heads=linear_heads,
                                linear_key_head_dim=linear_dim, linear_value_head_dim=linear_dim)
        cfg.architectures = ["Qwen3_5ForCausalLM"]
        return cfg
    raise ValueError(f"unknown tiny architecture {arch!r}; choose 'llama' or 'qwen3.5'")


def build_tiny_model(config: PretrainedConfig, seed: int = 0) -> PreTrainedModel:
    """A random-initialised causal LM from `config`, in fp32, deterministic for a seed."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    return model


def write_tiny_model_dir(out: Path, arch: Arch = "llama", *, texts: Iterable[str] | None = None,
                         vocab_size: int = 4096, hidden: int = 64, layers: int = 4, seed: int = 0,
                         head_dim: int | None = None) -> Path:
    """Train a tokenizer on `texts` (default: the bundled corpus), build the model, save both."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(list(texts) if texts is not None else [bundled_corpus()], vocab_size)
    config = tiny_config(arch, len(tokenizer), hidden=hidden, layers=layers, tokenizer=tokenizer,
                         head_dim=head_dim)
    model = build_tiny_model(config, seed=seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
