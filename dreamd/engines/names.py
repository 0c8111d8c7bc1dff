"""Which trainer weights are pushed into vLLM, under which names, and whether the push is whole.

The trainer holds a transformers model with HF parameter names. vLLM's `model.load_weights`
takes HF names and packs some of them into fused parameters itself (q/k/v -> qkv_proj,
gate/up -> gate_up_proj, and for Qwen3.5's Gated-DeltaNet in_proj_qkv/z -> in_proj_qkvz,
in_proj_b/a -> in_proj_ba). After `sleep(level=2)` every vLLM parameter holds garbage until it
is written again, so a push that forgets one shard of a fused parameter leaves part of it
garbage while vLLM reports the fused name as loaded. `PushLayout.check_complete` catches that
from names alone, before anything is copied.

The packing tables below are recorded from vLLM 0.26.0's source (model_executor/models/llama.py,
qwen3_next.py, qwen3_5.py, qwen3_vl.py; the same in 0.33.0) and are used only to predict and
check; the real renaming is done by vLLM. The GPU adapter also checks vLLM's own answer: the
set returned by load_weights must cover every parameter of the served model.

Tied embeddings: when `tie_word_embeddings` is set, vLLM's lm_head IS embed_tokens (Llama skips
'lm_head.*' on load; Qwen3.5 makes them one module), so 'lm_head.weight' is not sent; the embed
push updates both. transformers' `named_parameters()` already lists the tied tensor once, as
'model.embed_tokens.weight'.

Qwen3.5 text models (architectures ['Qwen3_5ForCausalLM']) are served natively (registered by
vllm_compat on vLLM < 0.33) or, with serve_as='multimodal', by vLLM's Qwen3_5ForConditionalGeneration,
whose checkpoint names put the language model under 'model.language_model.*'.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PretrainedConfig

Shard = str | int | tuple[int, ...]
Stacked = tuple[tuple[str, str, Shard], ...]

# (HF substring, vLLM fused substring, shard id), in vLLM's order. vLLM applies every rule whose
# substring occurs in the name (no early exit); `vllm_name` does the same.
LLAMA_STACKED: Stacked = (
    (".q_proj", ".qkv_proj", "q"), (".k_proj", ".qkv_proj", "k"), (".v_proj", ".qkv_proj", "v"),
    (".gate_proj", ".gate_up_proj", 0), (".up_proj", ".gate_up_proj", 1),
)
QWEN3_NEXT_STACKED: Stacked = (
    (".q_proj", ".qkv_proj", "q"), (".k_proj", ".qkv_proj", "k"), (".v_proj", ".qkv_proj", "v"),
    (".mlp.gate_proj", ".mlp.gate_up_proj", 0), (".mlp.up_proj", ".mlp.gate_up_proj", 1),
    (".shared_expert.gate_proj", ".shared_expert.gate_up_proj", 0),
    (".shared_expert.up_proj", ".shared_expert.gate_up_proj", 1),
)
QWEN3_5_STACKED: Stacked = QWEN3_NEXT_STACKED + (
    (".in_proj_qkv", ".in_proj_qkvz", (0, 1, 2)), (".in_proj_z", ".in_proj_qkvz", 3),
    (".in_proj_b", ".in_proj_ba", 0), (".in_proj_a", ".in_proj_ba", 1),
)
# Qwen3VLForConditionalGeneration.hf_to_vllm_mapper (inherited by Qwen3_5ForConditionalGeneration).
QWEN3_5_MULTIMODAL_PREFIXES = (
    ("model.visual.", "visual."),
    ("lm_head.", "language_model.lm_head."),
    ("model.language_model.", "language_model.model."),
)

LM_HEAD = "lm_head.weight"


@dataclass(frozen=True)
class PushLayout:
    """How one trainer architecture is served by vLLM and how its weights are named there."""

    trainer_architecture: str
    served_architecture: str
    """The architecture vLLM builds (its registry key)."""
    tied: bool
    """tie_word_embeddings: lm_head is embed_tokens; 'lm_head.weight' is not pushed."""
    rename: tuple[tuple[str, str], ...] = ()
    """Prefix renames from the trainer's names to the names the served class loads."""
    vllm_prefixes: tuple[tuple[str, str], ...] = ()
    """The served class's own prefix mapper (recorded), for predicting vLLM parameter names."""
    stacked: Stacked = LLAMA_STACKED
    """The served class's packing table (recorded from vLLM 0.26.0)."""

    def push_name(self, hf_name: str) -> str | None:
        """The name to hand to vLLM's load_weights, or None when the tensor is not sent."""
        if self.tied and hf_name == LM_HEAD:
            return None
        for old, new in self.rename:
            if hf_name.startswith(old):
                return new + hf_name[len(old):]
        return hf_name

    def _map(self, push_name: str) -> tuple[str, Shard | None, str | None]:
        name, shard, fused = push_name, None, None
        for old, new, shard_id in self.stacked:
            if old in name:
                name, shard, fused = name.replace(old, new, 1), shard_id, new
        for old, new in self.vllm_prefixes:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        return name, shard, fused

    def vllm_name(self, push_name: str) -> tuple[str, Shard | None]:
        """The vLLM parameter a pushed name lands in, and its shard id (None: not fused)."""
        name, shard, _ = self._map(push_name)
        return name, shard

    def required_shards(self) -> dict[str, set[Shard]]:
        """Fused vLLM substring -> every shard id it needs (e.g. '.qkv_proj' -> {q, k, v})."""
        need: dict[str, set[Shard]] = {}
        for _, fused, shard in self.stacked:
            need.setdefault(fused, set()).add(shard)
        return need

    def check_complete(self, push_names: Iterable[str]) -> None:
        """ValueError when some fused vLLM parameter would get only part of its shards: that
        part would keep the garbage left by sleep(level=2) while vLLM reports it loaded."""
        need = self.required_shards()
        got: dict[str, tuple[str, set[Shard]]] = {}
        for push in push_names:
            name, shard, fused = self._map(push)
            if fused is not None:
                got.setdefault(name, (fused, set()))[1].add(shard)
        gaps = {name: need[fused] - shards for name, (fused, shards) in got.items() if need[fused] - shards}
        if gaps:
            first = sorted(gaps)[0]
            raise ValueError(f"weight push is incomplete: {len(gaps)} fused vLLM parameters would keep "
                             f"garbage shards (e.g. {first} lacks {sorted(map(str, gaps[first]))}); "
                             "push every parameter of the trainer's model")

    def push_tensors(self, named: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
        """(push name, tensor) for every weight to send: detached views of the trainer's own
        tensors (no copies), tied lm_head dropped, names renamed, completeness checked."""
        out: list[tuple[str, torch.Tensor]] = []
        seen: dict[str, torch.Tensor] = {}
        for hf_name, tensor in named:
            seen[hf_name] = tensor
            name = self.push_name(hf_name)
            if name is not None:
                out.append((name, tensor.detach()))
        if self.tied and LM_HEAD in seen:
            embed = next((t for n, t in seen.items() if n.endswith("embed_tokens.weight")), None)
            if embed is not None and embed.data_ptr() != seen[LM_HEAD].data_ptr():
                raise ValueError("config says tie_word_embeddings but the trainer's lm_head.weight and "
                                 "embed_tokens.weight are different tensors; vLLM would serve the "
                                 "embedding as the head and drop the trained head")
        if not out:
            raise ValueError("weight push is empty: no named tensors were given")
        self.check_complete(name for name, _ in out)
        return out

    def vllm_param_names(self, push_names: Iterable[str]) -> set[str]:
        """Predicted vLLM parameter names a push fills (tests and diagnostics)."""
        return {self.vllm_name(name)[0] for name in push_names}


def is_tied(config: PretrainedConfig) -> bool:
    text = config.get_text_config()
    return bool(getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)))


