"""Choose the generation engine from the config: vLLM on CUDA boxes, transformers elsewhere.

engine.kind:
- 'auto': vLLM when CUDA is present and vllm imports, else transformers (logged).
- 'vllm': vLLM or a one-line UsageError saying why not and what to set instead.
- 'transformers': always transformers (CPU boxes, debugging, or no vLLM wheel for the CUDA).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dreamd.config import Config
from dreamd.engines.base import Engine
from dreamd.engines.canary import canary_probe, run_canary
from dreamd.errors import UsageError
from dreamd.log import get_logger

log = get_logger("dreamd.engines")


def vllm_unavailable_reason() -> str | None:
    """Why vLLM cannot serve here, or None when it can. Imports vllm only on CUDA machines
    (the import takes seconds and pulls CUDA libraries)."""
    if not torch.cuda.is_available():
        return f"CUDA is not available (torch {torch.__version__} sees no GPU)"
    from dreamd.engines import vllm_compat  # noqa: PLC0415

    try:
        vllm_compat.import_vllm()
    except Exception as exc:  # an ImportError, or a CUDA/ABI error raised while importing
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"vllm is not importable ({type(exc).__name__}: {first}; pip install 'dreamd[vllm]')"
    return None


def make_engine(cfg: Config, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> Engine:
    """The engine for `cfg.engine.kind`, ready to generate.

    For vLLM the engine is built from cfg.model.path with dummy weights, the trainer's weights
    are pushed, and the canary must pass before it is returned. Build it before the trainer
    allocates optimizer state (vLLM sizes itself against memory free at that moment).
    """
    kind = cfg.engine.kind
    if kind in ("auto", "vllm"):
        reason = vllm_unavailable_reason()
        if reason is None:
            from dreamd.engines.vllm import VLLMEngine  # noqa: PLC0415

            engine = VLLMEngine.create(model_path=cfg.model.path, model=model, tokenizer=tokenizer,
                                       engine_cfg=cfg.engine, seed=cfg.run.seed)
            result = run_canary(engine, model, canary_probe(tokenizer), cfg.engine.canary_atol)
            log.info("engine.ready", kind="vllm", version=engine.api.version,
                     canary_mean_abs_diff=result.mean_abs_diff)
            return engine
        if kind == "vllm":
            raise UsageError(f"engine.kind = 'vllm' but {reason}; set engine.kind = 'transformers' or 'auto'")
        log.info("engine.fallback", kind="transformers", reason=reason)
    from dreamd.engines.hf import TransformersEngine  # noqa: PLC0415

    return TransformersEngine(model, tokenizer)
