"""Refactor guard: a fixed-seed run of N cycles, fingerprinted, so two versions can be compared.

    .venv/bin/python benchmarks/bit_identical.py run OUT.json [--cycles 3] [--source template|mixed]
    .venv/bin/python benchmarks/bit_identical.py compare BEFORE.json AFTER.json

`run` makes a `dreamd init` setup (tiny llama, seed 0) in a temp dir and runs
`dreamd run --cycles N --now` in a fresh process with the transformers engine (deterministic on
CPU), one torch thread, and dream.source = --source: 'template' (default) or 'mixed' (the model
dreamer's path and the template fallback both run; use it when the dreamer's prompts are not
changing between the two versions compared), and controller.wait_steps = --wait-steps when given
(0: the controller speeds up, slows down or rolls back from the first cycle), and
eval.full_every = --full-every (default 1: every metric every cycle, as before the field existed). It then fingerprints the store and the newest checkpoint:

- every active optimizer step: step, loss, grad norm, lr, tokens, and the ids and content hashes
  of the scenarios it trained (exact float reprs: bit-identical or different);
- every scenario row: id, kind, source, status, rejection reason, content hash;
- every metric (evals) except wall-clock ones, by cycle number;
- every controller decision (action, reason, the settings before and after);
- the final weights: sha256 over each tensor of the newest checkpoint, by name.

`compare` prints what differs (the first few of each kind) and exits 1 when anything does
(torchtitan's rule for refactors: same losses, same data, same metrics, same weights).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("seconds", "_s", "per_s", "wall", "ms")


def run(out: Path, cycles: int, source: str, wait_steps: int | None = None, full_every: int = 1) -> None:
    from dreamd.config_file import load_config, to_toml
    from dreamd.init import init_dir

    root = Path(tempfile.mkdtemp(prefix="dreamd-bitident-"))
    cfg_path = init_dir(root / "setup", arch="llama", seed=0)
    cfg = load_config(cfg_path, environ={})
    cfg.engine.kind = "transformers"
    cfg.dream.source = source
    cfg.mix.examples_per_cycle = 16
    if wait_steps is not None:
        cfg.controller.wait_steps = wait_steps
    cfg.eval.full_every = full_every
    cfg_path.write_text(to_toml(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DREAMD_")}
    env.update(OMP_NUM_THREADS="1", DREAMD_LOG_FORMAT="json", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "dreamd", "run", "--config", str(cfg_path), "--cycles",
                           str(cycles), "--now"], env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        sys.exit(f"dreamd run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    out.write_text(json.dumps(fingerprint(cfg.run.state_dir), indent=1, sort_keys=True))
    print(f"wrote {out} ({cycles} cycles, setup in {root})")


def fingerprint(state_dir: Path) -> dict:
    db = sqlite3.connect(state_dir / "dreamd.sqlite")
    q = db.execute
    steps = []
    for sid, step, loss, gnorm, lr, tokens in q(
            "select id, step, loss, grad_norm, lr, tokens from train_steps where status = 'active' order by step"):
        trained = sorted(list(r) for r in q("select s.id, s.content_hash from step_examples e join scenarios s "
                                            "on s.id = e.scenario_id where e.step_id = ?", (sid,)))
        steps.append([step, repr(loss), repr(gnorm), repr(lr), tokens, trained])
    scenarios = [list(r) for r in q("select id, kind, source, status, reject_reason, content_hash from scenarios "
                                    "order by id")]
    metrics = [[n, m, repr(v)] for n, m, v in q(
        "select c.number, e.metric, e.value from evals e left join cycles c on c.id = e.cycle_id "
        "order by e.id") if not any(t in m for t in TIMING)]
    decisions = [list(r) for r in q("select c.number, d.action, d.reason, d.before_json, d.after_json "
                                    "from decisions d left join cycles c on c.id = d.cycle_id order by d.id")]
    return {"steps": steps, "scenarios": scenarios, "metrics": metrics, "decisions": decisions,
            "weights": weights_digest(state_dir)}


def weights_digest(state_dir: Path) -> dict[str, str]:
    import torch
    from safetensors.torch import load_file

    done = sorted(p.parent for p in (state_dir / "checkpoints").glob("run-*/*/COMPLETE.json"))
    if not done:
        return {}
    tensors = load_file(str(done[-1] / "model.safetensors"))
    return {name: hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            for name, t in sorted(tensors.items())}


def compare(a: Path, b: Path) -> int:
    before, after = json.loads(a.read_text()), json.loads(b.read_text())
    bad = 0
    for key in ("steps", "scenarios", "metrics", "decisions"):
        x, y = before[key], after[key]
        diffs = [(i, u, v) for i, (u, v) in enumerate(zip(x, y)) if u != v]
        if len(x) != len(y) or diffs:
            bad += 1
            print(f"{key}: {len(x)} vs {len(y)} rows, {len(diffs)} differ; first: {diffs[:3]}")
        else:
            print(f"{key}: {len(x)} rows identical")
    wx, wy = before["weights"], after["weights"]
    differ = sorted(n for n in set(wx) | set(wy) if wx.get(n) != wy.get(n))
    if differ or not wx:
        bad += 1
        print(f"weights: {len(differ)} of {len(wx)} tensors differ (e.g. {differ[:3]})")
    else:
        print(f"weights: {len(wx)} tensors identical")
    print("BIT-IDENTICAL" if bad == 0 else "DIFFERENT")
    return 1 if bad else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("out", type=Path)
    r.add_argument("--cycles", type=int, default=3)
    r.add_argument("--source", choices=["template", "mixed"], default="template")
    r.add_argument("--wait-steps", type=int, default=None,
                   help="controller.wait_steps (default: the config's); 0 makes every cycle's decision count")
    r.add_argument("--full-every", type=int, default=1,
                   help="eval.full_every (default 1: the full evaluation suite after every cycle)")
    c = sub.add_parser("compare")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.cmd == "run":
        run(args.out, args.cycles, args.source, args.wait_steps, args.full_every)
    else:
        sys.exit(compare(args.before, args.after))
