"""Loading the model to train, and the facts about it that other parts need.

`load_model` reads a LOCAL transformers directory only: nothing is ever downloaded
(`local_files_only=True`, HF_HUB_OFFLINE=1). Every way a user can hand us a bad directory ends
in one `UsageError` line saying what is wrong, where, and how to fix it, because a traceback
from deep inside transformers ("Repo id must be in the form ...") tells an operator nothing.

`model_facts` turns a config into plain numbers (layers, which layers are full attention,
context length, ...): 'self' scenarios teach these facts, and the Q3 metric reads only the
full-attention layers, since Gated-DeltaNet layers have no attention maps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# Set before transformers/huggingface_hub read it at import, so even code paths that do not
# take local_files_only stay off the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import torch  # noqa: E402
from safetensors import SafetensorError  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING  # noqa: E402

from dreamd.config import ModelConfig  # noqa: E402
from dreamd.config_file import check_model_dir  # noqa: E402
from dreamd.errors import UsageError  # noqa: E402

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a CUDA device is visible, else 'cpu'. Asking for 'cuda' on a machine
    without one is a usage error, not a silent fallback (training on CPU would be ~100x slower)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("run.device = 'cuda' but torch sees no CUDA device (torch "
                         f"{torch.__version__}); set run.device = 'auto' or 'cpu', or install a CUDA torch")
    if device not in ("cpu", "cuda"):
        raise UsageError(f"run.device = {device!r} is not a device dreamd knows; use 'auto', 'cpu' or 'cuda'")
    return device


def resolve_threads(threads: int) -> int:
    """run.threads: 0 -> half the cores this process may run on, at least 1 (see the field's doc)."""
    if threads:
        return threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // 2)


def apply_threads(threads: int) -> int:
    """Set torch's intra-op threads for this process from run.threads; returns the number.
    vLLM's CPU worker reads its own setting (engines.vllm_compat.cpu_thread_env) at creation."""
    n = resolve_threads(threads)
    torch.set_num_threads(n)
    return n


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """'auto': bfloat16 on CUDA (half the memory of fp32; train/bf16.py makes its updates land),
    float32 on CPU (CPU bf16 matmuls are slower than fp32 on most x86 parts)."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return _DTYPES[dtype]


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message without its final period (it goes mid-sentence)."""
    text = str(exc).strip()
    return text.splitlines()[0].rstrip(".") if text else type(exc).__name__


def _load_config(path: Path) -> PretrainedConfig:
    check_model_dir(path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read {path / 'config.json'}: {_first_line(exc)}; fix the file or upgrade "
                         "transformers if the model type is newer than it") from None
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UsageError(f"{path / 'config.json'} describes a {type(config).__name__} "
                         f"(model_type {config.model_type!r}), not a causal language model; "
                         "dreamd trains decoder LMs (e.g. Llama, Qwen3, Qwen3.5)")
    return config


def _load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise UsageError(f"cannot load the tokenizer from {path}: {_first_line(exc)}; copy tokenizer.json "
                         "and tokenizer_config.json of the model into the directory") from None
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"tokenizer in {path} has no chat_template; add one to "
                         "tokenizer_config.json (or a chat_template.jinja file)")
    if tokenizer.eos_token_id is None:
        raise UsageError(f"tokenizer in {path} has no eos_token; set eos_token in "
                         "tokenizer_config.json to the end-of-turn token (e.g. <|im_end|>)")
    return tokenizer


def load_model(model_cfg: ModelConfig, device: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the causal LM and its tokenizer from the local directory `model_cfg.path`.

    `device` is a resolved device ('cpu' or 'cuda', see `resolve_device`). The model comes
    back in train mode with every parameter trainable; dtype follows `resolve_dtype`.
    Raises UsageError (one line) for a missing directory, a missing or unreadable config.json,
    a config that is not a causal LM, missing/corrupt/incomplete weights, and a tokenizer that
    is missing or lacks a chat template or an eos token.
    """
    path = Path(model_cfg.path)
    config = _load_config(path)
    tokenizer = _load_tokenizer(path)
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise UsageError(f"model directory {path} has no weights (none of {', '.join(WEIGHT_FILES)}); "
                         "copy the model's weight files into it")
    dtype = resolve_dtype(model_cfg.dtype, device)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=dtype, attn_implementation=model_cfg.attn_implementation,
            local_files_only=True, output_loading_info=True)
    except SafetensorError as exc:
        raise UsageError(f"weights in {path} are corrupt or truncated ({exc}); copy the "
                         "*.safetensors files again and compare their sizes") from None
    except OSError as exc:
        raise UsageError(f"cannot load the weights in {path}: {_first_line(exc)}; copy the model's weight "
                         "files again") from None
    except ValueError as exc:
        first = _first_line(exc)
        if "attn" in first or "attention" in first:
            raise UsageError(f"{type(config).__name__} in {path} cannot use model.attn_implementation = "
                             f"{model_cfg.attn_implementation!r} ({first}); set it to 'eager'") from None
        raise UsageError(f"cannot load the model in {path}: {first}") from None
    except RuntimeError as exc:  # transformers: tensors whose shapes differ from config.json
        if "mismatched" not in str(exc) and "size mismatch" not in str(exc):
            raise
        raise UsageError(f"weights in {path} have other shapes than its config.json says "
                         f"({type(config).__name__}); the config and the weights come from different "
                         "models, copy the full model again") from None
    # A checkpoint that lacks tensors loads "fine" with random values and a warning; training
    # from that would silently start from noise, so refuse it.
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(m[0]) if isinstance(m, tuple) else str(m) for m in info.get("mismatched_keys") or [])
    if missing or mismatched:
        bad = missing or mismatched
        what = "lack" if missing else "have wrong shapes for"
        raise UsageError(f"weights in {path} {what} {len(bad)} tensors of {type(config).__name__} "
                         f"(e.g. {bad[0]}); the weights do not match config.json, copy the full model again")
    # Loaded on CPU, then moved: device_map= would stream weights straight to the GPU but needs
    # the accelerate package, which dreamd does not otherwise depend on.
    model.to(device)
    model.train()
    return model, tokenizer


def model_facts(config: PretrainedConfig) -> dict[str, Any]:
    """Checkable facts about a model, from its config alone (no weights needed).

    Keys: architecture, model_type, num_layers, layer_types (count per type, e.g.
    {'linear_attention': 3, 'full_attention': 1}), full_attention_layers (indices, what Q3
    reads), hidden_size, num_attention_heads, num_key_value_heads, head_dim, context_length,
    vocab_size, tie_word_embeddings. Multimodal configs are read through their text config.
    """
    text = config.get_text_config()
    layers = int(text.num_hidden_layers)
    types = list(getattr(text, "layer_types", None) or ["full_attention"] * layers)
    if len(types) != layers:
        raise ValueError(f"config has {layers} layers but {len(types)} layer_types")
    counts: dict[str, int] = {}
    for kind in types:
        counts[kind] = counts.get(kind, 0) + 1
    heads = int(text.num_attention_heads)
    archs = getattr(config, "architectures", None) or [type(config).__name__]
    return {
        "architecture": archs[0],
        "model_type": config.model_type,
        "num_layers": layers,
        "layer_types": counts,
        "full_attention_layers": [i for i, kind in enumerate(types) if kind == "full_attention"],
        "hidden_size": int(text.hidden_size),
        "num_attention_heads": heads,
        "num_key_value_heads": int(getattr(text, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(text, "head_dim", None) or text.hidden_size // heads),
        "context_length": int(text.max_position_embeddings),
        "vocab_size": int(text.vocab_size),
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
    }