def layout_for(config: PretrainedConfig, serve_as: Literal["native", "multimodal"] = "native") -> PushLayout:
    """The push layout for a trainer model's config.

    serve_as='multimodal' only applies to text-only Qwen3.5: serve it with vLLM's
    Qwen3_5ForConditionalGeneration (language model under 'model.language_model.*').
    """
    archs = getattr(config, "architectures", None) or [type(config).__name__]
    arch = archs[0]
    tied = is_tied(config)
    if arch == "Qwen3_5ForCausalLM":
        if serve_as == "multimodal":
            return PushLayout(arch, "Qwen3_5ForConditionalGeneration", tied,
                              rename=(("model.", "model.language_model."),),
                              vllm_prefixes=QWEN3_5_MULTIMODAL_PREFIXES, stacked=QWEN3_5_STACKED)
        return PushLayout(arch, arch, tied, stacked=QWEN3_5_STACKED)
    if serve_as != "native":
        raise ValueError(f"serve_as={serve_as!r} is only for Qwen3_5ForCausalLM models, not {arch}")
    if arch == "Qwen3_5ForConditionalGeneration":
        return PushLayout(arch, arch, tied, vllm_prefixes=QWEN3_5_MULTIMODAL_PREFIXES,
                          stacked=QWEN3_5_STACKED)
    if arch == "Qwen3NextForCausalLM":
        return PushLayout(arch, arch, tied, stacked=QWEN3_NEXT_STACKED)
    # Llama, Mistral, Qwen2, Qwen3 and most dense decoders pack exactly q/k/v and gate/up.
    return PushLayout(arch, arch, tied, stacked=LLAMA_STACKED)
