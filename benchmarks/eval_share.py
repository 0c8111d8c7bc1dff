"""Evaluation cost: its share of cycle time, and its one generation call (docs/benchmarks.md
"Evaluation share").

    .venv/bin/python benchmarks/eval_share.py run DIR --cycles 10 [--model NAME] [--full-every K]
    .venv/bin/python benchmarks/eval_share.py table STATE_DIR [STATE_DIR ...]
    .venv/bin/python benchmarks/eval_share.py batching [--rounds 4] [--engine auto|transformers]

`run` makes a `dreamd init` setup in DIR (the tiny demo model, or `--model NAME`, e.g.
smollm2-135m-instruct), pins run.threads = 1 and runs `dreamd run --cycles N --now` with the
dreamd found on PYTHONPATH (so the same command measures another checkout: PYTHONPATH=/other),
eval.full_every = K when given (a checkout without the field ignores it); then prints the table.

`table` prints, per committed cycle: the evaluate phase (phases table), the cycle's wall time
(cycles.started_at .. finished_at, so nested phase rows are not counted twice), the share, and
which suite ran (evals 'probes.seconds' detail; 'full' when the run predates the field). Then
the mean evaluate time of full and cheap cycles and the share they give at full_every = k, for a
cycle whose other phases take their measured mean: (full + (k-1) cheap) / (k other + full +
(k-1) cheap). Several state dirs: one table each, one after the other (same process, same box).

`batching` makes a `dreamd init` setup (tiny demo model) in a temp dir, opens its run (the
engine as the config picks it: vLLM's CPU build where installed, else transformers; --engine
forces one),
pins 1 torch thread, then in interleaved rounds measures the full suite (ProbeSuite.measure)
twice on the same weights: with the engine (every Q1, code and arithmetic reply in ONE
generate_mixed call) and through a wrapper that only has generate() (engines.base.generate_each
then makes one call per Sampling: Q1, code, arithmetic, as the metrics did before). It checks
that both give the same metrics and prints the medians of the 'generate' part and of the whole
evaluation, and their ratio (one call / per family), measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path


def _seconds(a: str, b: str) -> float:
    parse = lambda s: datetime.fromisoformat(s.replace(" ", "T").replace("Z", "+00:00"))  # noqa: E731
    return (parse(b) - parse(a)).total_seconds()


def cycles(state_dir: Path) -> list[dict]:
    db = sqlite3.connect(Path(state_dir) / "dreamd.sqlite")
    out = []
    for cid, number, started, finished in db.execute(
            "select id, number, started_at, finished_at from cycles where status = 'committed' order by number"):
        evaluate = db.execute("select sum(seconds) from phases where cycle_id = ? and name = 'evaluate'",
                              (cid,)).fetchone()[0] or 0.0
        detail = db.execute("select detail_json from evals where cycle_id = ? and metric = 'probes.seconds'",
                            (cid,)).fetchone()
        parts = json.loads(detail[0]) if detail and detail[0] else {}
        out.append({"cycle": number, "evaluate": evaluate, "cycle_s": _seconds(started, finished),
                    "suite": parts.get("suite", "full"), "parts": parts})
    return out


def projected(rows: list[dict], k: int) -> float | None:
    full = [r["evaluate"] for r in rows if r["suite"] == "full"]
    cheap = [r["evaluate"] for r in rows if r["suite"] == "cheap"] or ([0.0] if k == 1 else [])
    if not full or not cheap:
        return None
    other = sum(r["cycle_s"] - r["evaluate"] for r in rows) / len(rows)
    e_full, e_cheap = sum(full) / len(full), sum(cheap) / len(cheap)
    spent = e_full + (k - 1) * e_cheap
    return spent / (k * other + spent)


def table(state_dir: Path) -> None:
    rows = cycles(state_dir)
    print(f"{state_dir}")
    print(f"{'cycle':>5} {'suite':>6} {'evaluate s':>10} {'cycle s':>8} {'share':>6}")
    for r in rows:
        print(f"{r['cycle']:>5} {r['suite']:>6} {r['evaluate']:>10.2f} {r['cycle_s']:>8.2f} "
              f"{r['evaluate'] / r['cycle_s']:>6.1%}")
    ev, total = sum(r["evaluate"] for r in rows), sum(r["cycle_s"] for r in rows)
    if total:
        print(f"  all {len(rows)} cycles: evaluate {ev:.1f} s of {total:.1f} s = {ev / total:.1%}")
    for suite in ("full", "cheap"):
        got = [r["evaluate"] for r in rows if r["suite"] == suite]
        if got:
            print(f"  mean evaluate, {suite} suite: {sum(got) / len(got):.2f} s over {len(got)} cycles")
    shares = {k: projected(rows, k) for k in (1, 2, 5, 10, 20)}
    if any(v is not None for v in shares.values()):
        print("  share at full_every = k (measured means): "
              + ", ".join(f"k={k}: {v:.1%}" for k, v in shares.items() if v is not None))


def run(root: Path, cycles_n: int, model: str | None, full_every: int | None) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DREAMD_")}
    env.update(OMP_NUM_THREADS="1", DREAMD_LOG_FORMAT="json")
    init = [sys.executable, "-m", "dreamd", "init", str(root)] + (["--model", model] if model else [])
    # cwd outside any checkout: `python -m dreamd` imports the dreamd on PYTHONPATH, not the cwd's
    cwd = root.resolve().parent
    subprocess.run(init, env=env, check=True, capture_output=True, cwd=cwd)
    toml = root / "dreamd.toml"
    text = re.sub(r"(?m)^threads = .*$", "threads = 1", toml.read_text())
    if full_every is not None:
        probe = subprocess.run([sys.executable, "-c", "from dreamd.config import EvalConfig; "
                                "print('full_every' in EvalConfig.model_fields)"], env=env, capture_output=True,
                               text=True, cwd=cwd)
        if probe.stdout.strip() == "True":
            env["DREAMD_EVAL__FULL_EVERY"] = str(full_every)
    toml.write_text(text)
    subprocess.run([sys.executable, "-m", "dreamd", "run", "--config", str(toml), "--cycles", str(cycles_n),
                    "--now"], env=env, check=True, capture_output=True, cwd=cwd)
    table(root / "state")


class PerFamily:
    """The engine with generate() only: one call per distinct Sampling (the old path)."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def generate(self, conversations, sampling):
        return self.engine.generate(conversations, sampling)


