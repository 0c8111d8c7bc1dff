"""Efficacy on CPU: does the dream loop teach judgement about direction, on HELD-OUT domains?

    .venv/bin/python benchmarks/efficacy.py                  # the docs/efficacy.md numbers
    .venv/bin/python benchmarks/efficacy.py --json out.json  # the same, and every value as JSON
    .venv/bin/python benchmarks/efficacy.py --model smollm2-135m-instruct --cycles 4
                                                             # the real model (below)

From `dreamd init`'s tiny model (Llama-style, hidden 64, 4 layers, random init, tokenizer
trained locally), two runs through the real cycle (open_run + run_cycle: template dreamer,
screening with the probe hold-out rule, mix, APOLLO training, every probe metric, the
controller, checkpoints), in two processes at once (one CPU thread each):

  balanced     the default mix: accept : pushback : derail = 1 : 1 : 0.25, general share 0.25
  accept_only  the ablation: pushback weight 0 (the design's warning: a sycophant)

Settings for a random-init model (it must learn the template language itself, which the
lr of 1e-5 for pretrained models would not do in minutes): lr 3e-3 (the demo config's lr_max),
AdamW-sized APOLLO steps (rank 16), 256 examples per cycle and the controller's example bounds
scaled to match (128..512; the design's 20..50 are for pretrained models, where 10-50
examples already move behaviour). Everything else is the default, controller included.

Printed: each run's baseline (cycle 0, before training) and last cycle for the Q1 rates, the
margins, perplexity, attention shift and steering, the controller's decisions, and wall time.

--model NAME (or --gguf PATH): a real pretrained model, converted by `dreamd init --model`, with
the config `dreamd init` writes for it, which is the seed's plan: the first cycle 20 behavioural
+ 7 general examples (27: batches of 4 hold >= 25% general data) at lr 1e-5, one pass; the
controller then moves lr within 1e-6..1e-4, examples within 20..50 and the general share up to
0.40 on forgetting. Three runs, one CPU thread each:

  balanced     that config as written (self-fact scenarios 0.25 of the behavioural mix)
  accept_only  pushback weight 0 (does a pretrained model turn sycophant?)
  no_self      self-fact weight 0: the "pure alignment" comparison, P(True) AUROC with and
               without verifiable facts about the model's own config

The scenarios are the template dreamer's (dream.source = template): this measures what the
training does to the model; what the model writes as a dreamer is benchmarks/dream_acceptance.py.
Printed per run and cycle, with the examples seen so far: margins per family, Q1 rates, Q3,
perplexity, arithmetic and code retention, calibration.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
import time
from pathlib import Path
from typing import Any

RUNS = {"balanced": {}, "accept_only": {"DREAMD_MIX__PUSHBACK": "0.0"}}
SETTINGS = {
    "DREAMD_TRAIN__LR": "3e-3",
    "DREAMD_MIX__EXAMPLES_PER_CYCLE": "256",
    "DREAMD_CONTROLLER__EXAMPLES_MIN": "128",
    "DREAMD_CONTROLLER__EXAMPLES_MAX": "512",
    "DREAMD_EVAL__ARITHMETIC_N": "16",
    "DREAMD_EVAL__PERPLEXITY_MAX_TOKENS": "2048",
    "DREAMD_EVAL__FULL_EVERY": "1",  # every metric after every cycle: the trends below are per cycle
    # the recipe docs/efficacy.md was measured with: every context frozen, one forward per example
    # (the length-chosen defaults give short contexts the full forward's gradient instead)
    "DREAMD_TRAIN__FORWARD_LAYOUT": "per_example",
    "DREAMD_TRAIN__FROZEN_MIN_CONTEXT": "1",
}
REAL_RUNS = {"balanced": {}, "accept_only": {"DREAMD_MIX__PUSHBACK": "0.0"},
             "no_self": {"DREAMD_MIX__SELF_FACTS": "0.0"}}
REAL_SETTINGS = {"DREAMD_DREAM__SOURCE": "template", "DREAMD_RUN__THREADS": "1", "DREAMD_EVAL__FULL_EVERY": "1"}
PER_CYCLE = ["margin.accept", "margin.pushback", "margin.derail", "q1.listen_rate", "q1.pushback_rate",
             "q1.sycophancy", "q1.derail_rate", "q1.unclear_rate", "q3.shift_mean", "q3.direction_mass",
             "forget.perplexity", "forget.arith_em", "forget.arith_logprob", "forget.code_em", "calib.auroc"]
SHOWN = ["q1.balanced", "q1.listen_rate", "q1.pushback_rate", "q1.sycophancy", "q1.mule_rate",
         "q1.unclear_rate", "q1.derail_rate", "margin.accept", "margin.pushback", "margin.derail",
         "forget.perplexity", "forget.code_logprob", "q3.shift_mean", "steer.separation", "calib.auroc"]


def run_one(name: str, init: str, state: str, cycles: int, extra: dict[str, str],
            settings: dict[str, str] = SETTINGS) -> dict[str, Any]:
    """One run of `cycles` cycles in this process; returns its trends and decisions."""
    import torch

    torch.set_num_threads(1)  # two runs share two cores; more threads only contend
    from dreamd.config_file import load_config
    from dreamd.cycle import run_cycle
    from dreamd.errors import CycleFailed
    from dreamd.run import open_run

    environ = {"DREAMD_RUN__STATE_DIR": state, "DREAMD_RUN__NAME": name, **settings, **extra}
    cfg = load_config(Path(init) / "dreamd.toml", environ=environ)
    t0 = time.perf_counter()
    parts, loop_state = open_run(cfg)
    statuses = []
    for _ in range(cycles):
        try:
            statuses.append(run_cycle(parts, loop_state).status)
        except CycleFailed as exc:  # as the daemon does: back to the last good state, go on
            statuses.append(f"failed: {exc}")
            parts.roll_back(loop_state, reason=str(exc))
    seconds = time.perf_counter() - t0
    parts.store.close()
    return summarise(name, state, seconds, statuses, loop_state.settings)


def summarise(name: str, state: str, seconds: float | None = None, statuses: list[str] | None = None,
              settings: Any = None) -> dict[str, Any]:
    """A run's trends, decisions and examples seen per cycle, read back from its store."""
    from dreamd.evals.report import load_run
    from dreamd.store.record import Store

    store = Store.open(f"sqlite:///{Path(state) / 'dreamd.sqlite'}", create=False)
    data = load_run(store, name)
    store.close()
    number = {c["cycle_id"]: c["number"] for c in data.cycles}
    seen: dict[int, int] = {}
    for step in data.steps:
        n = number.get(step["cycle_id"], 0)
        seen[n] = seen.get(n, 0) + step["n_general"] + step["n_behavioral"]
    last = data.cycles[-1] if data.cycles else {}
    return {"name": name, "seconds": seconds, "statuses": statuses or [c["status"] for c in data.cycles],
            "steps": len(data.steps), "examples_by_cycle": seen, "trend": data.trend,
            "lr_final": settings.lr if settings else last.get("lr"),
            "examples_final": settings.examples_per_cycle if settings else None,
            "general_share_final": settings.general_share if settings else last.get("planned_general_share"),
            "decisions": [{k: d[k] for k in ("cycle", "action", "reason", "before", "after")}
                          for d in data.decisions]}


