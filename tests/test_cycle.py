"""One cycle end to end on a real tiny model, a real store (SQLite file / PostgreSQL), real
APOLLO: the rows it writes are consistent, nothing repeats across cycles and restarts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text

from dreamd.config_file import load_config
from dreamd.cycle import run_cycle
from dreamd.run import open_run

FAST = {  # small cycles: 8 examples in 2 batches of 4, cheap evaluation
    "DREAMD_MIX__EXAMPLES_PER_CYCLE": "8",
    "DREAMD_EVAL__ARITHMETIC_N": "4",
    "DREAMD_EVAL__PERPLEXITY_MAX_TOKENS": "256",
}



def config_for(setup_dir: Path, state: Path, store_url: str | None = None):
    env = dict(FAST, DREAMD_RUN__STATE_DIR=str(state))
    if store_url:
        env["DREAMD_STORE__URL"] = store_url
    return load_config(setup_dir / "dreamd.toml", environ=env), env


def rows(store, sql: str, **params):
    with store.read() as s:
        return [dict(r) for r in s.execute(text(sql), params).mappings()]


def test_one_cycle_writes_consistent_rows(setup_dir, tmp_path, store_url):
    cfg, _ = config_for(setup_dir, tmp_path / "state", store_url)
    parts, state = open_run(cfg)
    result = run_cycle(parts, state)
    store, run = parts.store, parts.run_id
    assert result.status == "committed" and result.steps == 2

    steps = rows(store, "SELECT id, step, n_general, n_behavioral, loss FROM train_steps "
                        "WHERE run_id = :r ORDER BY step", r=run)
    assert [s["step"] for s in steps] == list(range(len(steps)))        # contiguous from 0
    for s in steps:
        assert s["n_general"] / (s["n_general"] + s["n_behavioral"]) >= 0.25  # every batch
    links = rows(store, "SELECT se.step_id, sc.status, sc.cycle_id FROM step_examples se "
                        "JOIN scenarios sc ON sc.id = se.scenario_id")
    assert links and all(l["status"] == "accepted" and l["cycle_id"] == result.cycle_id for l in links)
    trained = rows(store, "SELECT scenario_id, COUNT(*) AS n FROM step_examples GROUP BY scenario_id")
    accepted = rows(store, "SELECT id FROM scenarios WHERE status = 'accepted'")
    assert {t["scenario_id"] for t in trained} == {a["id"] for a in accepted}  # each once, all of them
    assert all(t["n"] == 1 for t in trained)

    summary = store.cycle_summary(run)
    assert len(summary) == 1 and summary[0]["status"] == "committed" and summary[0]["steps"] == 2
    assert summary[0]["perplexity"] is not None and summary[0]["perplexity"] > 1
    ck = rows(store, "SELECT step, status, sha256 FROM checkpoints")
    assert ck == [{"step": 2, "status": "complete", "sha256": ck[0]["sha256"]}]
    assert (parts.checkpoints.latest() / "model.safetensors").exists()


def test_duplicate_is_stored_rejected_and_replaced(setup_dir, tmp_path):
    cfg, _ = config_for(setup_dir, tmp_path / "state")
    parts, state = open_run(cfg)
    first = run_cycle(parts, state)
    # A dreamer that repeats an already-trained scenario before dreaming new ones.
    old = parts.store.load_scenarios([rows(parts.store, "SELECT MIN(id) AS i FROM scenarios")[0]["i"]])
    repeat = next(iter(old.values()))
    real = parts.dreamer

    class Repeating:
        sent = False

        def dream(self, kind, rng, model_config=None):
            if kind == repeat.kind and not self.sent:
                self.sent = True
                return repeat
            return real.dream(kind, rng, model_config=model_config)

        def observe(self, scenario, accepted):
            real.observe(scenario, accepted)

    parts.dreamer = Repeating()
    second = run_cycle(parts, state)
    assert second.status == "committed" and sum(second.accepted.values()) == sum(first.accepted.values())
    dup = rows(parts.store, "SELECT status, reject_reason, content_hash, duplicate_of FROM scenarios "
                            "WHERE cycle_id = :c AND status = 'rejected'", c=second.cycle_id)
    assert len(dup) == 1 and dup[0]["reject_reason"].startswith("duplicate")
    assert dup[0]["content_hash"] is None and dup[0]["duplicate_of"] is not None


@pytest.mark.slow
def test_never_repeated_across_three_cycles_and_a_restart(setup_dir, tmp_path):
    """Two cycles in one process, then a new process resumes from the checkpoint for a third."""
    state = tmp_path / "state"
    _, env = config_for(setup_dir, state)
    env = {**os.environ, **env, "DREAMD_LOG_FORMAT": "json"}
    cmd = [sys.executable, "-m", "dreamd", "run", "--config", str(setup_dir / "dreamd.toml"), "--now"]
    subprocess.run([*cmd, "--cycles", "2"], env=env, check=True, capture_output=True)
    proc = subprocess.run([*cmd, "--cycles", "1"], env=env, check=True, capture_output=True, text=True)
    assert '"event": "run.resumed"' in proc.stderr

    cfg, _ = config_for(setup_dir, state)
    from dreamd.store import Store
    store = Store.open(cfg.store_url)
    summary = [r for r in store.cycle_summary(1) if r["status"] == "committed"]
    assert [r["number"] for r in summary] == [1, 2, 3]
    hashes = rows(store, "SELECT content_hash FROM scenarios WHERE status = 'accepted'")
    assert len(hashes) == 24 and len({h["content_hash"] for h in hashes}) == 24
    steps = rows(store, "SELECT step FROM train_steps WHERE status = 'active' ORDER BY step")
    assert [s["step"] for s in steps] == list(range(6))          # resumed at checkpoint step + 1
    twice = rows(store, "SELECT scenario_id FROM step_examples GROUP BY scenario_id HAVING COUNT(*) > 1")
    assert twice == []
    texts = [json.dumps(r["messages_json"]) for r in rows(store, "SELECT messages_json FROM scenarios")]
    assert all("How to judge a user's direction" not in t for t in texts)  # spec never stored in messages


@pytest.mark.slow
def test_a_corrupt_newest_checkpoint_resumes_from_the_one_before(setup_dir, tmp_path):
    """One flipped bit in the newest checkpoint's weights: the next start finds it by its hash,
    sets it aside with a checkpoint.skipped event, resumes from the checkpoint before, and the
    cycle after it is dreamed and trained again: no committed step lost that the weights hold,
    no scenario trained twice."""
    state = tmp_path / "state"
    _, env = config_for(setup_dir, state)
    env = {**os.environ, **env, "DREAMD_LOG_FORMAT": "json"}
    cmd = [sys.executable, "-m", "dreamd", "run", "--config", str(setup_dir / "dreamd.toml"), "--now"]
    subprocess.run([*cmd, "--cycles", "2"], env=env, check=True, capture_output=True)
    ckpts = sorted((state / "checkpoints" / "run-1").glob("ckpt-*"))
    weights = ckpts[-1] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    proc = subprocess.run([*cmd, "--cycles", "1"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '"event": "run.checkpoint_skipped"' in proc.stderr

    cfg, _ = config_for(setup_dir, state)
    from dreamd.store import Store
    store = Store.open(cfg.store_url)
    events = rows(store, "SELECT detail FROM events WHERE kind = 'checkpoint.skipped'")
    assert len(events) == 1 and ckpts[-1].name in events[0]["detail"] and "sha256" in events[0]["detail"]
    assert (state / "checkpoints" / "run-1" / f".corrupt-{ckpts[-1].name}").is_dir()
    committed = [r["number"] for r in store.cycle_summary(1) if r["status"] == "committed"]
    assert committed == [1, 2]                                   # cycle 2 again, from checkpoint 1
    steps = rows(store, "SELECT step FROM train_steps WHERE status = 'active' ORDER BY step")
    assert [s["step"] for s in steps] == list(range(4))
    twice = rows(store, "SELECT scenario_id FROM step_examples GROUP BY scenario_id HAVING COUNT(*) > 1")
    assert twice == []
    store.close()
