"""Atomic checkpoints with a real tiny model: round trip through from_pretrained, weights_only
state, RNG, hashes, retention, and real write failures (RLIMIT_FSIZE) and a real SIGKILL in a
child process."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dreamd.config_file import load_config
from dreamd.train.checkpoint import (MARKER, CheckpointDir, capture_rng_state,
                                       complete_checkpoints, latest_complete, load_checkpoint,
                                       load_model_state_dict, read_manifest, restore_rng_state,
                                       verify_checkpoint)
from dreamd.tiny import bundled_corpus, write_tiny_model_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    # A 512-token vocabulary trained on 20 kB of the corpus: ~0.5 MB of weights, fast to save.
    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", "llama", layers=2,
                                texts=[bundled_corpus()[:20_000]], vocab_size=512)


@pytest.fixture(scope="module")
def model_and_tokenizer(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)


def _trainer_state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"step": step, "lr": 1e-5 * step, "name": "apollo",
            "optimizer": {"state": {0: {"exp_avg": torch.randn(8, 4, generator=g), "seed": 1234 + step}},
                          "param_groups": [{"rank": 4, "proj": "random", "params": [0]}]},
            "history": [1.5, 2.5, None]}


def _save(ckdir: CheckpointDir, mt, step: int, **kw):
    model, tok = mt
    return ckdir.save(model=model, tokenizer=tok, trainer_state=_trainer_state(step),
                      loop_state={"run_id": 7, "cycle": step // 10, "step": step}, **kw)


def test_round_trip_is_a_loadable_model_dir_with_exact_state(tmp_path, model_and_tokenizer):
    model, tok = model_and_tokenizer
    cfg = load_config(None, environ={})
    cfg.mix.general_share = 0.4
    saved = _save(CheckpointDir(tmp_path), model_and_tokenizer, 20, config=cfg,
                  metrics={"forget.perplexity": 12.5})
    assert saved.path == tmp_path / "ckpt-000001-c2-s20" and latest_complete(tmp_path) == saved.path

    # A user can take the directory away and load it with transformers alone.
    again = AutoModelForCausalLM.from_pretrained(saved.path)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert AutoTokenizer.from_pretrained(saved.path)("def f(x): return x")["input_ids"] == \
        tok("def f(x): return x")["input_ids"]
    assert torch.equal(load_model_state_dict(saved.path)["model.embed_tokens.weight"],
                       model.model.embed_tokens.weight)

    loaded = load_checkpoint(saved.path, verify=True)
    expect = _trainer_state(20)
    assert loaded.trainer_state["optimizer"]["state"][0]["seed"] == 1234 + 20
    assert torch.equal(loaded.trainer_state["optimizer"]["state"][0]["exp_avg"],
                       expect["optimizer"]["state"][0]["exp_avg"])
    assert loaded.trainer_state["history"] == [1.5, 2.5, None]
    assert loaded.loop_state == {"run_id": 7, "cycle": 2, "step": 20}
    assert load_config(saved.path / "dreamd.toml", environ={}).model_dump() == cfg.model_dump()
    assert loaded.manifest["metrics"] == {"forget.perplexity": 12.5}


def test_sha256_and_bytes_cover_every_file(tmp_path, model_and_tokenizer):
    saved = _save(CheckpointDir(tmp_path), model_and_tokenizer, 1)
    files = sorted(p for p in saved.path.rglob("*") if p.is_file() and p.name != MARKER)
    assert {str(p.relative_to(saved.path)) for p in files} >= {
        "model.safetensors", "config.json", "tokenizer.json", "trainer_state.pt", "rng.pt",
        "loop_state.json"}
    assert saved.bytes == sum(p.stat().st_size for p in files)
    h = hashlib.sha256()
    for p in files:  # the documented formula, recomputed independently
        data = p.read_bytes()
        h.update(f"{p.relative_to(saved.path)}\0{len(data)}\0{hashlib.sha256(data).hexdigest()}\n".encode())
    assert saved.sha256 == h.hexdigest() == read_manifest(saved.path)["sha256"]

    weights = saved.path / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="model.safetensors does not match its sha256"):
        verify_checkpoint(saved.path)


def test_rng_states_restore_exactly(tmp_path, model_and_tokenizer):
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    saved = _save(CheckpointDir(tmp_path), model_and_tokenizer, 1)
    first = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), torch.rand(3).tolist())
    load_checkpoint(saved.path).restore_rng()
    second = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), torch.rand(3).tolist())
    assert first == second
    state = capture_rng_state()
    a = torch.randn(4)
    restore_rng_state(state)
    assert torch.equal(a, torch.randn(4))


def test_unsafe_trainer_state_fails_at_save_not_at_resume(tmp_path, model_and_tokenizer):
    ckdir = CheckpointDir(tmp_path)
    good = _save(ckdir, model_and_tokenizer, 1)
    model, tok = model_and_tokenizer
    with pytest.raises(ValueError, match="weights_only=True"):
        ckdir.save(model=model, tokenizer=tok, trainer_state={"projector": Fraction(1, 3)},
                   loop_state={"step": 2})
    assert sorted(os.listdir(tmp_path)) == [good.name]  # no temp dir, no half checkpoint


def test_directories_without_marker_are_never_loaded(tmp_path, model_and_tokenizer):
    ckdir = CheckpointDir(tmp_path)
    good = _save(ckdir, model_and_tokenizer, 1)
    unmarked = tmp_path / "ckpt-000099-c9-s99"
    shutil.copytree(good.path, unmarked)
    (unmarked / MARKER).unlink()
    assert latest_complete(tmp_path) == good.path
    assert complete_checkpoints(tmp_path) == [good.path]
    with pytest.raises(ValueError, match="never loaded"):
        load_checkpoint(unmarked)
    # Its number is still taken: the next save does not reuse the name.
    assert _save(ckdir, model_and_tokenizer, 2).name == "ckpt-000100-c0-s2"


def test_stale_temp_dirs_are_removed_at_start(tmp_path, model_and_tokenizer):
    ckdir = CheckpointDir(tmp_path)
    good = _save(ckdir, model_and_tokenizer, 1)
    for name in (".tmp-ckpt-000002-c0-s2-4242", ".tmp-deleting-ckpt-000000"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"partial")
    removed = ckdir.remove_stale_temps()
    assert sorted(p.name for p in removed) == [".tmp-ckpt-000002-c0-s2-4242", ".tmp-deleting-ckpt-000000"]
    assert sorted(os.listdir(tmp_path)) == [good.name]


@pytest.mark.parametrize(("mode", "best_step"), [("min", 2), ("max", 4)])
def test_retention_keeps_last_k_and_the_best(tmp_path, model_and_tokenizer, mode, best_step):
    ckdir = CheckpointDir(tmp_path, keep_last=2, best_metric="forget.perplexity", best_mode=mode)
    ppl = {1: 9.0, 2: 3.0, 3: 8.0, 4: 11.0, 5: 7.0, 6: 7.5}
    saved = {}
    for step, value in ppl.items():
        saved[step] = _save(ckdir, model_and_tokenizer, step, metrics={"forget.perplexity": value})
        ckdir.prune()
    kept = {read_manifest(p)["loop_state"]["step"] for p in complete_checkpoints(tmp_path)}
    assert kept == {5, 6, best_step}
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    # Metric values the caller has (e.g. from the evals table) override the markers'.
    removed = ckdir.prune(extra_metrics={saved[6].name: 0.5 if mode == "min" else 99.0})
    assert [p.name for p in removed] == [saved[best_step].name]


CHILD = r'''
import json, os, resource, signal, sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from dreamd.train.checkpoint import CheckpointDir

model_dir, root = Path(sys.argv[1]), Path(sys.argv[2])
model, tok = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
ckdir = CheckpointDir(root, keep_last=5)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over-limit writes fail with EFBIG instead
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

def attempt(step, limit, state_mb):
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        saved = ckdir.save(model=model, tokenizer=tok,
                           trainer_state={"m": torch.zeros(state_mb * 262144)},
                           loop_state={"cycle": 0, "step": step})
        out = {"step": step, "ok": saved.name, "sha256": saved.sha256}
    except BaseException as exc:
        out = {"step": step, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    print(json.dumps(out), flush=True)

weights = (model_dir / "model.safetensors").stat().st_size
attempt(1, hard, 1)                       # fine
attempt(2, 64 << 10, 1)                   # fails inside model.save_pretrained (safetensors)
attempt(3, weights + (256 << 10), 4)      # weights fit, the 4 MB trainer state does not
attempt(4, hard, 1)                       # room again: fine
print(json.dumps({"big": "starting"}), flush=True)
attempt(5, hard, 300)                     # killed by the parent while writing
'''


def test_write_failures_and_a_crash_leave_the_previous_checkpoint_intact(tmp_path, model_dir):
    root = tmp_path / "ckpts"
    script = tmp_path / "checkpoint_child.py"
    script.write_text(CHILD)
    child = subprocess.Popen([sys.executable, str(script), str(model_dir), str(root)],
                             stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        results = []
        for line in child.stdout:
            rec = json.loads(line)
            if "big" in rec:
                break
            results.append(rec)
        # Kill the child as soon as the 300 MB checkpoint's temp dir exists (mid-write).
        deadline = time.monotonic() + 60
        while not [p for p in root.iterdir() if p.name.startswith(".tmp-")]:
            assert time.monotonic() < deadline and child.poll() is None, "big save never started"
            time.sleep(0.002)
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()

    assert "ok" in results[0] and "ok" in results[3], results
    # The kernel's EFBIG surfaces from safetensors as-is; torch.save's C++ writer reports the
    # short write as RuntimeError "unexpected pos" (so save() cleans up on any exception).
    assert "File too large" in results[1]["error"], results[1]
    assert "unexpected pos" in results[2]["error"] or "File too large" in results[2]["error"], results[2]
    names = sorted(os.listdir(root))
    complete = [n for n in names if n.startswith("ckpt-")]
    assert complete == [results[0]["ok"], results[3]["ok"]]
    stale = [n for n in names if n.startswith(".tmp-")]
    assert len(stale) == 1 and not (root / stale[0] / MARKER).exists()  # the crash's leftover

    ckdir = CheckpointDir(root)
    assert latest_complete(root) == root / results[3]["ok"]
    for name, rec in ((results[0]["ok"], results[0]), (results[3]["ok"], results[3])):
        verify_checkpoint(root / name)
        assert read_manifest(root / name)["sha256"] == rec["sha256"]
    assert [p.name for p in ckdir.remove_stale_temps()] == stale
    assert sorted(os.listdir(root)) == complete


def test_keep_last_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointDir(tmp_path, keep_last=0)


def _flip_one_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "flipped bit in model.safetensors": lambda d: _flip_one_bit(d / "model.safetensors"),
    "truncated model.safetensors": lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:1000]),
    "truncated trainer_state.pt": lambda d: (d / "trainer_state.pt").write_bytes(b"PK\x03"),
    "garbage loop_state.json": lambda d: (d / "loop_state.json").write_text("{not json"),
    "missing rng.pt": lambda d: (d / "rng.pt").unlink(),
    "garbage COMPLETE.json": lambda d: (d / MARKER).write_text("\x00\x01garbage"),
    "marker without files": lambda d: (d / MARKER).write_text('{"seq": 3}'),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_resume_skips_a_corrupt_newest_checkpoint(tmp_path, model_and_tokenizer, corruption):
    """Every way the newest checkpoint can rot is found by its hashes before anything loads
    (one flipped bit used to resume silently from corrupt weights); the next older intact one is
    used, and the corrupt one is set aside, never listed again, its name never reused."""
    ckdir = CheckpointDir(tmp_path / "ck", keep_last=5)
    older = _save(ckdir, model_and_tokenizer, 10)
    newest = _save(ckdir, model_and_tokenizer, 20)
    CORRUPTIONS[corruption](newest.path)
    found, skipped = ckdir.latest_intact()
    assert found == older.path
    assert [name for name, _ in skipped] == [newest.name] and skipped[0][1]
    assert not newest.path.exists() and (ckdir.root / f".corrupt-{newest.name}").is_dir()
    assert complete_checkpoints(ckdir.root) == [older.path]
    load_checkpoint(found, verify=True)  # the fallback loads
    assert _save(ckdir, model_and_tokenizer, 30).seq == newest.seq + 1


def test_every_checkpoint_corrupt_means_none(tmp_path, model_and_tokenizer):
    ckdir = CheckpointDir(tmp_path / "ck", keep_last=5)
    only = _save(ckdir, model_and_tokenizer, 10)
    _flip_one_bit(only.path / "model.safetensors")
    assert ckdir.latest_intact() == (None, [(only.name, "model.safetensors does not match its sha256 (corrupted)")])
    other = CheckpointDir(tmp_path / "ck2", keep_last=5)
    kept = _save(other, model_and_tokenizer, 10)
    _flip_one_bit(kept.path / "model.safetensors")
    assert other.latest_intact(verify=False) == (kept.path, [])  # checkpoint.verify_on_resume = false
