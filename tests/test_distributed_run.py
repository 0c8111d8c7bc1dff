"""`torchrun --nproc-per-node 2 -m dreamd run` for real (gloo, one torch thread per rank, the
tiny llama, the transformers engine): two cycles; exact resume on the same world size; a rank
killed with SIGKILL mid-cycle, then a restart; a stop mid-cycle (SIGTERM) and its exact
resume; and a single process resuming the sharded run from its checkpoint's HF export (the
weights, 2 -> 1)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dreamd.train.checkpoint import latest_complete, load_model_state_dict, verify_checkpoint
from dreamd.train.sharded_checkpoint import SHARDED_DIR
from tests.daemon_process import child_env, sqlite_url, store_rows, wait_until, write_config
from tests.test_resume_exact import FIELDS as RESUME_FIELDS
from tests.test_resume_exact import STEP_SQL, TRAINED_SQL

ROOT = Path(__file__).resolve().parents[1]
# The single-process resume test's config with 24 examples a cycle: 6 steps of 4.
FIELDS = {**RESUME_FIELDS, "mix__examples_per_cycle": 24}
STEPS_PER_CYCLE = 6


def torchrun_dreamd(config: Path, log: Path, cycles: int, nproc: int = 2) -> subprocess.Popen:
    """`torchrun --nproc-per-node nproc -m dreamd run --now --cycles N` in its own session."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "dreamd", "run", "--config", str(config), "--now", "--cycles", str(cycles)]
    return subprocess.Popen(cmd, env=child_env(PYTHONPATH=str(ROOT)), cwd=ROOT, stdout=log.open("ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def kill_world(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun's workers (each in its own session) and torchrun."""
    for rank in range(2):
        pid = rank_pid(proc.pid, rank)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
    proc.kill()
    proc.wait(30)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 600) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        kill_world(proc)
        raise AssertionError(f"torchrun did not finish in {timeout} s: {log.read_text()[-3000:]}") from None


def steps_after(url: str, step: int) -> bool:
    """Whether the store holds a train_steps row after `step` (False before its migrations)."""
    from sqlalchemy.exc import OperationalError

    try:
        return bool(store_rows(url, "SELECT 1 FROM train_steps WHERE step > :s", s=step))
    except OperationalError:
        return False


def ran(config: Path, log: Path, cycles: int) -> None:
    proc = torchrun_dreamd(config, log, cycles)
    assert finish(proc, log) == 0, log.read_text()[-4000:]


def weights(state: Path) -> dict[str, torch.Tensor]:
    path = latest_complete(state / "checkpoints" / "run-1")
    assert path is not None and (path / SHARDED_DIR / ".metadata").is_file()
    verify_checkpoint(path)          # the marker covers every rank's shard files
    return load_model_state_dict(path)


def rank_pid(torchrun_pid: int, rank: int) -> int | None:
    """The pid of the worker that torchrun started (its child) with RANK=rank."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != torchrun_pid:
                continue
            env = set((entry / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and f"LOCAL_RANK={rank}".encode() in env:
            return int(entry.name)
    return None


@pytest.mark.slow
def test_two_ranks_run_resume_exactly_survive_a_kill_and_reshard_to_one(setup_dir, tmp_path) -> None:
    # ---- X: two cycles straight on 2 ranks --------------------------------------------------
    x, y, z = (tmp_path / n for n in "xyz")
    config_x = write_config(setup_dir, tmp_path / "x.toml", x, **FIELDS)
    ran(config_x, tmp_path / "x.log", 2)
    steps_x = store_rows(sqlite_url(x), STEP_SQL)
    assert [r["step"] for r in steps_x] == list(range(2 * STEPS_PER_CYCLE))
    trained = store_rows(sqlite_url(x), TRAINED_SQL)
    accepted = store_rows(sqlite_url(x), "SELECT content_hash FROM scenarios WHERE status = 'accepted'")
    # every accepted scenario trained exactly once across the world, one row per step (rank 0)
    assert sorted(r["content_hash"] for r in trained) == sorted(r["content_hash"] for r in accepted)

    # ---- Y: one cycle, a new world, the second cycle: equal to X bit for bit ----------------
    config_y = write_config(setup_dir, tmp_path / "y.toml", y, **FIELDS)
    ran(config_y, tmp_path / "y.log", 1)
    ran(config_y, tmp_path / "y.log", 1)
    assert store_rows(sqlite_url(y), STEP_SQL) == steps_x
    assert store_rows(sqlite_url(y), TRAINED_SQL) == trained
    wx, wy = weights(x), weights(y)
    assert wx.keys() == wy.keys() and all(torch.equal(wx[k], wy[k]) for k in wx)

    # ---- Z: SIGKILL rank 1 while cycle 2 trains; torchrun ends the world; a restart ---------
    config_z = write_config(setup_dir, tmp_path / "z.toml", z, **FIELDS)
    log_z = tmp_path / "z.log"
    proc = torchrun_dreamd(config_z, log_z, 2)
    url_z = sqlite_url(z)
    try:
        wait_until(lambda: (z / "dreamd.sqlite").exists() and steps_after(url_z, STEPS_PER_CYCLE), 600,
                   "cycle 2 training", every=0.2)
        victim = rank_pid(proc.pid, 1)
        assert victim is not None, log_z.read_text()[-2000:]
        os.kill(victim, signal.SIGKILL)
        assert finish(proc, log_z) != 0                    # the world ends with its rank
    finally:
        if proc.poll() is None:
            kill_world(proc)
    time.sleep(0.5)
    ran(config_z, log_z, 1)                                # resumes from cycle 1's checkpoint
    restart = store_rows(url_z, "SELECT detail FROM events WHERE kind = 'restart'")
    # the restart event names the last step the checkpoint holds (0-based: 6 steps -> step 5)
    assert restart and '"step": 5' in str(restart[-1]["detail"]).replace("'", '"')
    steps_z = store_rows(url_z, STEP_SQL)
    assert [r["step"] for r in steps_z] == list(range(2 * STEPS_PER_CYCLE))
    assert steps_z[:STEPS_PER_CYCLE] == steps_x[:STEPS_PER_CYCLE]
    assert store_rows(url_z, "SELECT 1 FROM train_steps WHERE status = 'superseded'")
    weights(z)

    # ---- W: a stop (SIGTERM to every rank, as systemd's control-group kill sends it) while
    # cycle 2 trains: rank 0 checkpoints at the step boundary with ranks 1.. (they ignore
    # SIGTERM), the cycle is 'stopped'; a new world trains its remaining batches: equal to X
    # bit for bit --------------------------------------------------------------------------
    w = tmp_path / "w"
    config_w = write_config(setup_dir, tmp_path / "w.toml", w, **FIELDS)
    log_w = tmp_path / "w.log"
    proc = torchrun_dreamd(config_w, log_w, 2)
    try:
        wait_until(lambda: (w / "dreamd.sqlite").exists() and steps_after(sqlite_url(w), STEPS_PER_CYCLE), 600,
                   "cycle 2 training", every=0.2)
        ranks = [rank_pid(proc.pid, r) for r in range(2)]
        assert None not in ranks, log_w.read_text()[-2000:]
        for pid in ranks:
            os.kill(pid, signal.SIGTERM)
        assert finish(proc, log_w) == 0, log_w.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            kill_world(proc)
    assert store_rows(sqlite_url(w), "SELECT status FROM cycles WHERE number = 2") == [{"status": "stopped"}]
    ran(config_w, log_w, 1)
    assert store_rows(sqlite_url(w), STEP_SQL) == steps_x
    assert store_rows(sqlite_url(w), TRAINED_SQL) == trained
    ww = weights(w)
    assert all(torch.equal(wx[k], ww[k]) for k in wx)

    # ---- one process resumes Y's sharded checkpoint: its HF export, a fresh optimizer ------
    from tests.daemon_process import cli

    done = cli(config_y, "run", "--now", "--cycles", "1", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["step"] for r in store_rows(sqlite_url(y), STEP_SQL)] == list(range(3 * STEPS_PER_CYCLE))
