"""GPU tests of the vLLM engine (marked gpu; skipped without CUDA and an importable vllm).

Run on a GPU host (see docs/benchmarks.md, "GPU host"):

    python -m pytest tests/gpu -m gpu -x -q -s

Each engine check runs in its own interpreter (tests/vllm_checks.py, shared with the CPU tier
tests/test_vllm_real.py): only one sleep-mode vllm.LLM may live in a process. Numbers land in $DREAMD_GPU_OUT (default /tmp/dreamd-gpu-out)
as <arch>.json, for docs/benchmarks.md.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(os.environ.get("DREAMD_GPU_OUT", "/tmp/dreamd-gpu-out"))
HAVE = torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAVE, reason="needs CUDA and an importable vllm")]


def _env() -> dict[str, str]:
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _run(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    print(proc.stdout[-6000:])
    if proc.returncode != 0:
        print(proc.stderr[-12000:], file=sys.stderr)
    return proc


def test_recorded_signatures_match_the_installed_vllm() -> None:
    from dreamd.engines import vllm_compat
    from tests.gpu.vllm_signatures import differences, from_installed

    installed = from_installed()
    record = ROOT / "tests" / "data" / f"vllm_signatures_{installed['version']}.json"
    if record.exists():
        assert differences(json.loads(record.read_text()), installed) == []
    else:  # a newer vLLM: the calls the adapter makes must still be valid
        base = json.loads((ROOT / "tests" / "data" / "vllm_signatures_0.26.0.json").read_text())
        init = {p[0] for p in installed["methods"]["LLM.__init__"]} | {f[0] for f in installed["fields"]["EngineArgs"]}
        kwargs = vllm_compat.llm_kwargs(model_path="m", dtype="bfloat16", seed=0, gpu_memory_utilization=0.3,
                                        enforce_eager=True, max_model_len=64, kv_cache_memory_bytes=1)
        assert set(kwargs) <= init
        used = ("LLM.generate", "LLM.sleep", "LLM.wake_up", "LLM.reset_prefix_cache", "LLM.collective_rpc")
        for key in used:
            assert [p[0] for p in installed["methods"][key]][:2] == [p[0] for p in base["methods"][key]][:2], key
    assert vllm_compat.parse_version(installed["version"]) >= vllm_compat.MIN_VERSION


@pytest.mark.parametrize("arch", ["llama", "llama_tied", "qwen3.5"])
def test_engine_generate_sleep_wake_push_canary(arch: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    out = OUT / f"{arch.replace('.', '')}.json"
    proc = _run([sys.executable, "-m", "tests.vllm_checks", arch, str(out), "--device", "cuda"], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    numbers = json.loads(out.read_text())
    for key in ("canary_first_push", "canary_after_sleep_push", "canary_after_awake_push",
                "canary_after_refused_partial"):
        assert numbers[key]["ok"], (key, numbers[key])
    assert numbers["free_engine_asleep"] > numbers["free_engine_awake"]
    names = [p["name"] for p in numbers["phases"]]
    assert names[:6] == ["generate", "sleep", "train", "wake", "push", "wake"]


def test_full_dream_cycle_with_vllm(tmp_path: Path) -> None:
    """`dreamd init` a tiny model (hidden 256), then one cycle through the daemon with vLLM."""
    if importlib.util.find_spec("dreamd.cycle") is None:
        pytest.skip("dreamd.cycle is not there yet")
    setup = tmp_path / "setup"
    init = _run([sys.executable, "-m", "dreamd", "init", str(setup), "--hidden", "256"], timeout=600)
    assert init.returncode == 0, init.stderr[-3000:]
    os.environ["DREAMD_ENGINE__KIND"] = "vllm"
    try:
        once = _run([sys.executable, "-m", "dreamd", "once", "--config", str(setup / "dreamd.toml"), "--now"],
                    timeout=900)
    finally:
        del os.environ["DREAMD_ENGINE__KIND"]
    assert once.returncode == 0, once.stderr[-3000:]
    (OUT / "cycle.log").parent.mkdir(parents=True, exist_ok=True)
    (OUT / "cycle.log").write_text(once.stdout + once.stderr)
