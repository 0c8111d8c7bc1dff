"""The full evaluation suite's generation: one engine call (generate_mixed) vs one per family.

    .venv/bin/python benchmarks/eval_batching.py [--rounds 5] [--engine auto|transformers]

Makes a `dreamd init` setup (tiny demo model) in a temp dir, opens its run (the engine as the
config picks it: vLLM's CPU build where installed, else transformers; --engine forces one),
pins 1 torch thread, then in interleaved rounds measures the full suite (ProbeSuite.measure)
twice on the same weights: with the engine (every Q1, code and arithmetic reply in ONE
generate_mixed call) and through a wrapper that only has generate() (engines.base.generate_each
then makes one call per Sampling: Q1, code, arithmetic, as the metrics did before). It checks
that both give the same metrics and prints the medians of the 'generate' part and of the whole
evaluation, and their ratio (one call / per family), measured in the same process.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path


class PerFamily:
    """The engine with generate() only: one call per distinct Sampling (the old path)."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def generate(self, conversations, sampling):
        return self.engine.generate(conversations, sampling)


def main(rounds: int, engine_kind: str) -> None:
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
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--engine", choices=["auto", "transformers"], default="auto")
    args = parser.parse_args()
    main(args.rounds, args.engine)
