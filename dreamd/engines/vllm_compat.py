"""Every difference between vLLM versions that dreamd touches, in one file.

dreamd supports vLLM 0.26.0 (the newest release pinned to torch 2.11 / CUDA 13, FACTS.md) and
later. The public calls the adapter makes were read from the 0.26.0 and 0.33.0 wheels and
recorded in tests/data/vllm_signatures_<version>.json; a CPU test checks every keyword used here
against both records, and a GPU test checks the records against the installed library.

What differs (and is handled only here):
- `LLM.wake_up` returns None in 0.26.0 and "fully awake" (bool) in 0.33.0: ignored, dreamd
  tracks its own state.
- The text-only Qwen3.5 class `Qwen3_5ForCausalLM` exists in 0.26.0's qwen3_5.py but is not in
  its registry and lacks the IsHybrid interface (so vLLM would not allocate the Gated-DeltaNet
  state). 0.33.0 registers it with IsHybrid and a config hook that drops M-RoPE fields. For
  older versions `register_missing_architectures` registers the same thing through the public
  `ModelRegistry.register_model`.
vLLM is imported only inside functions (import_vllm, the registration helpers), so this module
imports on machines without it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

MIN_VERSION = (0, 26, 0)
RECORDED_VERSIONS = ("0.26.0", "0.33.0")
"""Versions whose signatures are recorded in tests/data (read from their wheels)."""

WAKE_TAGS = ("weights", "kv_cache", "scheduling")
"""Tags LLM.wake_up accepts in every supported version."""


def installed_version() -> str | None:
    """The installed vLLM's version, without importing it (importing takes seconds)."""
    try:
        return metadata.version("vllm")
    except metadata.PackageNotFoundError:
        return None


