"""Training sharded with FSDP2 (torch's `fully_shard`) across the ranks `torchrun` launches.

A single process never comes here: `torchrun_world()` is None unless torchrun set WORLD_SIZE
above 1, and then the Trainer, its numbers and its checkpoints are exactly as without this file.

What each rank does per optimizer step (ShardedTrainer):
- data: every rank holds the whole batch (rank 0 dreams and broadcasts it); rank r trains the
  examples batch[r::world] (`rank_share`), so every scenario is trained exactly once across the
  world and the optimizer-step count is the single process's.
- forwards: FSDP2 all-gathers each decoder layer in every forward, a collective every rank
  must join. Ranks hold different examples, so their micro-forwards differ in number and in
  shape (a context-frozen example runs a no_grad context forward before its grad forward).
  Every rank computes every rank's plan from the shared batch (`step_plan`) and fills the gaps
  with a one-token forward whose loss is multiplied by 0: all ranks run the same sequence of
  forwards and backwards. A filler adds exact zeros to the gradient.
- gradient: each micro-backward's loss is nll / n_labels of the WHOLE batch; the reduce-scatter
  SUMS across ranks (gradient divide factor 1), so the sharded gradient is the single
  process's sum, added in another order (float rounding only).
- clipping: torch's clip_grad_norm_ over the DTensor gradients (the norm of all shards,
  all-reduced), the same clip coefficient on every rank.
- optimizer: plain Adam groups (embeddings, norms, lm_head) step elementwise on the local
  shards with sharded state. APOLLO's low-rank groups do NOT: apollo-torch's projection is a
  matmul of the gradient with a plain random matrix (aten.mm refuses a DTensor mixed with a
  Tensor), its channel norms run across the sharded dimension, and its norm-growth limiter
  takes the whole tensor's norm. So per low-rank parameter the full gradient and weight are
  gathered, apollo-torch's own step runs on those full tensors on every rank (the same
  deterministic result everywhere; its low-rank moments, r x n, are replicated), and each rank
  keeps its shard of the updated weight. Given the same gradient this is apollo-torch's update
  bit for bit (APOLLO-Mini, rank 1 with tensor scaling, included); one full matrix at a time
  is alive beside the shards.
- precision: the sharded parameters stay fp32 (the master weights); a bf16/fp16 model.dtype
  becomes FSDP2's MixedPrecisionPolicy (param_dtype = that dtype, reduce_dtype fp32) instead
  of the single process's LowPrecisionWeights (bf16 weights with fp32 work copies).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dreamd.errors import CycleFailed, UsageError
from dreamd.train.context_frozen import AlignedBatch
from dreamd.train.examples import Encoded
from dreamd.train.trainer import StepResult, Trainer

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class World:
    """This process's place among the ranks torchrun started."""

    rank: int
    size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that dreams, evaluates and writes the store."""
        return self.rank == 0


def torchrun_world(env: Mapping[str, str] | None = None) -> World | None:
    """The torchrun world from RANK / WORLD_SIZE / LOCAL_RANK, or None for a single process
    (none of them set, or WORLD_SIZE=1: then everything runs exactly as without torchrun)."""
    env = os.environ if env is None else env
    present = [k for k in _ENV if k in env]
    if not present:
        return None
    if len(present) != len(_ENV):
        missing = ", ".join(k for k in _ENV if k not in env)
        raise UsageError(f"the environment sets {', '.join(present)} but not {missing}; start "
                         "dreamd with torchrun (which sets all three) or unset them for one process")
    try:
        rank, size, local = (int(env[k]) for k in _ENV)
    except ValueError:
        raise UsageError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers, got "
                         f"{[env[k] for k in _ENV]}; start dreamd with torchrun") from None
    if size < 1 or not 0 <= rank < size or local < 0:
        raise UsageError(f"RANK={rank} WORLD_SIZE={size} LOCAL_RANK={local} is not a world "
                         "(need 0 <= RANK < WORLD_SIZE); start dreamd with torchrun")
    return None if size == 1 else World(rank=rank, size=size, local_rank=local)


def init_world(world: World, device: str) -> str:
    """Join the process group torchrun set up (MASTER_ADDR/PORT from its env): gloo on CPU,
    nccl on CUDA (each rank on cuda:LOCAL_RANK). Returns this rank's device."""
    if device == "cuda":
        torch.cuda.set_device(world.local_rank)
        device = f"cuda:{world.local_rank}"
    if not dist.is_initialized():
        # Ranks 1.. wait in a broadcast while rank 0 dreams, evaluates or waits for its schedule
        # (hours): no collective timeout. A dead rank is torchrun's to see: it ends the world.
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                timeout=timedelta(days=365))
    return device


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 shards one by one: the decoder layers (the model's _no_split_modules)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    units = [m for m in model.modules() if type(m).__name__ in names]
    if not units:
        raise UsageError(f"{type(model).__name__} names no decoder layer class (_no_split_modules); "
                         "dreamd cannot shard it, run it as one process")
    return units


def shard_model(model: nn.Module, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """fully_shard every decoder layer, then the root (in place). The parameters must be fp32:
    a lower compute_dtype is FSDP2's mixed precision (param_dtype), gradients reduced in fp32.
    The reduce-scatter sums (divide factor 1, a plain SUM: gloo has no PREMUL_SUM): the loss is
    already divided by the whole batch's reply tokens."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    low = {p.dtype for p in model.parameters()} - {torch.float32}
    if low:
        raise ValueError(f"shard_model needs fp32 parameters (got {sorted(map(str, low))}); load the "
                         "model in fp32 and pass the compute dtype")
    policy = MixedPrecisionPolicy(param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
                                  reduce_dtype=torch.float32)
    for unit in shard_units(model):
        fully_shard(unit, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)   # gloo has no PREMUL_SUM
    return model


def rank_share(batch: list[Any], world: World, rank: int | None = None) -> list[Any]:
    """The examples of `batch` that `rank` (default: this one) trains: every world.size-th."""
    return batch[(world.rank if rank is None else rank)::world.size]


def broadcast(message: Any, world: World) -> Any:
    """Rank 0's `message` (any picklable object) on every rank; the other ranks pass None."""
    box = [message if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------------------
# The step plan: the same forwards and backwards on every rank


@dataclass(frozen=True)
class Slot:
    """One micro-forward position in the step, the same on every rank."""

    prefix: bool
    """Some rank runs a no_grad context forward here (context-frozen): every rank runs one."""
    mine: tuple[AlignedBatch, bool] | None
    """This rank's micro-batch here, or None (a zero-loss filler forward)."""


def _has_prefix(aligned: AlignedBatch, frozen: bool) -> bool:
    return frozen and aligned.context_width > 1    # reply_nll's no_grad context forward


def step_plan(trainer: Trainer, batch: list[Encoded], world: World) -> list[Slot]:
    """This rank's slots for one step; every rank derives every rank's micro-batches from the
    whole batch, so the plans line up without communication."""
    per_rank = [trainer.micro_batches(rank_share(batch, world, r)) if rank_share(batch, world, r) else []
                for r in range(world.size)]
    mine = per_rank[world.rank]
    slots = []
    for i in range(max(len(m) for m in per_rank)):
        prefix = any(i < len(m) and _has_prefix(*m[i]) for m in per_rank)
        slots.append(Slot(prefix=prefix, mine=mine[i] if i < len(mine) else None))
    return slots


def _filler_ids(trainer: Trainer) -> torch.Tensor:
    return torch.full((1, 1), trainer.pad_id, dtype=torch.long, device=trainer.device)


# ---------------------------------------------------------------------------------------------
# APOLLO on shards


def _local_chunk(full: torch.Tensor, p: Any) -> torch.Tensor:
    """This rank's Shard(0) piece of `full`, as FSDP2 cuts it (torch.chunk, empty past the end)."""
    mesh = p.device_mesh
    rank, size = mesh.get_local_rank(), mesh.size()
    chunks = torch.chunk(full, size, dim=0)
    local = chunks[rank] if rank < len(chunks) else full[:0]
    assert local.shape == p.to_local().shape, (local.shape, p.to_local().shape)
    return local


@torch.no_grad()
def sharded_optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    """optimizer.step() on FSDP2 shards: plain groups on the local shards; each low-rank
    (APOLLO) parameter on its gathered full weight and gradient, one at a time (module doc)."""
    groups = optimizer.param_groups
    saved = [g["params"] for g in groups]
    try:
        for g in groups:
            if "rank" in g:
                g["params"] = []
        optimizer.step()                       # elementwise Adam on DTensor shards
        for gi, params in enumerate(saved):
            if "rank" not in groups[gi]:
                continue
            for p in params:
                if p.grad is None:
                    continue
                full = p.full_tensor().detach().clone()
                full.grad = p.grad.full_tensor()
                for g in groups:
                    g["params"] = []
                groups[gi]["params"] = [full]
                if p in optimizer.state:
                    optimizer.state[full] = optimizer.state.pop(p)
                optimizer.step()
                optimizer.state[p] = optimizer.state.pop(full)
                p.to_local().copy_(_local_chunk(full, p))
                del full
    finally:
        for g, params in zip(groups, saved):
            g["params"] = params


# ---------------------------------------------------------------------------------------------
# The trainer


class ShardedTrainer(Trainer):
    """Trainer over an FSDP2-sharded model: one optimizer step per (whole) batch, as the single
    process; the step's numbers (loss, tokens, grad norm) are the world's."""

    def __init__(self, model: nn.Module, train_cfg: Any, opt_cfg: Any, *, world: World, seed: int = 0,
                 serving: nn.Module | None = None) -> None:
        super().__init__(model, train_cfg, opt_cfg, seed=seed)
        if self.low_precision is not None:
            raise ValueError("sharded parameters must be fp32 (FSDP2's mixed precision computes in bf16)")
        self.world = world
        self.serving = serving
        """Rank 0: the full, unsharded model the engine serves (None on the other ranks)."""
        self.opt_cfg = opt_cfg

    def forward_backward(self, batch: list[Encoded], n_labels: int) -> tuple[float, int, int, int]:
        nll_total, peak_saved, real, slots = 0.0, 0, 0, 0
        for slot in step_plan(self, batch, self.world):
            if slot.prefix and (slot.mine is None or not _has_prefix(*slot.mine)):
                with torch.no_grad():       # match another rank's no_grad context forward
                    self.model(input_ids=_filler_ids(self), use_cache=False, logits_to_keep=1)
            if slot.mine is None:
                out = self.model(input_ids=_filler_ids(self), use_cache=False, logits_to_keep=1)
                (out.logits.float().sum() * 0.0).backward()
                continue
            aligned, frozen = slot.mine
            nll_total += self.micro_step(aligned, frozen, n_labels)
            peak_saved = max(peak_saved, self.meter.bytes)
            real, slots = real + aligned.n_real_tokens, slots + aligned.n_slots
        # The world's sums, in float64 so that the loss adds up as the single process's does.
        sums = torch.tensor([nll_total, real, slots], dtype=torch.float64)
        dist.all_reduce(sums)
        peak = torch.tensor([peak_saved], dtype=torch.int64)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        return float(sums[0]), int(peak[0]), int(sums[1]), int(sums[2])

    def train_pass(self, batches: Iterable[list[Encoded]]) -> Iterator[StepResult]:
        """Rank 0: tell the other ranks to train these batches, then train them in step. Before
        every step after the first rank 0 says whether it goes on (its consumer may stop at a
        step boundary: the generator is closed, and the others hear False). Afterwards (also
        when stopped) rank 0's serving model gets the trained weights."""
        batches = list(batches)
        if self.world.is_main:
            broadcast(("train", batches, self.base_lr), self.world)
        return self.pass_in_step(batches)

    def pass_in_step(self, batches: list[list[Encoded]]) -> Iterator[StepResult]:
        """The pass every rank runs (rank 0 through train_pass, the others in `follow`)."""
        self.model.train()
        done = 0
        try:
            for i, batch in enumerate(batches):
                if i > 0 and broadcast(True, self.world) is not True:
                    break                          # rank 0 stopped at this step boundary
                res = self.train_step(batch)
                done += 1
                yield res
                if self.nonfinite_in_a_row >= self.cfg.max_nonfinite_steps:
                    # loss and grad norm are the world's: every rank raises at the same step
                    raise CycleFailed(f"{self.nonfinite_in_a_row} steps in a row had a non-finite loss "
                                      f"or gradient (last at step {self.step - 1}); rolling back")
        except GeneratorExit:
            if self.world.is_main and done < len(batches):
                broadcast(False, self.world)
            raise
        finally:
            self.sync_serving()

    def sync_serving(self) -> None:
        """Every rank: gather each parameter; rank 0 copies it into its serving model (the one
        the evals and the HF export use, and the transformers engine serves)."""
        for name, full in self.full_tensors():
            if self.serving is not None:
                with torch.no_grad():
                    self.serving.get_parameter(name).copy_(full)

    def full_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every rank: (name, whole tensor) per parameter, each gathered from the shards (a
        collective all ranks join, so every rank iterates to the end) and dropped before the
        next: one full parameter alive at a time."""
        for name, p in self.model.named_parameters():
            with torch.no_grad():    # not around the yield: the caller's grad mode stays its own
                full = p.full_tensor()
            yield name, full
            del full

    def clip_grads(self) -> float:
        grads = [p for p in self.opt_params.values() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(grads, self.cfg.grad_clip)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def optimizer_step(self) -> None:
        sharded_optimizer_step(self.optimizer)

    # ---- checkpoints (train/sharded_checkpoint.py) and rollback: every rank in step -----------
    def state_dict(self) -> dict[str, Any]:
        """trainer_state.pt of a sharded run: the optimizer lives in the DCP shards instead."""
        return {**super().state_dict(), "optimizer": None, "world_size": self.world.size}

    def save_shards(self, checkpoint_dir: Path) -> None:
        """Rank 0 (inside CheckpointDir.save, before the marker): every rank writes its shards."""
        from dreamd.train.sharded_checkpoint import save_sharded

        if self.world.is_main:
            broadcast(("save", str(checkpoint_dir)), self.world)
        save_sharded(self, checkpoint_dir)

    def restore_checkpoint(self, checkpoint_dir: Path, trainer_state: dict[str, Any]) -> None:
        """Rank 0: every rank loads the shards (weights, optimizer) and the step counters."""
        from dreamd.train.sharded_checkpoint import SHARDED_DIR, load_sharded

        counters = {k: trainer_state[k] for k in ("step", "base_lr", "nonfinite_in_a_row")}
        if self.world.is_main and not (Path(checkpoint_dir) / SHARDED_DIR).is_dir():
            # A single process's checkpoint: its weights (the serving model, loaded from it),
            # a fresh optimizer.
            self.reset(dict(self.serving.named_parameters()))
            self.step, self.base_lr, self.nonfinite_in_a_row = counters.values()
            self.generator.set_state(trainer_state["generator"])
            return
        if self.world.is_main:
            broadcast(("load", str(checkpoint_dir), counters), self.world)
            self.load_state_dict(trainer_state)
        else:
            self.step, self.base_lr, self.nonfinite_in_a_row = counters.values()
        load_sharded(self, Path(checkpoint_dir))

    def reset(self, weights: Mapping[str, torch.Tensor] | None = None) -> None:
        """Back to the run's start (a rollback without a checkpoint), on every rank: the
        weights of model.path (rank 0 passes them; the others receive them), a fresh optimizer."""
        from dreamd.train.optim import build_optimizer

        if self.world.is_main:
            weights = {k: v.detach().cpu() for k, v in weights.items()}
            broadcast(("reset", weights), self.world)
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.to_local().copy_(_local_chunk(weights[name].to(p.dtype), p))
        self.optimizer = build_optimizer(self.model, self.opt_cfg, self.cfg.lr, self.opt_params)
        self.step, self.base_lr, self.nonfinite_in_a_row = 0, self.cfg.lr, 0


def finish(world: World | None, *, end_world: bool = True) -> None:
    """Rank 0 at exit: the other ranks leave `follow` (best effort: a dead world is torchrun's),
    and rank 0 ends its process group as they do. end_world=False: vLLM built its state on this
    rank and its cleanup ends the world (engines/vllm_compat.owns_world)."""
    if world is not None and world.is_main and dist.is_initialized():
        broadcast(("exit",), world)
        _settle()
        if end_world:
            dist.destroy_process_group()


def _settle() -> None:
    """Every rank, after the exit message: a barrier. gloo's worker thread drops a finished
    collective's tensors after the caller moved on, and a tensor made in Python needs the GIL
    to go; at interpreter exit that thread is killed mid-destructor and the process aborts
    ('terminate called without an active exception', SIGABRT: ~1 exit in 4 of rank 0 on the
    2-core box, a core dump showed ProcessGroupGloo::runLoop in ~AsyncBroadcastWork). The
    barrier's wait releases the GIL while the thread finishes; its own tensors are C++'s."""
    dist.barrier()


def follow(trainer: ShardedTrainer, engine_side: Callable[[ShardedTrainer], Any] | None = None) -> int:
    """Ranks 1..: train, save, load and reset in step with rank 0 until it says exit; with
    vLLM, run rank 0's engine calls on this rank's own engine: `engine_side(trainer)` builds
    its side at the first call (engines/ranked.py RankSide; passed in by cli.py, so that
    train/ does not import engines/). Only rank 0 dreams, evaluates and writes the store
    (docs/sql.md)."""
    side = None
    while True:
        message = broadcast(None, trainer.world)
        op = message[0]
        if op == "exit":
            _settle()
            if side is not None:
                side.close()      # this rank's vLLM; it ends torch.distributed with it
            return 0
        try:
            if op == "engine":
                if side is None:
                    if engine_side is None:
                        raise RuntimeError(f"rank {trainer.world.rank}: an engine call from rank 0, and no engine here")
                    side = engine_side(trainer)
                side.follow(message[1], message[2])
            elif op == "train":
                trainer.set_lr(message[2])
                for _ in trainer.pass_in_step(message[1]):
                    pass
            elif op == "save":
                trainer.save_shards(Path(message[1]))
            elif op == "load":
                trainer.restore_checkpoint(Path(message[1]), message[2])
            elif op == "reset":
                trainer.reset(message[1])
            else:
                raise RuntimeError(f"rank {trainer.world.rank}: unknown message {op!r} from rank 0")
        except CycleFailed:
            continue          # rank 0 failed the same step; it rolls back and says how


def open_sharded_trainer(cfg: Any, world: World, device: str, serving: nn.Module | None) -> ShardedTrainer:
    """The training copy of model.path in fp32, sharded (model.dtype is the compute dtype)."""
    from dreamd.models import load_model, resolve_dtype

    model, _ = load_model(cfg.model.model_copy(update={"dtype": "float32"}), device)
    shard_model(model, resolve_dtype(cfg.model.dtype, device))
    return ShardedTrainer(model, cfg.train, cfg.optimizer, world=world, seed=cfg.run.seed, serving=serving)


def run_follower(cfg: Any, world: World, engine_side: Callable[[ShardedTrainer], Any] | None = None) -> int:
    """`dreamd run` on ranks 1..: no store, no daemon; the training shards, and with vLLM this
    rank's own engine, built and driven by rank 0's calls (engines/ranked.py)."""
    from dreamd.models import apply_threads, resolve_device

    # A stop (systemctl stop, Ctrl-C: torchrun passes SIGTERM/SIGINT to every rank) is rank 0's
    # to carry out at a step boundary, and it needs these ranks for its checkpoint; then it
    # says exit. A rank that must die now is killed (SIGKILL), and torchrun ends the world.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    apply_threads(cfg.run.threads)
    device = init_world(world, resolve_device(cfg.run.device))
    torch.manual_seed(cfg.run.seed)
    try:
        return follow(open_sharded_trainer(cfg, world, device, serving=None), engine_side)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
