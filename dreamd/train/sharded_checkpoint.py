"""The sharded part of a checkpoint: torch.distributed.checkpoint (DCP) of the FSDP2 weights and
the optimizer state, written by every rank into the checkpoint's temp directory.

A sharded run's checkpoint is the usual atomic directory (train/checkpoint.py: temp dir, every
file fsynced, the marker written last by rank 0, renamed): rank 0 writes the HF export of the
full model (its serving copy, `from_pretrained`-able) and trainer_state.pt without the
optimizer; every rank writes its shards under `sharded/` (DCP's files: one per rank and a
.metadata) before rank 0 hashes the files and writes the marker, so the marker covers them and
a crash before it leaves a temp directory that is never loaded. One filesystem for all ranks
(one node, or a shared mount).

Keys are flat, 'model/<param>' and 'optim/<param>/<field>' (APOLLO's projector as
'optim/<param>/projector/<field>'), so a fresh process builds its load template from the
checkpoint's metadata alone: a tensor the size of a plain-group parameter is a shard of it
(DTensor, resharded by DCP to this world), anything else (APOLLO's r x n moments and
projection) is replicated. So the same world size resumes exactly, and another world size
gets the same weights and optimizer state resharded. A single process resumes a sharded
checkpoint from its HF export (the weights) with a fresh optimizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from dreamd.train.optim import PROJECTOR_KEYS, projector_from_dict

SHARDED_DIR = "sharded"


def _names(trainer: Any) -> dict[int, str]:
    return {id(p): n for n, p in trainer.opt_params.items()}


def sharded_state(trainer: Any) -> dict[str, Any]:
    """The flat DCP state of a ShardedTrainer: its parameters and its optimizer's state."""
    out: dict[str, Any] = {f"model/{n}": p for n, p in trainer.model.named_parameters()}
    names = _names(trainer)
    for p, st in trainer.optimizer.state.items():
        for key, value in st.items():
            if key == "projector":
                for field in PROJECTOR_KEYS:
                    out[f"optim/{names[id(p)]}/projector/{field}"] = getattr(value, field)
            else:
                out[f"optim/{names[id(p)]}/{key}"] = value
    return out


def save_sharded(trainer: Any, checkpoint_dir: Path) -> None:
    """Every rank: DCP-save the trainer's shards into checkpoint_dir/sharded (a collective)."""
    with torch.no_grad():
        dcp.save(sharded_state(trainer), checkpoint_id=Path(checkpoint_dir) / SHARDED_DIR)


def _low_rank_names(trainer: Any) -> set[str]:
    names = _names(trainer)
    return {names[id(p)] for g in trainer.optimizer.param_groups if "rank" in g for p in g["params"]}


def load_sharded(trainer: Any, checkpoint_dir: Path) -> None:
    """Every rank: load weights and optimizer state from checkpoint_dir/sharded (a collective),
    resharded to this world; the optimizer's state is replaced whole."""
    path = Path(checkpoint_dir) / SHARDED_DIR
    metadata = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    params = dict(trainer.model.named_parameters())
    low_rank = _low_rank_names(trainer)
    template: dict[str, Any] = {}
    for key, md in metadata.items():
        kind, rest = key.split("/", 1)
        if kind == "model":
            template[key] = params[rest]
            continue
        name = next(n for n in sorted(params, key=len, reverse=True) if rest.startswith(f"{n}/"))
        p = params[name]
        if not isinstance(md, TensorStorageMetadata):
            template[key] = None                       # a Python value, filled by the load
        elif name not in low_rank and tuple(md.size) == tuple(p.shape) and hasattr(p, "to_local"):
            template[key] = torch.zeros_like(p, dtype=md.properties.dtype)   # a shard, like p
        else:
            template[key] = torch.empty(tuple(md.size), dtype=md.properties.dtype, device=p.device)
    with torch.no_grad():
        dcp.load(template, checkpoint_id=path)
    # The optimizer's state, rebuilt per parameter (APOLLO's projector as an object again).
    by_param: dict[str, dict[str, Any]] = {}
    for key, value in template.items():
        kind, rest = key.split("/", 1)
        if kind != "optim":
            continue
        name = next(n for n in sorted(params, key=len, reverse=True) if rest.startswith(f"{n}/"))
        field = rest[len(name) + 1:]
        st = by_param.setdefault(name, {})
        if field.startswith("projector/"):
            st.setdefault("projector", {})[field.split("/", 1)[1]] = value
        else:
            st[field] = value
    trainer.optimizer.state.clear()
    for name, st in by_param.items():
        if "projector" in st:
            st["projector"] = projector_from_dict(st["projector"])
        trainer.optimizer.state[trainer.opt_params[name]] = st
