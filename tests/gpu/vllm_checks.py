"""The real vLLM engine on a GPU, one architecture per process.

Only one sleep-mode vllm.LLM may live in a process (FACTS.md), so tests/gpu/test_vllm_gpu.py
runs this file once per architecture in a fresh interpreter:

    python -m tests.gpu.vllm_checks {llama,llama_tied,qwen3.5} OUT.json

It builds a random-initialised tiny model (hidden 256, 4 layers; written by
dreamd.tiny.write_tiny_model_dir), serves it with VLLMEngine (dummy weights, then a full push),
and checks, in order: canary after the first push; batched sampled generation; a sleeping
training window (sleep level 2 frees memory, trained weights pushed, canary passes, and the
engine does NOT match the weights on disk, i.e. nothing reloaded them); an awake window; a push
missing one tensor is refused by vLLM's own loaded-set check; tied embeddings stay tied.
Every number (phase seconds, free memory, tokens/s, canary deltas) goes to OUT.json.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from dreamd.config import EngineConfig, ModelConfig, OptimizerConfig
from dreamd.engines.base import Sampling
from dreamd.engines.canary import canary_probe, compare, default_atol, run_canary, trainer_prompt_logprobs
from dreamd.engines.ledger import PhaseLedger, cuda_free_bytes
from dreamd.engines.memory import decide_sleep, estimate_training_memory
from dreamd.engines.vllm import VLLMEngine
from dreamd.engines.window import TrainingWindow
from dreamd.models import load_model
from dreamd.tiny import build_tiny_model, bundled_corpus, tiny_config, train_tokenizer

HIDDEN, LAYERS = 256, 4
CONVS = [
    [{"role": "user", "content": "What is 7 * 8?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort [3, 1, 2] in place."}],
    [{"role": "user", "content": "Name a prime number larger than 100."}],
    [{"role": "user", "content": "Write a Python function that reverses a string."}],
]


def write_model(out: Path, name: str) -> Path:
    arch = "qwen3.5" if name.startswith("qwen") else "llama"
    tok = train_tokenizer([bundled_corpus()], vocab_size=4096)
    cfg = tiny_config(arch, len(tok), hidden=HIDDEN, layers=LAYERS, tokenizer=tok)
    cfg.tie_word_embeddings = name.endswith("_tied")
    build_tiny_model(cfg, seed=0).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def train_steps(model: torch.nn.Module, tok, steps: int, lr: float) -> None:
    ids = torch.tensor([tok("def square(x):\n    return x * x\n" * 4, add_special_tokens=False)["input_ids"]],
                       device=model.device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    del opt


def main(name: str, out_json: Path) -> None:
    numbers: dict[str, object] = {"arch": name}
    workdir = Path(tempfile.mkdtemp(prefix=f"dreamd-gpu-{name.replace('.', '')}-"))
    path = write_model(workdir / "model", name)
    model, tok = load_model(ModelConfig(path=path, dtype="bfloat16"), "cuda")
    total = torch.cuda.mem_get_info()[1]
    numbers["free_before_engine"] = cuda_free_bytes()

    t0 = time.perf_counter()
    engine = VLLMEngine.create(model_path=path, model=model, tokenizer=tok, seed=0,
                               engine_cfg=EngineConfig(gpu_memory_utilization=0.25, max_model_len=2048))
    numbers["create_and_first_push_s"] = time.perf_counter() - t0
    numbers["vllm_version"] = engine.api.version
    numbers["free_engine_awake"] = cuda_free_bytes()
    probe = canary_probe(tok)
    first = run_canary(engine, model, probe)
    numbers["canary_first_push"] = first.to_json()

    ledger = PhaseLedger()
    with ledger.phase("generate") as rec:
        outs = engine.generate(CONVS * 8, Sampling(n=2, temperature=0.8, top_p=0.95, max_tokens=64, seed=1))
        rec.tokens = engine.last_generated_tokens
    assert len(outs) == 32 and all(len(c) == 2 for c in outs)
    assert all(c.finish_reason in ("stop", "length") and c.token_ids for cs in outs for c in cs)
    again = engine.generate(CONVS, Sampling(n=2, temperature=0.8, top_p=0.95, max_tokens=64, seed=1))
    assert [[c.token_ids for c in cs] for cs in again] == [[c.token_ids for c in cs] for cs in outs[:4]], \
        "seeded sampling is not reproducible"

    # ---- sleeping window: sleep(2), train, wake weights, push, wake kv, canary ------------------
    memory = estimate_training_memory(model, OptimizerConfig(name="adamw"), batch_size=1, seq_len=64,
                                      eager_attention=False)
    decision = decide_sleep(memory, cuda_free_bytes(), policy="always", total_bytes=total)
    numbers["decision_auto"] = decide_sleep(memory, cuda_free_bytes(), total_bytes=total).reason
    window = TrainingWindow(engine, decision, ledger, probe=probe)
    window.before_train()
    numbers["free_engine_asleep"] = cuda_free_bytes()
    assert numbers["free_engine_asleep"] > numbers["free_engine_awake"], "sleep(level=2) freed nothing"
    with ledger.phase("train"):
        train_steps(model, tok, steps=20, lr=1e-3)
    canary = window.after_train(model)
    numbers["canary_after_sleep_push"] = canary.to_json()
    assert engine.last_push.missing == () and engine.last_push.tie_ok

    # The engine serves the trained weights, not the ones on disk: a disk model disagrees.
    disk, _ = load_model(ModelConfig(path=path, dtype="bfloat16"), "cuda")
    vs_disk = compare(engine.prompt_logprobs([probe])[0], trainer_prompt_logprobs(disk, probe),
                      default_atol(torch.bfloat16))
    numbers["engine_vs_disk_mean_abs_diff"] = vs_disk.mean_abs_diff
    assert not vs_disk.ok, "engine matches the untrained disk weights: the push did not land"
    del disk

    # ---- awake window: push in place, reset prefix cache, canary --------------------------------
    awake = decide_sleep(memory, cuda_free_bytes(), policy="never", total_bytes=total)
    window = TrainingWindow(engine, awake, ledger, probe=probe)
    with window.training(model):
        with ledger.phase("train"):
            train_steps(model, tok, steps=5, lr=1e-3)
    numbers["canary_after_awake_push"] = window.last_canary.to_json()

    # ---- vLLM's loaded-set check refuses a push that misses a tensor -----------------------------
    engine.sleep(level=2)
    engine.wake(["weights"])
    partial = [(n, p) for n, p in model.named_parameters() if n != "model.norm.weight"]
    try:
        engine.load_weights(partial)
        raise AssertionError("a push without model.norm.weight was accepted")
    except RuntimeError as exc:
        assert "norm" in str(exc), exc
    assert not engine.weights_valid
    engine.load_weights(model.named_parameters())
    engine.wake(["kv_cache"])
    numbers["canary_after_refused_partial"] = run_canary(engine, model, probe).to_json()

    numbers["phases"] = [{**r, "started_at": r["started_at"].isoformat()} for r in ledger.rows()]
    numbers["overhead_share"] = ledger.overhead_share()
    numbers["pushes"] = engine.pushes
    out_json.write_text(json.dumps(numbers, indent=1))
    print(json.dumps({k: v for k, v in numbers.items() if k != "phases"}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
