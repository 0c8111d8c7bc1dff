"""FSDP2 sharded training (dreamd/train/distributed.py): the torchrun world, each rank's share
of a batch, the step plan that keeps the ranks' collectives in line, and, under a real
`torchrun --nproc-per-node 2` (gloo, one torch thread per rank), optimizer steps that equal
the single process's on the same data."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # torchrun runs this file as a script (the ranks' side, below)

import pytest  # noqa: E402
import torch  # noqa: E402

from dreamd.config import OptimizerConfig, TrainConfig  # noqa: E402
from dreamd.dream.scenario import ScenarioKind  # noqa: E402
from dreamd.errors import UsageError  # noqa: E402
from dreamd.train.distributed import (  # noqa: E402
    ShardedTrainer, World, init_world, rank_share, shard_model, step_plan, torchrun_world)
from dreamd.train.trainer import Trainer  # noqa: E402
from tests.fixtures_models import random_example, tiny_model  # noqa: E402

# name -> (arch, TrainConfig, OptimizerConfig): the cases test_distributed compares with one process
CASES = {
    "apollo": ("llama", TrainConfig(lr=1e-3, warmup_steps=0, context_frozen="auto", grad_clip=0.5,
                                       forward_layout="per_example", frozen_min_context=1),
               OptimizerConfig(rank=8, update_proj_gap=2, weight_decay=0.01)),
    "apollo_mini": ("llama", TrainConfig(lr=1e-3, warmup_steps=0, context_frozen="on"),
                    OptimizerConfig(rank=1, scale_type="tensor", update_proj_gap=2)),
    "adamw_padded": ("llama", TrainConfig(lr=1e-3, warmup_steps=0, forward_layout="padded"),
                     OptimizerConfig(name="adamw", weight_decay=0.01)),
    "apollo_qwen35": ("qwen3.5", TrainConfig(lr=1e-3, warmup_steps=0, context_frozen="auto",
                                                forward_layout="per_example", frozen_min_context=1),
                      OptimizerConfig(rank=4, update_proj_gap=2)),
}
STEPS = 3


def batches(seed: int = 7, n: int = STEPS, size: int = 3) -> list[list]:
    """Mixed batches: example 0 has a context shorter than its reply (a full forward under
    context_frozen='auto') while rank 1's example 1 runs context-frozen, so rank 0 runs a
    borrowed no_grad forward; 3 examples over 2 ranks leave rank 1 a filler slot."""
    rng = random.Random(seed)
    kinds = (ScenarioKind.GENERAL, ScenarioKind.ACCEPT)
    def example(k: int, i: int):
        context, reply = (rng.randrange(2, 5), rng.randrange(6, 15)) if i == 0 else \
            (rng.randrange(10, 40), rng.randrange(3, 9))
        return random_example(rng, context, reply, kinds[i > 0], scenario_id=100 * k + i)
    return [[example(k, i) for i in range(size)] for k in range(n)]


def steps(out: Path) -> None:
    world = torchrun_world()
    assert world is not None, "run me under torchrun with 2+ ranks"
    init_world(world, "cpu")
    results = {}
    for name, (arch, train_cfg, opt_cfg) in CASES.items():
        model = shard_model(tiny_model(arch))
        trainer = ShardedTrainer(model, train_cfg, opt_cfg, world=world, seed=0)
        rows = [r.metrics() for r in trainer.pass_in_step(batches())]
        weights = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
        results[name] = {"rows": rows, "weights": weights}
    if world.is_main:
        torch.save(results, out)
    torch.distributed.destroy_process_group()




def torchrun(nproc: int, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node nproc tests/test_distributed.py args...`, one thread per rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(ROOT / "tests" / "test_distributed.py"), *args]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def test_a_single_process_has_no_world() -> None:
    assert torchrun_world({}) is None
    assert torchrun_world({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}) is None
    assert torchrun_world({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == World(1, 2, 1)


@pytest.mark.parametrize("env", [{"RANK": "0"}, {"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"},
                                 {"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}])
def test_a_broken_torchrun_environment_is_one_line(env: dict[str, str]) -> None:
    with pytest.raises(UsageError) as err:
        torchrun_world(env)
    assert "\n" not in str(err.value) and "torchrun" in str(err.value)


def test_every_example_is_trained_once_across_the_world() -> None:
    batch = list(range(7))
    for size in (1, 2, 3, 8):
        shares = [rank_share(batch, World(r, size, r)) for r in range(size)]
        assert sorted(x for share in shares for x in share) == batch
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_the_step_plan_lines_up_every_ranks_forwards() -> None:
    """Ranks derive the same slot sequence; a rank without a micro-batch gets a filler, and a
    context-frozen forward on one rank means a no_grad forward on every rank. The worker's
    batches hold both cases, so the torchrun test below exercises them."""
    trainer = Trainer(tiny_model("llama"), CASES["apollo"][1], CASES["apollo"][2])
    plans = [[step_plan(trainer, batch, World(r, 2, r)) for r in range(2)] for batch in batches()]
    for plan in plans:
        assert [s.prefix for s in plan[0]] == [s.prefix for s in plan[1]]
    slots = [s for plan in plans for s in plan[1]]
    assert any(s.mine is None for s in slots)                                   # a filler
    assert any(s.prefix and s.mine is not None and not (s.mine[1] and s.mine[0].context_width > 1)
               for plan in plans for s in plan[0] + plan[1])                     # a borrowed no_grad


@pytest.mark.slow
def test_sharded_steps_equal_the_single_process(tmp_path: Path) -> None:
    """3 optimizer steps on 2 ranks vs one process, same model, batches and config: APOLLO
    (channel, weight decay, clipping active, projection refreshed every 2 steps), APOLLO-Mini
    (rank 1, tensor scale), AdamW with padded forwards, APOLLO on the qwen3.5-style hybrid.
    The difference is the order in which gradients are added (per rank, then across ranks),
    float rounding only: losses within 1e-6 relative, grad norms within 1e-5, weights within
    5e-6 absolute (measured <= 2.5e-6, in embedding rows whose near-zero gradients Adam
    normalises; updates are ~1e-2); padded forwards pad each rank's share on its own (other
    padding, pad_fraction differs): 5e-5 (measured 1.2e-5, Adam again on tiny gradients)."""
    out = tmp_path / "steps.pt"
    torchrun(2, "steps", str(out))
    sharded = torch.load(out, weights_only=True)
    for name, (arch, train_cfg, opt_cfg) in CASES.items():
        model = tiny_model(arch)
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        rows = [r.metrics() for r in Trainer(model, train_cfg, opt_cfg, seed=0).train_pass(batches())]
        got = sharded[name]
        assert len(got["rows"]) == len(rows)
        for one, two in zip(rows, got["rows"]):
            assert two["loss"] == pytest.approx(one["loss"], rel=1e-6), name
            assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5), name
            assert (two["tokens"], two["scenario_ids"], two["skipped"]) == (one["tokens"], one["scenario_ids"], False)
        atol = 5e-5 if train_cfg.forward_layout == "padded" else 5e-6
        for n, p in model.named_parameters():
            assert not torch.equal(p.detach(), start[n]) or n.endswith("embed_tokens.weight"), (name, n)
            torch.testing.assert_close(got["weights"][n], p.detach(), rtol=1e-4, atol=atol, msg=f"{name} {n}")


def _full_state(trainer: ShardedTrainer) -> dict[str, torch.Tensor]:
    """Every rank: the trainer's weights and optimizer state (full tensors, Python values) by flat key."""
    from dreamd.train.sharded_checkpoint import sharded_state

    out = {}
    for key, value in sorted(sharded_state(trainer).items()):
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        out[key] = value.detach().clone() if isinstance(value, torch.Tensor) else value
    return out


