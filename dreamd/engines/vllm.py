"""The vLLM engine: the offline `vllm.LLM` in the daemon's own process, one for its lifetime.

In-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) because weight pushes hand the trainer's tensors
to the served model through `LLM.collective_rpc(fn)`, which runs `fn` in the worker with no
pickling; and only one sleep-mode LLM can live in a process. The same code serves CUDA and
vLLM's CPU build; the platform differences live in engines.vllm_compat.

State kept here, because vLLM does not tell it reliably across versions:
- weights_valid: False from construction (load_format='dummy', random weights) and after
  sleep(level=2) until a full push has landed; generate/prompt_logprobs raise while False.
- asleep: which of {'weights', 'kv_cache'} are unmapped now. On a platform without sleep mode
  (CPU) sleep() raises instead of pausing vLLM's scheduler, after which generate would hang.
- prefix cache: every push makes cached KV blocks stale; `load_weights` calls
  reset_prefix_cache() right away when the KV cache is awake, else at wake(['kv_cache']), and
  raises when vLLM refuses the reset (it does while requests hold blocks).
A push is checked twice: by names before copying (every shard of every fused parameter, see
engines.names) and by vLLM's answer after (load_weights' returned set must cover every
parameter of the served model, the same check vLLM's own loader makes; tied lm_head must still
be the embedding). The engine never asks vLLM to reload weights from disk.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dreamd.config import EngineConfig
from dreamd.dream.scenario import Message
from dreamd.engines import vllm_compat as compat
from dreamd.engines.base import Completion, GenerationMeter, Sampling, SleepState, check_mixed
from dreamd.chat import encode_chat, generation_stop_ids
from dreamd.engines.names import PushLayout, layout_for
from dreamd.engines.vllm_compat import PushReport

CPU_DEFAULT_KV_BYTES = 1 << 30
"""KV cache on vLLM's CPU platform when engine.kv_cache_memory_bytes is unset: a fraction of
host RAM (gpu_memory_utilization) would take GiBs the trainer needs. 1 GiB holds ~23k tokens of
SmolLM2-135M in fp32 (30 layers x 3 KV heads x 64 x 2 x 4 bytes per token)."""
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class VLLMEngine:
    """Implements dreamd.engines.base.Engine on an in-process `vllm.LLM` (see module docstring)."""

    def __init__(self, llm: Any, api: compat.VllmApi, tokenizer: PreTrainedTokenizerBase,
                 layout: PushLayout, *, stop_ids: list[int], max_model_len: int, dtype: torch.dtype) -> None:
        self.llm = llm
        self.api = api
        self.tokenizer = tokenizer
        self.layout = layout
        self.stop_ids = list(stop_ids)
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.sleep_state = SleepState(weights_valid=False)  # load_format='dummy': random until the first push
        self._prefix_cache_stale = False
        self.pushes = 0
        self.last_push: PushReport | None = None
        self.last_generated_tokens = 0
        """Completion tokens produced by the last generate() call (for tokens/s)."""
        self.meter = GenerationMeter()
        self.lockstep = False
        """Under torchrun with vLLM data parallelism the ranks' engines step together (vLLM
        all-reduces every step): a rank with nothing to generate still calls vLLM, and idles."""

    @classmethod
    def create(cls, *, model_path: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
               engine_cfg: EngineConfig, seed: int, api: compat.VllmApi | None = None,
               threads: int | None = None) -> VLLMEngine:
        """Build the LLM for the model in `model_path` with dummy weights, then push `model`'s.

        Call it before the trainer allocates optimizer state: vLLM checks
        engine.gpu_memory_utilization (a fraction of TOTAL memory; of host RAM on CPU) against
        memory free now, unless engine.kv_cache_memory_bytes fixes the KV cache size.
        `threads`: torch threads the process keeps on vLLM's CPU platform (run.threads).
        """
        engine = cls.build(model_path=model_path, config=model.config, dtype=next(model.parameters()).dtype,
                           stop_ids=generation_stop_ids(tokenizer, model), tokenizer=tokenizer,
                           engine_cfg=engine_cfg, seed=seed, api=api, threads=threads)
        engine.load_weights(model.named_parameters())
        return engine

    @classmethod
    def build(cls, *, model_path: Path, config: Any, dtype: torch.dtype, stop_ids: list[int],
              tokenizer: PreTrainedTokenizerBase, engine_cfg: EngineConfig, seed: int,
              api: compat.VllmApi | None = None, threads: int | None = None,
              launcher: tuple[int, int] | None = None) -> VLLMEngine:
        """The LLM with dummy weights (weights_valid False until the first push). `launcher`:
        (tensor_parallel_size, data_parallel_size) under torchrun (engines/ranked.py): vLLM's
        external_launcher, which joins the process group torchrun's ranks already hold; every
        rank must build at once."""
        api = api or compat.import_vllm()
        layout = layout_for(config)
        compat.prepare_architecture(api, layout.served_architecture)
        compat.guard_module_scan()
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"vLLM serves float32/bfloat16/float16 weights, the trainer has {dtype}")
        if api.device == "cpu":
            if (reason := compat.cpu_unsupported_reason(config, dtype)) is not None:
                raise ValueError(f"vLLM's CPU platform cannot serve {model_path}: {reason}")
            if threads is not None:
                compat.cpu_thread_env(threads)
        kv_bytes = engine_cfg.kv_cache_memory_bytes
        if kv_bytes is None and api.device == "cpu":
            kv_bytes = CPU_DEFAULT_KV_BYTES
        kwargs = compat.llm_kwargs(
            model_path=str(model_path), dtype=DTYPE_NAMES[dtype], seed=seed,
            gpu_memory_utilization=engine_cfg.gpu_memory_utilization,
            enforce_eager=engine_cfg.enforce_eager, max_model_len=engine_cfg.max_model_len,
            kv_cache_memory_bytes=kv_bytes, sleep_mode=api.sleep_mode)
        if launcher is not None:
            kwargs.update(compat.external_launcher_kwargs(*launcher))
        engine = cls(api.LLM(**kwargs), api, tokenizer, layout, stop_ids=stop_ids,
                     max_model_len=engine_cfg.max_model_len, dtype=dtype)
        engine.lockstep = launcher is not None and launcher[1] > 1
        return engine

    # ---- state machine ---------------------------------------------------------------------
    @property
    def weights_valid(self) -> bool:
        return self.sleep_state.weights_valid

    @property
    def asleep_tags(self) -> frozenset[str]:
        return frozenset(self.sleep_state.asleep)

    @property
    def can_sleep(self) -> bool:
        """Whether sleep() can free memory here (vLLM's sleep mode exists on CUDA, not on CPU)."""
        return self.api.sleep_mode

    def sleep(self, level: int = 1) -> None:
        self.sleep_state.begin_sleep(level, None if self.api.sleep_mode else (
            f"vLLM's {self.api.device} platform has no sleep mode (its sleep() only pauses the "
            "scheduler, and generating afterwards hangs); keep the engine awake"))
        compat.sleep(self.llm, level)
        self.sleep_state.slept(level)
        self._prefix_cache_stale = False  # sleep(level >= 1) drops the KV cache, prefix cache included

    def wake(self, tags: list[str] | None = None) -> None:
        wanted = self.sleep_state.begin_wake(tags)
        compat.wake_up(self.llm, wanted)
        self.sleep_state.woke(wanted)
        if "kv_cache" in wanted and self._prefix_cache_stale:
            self._reset_prefix_cache()

    def close(self) -> None:
        """Shut vLLM down now (vllm_compat.shutdown: under torchrun this ends the world too)."""
        compat.shutdown(self.llm)

    def _reset_prefix_cache(self) -> None:
        if not compat.reset_prefix_cache(self.llm):
            raise RuntimeError("vLLM refused reset_prefix_cache() after a weight push (requests still "
                               "hold KV blocks); cached prefixes would be served from the old weights")
        self._prefix_cache_stale = False

    def _require_ready(self, what: str) -> None:
        self.sleep_state.require_awake(what)
        if not self.sleep_state.weights_valid:
            raise RuntimeError(f"{what} called before a full weight push (after construction or "
                               "sleep(level=2) the engine's weights are garbage); call load_weights()")
        assert not self._prefix_cache_stale, "prefix cache not reset after a push"

    # ---- weights ---------------------------------------------------------------------------
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Push ALL the trainer's weights in place, by HF name (see module docstring)."""
        self._push([self.layout.push_tensors(named_tensors)])

    def load_weights_streamed(self, named_tensors: Iterable[tuple[str, torch.Tensor]], names: list[str]) -> None:
        """Push ALL the weights one tensor at a time, as `named_tensors` yields them (under
        torchrun: each gathered whole from the FSDP2 shards just before, and dropped after, so
        no rank ever holds the whole model). `names`: every name it will yield, checked first."""
        pushed = [name for name in map(self.layout.push_name, names) if name is not None]
        if not pushed:
            raise ValueError("weight push is empty: no named tensors were given")
        self.layout.check_complete(pushed)
        layout = self.layout
        self._push([(name, tensor.detach())] for name, tensor in
                   ((layout.push_name(hf), t) for hf, t in named_tensors) if name is not None)

    def _push(self, chunks: Iterable[list[tuple[str, torch.Tensor]]]) -> None:
        if "weights" in self.sleep_state.asleep:
            raise RuntimeError("load_weights called while the weights sleep; call wake(['weights']) first")
        self.sleep_state.weights_valid = False  # until the push is known to be whole
        report = compat.push_weights(self.api, self.llm, chunks, self.layout.tied)
        self.pushes += 1
        self.last_push = report
        if report.missing:
            raise RuntimeError(f"weight push left {len(report.missing)} parameters of the served "
                               f"{self.layout.served_architecture} unwritten (e.g. {report.missing[0]}); "
                               "they hold garbage or dummy values")
        if not report.tie_ok:
            raise RuntimeError(f"after the push lm_head {'is not' if self.layout.tied else 'is'} the "
                               f"embedding, but tie_word_embeddings = {self.layout.tied}")
        self.sleep_state.weights_valid = True
        self._prefix_cache_stale = True
        if "kv_cache" not in self.sleep_state.asleep:
            self._reset_prefix_cache()

    # ---- generation ------------------------------------------------------------------------
    def _sampling_params(self, **kwargs: Any) -> Any:
        return self.api.SamplingParams(**compat.sampling_kwargs(**kwargs))

    def _tokens_prompts(self, token_ids: list[list[int]]) -> list[dict[str, list[int]]]:
        for i, ids in enumerate(token_ids):
            if len(ids) >= self.max_model_len:
                raise ValueError(f"prompt {i} has {len(ids)} tokens; engine.max_model_len is "
                                 f"{self.max_model_len} (raise it, or shorten the conversation)")
        return [{"prompt_token_ids": list(ids)} for ids in token_ids]  # vllm.TokensPrompt's shape

    def generate(self, conversations: list[list[Message]], sampling: Sampling) -> list[list[Completion]]:
        """`sampling.n` completions per conversation, rendered with the chat template exactly as
        TransformersEngine renders it, stopped at end of turn."""
        self._require_ready("generate")
        if sampling.n < 1 or sampling.max_tokens < 1:
            raise ValueError(f"sampling needs n >= 1 and max_tokens >= 1, got {sampling}")
        if sampling.temperature < 0 or not 0.0 < sampling.top_p <= 1.0:
            raise ValueError(f"sampling needs temperature >= 0 and 0 < top_p <= 1, got {sampling}")
        prompts = self._tokens_prompts([encode_chat(self.tokenizer, conv) for conv in conversations])
        process_seed = sampling.seed if self.api.device == "cpu" else None
        params = self._sampling_params(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                       max_tokens=sampling.max_tokens,
                                       seed=None if process_seed is not None else sampling.seed,
                                       stop_token_ids=self.stop_ids)
        t0 = time.perf_counter()
        if process_seed is None:
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        else:  # vLLM's CPU build: the call's seed drives the process RNG (vllm_compat docstring)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(process_seed)
                outputs = self.llm.generate(prompts, params, use_tqdm=False)
        result = [[self._completion(c) for c in sorted(out.outputs, key=lambda c: c.index)] for out in outputs]
        self.last_generated_tokens = sum(len(c.token_ids) for comps in result for c in comps)
        self.meter.add(self.last_generated_tokens, time.perf_counter() - t0)
        return result

    def generate_mixed(self, conversations: list[list[Message]], samplings: list[Sampling]) -> list[Completion]:
        """One greedy completion per conversation under its own max_tokens (engines.base): one
        llm.generate call with one SamplingParams per prompt; vLLM schedules them together and
        drops each request from the batch when it ends."""
        self._require_ready("generate_mixed")
        check_mixed(conversations, samplings)
        prompts = self._tokens_prompts([encode_chat(self.tokenizer, conv) for conv in conversations])
        seed = samplings[0].seed if samplings else None
        process_seed = seed if self.api.device == "cpu" else None
        params = [self._sampling_params(n=1, temperature=0.0, top_p=1.0, max_tokens=s.max_tokens,
                                        seed=None if process_seed is not None else seed,
                                        stop_token_ids=self.stop_ids) for s in samplings]
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            if process_seed is not None:
                torch.manual_seed(process_seed)
            if prompts:
                outputs = self.llm.generate(prompts, params, use_tqdm=False)
            else:  # an idle rank in lockstep joins its peers' steps (vLLM wants one params then)
                outputs = [] if not self.lockstep else self.llm.generate([], self._sampling_params(
                    n=1, temperature=0.0, top_p=1.0, max_tokens=1, seed=None, stop_token_ids=[]), use_tqdm=False)
        result = [self._completion(min(out.outputs, key=lambda c: c.index)) for out in outputs]
        self.last_generated_tokens = sum(len(c.token_ids) for c in result)
        self.meter.add(self.last_generated_tokens, time.perf_counter() - t0)
        return result

    @staticmethod
    def _completion(output: Any) -> Completion:
        if output.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM ended a request with finish_reason={output.finish_reason!r}")
        return Completion(text=output.text, token_ids=tuple(int(t) for t in output.token_ids),
                          finish_reason=output.finish_reason)

    def prompt_logprobs(self, token_ids: list[list[int]]) -> list[list[float]]:
        """Log-prob of every token after the first, given its prefix (the canary uses it).
        prompt_logprobs=0 returns just the prompt token's own log-prob at each position, from
        the raw logits; such requests skip reading the prefix cache (vLLM >= 0.26)."""
        self._require_ready("prompt_logprobs")
        scored = [ids for ids in token_ids if len(ids) >= 2]
        params = self._sampling_params(n=1, temperature=0.0, top_p=1.0, max_tokens=1, seed=None,
                                       stop_token_ids=[], prompt_logprobs=0)
        outputs = (self.llm.generate(self._tokens_prompts(scored), params, use_tqdm=False)
                   if scored or self.lockstep else [])
        by_prompt = iter(outputs)
        out: list[list[float]] = []
        for ids in token_ids:
            if len(ids) < 2:
                out.append([])
                continue
            positions = next(by_prompt).prompt_logprobs
            out.append([compat.prompt_token_logprob(positions[i], ids[i]) for i in range(1, len(ids))])
        return out
