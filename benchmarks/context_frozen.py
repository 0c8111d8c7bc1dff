"""Context-frozen vs masked full forward: activation memory and step time against context length.

    .venv/bin/python benchmarks/context_frozen.py                 # the docs/benchmarks.md tables
    .venv/bin/python benchmarks/context_frozen.py --contexts 1024 --arch llama   # quick look

Part 1: one conversation (random tokens; `--reply` reply tokens after a context of N tokens),
one forward + backward of the reply loss, each configuration in a FRESH process so peak RSS
is its own. Columns:
  saved MiB   bytes autograd saves for backward (activation_memory.SavedTensorMeter): the
              activation memory at the start of backward, parameters excluded
  rss MiB     peak RSS of the process minus its RSS just before the step (ru_maxrss): includes
              transient op buffers and the allocator's slack, so it is noisier
  step s      wall time of forward + backward (best of --repeats)
  loss        the reply loss; frozen and full must agree (same function of the weights)
Part 2: a batch of 4 conversations with different context lengths, trained as one padded
forward (left-padded contexts, right-padded replies) vs one forward per example.

CPU, tiny models (hidden 64, 4 layers, vocab 4096), sdpa attention. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time

import torch

from dreamd.dream.scenario import ScenarioKind
from dreamd.tiny import build_tiny_model, tiny_config
from dreamd.train.activation_memory import SavedTensorMeter
from dreamd.train.context_frozen import align, reply_nll
from dreamd.train.examples import IGNORE_INDEX, Encoded

VOCAB = 4096
MiB = 2**20


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _model(arch: str, hidden: int, layers: int, max_positions: int):
    cfg = tiny_config(arch, VOCAB, hidden=hidden, layers=layers, max_positions=max_positions)
    cfg.pad_token_id = 0
    cfg._attn_implementation = "sdpa"
    return build_tiny_model(cfg, seed=0)


def _example(context: int, reply: int, seed: int) -> Encoded:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (context + reply,), generator=g).tolist()
    return Encoded(ids, [IGNORE_INDEX] * context + ids[context:], context, ScenarioKind.ACCEPT)


def _one_config(args: tuple) -> dict:
    """Runs in a fresh process: one example, one mode, forward + backward."""
    arch, context, reply, frozen, hidden, layers, repeats, threads = args
    torch.set_num_threads(threads)
    model = _model(arch, hidden, layers, context + reply + 8)
    batch = align([_example(context, reply, seed=1)], pad_id=0)
    meter = SavedTensorMeter(model)
    # Warm the kernels on a short example so one-time allocations do not count.
    short = align([_example(64, 16, seed=2)], pad_id=0)
    reply_nll(model, short, frozen).backward()
    model.zero_grad(set_to_none=True)
    times, rss_before = [], _rss_bytes()
    for _ in range(repeats):
        start = time.perf_counter()
        with meter:
            loss = reply_nll(model, batch, frozen)
        loss.backward()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"saved": meter.bytes, "rss": max(0, peak_rss - rss_before), "time": min(times),
            "loss": loss.item() / reply}


def _batch_config(args: tuple) -> dict:
    """Runs in a fresh process: 4 conversations, padded together or one forward each."""
    arch, contexts, reply, per_example, hidden, layers, repeats, threads = args
    torch.set_num_threads(threads)
    model = _model(arch, hidden, layers, max(contexts) + 2 * reply + 8)
    examples = [_example(c, reply // 2 + 16 * i, seed=10 + i) for i, c in enumerate(contexts)]
    groups = [[e] for e in examples] if per_example else [examples]
    batches = [align(g, pad_id=0) for g in groups]
    n_labels = sum(e.reply_len for e in examples)
    meter = SavedTensorMeter(model)
    reply_nll(model, align([_example(64, 16, seed=2)], pad_id=0), True).backward()
    model.zero_grad(set_to_none=True)
    times, peak_saved, rss_before = [], 0, _rss_bytes()
    for _ in range(repeats):
        start, total = time.perf_counter(), 0.0
        for b in batches:
            with meter:
                nll = reply_nll(model, b, frozen=True)
            (nll / n_labels).backward()
            peak_saved = max(peak_saved, meter.bytes)
            total += nll.item()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    slots = sum(b.n_slots for b in batches)
    real = sum(b.n_real_tokens for b in batches)
    return {"saved": peak_saved, "rss": max(0, peak_rss - rss_before), "time": min(times),
            "loss": total / n_labels, "pad": 1 - real / slots, "tokens_per_s": real / min(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["llama", "qwen3.5"])
    parser.add_argument("--contexts", nargs="*", type=int, default=[1024, 4096, 16384])
    parser.add_argument("--reply", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (1: stable timings on a shared box)")
    parser.add_argument("--batch-contexts", nargs="*", type=int, default=[256, 1024, 2048, 4096])
    parser.add_argument("--crossover", nargs="*", type=int, default=[],
                        help="only the short-context table: every (layout, frozen) choice per length")
    args = parser.parse_args()
    if args.crossover:
        crossover_table(args)
        return
    pool = mp.get_context("spawn")
    print(f"torch {torch.__version__}, {args.threads} thread(s), hidden {args.hidden}, "
          f"{args.layers} layers, vocab {VOCAB}, reply {args.reply} tokens, sdpa, CPU\n")

    if args.contexts:
        context_length_table(args, pool)
    if args.batch_contexts:
        batch_layout_table(args, pool)


def _choices() -> dict:
    """Trainers whose micro_batches make each choice. 'before' is the rule until forward_layout
    'auto' and frozen_min_context: one forward per example, context-frozen whenever the context
    is longer than the reply; 'after' is the trainer's defaults (the choice by length)."""
    from dreamd.config import TrainConfig

    return {"before": TrainConfig(forward_layout="per_example", frozen_min_context=1),
            "per-example full": TrainConfig(forward_layout="per_example", context_frozen="off"),
            "padded frozen": TrainConfig(forward_layout="padded", context_frozen="on"),
            "padded full": TrainConfig(forward_layout="padded", context_frozen="off"),
            "after (auto)": TrainConfig()}


