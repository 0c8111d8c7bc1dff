"""How often the model dreamer's candidates pass screening, per kind, on a real model.

    .venv/bin/python benchmarks/dream_acceptance.py --model-dir DIR [--kinds accept,self] [--n 16]

DIR is a transformers model directory (e.g. the one `dreamd init X --model smollm2-135m-instruct`
writes to X/model). The dreamer is the run's own (few-shot examples from the template dreamer,
the transformers engine, 1 torch thread) and so is the screener (every rule except the store's
near-duplicate index, which needs a run's history). Prints, per kind: accepted / candidates,
the top rejection reasons and seconds; --samples FILE writes every candidate as JSON lines
(conversation, target, verdict, reason) for reading. docs/dreaming.md has the numbers.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True, type=Path)
    p.add_argument("--kinds", default="accept,pushback,derail,self")
    p.add_argument("--n", type=int, default=16, help="candidates per kind")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--situation-max-tokens", type=int, default=256)
    p.add_argument("--reply-max-tokens", type=int, default=256)
    p.add_argument("--judge-max-tokens", type=int, default=64)
    p.add_argument("--fewshot", type=int, default=2, help="worked examples per request (0: none)")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--samples", type=Path, help="write every candidate here (JSON lines)")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from dreamd.config import DEFAULT_SPEC, DreamConfig, EvalConfig, ModelConfig, ScreenConfig
    from dreamd.dream.model_dreamer import ModelDreamer
    from dreamd.dream.routing import fewshot_examples
    from dreamd.dream.scenario import ScenarioKind
    from dreamd.dream.screen import Screener
    from dreamd.evals.forgetting import screen_rule as forgetting_rule
    from dreamd.evals.probes import HELDOUT_DOMAINS
    from dreamd.dream.taxonomy import load_taxonomy
    from dreamd.dream.templates import TemplateDreamer
    from dreamd.engines.hf import TransformersEngine
    from dreamd.models import load_model

    model, tokenizer = load_model(ModelConfig(path=args.model_dir), "cpu")
    engine = TransformersEngine(model, tokenizer)
    config = DreamConfig(batch_size=args.batch_size, situation_max_tokens=args.situation_max_tokens,
                         reply_max_tokens=args.reply_max_tokens, judge_max_tokens=args.judge_max_tokens)
    dreamer = ModelDreamer(engine, spec=DEFAULT_SPEC, config=config, taxonomy=load_taxonomy(),
                           examples=fewshot_examples(TemplateDreamer(spec=DEFAULT_SPEC, seed=0), HELDOUT_DOMAINS) if args.fewshot else None,
                           fewshot=args.fewshot)
    screener = Screener(ScreenConfig(), model_config=model.config, forgetting=forgetting_rule(EvalConfig()))
    rng = random.Random(args.seed)
    out = args.samples.open("w") if args.samples else None
    print(f"model {args.model_dir}, few-shot {args.fewshot}, budgets situation/reply/judge "
          f"{args.situation_max_tokens}/{args.reply_max_tokens}/{args.judge_max_tokens}, n {args.n} per kind")
    for name in args.kinds.split(","):
        kind = ScenarioKind(name)
        t0, accepted, reasons = time.perf_counter(), 0, Counter()
        for _ in range(args.n):
            s = dreamer.dream(kind, rng, model_config=model.config)
            verdict = screener(s)
            dreamer.observe(s, verdict.ok)
            accepted += verdict.ok
            reasons[":".join((verdict.reason or "").split(":")[:2])[:70] or "accepted"] += 1
            if out:
                out.write(json.dumps({"kind": name, "accepted": verdict.ok, "reason": verdict.reason,
                                      "messages": s.messages, "target": s.target,
                                      "judge": s.meta.get("judge"), "temperature": s.meta.get("temperature")}) + "\n")
        top = ", ".join(f"{r} x{c}" for r, c in reasons.most_common(4) if r != "accepted")
        print(f"{name:9s} accepted {accepted}/{args.n} ({accepted / args.n:.0%}) in "
              f"{time.perf_counter() - t0:.0f} s; top rejections: {top}", flush=True)
    if out:
        out.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
