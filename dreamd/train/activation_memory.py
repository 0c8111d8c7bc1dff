"""Activation memory of a forward, measured the same way on CPU and GPU: the bytes of the
tensors autograd saves for backward.

Those tensors are alive from the moment they are saved until the backward consumes them, so
their sum at the end of the forward is the activation memory at its peak (the start of
backward). Counted once per storage (views share one), parameters excluded (a linear layer
saves its weight, which is not an activation). Not counted: transient buffers inside an op
and the no_grad context pass's temporaries, which are freed before the grad pass. On CUDA the
trainer reports torch.cuda.max_memory_allocated instead, which includes everything.
"""

from __future__ import annotations

from types import TracebackType

import torch
from torch import nn


def _local(p: torch.Tensor) -> torch.Tensor:
    """A parameter's own tensor: its shard when FSDP2 shards it (a DTensor has no storage).
    Sharded, the layers save the all-gathered weights, which are not parameters: they count."""
    return p.to_local() if hasattr(p, "to_local") else p


class SavedTensorMeter:
    """Context manager: `.bytes` = unique non-parameter bytes saved for backward inside it."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self._param_storages: set[int] = set()
        self._seen: set[int] = set()
        self.bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        # A saved tensor stays alive until backward, so no other storage can reuse its address
        # while the meter runs: the pointer identifies it.
        if ptr not in self._param_storages and ptr not in self._seen:
            self._seen.add(ptr)
            self.bytes += storage.nbytes()
        return t

    def __enter__(self) -> SavedTensorMeter:
        self._param_storages = {_local(p).untyped_storage().data_ptr() for p in self._model.parameters()}
        self._seen.clear()
        self.bytes = 0
        self._hooks.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._hooks.__exit__(exc_type, exc, tb)
        self._seen.clear()