def run_efficacy(root: Path, cycles: int) -> dict[str, Any]:
    from dreamd.init import init_dir, tokenizer_texts
    from dreamd.tiny import write_tiny_model_dir

    root = Path(root)
    init_dir(root / "init", arch="llama")
    # The model this proof was measured with (docs/efficacy.md): heads of 16, as `dreamd init`
    # wrote them before its models took heads of 32 for vLLM's CPU kernels. Same seed, same
    # tokenizer; only the head split differs, and it changes this small model's trajectory.
    write_tiny_model_dir(root / "init" / "model", "llama", texts=tokenizer_texts(0), seed=0)
    return run_all(root, RUNS, SETTINGS, cycles)


def run_all(root: Path, runs: dict[str, dict[str, str]], settings: dict[str, str], cycles: int) -> dict[str, Any]:
    """Every run at once, one process (and one CPU thread) each, from the setup in root/init."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(len(runs)) as pool:
        jobs = [pool.apply_async(run_one, (name, str(root / "init"), str(root / f"state-{name}"), cycles, extra,
                                           settings))
                for name, extra in runs.items()]
        results = [j.get() for j in jobs]
    return {r["name"]: r for r in results}


def run_real(root: Path, cycles: int, model: str | None, gguf: str | None) -> dict[str, Any]:
    """The real-model runs from `dreamd init --model/--gguf`'s setup (converted once, cached)."""
    from dreamd.init import init_from_gguf

    root = Path(root)
    if not (root / "init" / "dreamd.toml").is_file():
        init_from_gguf(root / "init", gguf=Path(gguf) if gguf else None, model=model)
    return run_all(root, REAL_RUNS, REAL_SETTINGS, cycles)