def _crossover_batch(context: int, seed: int) -> list[Encoded]:
    """A batch of 4 as length bucketing makes them on the demo data: contexts within +-25% of
    `context`, replies 16-80 tokens (the demo's are 12-91)."""
    rng = torch.Generator().manual_seed(seed)
    contexts = [max(2, int(context * f)) for f in (0.75, 0.9, 1.1, 1.25)]
    replies = torch.randint(16, 81, (4,), generator=rng).tolist()
    return [_example(c, r, seed=seed * 10 + i) for i, (c, r) in enumerate(zip(contexts, replies))]


def _step_seconds(trainer, examples: list[Encoded]) -> float:
    """The forwards + backwards of one train_step, as the trainer chooses them (no optimizer step)."""
    n_labels = sum(e.reply_len for e in examples)
    start = time.perf_counter()
    for aligned, frozen in trainer.micro_batches(examples):
        (reply_nll(trainer.model, aligned, frozen) / n_labels).backward()
    trainer.model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def crossover_table(args: argparse.Namespace) -> None:
    """Step time of each choice for batches of 4 around each context length, all alternated in
    one process (a busy box slows them alike), relative to 'before'."""
    from dreamd.config import OptimizerConfig
    from dreamd.train.trainer import Trainer

    torch.set_num_threads(args.threads)
    model = _model(args.arch[0], args.hidden, args.layers, 2 * max(args.crossover) + 200)
    trainers = {k: Trainer(model, cfg, OptimizerConfig(name="adamw")) for k, cfg in _choices().items()}
    print(f"\n{args.arch[0]}: batches of 4, contexts within +-25% of the length, replies 16-80, "
          f"{args.repeats} alternated repeats x 3 batches; forwards + backwards of one step / 'before', "
          "median [min, max]\n")
    print("| context | " + " | ".join(trainers) + " | before ms |")
    print("|---:|" + "---:|" * (len(trainers) + 1))
    for context in args.crossover:
        batches = [_crossover_batch(context, seed) for seed in range(3)]
        for b in batches:  # warm-up
            for t in trainers.values():
                _step_seconds(t, b)
        times = {k: [] for k in trainers}
        for _ in range(args.repeats):
            for b in batches:
                for k, t in trainers.items():
                    times[k].append(_step_seconds(t, b))
        cells = []
        for k in trainers:
            r = [x / y for x, y in zip(times[k], times["before"])]
            cells.append(f"{statistics.median(r):.2f} [{min(r):.2f}, {max(r):.2f}]")
        print(f"| {context} | " + " | ".join(cells) + f" | {statistics.median(times['before']) * 1e3:.1f} |",
              flush=True)


def context_length_table(args: argparse.Namespace, pool) -> None:
    print("| arch | context | mode | saved MiB | rss MiB | step s | loss | saved frozen/full |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for arch in args.arch:
        for context in args.contexts:
            rows = {}
            for frozen in (False, True):
                with pool.Pool(1) as p:
                    rows[frozen] = p.apply(_one_config, ((arch, context, args.reply, frozen, args.hidden,
                                                          args.layers, args.repeats, args.threads),))
            for frozen in (False, True):
                r = rows[frozen]
                ratio = f"{rows[True]['saved'] / rows[False]['saved']:.3f}" if frozen else ""
                print(f"| {arch} | {context} | {'frozen' if frozen else 'full'} | {r['saved'] / MiB:.1f} | "
                      f"{r['rss'] / MiB:.0f} | {r['time']:.2f} | {r['loss']:.6f} | {ratio} |", flush=True)


def batch_layout_table(args: argparse.Namespace, pool) -> None:
    print(f"\nBatch of {len(args.batch_contexts)} conversations, contexts {args.batch_contexts}, "
          "context-frozen, one optimizer step's forwards + backwards:\n")
    print("| arch | layout | pad fraction | saved MiB (largest forward) | rss MiB | step s | tokens/s | loss |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for arch in args.arch:
        for per_example in (False, True):
            with pool.Pool(1) as p:
                r = p.apply(_batch_config, ((arch, args.batch_contexts, args.reply, per_example, args.hidden,
                                             args.layers, args.repeats, args.threads),))
            print(f"| {arch} | {'per-example' if per_example else 'padded'} | {r['pad']:.3f} | "
                  f"{r['saved'] / MiB:.1f} | {r['rss'] / MiB:.0f} | {r['time']:.2f} | {r['tokens_per_s']:.0f} | "
                  f"{r['loss']:.6f} |", flush=True)


if __name__ == "__main__":
    main()