def save_then_dump(out: Path) -> None:
    """2 ranks: 2 steps of the 'apollo' case, DCP-saved to out.parent / 'ck'; the full state."""
    from dreamd.train.sharded_checkpoint import save_sharded

    world = torchrun_world()
    init_world(world, "cpu")
    arch, train_cfg, opt_cfg = CASES["apollo"]
    trainer = ShardedTrainer(shard_model(tiny_model(arch)), train_cfg, opt_cfg, world=world)
    for _ in trainer.pass_in_step(batches(n=2)):
        pass
    (out.parent / "ck").mkdir(exist_ok=True)
    save_sharded(trainer, out.parent / "ck")
    state = _full_state(trainer)
    if world.is_main:
        torch.save(state, out)
    torch.distributed.destroy_process_group()


def load_then_dump(out: Path) -> None:
    """Any number of ranks: a fresh trainer loads out.parent / 'ck' (DCP reshards); the full state."""
    from dreamd.train.sharded_checkpoint import load_sharded

    world = torchrun_world()
    init_world(world, "cpu")
    arch, train_cfg, opt_cfg = CASES["apollo"]
    trainer = ShardedTrainer(shard_model(tiny_model(arch, seed=1)), train_cfg, opt_cfg, world=world)
    load_sharded(trainer, out.parent / "ck")
    state = _full_state(trainer)
    if world.is_main:
        torch.save(state, out)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_dcp_shards_saved_by_two_ranks_load_resharded_on_three(tmp_path: Path) -> None:
    """Weights and optimizer state (sharded Adam moments, replicated APOLLO moments and
    projections) saved by 2 ranks come back bit for bit on 3 (DCP reshards the DTensors)."""
    torchrun(2, "save", str(tmp_path / "saved.pt"))
    torchrun(3, "load", str(tmp_path / "loaded.pt"))
    saved = torch.load(tmp_path / "saved.pt", weights_only=True)
    loaded = torch.load(tmp_path / "loaded.pt", weights_only=True)
    assert saved.keys() == loaded.keys() and any("/projector/ortho_matrix" in k for k in saved)
    assert any(k.startswith("optim/model.embed_tokens.weight/exp_avg") for k in saved)
    for key in saved:
        if isinstance(saved[key], torch.Tensor):
            assert torch.equal(saved[key], loaded[key]), key
        else:
            assert saved[key] == loaded[key], key


if __name__ == "__main__":      # a rank under torchrun: `test_distributed.py steps|save|load OUT.pt`
    torch.set_num_threads(1)
    {"steps": steps, "save": save_then_dump, "load": load_then_dump}[sys.argv[1]](Path(sys.argv[2]))
    os._exit(0)
