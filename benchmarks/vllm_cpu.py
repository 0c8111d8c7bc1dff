"""The vLLM engine on vLLM's CPU build: overhead, engine choice, and push cost, side by side.

    .venv/bin/python benchmarks/vllm_cpu.py [--model DIR] [--repeats 5] [--threads 1]

One process, one vllm.LLM (the daemon's shape), torch threads pinned (--threads; vLLM's CPU
worker keeps them via OMP_NUM_THREADS). Default model: a `dreamd init` tiny Llama (hidden 64,
heads of 32) written to a temp dir; --model takes any dreamd model dir (e.g. the converted
SmolLM2-135M-Instruct). Rows, each against a baseline measured in the same run, alternating
A/B per repeat so load on a shared box hits both sides alike (median [min, max]):

1. dreamd's VLLMEngine.generate vs vllm.LLM.generate alone, on the same token prompts with the
   same SamplingParams (the dreamer's shape: 16 conversations x n=2, 64 tokens, seeded):
   completion tokens/s ratio (target >= 0.95).
2. vLLM vs the transformers engine for the same batched sampled generation: tokens/s ratio.
3. push (all weights through the layerwise reload) + canary, seconds vs one training step
   (dreamd's Trainer, APOLLO, a batch of 4 template scenarios).
4. the push one tensor per collective_rpc (load_weights_streamed: the torchrun push from the
   FSDP2 shards, engines/ranked.py, without the gathers) vs all weights in one call, seconds.
Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3g} [{min(xs):.3g}, {max(xs):.3g}]"


def measure(args: argparse.Namespace) -> dict:
    """The three comparisons (args: model, repeats, threads, max_tokens): per-repeat lists
    under 'overhead' (engine / vllm.LLM), 'vs_hf' (vLLM / transformers engine), 'push_ratio'
    (push + canary / train step), their sides, and 'about' (a line naming what ran)."""
    import torch

    torch.set_num_threads(args.threads)
    from dreamd.config import EngineConfig, ModelConfig, OptimizerConfig, TrainConfig
    from dreamd.dream.scenario import ScenarioKind
    from dreamd.dream.templates import TemplateDreamer
    from dreamd.engines.base import Sampling
    from dreamd.engines.canary import canary_probe, run_canary
    from dreamd.engines.hf import TransformersEngine, encode_chat
    from dreamd.engines.vllm import VLLMEngine
    from dreamd.engines import vllm_compat as compat
    from dreamd.models import load_model
    from dreamd.train.examples import encode_scenario
    from dreamd.train.trainer import Trainer

    path = args.model
    if path is None:
        from dreamd.init import tokenizer_texts
        from dreamd.tiny import VLLM_HEAD_DIM, write_tiny_model_dir

        path = Path(tempfile.mkdtemp(prefix="dreamd-bench-vllm-")) / "model"
        write_tiny_model_dir(path, "llama", texts=tokenizer_texts(0), head_dim=VLLM_HEAD_DIM)
    model, tok = load_model(ModelConfig(path=path), "cpu")
    engine = VLLMEngine.create(model_path=path, model=model, tokenizer=tok, seed=0, threads=args.threads,
                               engine_cfg=EngineConfig(max_model_len=2048, kv_cache_memory_bytes=512 << 20))
    hf = TransformersEngine(model, tok)

    dreamer = TemplateDreamer(spec="", seed=0)
    rng = random.Random(0)
    kinds = [ScenarioKind.ACCEPT, ScenarioKind.PUSHBACK]
    convs = [dreamer.dream(kinds[i % 2], rng).training_messages()[:-1] for i in range(16)]
    sampling = Sampling(n=2, temperature=0.8, top_p=0.95, max_tokens=args.max_tokens, seed=1)
    prompts = [{"prompt_token_ids": encode_chat(tok, c)} for c in convs]
    # The same request the engine sends on CPU: no per-request seed, the process RNG seeded
    # (dreamd/engines/vllm_compat.py explains why).
    params = engine.api.SamplingParams(**compat.sampling_kwargs(
        n=2, temperature=0.8, top_p=0.95, max_tokens=args.max_tokens, seed=None, stop_token_ids=engine.stop_ids))

    def tps_engine() -> float:
        t0 = time.perf_counter()
        out = engine.generate(convs, sampling)
        return sum(len(c.token_ids) for cs in out for c in cs) / (time.perf_counter() - t0)

    def tps_raw() -> float:
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            out = engine.llm.generate(prompts, params, use_tqdm=False)
        return sum(len(c.token_ids) for o in out for c in o.outputs) / (time.perf_counter() - t0)

    def tps_hf() -> float:
        t0 = time.perf_counter()
        out = hf.generate(convs, sampling)
        return sum(len(c.token_ids) for cs in out for c in cs) / (time.perf_counter() - t0)

    tps_engine(), tps_raw()  # warm-up
    overhead, raw_tps, eng_tps, vs_hf, hf_tps = [], [], [], [], []
    for _ in range(args.repeats):
        raw = tps_raw()
        eng = tps_engine()
        overhead.append(eng / raw)
        raw_tps.append(raw)
        eng_tps.append(eng)
    for _ in range(max(1, args.repeats // 2)):
        v = tps_engine()
        h = tps_hf()
        vs_hf.append(v / h)
        hf_tps.append(h)

    # ---- push + canary vs a train step ----------------------------------------------------------
    trainer = Trainer(model, TrainConfig(lr=1e-5, warmup_steps=0), OptimizerConfig(rank=16), seed=0)
    scenarios = [dreamer.dream(kinds[i % 2], rng) for i in range(4 * (args.repeats + 1))]
    examples = [encode_scenario(tok, s, 1024) for s in scenarios]
    probe = canary_probe(tok)
    trainer.train_step(examples[:4])  # warm-up (optimizer state allocated)
    step_s, push_s, ratio = [], [], []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        trainer.train_step(examples[4 * (r + 1):4 * (r + 2)])
        step = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine.load_weights(model.named_parameters())
        assert run_canary(engine, model, probe).ok
        push = time.perf_counter() - t0
        step_s.append(step)
        push_s.append(push)
        ratio.append(push / step)

    # ---- the push one tensor per call (torchrun: from the FSDP2 shards) vs all at once -------
    names = [name for name, _ in model.named_parameters()]
    whole_s, streamed_s, stream_ratio = [], [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        engine.load_weights(model.named_parameters())
        whole = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine.load_weights_streamed(model.named_parameters(), names)
        streamed = time.perf_counter() - t0
        whole_s.append(whole)
        streamed_s.append(streamed)
        stream_ratio.append(streamed / whole)
    assert run_canary(engine, model, probe).ok

    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    about = (f"model {path} ({params_m:.1f}M params, {next(model.parameters()).dtype}), vllm "
             f"{engine.api.version} ({engine.api.device}), torch {torch.__version__}, threads {args.threads}, "
             f"repeats {args.repeats}, python {sys.version.split()[0]}")
    return {"overhead": overhead, "eng_tps": eng_tps, "raw_tps": raw_tps, "vs_hf": vs_hf, "hf_tps": hf_tps,
            "push_ratio": ratio, "push_s": push_s, "step_s": step_s, "stream_ratio": stream_ratio,
            "streamed_s": streamed_s, "whole_s": whole_s, "tensors": len(names), "about": about}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    m = measure(args)
    overhead, eng_tps, raw_tps, vs_hf, hf_tps = m["overhead"], m["eng_tps"], m["raw_tps"], m["vs_hf"], m["hf_tps"]
    ratio, push_s, step_s = m["push_ratio"], m["push_s"], m["step_s"]
    print(f"\n{m['about']}\n")
    print("| measure | ratio, median [min, max] | side A | side B |")
    print("|---|---|---|---|")
    print(f"| dreamd VLLMEngine.generate / vllm.LLM.generate, tokens/s (16 convs x n=2, "
          f"{args.max_tokens} tok) | {spread(overhead)} | {spread(eng_tps)} tok/s | {spread(raw_tps)} tok/s |")
    print(f"| vLLM engine / transformers engine, same batched sampling, tokens/s | {spread(vs_hf)} | "
          f"vLLM | {spread(hf_tps)} tok/s |")
    print(f"| push all weights + canary / one train step (batch 4, APOLLO) | {spread(ratio)} | "
          f"{spread(push_s)} s | {spread(step_s)} s |")
    print(f"| push one tensor per call ({m['tensors']} calls, as from FSDP2 shards) / all in one call | "
          f"{spread(m['stream_ratio'])} | {spread(m['streamed_s'])} s | {spread(m['whole_s'])} s |")


if __name__ == "__main__":
    main()
