"""The optimizer: APOLLO (apollo-torch's APOLLOAdamW) or torch's AdamW, and a state_dict that
`torch.load(weights_only=True)` can read.

APOLLO (arXiv 2412.05270) keeps Adam moments in a random rank-r projection of each 2-D weight
and uses them only to compute per-channel (or per-tensor) scaling factors for the raw
gradient. Param groups, as apollo-torch expects them:
- 2-D nn.Linear weights inside the decoder layers (`...layers.<i>...`): low-rank groups with
  {'rank', 'proj': 'random', 'scale_type', 'scale', 'update_proj_gap', 'proj_type': 'std'}.
- everything else (embeddings, lm_head, norms, biases, conv1d, A_log, dt_bias): plain groups
  with full Adam state.

Rank rule: r = min(optimizer.rank, n // 2) with n the smaller matrix dimension, because a
projection to r >= n keeps as much state as plain Adam and saves nothing; at n // 2 the state
is still halved. A matrix with n < 2 (r would be 0) goes to a plain group.
Scale rule (APOLLO, arXiv 2412.05270): the update is multiplied by sqrt(scale) and the scaling
factors shrink ~sqrt(r/n), so scale = n/r gives an AdamW-sized step. n differs between matrices (a Qwen3.5
DeltaNet's in_proj_a is [heads, hidden]), so low-rank params are grouped by (r, scale): each
group's scale is right for every matrix in it. `optimizer.scale` overrides n/r for all.
Weight decay (decoupled) applies to params with 2+ dims; norms, biases, A_log, dt_bias: none.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from dreamd.config import OptimizerConfig

_DECODER_LAYER = re.compile(r"(^|\.)layers\.\d+\.")
PROJECTOR_KEYS = ("rank", "update_proj_gap", "scale", "proj_type", "seed", "svd_count", "ortho_matrix")


def low_rank_rank(shape: torch.Size | tuple[int, ...], rank: int) -> int:
    """The projection rank APOLLO uses for a 2-D weight of `shape` (0: plain Adam)."""
    return min(rank, min(shape) // 2)


def linear_weight_names(model: nn.Module) -> set[str]:
    """Names of the weights of nn.Linear modules inside the decoder layers."""
    return {f"{name}.weight" for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and _DECODER_LAYER.search(f"{name}.")}


def param_groups(model: nn.Module, cfg: OptimizerConfig, params: dict[str, torch.Tensor] | None = None
                 ) -> list[dict[str, Any]]:
    """Param groups for `cfg.name`, in model order. `params` maps model parameter names to the
    tensors the optimizer steps (fp32 work copies for bf16 models); default: the model's own."""
    if params is None:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # Shapes from the MODEL: bf16 work tensors are empty between steps (see bf16.py).
    shapes = {n: p.shape for n, p in model.named_parameters()}
    low_rank_names = linear_weight_names(model) if cfg.name == "apollo" else set()
    groups: OrderedDict[tuple, dict[str, Any]] = OrderedDict()
    for name, p in params.items():
        shape = shapes[name]
        decay = cfg.weight_decay if len(shape) >= 2 else 0.0
        r = low_rank_rank(shape, cfg.rank) if name in low_rank_names and len(shape) == 2 else 0
        if r >= 1:
            n = min(shape)
            scale = cfg.scale if cfg.scale is not None else n / r
            key = ("low_rank", r, scale, decay)
            if key not in groups:
                groups[key] = {"params": [], "param_names": [], "rank": r, "proj": "random",
                               "scale_type": cfg.scale_type, "scale": float(scale),
                               "update_proj_gap": cfg.update_proj_gap, "proj_type": "std",
                               "weight_decay": decay}
        else:
            key = ("plain", decay)
            groups.setdefault(key, {"params": [], "param_names": [], "weight_decay": decay})
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, lr: float,
                    params: dict[str, torch.Tensor] | None = None) -> torch.optim.Optimizer:
    """APOLLOAdamW or torch AdamW over `params` (see param_groups)."""
    groups = param_groups(model, cfg, params)
    if cfg.name == "apollo":
        from apollo_torch import APOLLOAdamW  # imports bitsandbytes; only needed for APOLLO

        return APOLLOAdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                           correct_bias=True)
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


# ---------------------------------------------------------------------------------------------
# state_dict that torch.load(weights_only=True) reads
#
# apollo-torch keeps a Python GradientProjector object per low-rank param in the optimizer
# state (its seed advances every update_proj_gap steps; its ortho_matrix is the current random
# projection). weights_only loading rejects the object, and dropping it silently restarts the
# projection sequence. So it is saved as a dict of its fields and rebuilt on load.


def _projector_to_dict(projector: Any) -> dict[str, Any]:
    return {k: getattr(projector, k) for k in PROJECTOR_KEYS}


def projector_from_dict(d: dict[str, Any]) -> Any:
    from apollo_torch.random_projector import GradientProjector

    projector = GradientProjector(d["rank"], update_proj_gap=d["update_proj_gap"], scale=d["scale"],
                                  proj_type=d["proj_type"], seed=d["seed"])
    projector.ortho_matrix = d["ortho_matrix"]
    projector.svd_count = d["svd_count"]
    return projector


def optimizer_state_dict(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """optimizer.state_dict() with APOLLO's projector objects turned into plain dicts."""
    sd = optimizer.state_dict()
    state = {}
    for idx, s in sd["state"].items():
        s = dict(s)  # state_dict() shares the live per-param dicts: do not modify those
        if "projector" in s:
            s["projector"] = _projector_to_dict(s["projector"])
        state[idx] = s
    return {"state": state, "param_groups": sd["param_groups"]}


def load_optimizer_state_dict(optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """Inverse of optimizer_state_dict. The projectors are rebuilt BEFORE torch's
    load_state_dict, whose recursive cast would turn their string fields into garbage
    (it rebuilds every iterable, str included); their ortho_matrix is then moved to the
    param's device here, as torch does for the other state tensors."""
    state = {}
    for idx, s in sd["state"].items():
        s = dict(s)
        if isinstance(s.get("projector"), dict):
            s["projector"] = projector_from_dict(s["projector"])
        state[idx] = s
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
    for p, s in optimizer.state.items():
        projector = s.get("projector")
        if projector is not None and projector.ortho_matrix is not None:
            projector.ortho_matrix = projector.ortho_matrix.to(device=p.device, dtype=p.dtype)