def parse_version(text: str) -> tuple[int, int, int]:
    """'0.26.0', '0.27.1rc2+cu130', '0.28' -> (0, 26, 0), (0, 27, 1), (0, 28, 0)."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if match is None:
        raise ValueError(f"not a version: {text!r}")
    return int(match[1]), int(match[2]), int(match[3] or 0)


@dataclass(frozen=True)
class VllmApi:
    """The vLLM entry points the adapter uses. Tests pass a stand-in with the same shape."""

    LLM: Callable[..., Any]
    SamplingParams: Callable[..., Any]
    version: str
    register_model: Callable[[str, Any], None] | None = None
    supported_archs: Callable[[], Any] | None = None


def import_vllm() -> VllmApi:
    """Import vLLM for in-process use; ImportError with the reason when it cannot be used.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 must be set before the engine is built: with it the
    EngineCore and the worker live in this process, so `apply_model` hands our closure (and the
    trainer's CUDA tensors) to the model object directly, with no pickling (FACTS.md).
    """
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import vllm  # noqa: PLC0415  (heavy, and absent on CPU machines)
    from vllm import ModelRegistry  # noqa: PLC0415

    if parse_version(vllm.__version__) < MIN_VERSION:
        raise ImportError(f"vllm {vllm.__version__} is older than the supported "
                          f"{'.'.join(map(str, MIN_VERSION))}")
    return VllmApi(LLM=vllm.LLM, SamplingParams=vllm.SamplingParams, version=vllm.__version__,
                   register_model=ModelRegistry.register_model,
                   supported_archs=ModelRegistry.get_supported_archs)


def llm_kwargs(*, model_path: str, dtype: str, seed: int, gpu_memory_utilization: float,
               enforce_eager: bool, max_model_len: int, kv_cache_memory_bytes: int | None = None) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM(...)`, valid in every recorded version.

    load_format='dummy': the engine starts with random weights and dreamd pushes the trainer's
    weights before the first use. The trainer may have resumed from a checkpoint that differs
    from the directory on disk, so the trainer, not the disk, is the source of truth; and the
    weights are not read from disk twice. enable_sleep_mode: sleep/wake need vLLM's cumem
    allocator, which can only be chosen at construction.
    """
    kwargs: dict[str, Any] = dict(
        model=model_path, tokenizer=model_path, dtype=dtype, seed=seed,
        load_format="dummy", enable_sleep_mode=True,
        gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
        max_model_len=max_model_len, trust_remote_code=False,
    )
    if kv_cache_memory_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = kv_cache_memory_bytes
    return kwargs


def sampling_kwargs(*, n: int, temperature: float, top_p: float, max_tokens: int, seed: int | None,
                    stop_token_ids: list[int], prompt_logprobs: int | None = None) -> dict[str, Any]:
    """Keyword arguments for `vllm.SamplingParams(...)`; names are the same in every version."""
    kwargs: dict[str, Any] = dict(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                  seed=seed, stop_token_ids=stop_token_ids, skip_special_tokens=True)
    if prompt_logprobs is not None:
        kwargs["prompt_logprobs"] = prompt_logprobs
    return kwargs


def sleep(llm: Any, level: int) -> None:
    # mode stays at its default ('abort'): dreamd's calls are synchronous, so no request is in
    # flight when it sleeps.
    llm.sleep(level=level)


def wake_up(llm: Any, tags: list[str]) -> None:
    unknown = set(tags) - set(WAKE_TAGS)
    if unknown:
        raise ValueError(f"unknown wake_up tags {sorted(unknown)}; vLLM accepts {list(WAKE_TAGS)}")
    llm.wake_up(tags=list(tags))  # returns None (0.26) or bool (0.33+): state is tracked by dreamd


def reset_prefix_cache(llm: Any) -> bool:
    return bool(llm.reset_prefix_cache())


def apply_model(llm: Any, func: Callable[[Any], Any]) -> list[Any]:
    """Run `func(model)` on the model in every worker (one, in-process) and return the results."""
    return list(llm.apply_model(func))


def prompt_token_logprob(position: Any, token_id: int) -> float:
    """Log-prob of `token_id` at one prompt position. The position is a dict[int, Logprob]
    (list form) or the same dict produced by FlatLogprobs' indexing (flat form)."""
    return float(position[token_id].logprob)


# ---------------------------------------------------------------------------------------------
# architectures missing from older registries


def register_missing_architectures(api: VllmApi, architecture: str) -> bool:
    """Register `architecture` with vLLM when this version lacks it and dreamd knows how.

    Returns True when something was registered. Only the text-only Qwen3.5 class needs this
    (vLLM < 0.33: present in qwen3_5.py, absent from the registry, missing IsHybrid).
    """
    if api.supported_archs is None or api.register_model is None:
        return False
    if architecture in set(api.supported_archs()):
        return False
    if architecture != "Qwen3_5ForCausalLM":
        return False
    api.register_model(architecture, _qwen3_5_text_class())
    _register_qwen3_5_text_config_hook()
    return True


def _qwen3_5_text_class() -> type:
    from vllm.model_executor.models.interfaces import IsHybrid  # noqa: PLC0415
    from vllm.model_executor.models.qwen3_5 import (  # noqa: PLC0415
        Qwen3_5ForCausalLM,
        Qwen3_5ForConditionalGeneration,
    )

    multimodal = Qwen3_5ForConditionalGeneration

    class Qwen3_5TextForCausalLM(Qwen3_5ForCausalLM, IsHybrid):
        """Qwen3_5ForCausalLM plus the IsHybrid methods of the multimodal class, which read
        only `hf_text_config` and so serve the text model unchanged (as 0.33.0 does)."""

        get_mamba_state_dtype_from_config = classmethod(multimodal.get_mamba_state_dtype_from_config.__func__)
        get_mamba_state_shape_from_config = classmethod(multimodal.get_mamba_state_shape_from_config.__func__)
        get_mamba_state_copy_func = classmethod(multimodal.get_mamba_state_copy_func.__func__)

    return Qwen3_5TextForCausalLM


def _register_qwen3_5_text_config_hook() -> None:
    from vllm.model_executor.models import config as model_configs  # noqa: PLC0415

    base = model_configs.Qwen3_5ForConditionalGenerationConfig

    class Qwen3_5TextConfigHook(base):
        @staticmethod
        def verify_and_update_config(vllm_config: Any) -> None:
            base.verify_and_update_config(vllm_config)
            # Text-only models use 1-D positions; M-RoPE fields copied from a multimodal
            # config would make vLLM build a 3-D rotary embedding (0.33.0 does the same).
            rope = getattr(vllm_config.model_config.hf_text_config, "rope_parameters", None)
            if rope is not None:
                rope.pop("mrope_section", None)
                rope.pop("mrope_interleaved", None)

    model_configs.MODELS_CONFIG_MAP.setdefault("Qwen3_5ForCausalLM", Qwen3_5TextConfigHook)
