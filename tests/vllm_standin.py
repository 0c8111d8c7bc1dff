"""A recording stand-in for `vllm.LLM` 0.26.0 that runs a real tiny transformers model on CPU.

vLLM cannot run here (no GPU), so the adapter's ordering logic is tested against this class.
Its public methods have vLLM 0.26.0's exact signatures (parameter names, kinds, defaults); a
test compares them with tests/data/vllm_signatures_0.26.0.json, which was read from the wheel,
so the stand-in cannot drift silently. Constructor keywords are checked against the recorded
LLM.__init__ parameters and EngineArgs fields, as vLLM would (TypeError for unknown ones).

What it models, and how (each rule is one a real vLLM run enforces or exhibits):
- load_format='dummy': weights start random.
- sleep(level=2) drops the weights; wake_up(['weights']) maps memory whose contents are garbage
  (here: normal noise with std 10) until written. Level 1 restores the old weights.
- touching the model while its weights sleep, or generating while the KV cache sleeps, raises
  (on a GPU: an illegal memory access or a hang).
- sleep clears the prefix cache; a weight push does not. Generating after a push without a
  reset counts in `served_stale_prefix` (vLLM would reuse KV blocks of the old weights).
- reset_prefix_cache returns False when `refuse_reset` is set (vLLM: requests hold blocks).
- collective_rpc('reload_weights') re-reads the checkpoint from disk (undoing training);
  collective_rpc(fn, args=...) runs fn(worker, *args) with a worker whose get_model() is the
  served model (vLLM's in-process executor does the same with its one worker).
- the platform is CUDA-like (sleep mode, in-place loading): what vLLM's CPU build cannot show
  (freed memory, garbage after sleep level 2). The CPU platform itself is tested against real
  vLLM (tests/test_vllm_real.py), not modelled here.
- the served model's load_weights copies by HF name, skips 'lm_head.*' when tied (as vLLM's
  Llama does), raises on unknown names, returns the loaded names. `lie_about` names are
  reported loaded but not written (a silent loader bug, for the canary test).
Every call is appended to `calls` as (method, arguments).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

RECORDED_026 = json.loads((Path(__file__).parent / "data" / "vllm_signatures_0.26.0.json").read_text())


def _public_fields(record: str, version: dict = RECORDED_026) -> dict[str, Any]:
    return {name: default for name, default in version["fields"][record] if not name.startswith("_")}


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: Sequence[int]
    cumulative_logprob: float | None
    logprobs: Any
    routed_experts: Any = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    lora_request: Any = None


class RequestOutput:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int] | None,
                 prompt_logprobs: Any, outputs: list[CompletionOutput], finished: bool,
                 metrics: Any = None, lora_request: Any = None, encoder_prompt: str | None = None,
                 encoder_prompt_token_ids: list[int] | None = None, num_cached_tokens: int | None = None,
                 num_cache_creation_tokens: int | None = None, *, kv_transfer_params: Any = None,
                 ec_transfer_params: Any = None, **kwargs: Any) -> None:
        self.request_id, self.prompt, self.prompt_token_ids = request_id, prompt, prompt_token_ids
        self.prompt_logprobs, self.outputs, self.finished = prompt_logprobs, outputs, finished


class SamplingParams:
    """Accepts exactly the recorded public SamplingParams fields, with the recorded defaults."""

    FIELDS = _public_fields("SamplingParams")

    def __init__(self, **kwargs: Any) -> None:
        unknown = set(kwargs) - set(self.FIELDS)
        if unknown:
            raise TypeError(f"SamplingParams got unexpected keyword arguments {sorted(unknown)}")
        for name, default in self.FIELDS.items():
            setattr(self, name, kwargs.get(name, None if isinstance(default, dict) else default))


class ServedModel:
    """What apply_model's function receives: load_weights + named_parameters, vLLM-style."""

    def __init__(self, llm: RecordingLLM) -> None:
        self._llm = llm

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        self._llm._require_weights("named_parameters")
        return self._llm.hf.named_parameters(prefix, recurse, remove_duplicate)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        self._llm._require_weights("load_weights")
        params = dict(self._llm.hf.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if self._llm.tied and name.startswith("lm_head."):
                continue
            if name not in params:
                raise ValueError(f"There is no module or parameter named '{name}' in {type(self._llm.hf).__name__}")
            if name not in self._llm.lie_about:
                params[name].copy_(tensor)
            loaded.add(name)
        self._llm.weight_pushes += 1
        self._llm.prefix_cache_stale = bool(self._llm.prefix_cache)
        return loaded


class Worker:
    """What collective_rpc's function receives: get_model() and model_config, as vLLM's worker."""

    def __init__(self, llm: RecordingLLM) -> None:
        self._llm = llm
        self.model_config = None

    def get_model(self) -> ServedModel:
        return ServedModel(self._llm)


class RecordingLLM:
    """Stand-in for vllm.LLM (0.26.0 signatures). See the module docstring."""

    ACCEPTED_INIT = ({p[0] for p in RECORDED_026["methods"]["LLM.__init__"]} - {"self", "kwargs"}
                     | {f[0] for f in RECORDED_026["fields"]["EngineArgs"]})

    def __init__(self, model: str, **kwargs: Any) -> None:
        unknown = set(kwargs) - self.ACCEPTED_INIT
        if unknown:
            raise TypeError(f"LLM.__init__() got unexpected keyword arguments {sorted(unknown)}")
        self.calls: list[tuple[str, dict[str, Any]]] = [("__init__", dict(model=model, **kwargs))]
        self.model_path = model
        self.kwargs = kwargs
        self.hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(kwargs.get("tokenizer") or model)
        self.tied = bool(self.hf.config.tie_word_embeddings)
        self.asleep: set[str] = set()
        self.level = 0
        self.prefix_cache: set[tuple[int, ...]] = set()
        self.prefix_cache_stale = False
        self.served_stale_prefix = 0
        self.weight_pushes = 0
        self.worker = Worker(self)
        """One worker for the LLM's lifetime, as vLLM's (a push keeps its state on it between calls)."""
        self.refuse_reset = False
        self.lie_about: set[str] = set()
        self._offloaded: dict[str, torch.Tensor] = {}
        self._noise = torch.Generator().manual_seed(1234)
        if kwargs.get("load_format") == "dummy":
            self._fill(lambda p: torch.empty_like(p).uniform_(-1e-3, 1e-3, generator=self._noise))

    # ---- helpers (not vLLM API) -------------------------------------------------------------
    def _fill(self, make: Callable[[torch.Tensor], torch.Tensor]) -> None:
        with torch.no_grad():
            for p in self.hf.parameters():
                p.copy_(make(p))

    def _require_weights(self, what: str) -> None:
        if "weights" in self.asleep:
            raise RuntimeError(f"stand-in: {what} touched weights that sleep (CUDA: illegal memory access)")

    def called(self) -> list[str]:
        return [name for name, _ in self.calls]

    # ---- vLLM 0.26.0 API ---------------------------------------------------------------------
    def generate(self, prompts: Any, sampling_params: Any = None, *, use_tqdm: bool | Callable[..., Any] = True,
                 lora_request: Any = None, priority: list[int] | None = None,
                 tokenization_kwargs: dict[str, Any] | None = None,
                 mm_processor_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        self.calls.append(("generate", dict(prompts=prompts, sampling_params=sampling_params, use_tqdm=use_tqdm)))
        self._require_weights("generate")
        if "kv_cache" in self.asleep:
            raise RuntimeError("stand-in: generate while the KV cache sleeps")
        params = sampling_params or SamplingParams()
        prompts = prompts if isinstance(prompts, list) else [prompts]
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)  # vLLM takes either
        if len(per_prompt) != len(prompts):
            raise ValueError("The lengths of prompts and sampling_params must be the same.")
        return [self._one(i, p["prompt_token_ids"], sp) for i, (p, sp) in enumerate(zip(prompts, per_prompt))]

    @torch.no_grad()
    def _one(self, index: int, ids: list[int], params: SamplingParams) -> RequestOutput:
        key = tuple(ids)
        if self.prefix_cache_stale and key in self.prefix_cache:
            self.served_stale_prefix += 1
        self.prefix_cache.add(key)
        x = torch.tensor([ids])
        prompt_logprobs = None
        if params.prompt_logprobs is not None:
            logp = torch.log_softmax(self.hf(input_ids=x, use_cache=False).logits[0, :-1].float(), -1)
            prompt_logprobs = [None] + [{ids[i]: Logprob(float(logp[i - 1, ids[i]]))} for i in range(1, len(ids))]
        greedy = params.temperature == 0.0
        if params.seed is not None:
            torch.manual_seed(params.seed)
        config = GenerationConfig(do_sample=not greedy, max_new_tokens=params.max_tokens,
                                  eos_token_id=params.stop_token_ids or None,
                                  pad_token_id=self.tokenizer.pad_token_id, num_return_sequences=params.n,
                                  **({} if greedy else dict(temperature=params.temperature, top_p=params.top_p, top_k=0)))
        rows = self.hf.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=config)
        outs = []
        for k, row in enumerate(rows[:, len(ids):].tolist()):
            stop = next((j for j, t in enumerate(row) if t in (params.stop_token_ids or [])), None)
            row = row if stop is None else row[: stop + 1]
            outs.append(CompletionOutput(index=k, text=self.tokenizer.decode(row, skip_special_tokens=True),
                                         token_ids=row, cumulative_logprob=None, logprobs=None,
                                         finish_reason="length" if stop is None else "stop",
                                         stop_reason=None if stop is None else row[-1]))
        return RequestOutput(str(index), None, ids, prompt_logprobs, outs, True)

    def sleep(self, level: int = 1, mode: str = "abort"):
        self.calls.append(("sleep", dict(level=level, mode=mode)))
        if not self.kwargs.get("enable_sleep_mode"):
            raise ValueError("Sleep mode is not enabled (enable_sleep_mode=False)")
        if level == 1:
            self._offloaded = {n: p.detach().clone() for n, p in self.hf.named_parameters()}
        self.asleep, self.level = {"weights", "kv_cache"}, level
        self.prefix_cache.clear()
        self.prefix_cache_stale = False

    def wake_up(self, tags: list[str] | None = None):
        self.calls.append(("wake_up", dict(tags=tags)))
        tags = ["weights", "kv_cache", "scheduling"] if tags is None else tags
        if not set(tags) <= {"weights", "kv_cache", "scheduling"}:
            raise ValueError(f"bad tags {tags}")
        if "weights" in tags and "weights" in self.asleep:
            if self.level == 1:
                self._fill(lambda p: self._offloaded[next(n for n, q in self.hf.named_parameters() if q is p)])
            else:  # level 2: mapped again, contents are whatever the memory held
                self._fill(lambda p: torch.randn(p.shape, generator=self._noise) * 10)
        self.asleep -= set(tags)

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        self.calls.append(("reset_prefix_cache", dict(reset_running_requests=reset_running_requests,
                                                      reset_connector=reset_connector)))
        if "kv_cache" in self.asleep:
            raise RuntimeError("stand-in: reset_prefix_cache while the KV cache sleeps")
        if self.refuse_reset:
            return False
        self.prefix_cache.clear()
        self.prefix_cache_stale = False
        return True

    def apply_model(self, func: Callable[[Any], Any]) -> list[Any]:
        self.calls.append(("apply_model", dict(func=func)))
        return [func(ServedModel(self))]

    def collective_rpc(self, method: str | Callable[..., Any], timeout: float | None = None,
                       args: tuple = (), kwargs: dict[str, Any] | None = None) -> list[Any]:
        self.calls.append(("collective_rpc", dict(method=method, args=args, kwargs=kwargs)))
        if method == "reload_weights":
            disk = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32)
            self.hf.load_state_dict(disk.state_dict())
            return [None]
        if callable(method):
            return [method(self.worker, *args, **(kwargs or {}))]
        raise AttributeError(f"stand-in worker has no method {method!r}")