def print_per_cycle(results: dict[str, Any]) -> None:
    """One table per run: a row per cycle (0 = before training), with the examples seen."""
    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"

    for name, r in results.items():
        trend = {m: dict(r["trend"].get(m) or []) for m in PER_CYCLE}
        cycles = sorted({c for values in trend.values() for c in values})
        print(f"\n{name}:\n")
        print("| cycle | examples seen | " + " | ".join(PER_CYCLE) + " |")
        print("|---:|---:|" + "---:|" * len(PER_CYCLE))
        seen = 0
        for c in cycles:
            seen += r["examples_by_cycle"].get(c, 0)
            print(f"| {c} | {seen} | " + " | ".join(fmt(trend[m].get(c)) for m in PER_CYCLE) + " |")


def first_last(trend: dict[str, list], metric: str) -> tuple[float | None, float | None]:
    values = trend.get(metric) or []
    start = next((v for c, v in values if c == 0), None)
    return start, (values[-1][1] if values else None)


def print_tables(results: dict[str, Any], cycles: int, seconds: float) -> None:
    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"

    names = list(results)
    print(f"| metric | {' | '.join(f'{n} start | {n} cycle {cycles}' for n in names)} |")
    print("|---|" + "---:|" * (2 * len(names)))
    for metric in SHOWN:
        cells = []
        for n in names:
            cells += [fmt(x) for x in first_last(results[n]["trend"], metric)]
        print(f"| {metric} | {' | '.join(cells)} |")
    print()
    for n in names:
        r = results[n]
        took = f"{r['seconds']:.0f} s" if r["seconds"] is not None else "time not recorded"
        print(f"{n}: {r['steps']} optimizer steps, {took}, statuses {r['statuses']}, final lr "
              f"{r['lr_final']:.3g}, examples/cycle {r['examples_final']}, general share {r['general_share_final']}")
        for d in r["decisions"]:
            print(f"  cycle {d['cycle']}: {d['action']}: {d['reason']}")
    print(f"\nwall time {seconds:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=12, help="cycles per run (default 12)")
    parser.add_argument("--dir", help="work directory (default: a temporary one)")
    parser.add_argument("--json", help="also write every value to this JSON file")
    real = parser.add_mutually_exclusive_group()
    real.add_argument("--model", help="a named real model (dreamd init --model), e.g. smollm2-135m-instruct")
    real.add_argument("--gguf", help="a local GGUF causal LM (dreamd init --gguf)")
    parser.add_argument("--reread", action="store_true", help="print the tables of the finished runs in "
                        "--dir again without running anything")
    args = parser.parse_args()
    t0 = time.perf_counter()
    if args.reread:
        if not args.dir:
            parser.error("--reread needs --dir")
        names = REAL_RUNS if (args.model or args.gguf) else RUNS
        results = {n: summarise(n, str(Path(args.dir) / f"state-{n}")) for n in names}
        if args.model or args.gguf:
            print_per_cycle(results)
            print()
        print_tables(results, args.cycles, time.perf_counter() - t0)
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.model or args.gguf:
            results = run_real(Path(args.dir or tmp), args.cycles, args.model, args.gguf)
        else:
            results = run_efficacy(Path(args.dir or tmp), args.cycles)
    if args.model or args.gguf:
        print_per_cycle(results)
        print()
    print_tables(results, args.cycles, time.perf_counter() - t0)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