def batching(rounds: int, engine_kind: str) -> None:
    import torch

    from dreamd.config_file import load_config, to_toml
    from dreamd.init import init_dir
    from dreamd.run import open_run

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="dreamd-evalbatch-"))
    cfg_path = init_dir(root / "setup", arch="llama", seed=0)
    cfg = load_config(cfg_path, environ={})
    cfg.run.threads = 1
    if engine_kind != "auto":
        cfg.engine.kind = engine_kind
    cfg_path.write_text(to_toml(cfg))
    cfg = load_config(cfg_path, environ={})
    run, _ = open_run(cfg)
    print(f"engine {type(run.engine).__name__}, {rounds} rounds, 1 torch thread")
    timing = "probes.seconds"
    ways = {"one call": run.engine, "per family": PerFamily(run.engine)}
    got: dict[str, dict[str, list[float]]] = {w: {"generate": [], "total": []} for w in ways}
    reference = None
    for _ in range(rounds):
        for way, engine in ways.items():
            m = run.probes.measure(run.model, run.tokenizer, engine, cfg.run.seed, eval_cfg=cfg.eval)
            got[way]["generate"].append(m.details[timing]["generate"])
            got[way]["total"].append(m.metrics[timing])
            values = {k: v for k, v in m.metrics.items() if k != timing}
            reference = reference or values
            assert values == reference, f"{way}: metrics differ"
    print("same metrics both ways:", len(reference), "metrics")
    print(f"{'':12} {'generate s':>10} {'evaluation s':>12}")
    med = {w: {k: statistics.median(v) for k, v in parts.items()} for w, parts in got.items()}
    for way in ways:
        print(f"{way:12} {med[way]['generate']:>10.3f} {med[way]['total']:>12.3f}")
    print(f"{'ratio':12} {med['one call']['generate'] / med['per family']['generate']:>10.2f} "
          f"{med['one call']['total'] / med['per family']['total']:>12.2f}   (one call / per family, medians)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("dir", type=Path)
    r.add_argument("--cycles", type=int, default=10)
    r.add_argument("--model", default=None)
    r.add_argument("--full-every", type=int, default=None)
    t = sub.add_parser("table")
    t.add_argument("state_dirs", type=Path, nargs="+")
    b = sub.add_parser("batching")
    b.add_argument("--rounds", type=int, default=4)
    b.add_argument("--engine", choices=["auto", "transformers"], default="auto")
    args = parser.parse_args()
    if args.cmd == "run":
        run(args.dir, args.cycles, args.model, args.full_every)
    elif args.cmd == "batching":
        batching(args.rounds, args.engine)
    else:
        for d in args.state_dirs:
            table(d)
