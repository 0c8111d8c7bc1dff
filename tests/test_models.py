"""Loading a local model dir, and every user-caused failure as one UsageError line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dreamd.config import ModelConfig
from dreamd.errors import UsageError
from dreamd.models import load_model, model_facts, resolve_device, resolve_dtype
from dreamd.tiny import tiny_config, write_tiny_model_dir


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model_dir(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture()
def broken(llama_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny model dir that a test may damage."""
    return Path(shutil.copytree(llama_dir, tmp_path / "model"))


def _load(path: Path, **kw) -> tuple:
    return load_model(ModelConfig(path=path, **kw), "cpu")


def _usage(path: Path, **kw) -> str:
    with pytest.raises(UsageError) as err:
        _load(path, **kw)
    msg = str(err.value)
    assert "\n" not in msg, "usage errors are one line"
    return msg


def test_loads_tiny_llama_in_fp32_train_mode(llama_dir: Path) -> None:
    model, tok = _load(llama_dir)
    assert model.training and model.dtype == torch.float32
    assert all(p.requires_grad for p in model.parameters())
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    assert model.config._attn_implementation == "sdpa"


def test_dtype_and_attn_choices(llama_dir: Path) -> None:
    model, _ = _load(llama_dir, dtype="bfloat16", attn_implementation="eager")
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16


def test_resolve_device() -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device"):
            resolve_device("cuda")


def test_missing_dir(tmp_path: Path) -> None:
    msg = _usage(tmp_path / "nope")
    assert "does not exist" in msg and "model.path" in msg


def test_file_instead_of_dir(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    assert "not a directory" in _usage(tmp_path / "f")


def test_no_config_json(broken: Path) -> None:
    (broken / "config.json").unlink()
    assert "no config.json" in _usage(broken)


def test_config_not_json(broken: Path) -> None:
    (broken / "config.json").write_text("{not json")
    assert "cannot read" in _usage(broken)


def test_unknown_model_type(broken: Path) -> None:
    cfg = json.loads((broken / "config.json").read_text())
    cfg["model_type"] = "no_such_model"
    (broken / "config.json").write_text(json.dumps(cfg))
    assert "cannot read" in _usage(broken)


def test_config_not_a_causal_lm(broken: Path) -> None:
    from transformers import ViTConfig

    (broken / "config.json").unlink()
    ViTConfig().save_pretrained(broken)
    msg = _usage(broken)
    assert "ViTConfig" in msg and "not a causal language model" in msg


def test_weights_missing(broken: Path) -> None:
    (broken / "model.safetensors").unlink()
    assert "has no weights" in _usage(broken)


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.0001])
def test_weights_truncated(broken: Path, keep: float) -> None:
    f = broken / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])
    msg = _usage(broken)
    assert "corrupt or truncated" in msg and str(broken) in msg


def test_weights_lacking_a_tensor(broken: Path) -> None:
    f = broken / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    msg = _usage(broken)
    assert "lack 1 tensors" in msg and "down_proj" in msg


def test_tokenizer_missing(broken: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (broken / name).unlink()
    assert "cannot load the tokenizer" in _usage(broken)


def test_tokenizer_without_chat_template(broken: Path) -> None:
    (broken / "chat_template.jinja").unlink()
    msg = _usage(broken)
    assert "has no chat_template; add one to tokenizer_config.json" in msg


def test_model_facts_llama_and_hybrid() -> None:
    llama = model_facts(tiny_config("llama", 512, layers=2))
    assert llama["num_layers"] == 2 and llama["layer_types"] == {"full_attention": 2}
    assert llama["full_attention_layers"] == [0, 1] and llama["architecture"] == "LlamaForCausalLM"
    assert llama["context_length"] == 32768 and llama["vocab_size"] == 512 and llama["hidden_size"] == 64

    hybrid = model_facts(tiny_config("qwen3.5", 512, layers=8))
    assert hybrid["layer_types"] == {"linear_attention": 6, "full_attention": 2}
    assert hybrid["full_attention_layers"] == [3, 7]
    assert hybrid["num_attention_heads"] == 4 and hybrid["num_key_value_heads"] == 2
    assert hybrid["head_dim"] == 16 and hybrid["model_type"] == "qwen3_5_text"
    json.dumps(hybrid)  # facts are stored as JSON and quoted into 'self' scenarios


def test_model_facts_reads_multimodal_text_config() -> None:
    from transformers import Qwen3_5Config

    cfg = Qwen3_5Config(text_config=tiny_config("qwen3.5", 512, layers=4).to_dict())
    facts = model_facts(cfg)
    assert facts["num_layers"] == 4 and facts["full_attention_layers"] == [3]
