"""Write a GGUF file from a tiny Llama-style transformers model, as llama.cpp's
convert_hf_to_gguf.py would, so the GGUF conversion (dreamd/gguf.py) is tested in seconds
without the 93 MB SmolLM2 file.

- metadata under llama.cpp's keys (llama.block_count, ...), tokenizer as 'gpt2' (byte-level BPE:
  the vocabulary in id order, merges 'a b', the ChatML tokens marked CONTROL), chat template;
- tensors under GGUF names (gguf.get_tensor_name_map), q/k rows permuted the way llama.cpp
  permutes them (transformers reverses it when loading), F32 (exact) or Q8_0 (quantised);
- a tied model gets no output.weight (that is how a GGUF says "tied").
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, MODEL_ARCH, TokenType, get_tensor_name_map
from gguf.quants import quantize
from transformers import PreTrainedModel, PreTrainedTokenizerFast


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (interleaved rotary halves), the inverse of transformers'
    LlamaTensorProcessor._reverse_permute_weights."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, path: Path, *,
                     quant: str = "F32", chat_template: str | None = "keep",
                     architecture: str = "llama") -> Path:
    cfg = model.config
    writer = GGUFWriter(str(path), architecture)
    writer.add_name("dreamd tiny test model")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_vocab_size(cfg.vocab_size)

    vocab = tokenizer.get_vocab()
    tokens = [tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert len(tokens) == cfg.vocab_size and [vocab[t] for t in tokens] == list(range(len(tokens)))
    special = set(tokenizer.all_special_tokens)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([TokenType.CONTROL if t in special else TokenType.NORMAL for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    if chat_template is not None:
        writer.add_chat_template(tokenizer.chat_template if chat_template == "keep" else chat_template)

    names = get_tensor_name_map(MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    tied = bool(cfg.tie_word_embeddings)
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        base, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        data = tensor.detach().float().numpy()
        if name.endswith("attn_q.weight"):
            data = llama_permute(data, cfg.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            data = llama_permute(data, cfg.num_key_value_heads)
        if quant == "Q8_0" and data.ndim == 2 and data.shape[1] % 32 == 0:
            writer.add_tensor(name, quantize(data, GGMLQuantizationType.Q8_0),
                              raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
