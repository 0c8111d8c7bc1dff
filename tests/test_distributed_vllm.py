"""vLLM colocated per rank under torchrun (engines/ranked.py), for real: `torchrun
--nproc-per-node 2 -m dreamd run` with engine.kind = 'vllm' (vLLM's CPU build, gloo, one
thread per rank, the tiny llama, model-written dreaming): each rank builds its own vLLM through
vLLM's external_launcher inside the world torchrun started, the cycle's generation is dealt
across both ranks' engines, every push goes from the FSDP2 shards into both engines one
parameter at a time, and the canary passes on both ranks after every push.

Also the pure parts: the deal of conversations across data-parallel ranks and its undoing, the
per-rank seed streams, and engine.tensor_parallel_size refused in one line where it cannot work.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dreamd.engines.ranked import RankGroups, merge, rank_seed, share
from dreamd.errors import UsageError
from tests.daemon_process import sqlite_url, store_rows, write_config
from tests.test_distributed_run import finish, torchrun_dreamd
from tests.test_resume_exact import STEP_SQL
from tests.test_vllm_real import _require_vllm

STEPS_PER_CYCLE = 2      # mix.examples_per_cycle 8 at the init config's batch size 4


def test_share_and_merge_round_trip_for_every_world() -> None:
    items = list(range(11))
    for dp in range(1, 6):
        parts = [share(items, d, dp) for d in range(dp)]
        assert sorted(x for p in parts for x in p) == items
        assert merge(parts) == items
    assert merge([[], []]) == []


def test_rank_seeds_keep_rank_0_and_differ_per_rank() -> None:
    assert rank_seed(7, 0) == 7 and rank_seed(None, 3) is None
    assert len({rank_seed(7, d) for d in range(8)}) == 8


def test_groups_follow_vllm_numbering_and_refuse_a_non_divisor() -> None:
    g = RankGroups.of(3, 4, 2)
    assert (g.dp_size, g.dp_rank) == (2, 1)          # vLLM: data_parallel_rank = RANK // tp
    assert RankGroups.of(1, 2, 1).dp_rank == 1
    with pytest.raises(UsageError) as info:
        RankGroups.of(0, 2, 3)
    assert "engine.tensor_parallel_size = 3 does not divide the torchrun world of 2 ranks" in str(info.value)
    assert "\n" not in str(info.value)


def test_tensor_parallel_without_torchrun_is_refused_in_one_line(setup_dir: Path) -> None:
    from dreamd.config_file import load_config
    from dreamd.engines.select import make_engine
    from dreamd.models import load_model

    cfg = load_config(setup_dir / "dreamd.toml", environ={})
    cfg.model.path = setup_dir / "model"
    cfg.engine.kind, cfg.engine.tensor_parallel_size = "vllm", 2
    model, tokenizer = load_model(cfg.model, "cpu")
    with pytest.raises(UsageError) as info:
        make_engine(cfg, model, tokenizer)
    assert str(info.value) == ("engine.kind = 'vllm' but engine.tensor_parallel_size = 2 needs torchrun (each "
                               "rank one slice of the model); a single process serves with one engine: set "
                               "it to 1; set engine.kind = 'transformers' or 'auto'")


@pytest.mark.slow
def test_two_ranks_each_with_its_own_vllm_run_two_cycles(setup_dir: Path, tmp_path: Path) -> None:
    _require_vllm()
    state = tmp_path / "state"
    config = write_config(setup_dir, tmp_path / "v.toml", state, engine__kind="vllm",
                          engine__kv_cache_memory_bytes=64 << 20,
                          dream__source="mixed", dream__situation_max_tokens=48, dream__reply_max_tokens=48,
                          dream__judge_max_tokens=16, dream__batch_size=4)
    log = tmp_path / "v.log"
    proc = torchrun_dreamd(config, log, 2)
    assert finish(proc, log) == 0, log.read_text()[-4000:]
    text = log.read_text()
    ready = [json.loads(line) for line in text.splitlines() if '"engine.ready"' in line]
    assert len(ready) == 1 and ready[0]["kind"] == "vllm" and ready[0]["ranks"] == 2, ready
    pushes = [json.loads(line) for line in text.splitlines() if '"engine.push"' in line]
    assert len(pushes) == 3 and all(p["ranks"] == 2 and p["sent"][0] == p["sent"][1] > 0 for p in pushes)

    url = sqlite_url(state)
    assert [r["step"] for r in store_rows(url, STEP_SQL)] == list(range(2 * STEPS_PER_CYCLE))
    cycles = store_rows(url, "SELECT id, status FROM cycles ORDER BY number")
    assert [c["status"] for c in cycles] == ["committed", "committed"]
    # every cycle pushed from the shards and ran the canary on both ranks' engines
    phases = store_rows(url, "SELECT cycle_id, name FROM phases WHERE name IN ('push', 'canary')")
    for c in cycles:
        assert sorted(p["name"] for p in phases if p["cycle_id"] == c["id"]) == ["canary", "push"]
    canaries = store_rows(url, "SELECT cycle_id, detail_json FROM evals WHERE metric = 'engine.canary_mean_abs_diff'")
    assert {r["cycle_id"] for r in canaries} == {c["id"] for c in cycles}
    for row in canaries:
        detail = json.loads(row["detail_json"]) if isinstance(row["detail_json"], str) else row["detail_json"]
        assert detail["ok"] and detail["rank"] in (0, 1), detail
        assert len(detail["per_rank"]) == 2 and max(detail["per_rank"]) <= detail["atol"], detail
    # the model dreamer wrote through both ranks' engines (candidates from the model exist)
    model_written = store_rows(url, "SELECT COUNT(*) AS n FROM scenarios WHERE source = 'model'")
    assert model_written[0]["n"] > 0


@pytest.mark.slow
def test_a_failed_cycle_rolls_back_and_pushes_the_reset_shards_to_both_engines(setup_dir: Path,
                                                                              tmp_path: Path) -> None:
    """`torchrun ... dreamd once` whose cycle fails: the ' instructions' embedding is NaN
    (tests/test_faults.py), derail scenarios hold it, max_nonfinite_steps 1. The rollback resets
    every rank's shards to model.path and only then pushes them into both engines, whose canary
    must pass (else the rollback raises and the process dies with a traceback). The NaN lands in
    the pass's first step, so the shards never changed: this shows the rollback's push and
    canary on both ranks, not that the push follows the restore (run.py: Run.roll_back)."""
    import subprocess
    import sys

    from tests.daemon_process import child_env
    from tests.test_faults import model_with_nan_tokens

    _require_vllm()
    model = tmp_path / "nan-model"
    model_with_nan_tokens(setup_dir, model, (" instructions",))
    state = tmp_path / "state"
    config = write_config(setup_dir, tmp_path / "f.toml", state, model__path=model, engine__kind="vllm",
                          engine__kv_cache_memory_bytes=64 << 20, train__max_nonfinite_steps=1)
    log = tmp_path / "f.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "dreamd", "once", "--config", str(config), "--now"]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(cmd, env=child_env(PYTHONPATH=str(root)), cwd=root, stdout=log.open("ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    code = finish(proc, log)
    text = log.read_text()
    assert "[rank0]: Traceback" not in text and "[rank1]: Traceback" not in text, text[-4000:]
    assert code != 0                                     # `once` with a failed cycle
    events = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    pushes = [e for e in events if e["event"] == "engine.push"]
    # at start, then after the rollback (the failed training pass pushed nothing): both ranks,
    # every parameter, one at a time
    assert len(pushes) == 2 and all(p["ranks"] == 2 and len(set(p["sent"])) == 1 for p in pushes), pushes
    assert [e["event"] for e in events if e["event"] in ("engine.push", "cycle.rollback")] == \
        ["engine.push", "cycle.rollback", "engine.push"]
    url = sqlite_url(state)
    assert [c["status"] for c in store_rows(url, "SELECT status FROM cycles")] == ["failed"]
    rollbacks = store_rows(url, "SELECT reason FROM decisions WHERE action = 'rollback'")
    assert len(rollbacks) == 1 and "non-finite" in rollbacks[0]["reason"], rollbacks
    assert not store_rows(url, "SELECT id FROM train_steps WHERE status = 'active'")
