"""Per-step store cost: Store.add_train_step against a plain driver insert of the same rows.

    .venv/bin/python benchmarks/store_step.py                       # SQLite
    .venv/bin/python benchmarks/store_step.py --pg URL              # and PostgreSQL (an empty database is made)
    .venv/bin/python benchmarks/store_step.py --pg URL --methods    # and each way of writing them on PostgreSQL
    .venv/bin/python benchmarks/store_step.py --pg URL --methods --before REV   # and against the Store of git REV

Each optimizer step writes one train_steps row and one step_examples row per example of its
batch, in one transaction (the step and its examples, or neither). The baseline does exactly
that with the bare driver (sqlite3 / psycopg), same file or server, same rows, the same way
(PostgreSQL: one statement, asynchronous commit; see Store.add_train_step). Measured
interleaved (A, B, A, B, ...) in one process, one thread, so a busy box slows both alike;
printed: median microseconds per step and the ratio (median [min, max] over rounds).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

from dreamd.dream.scenario import Scenario, ScenarioKind
from dreamd.store import Store

BATCH = 4
ROUNDS = 7
STEPS_PER_ROUND = 100
METRICS = {"lr": 1e-5, "tokens": 512, "n_behavioral": 3, "n_general": 1, "wall_ms": 250.0,
           "tokens_per_s": 2048.0, "loss": 1.25, "grad_norm": 0.5, "pad_fraction": 0.1,
           "peak_mem_bytes": 1 << 20, "update_landed": 1.0, "skipped": False}


def setup(url: str) -> tuple[Store, int, int, list[int]]:
    store = Store.open(url)
    store.upgrade()
    run_id = store.start_run("bench", {}, "model", 0)
    cycle_id = store.start_cycle(run_id, 1, 1e-5, 0.25, BATCH)
    ids = [store.add_scenario(run_id, cycle_id, Scenario(ScenarioKind.ACCEPT, "template",
                                                          [{"role": "user", "content": f"q{i}"}], f"a{i}"),
                              "accepted").id for i in range(BATCH)]
    return store, run_id, cycle_id, ids


def plain_sqlite(path: Path):
    import sqlite3

    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    cols = ["run_id", "cycle_id", "step", "status", *METRICS]
    sql = f"INSERT INTO train_steps ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) RETURNING id"

    def write(run_id: int, cycle_id: int, step: int, ids: list[int]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        row = conn.execute(sql, [run_id, cycle_id, step, "superseded", *METRICS.values()]).fetchone()
        conn.executemany("INSERT INTO step_examples (step_id, scenario_id) VALUES (?, ?)", [(row[0], i) for i in ids])
        conn.execute("COMMIT")
    return write


def _pg_connect(url: str, autocommit: bool = False):
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(url)
    return psycopg.connect(host=u.host, port=u.port or 5432, user=u.username, password=u.password,
                           dbname=u.database, autocommit=autocommit)


_PG_COLS = ["run_id", "cycle_id", "step", "status", *METRICS]
_PG_STEP = (f"INSERT INTO train_steps ({', '.join(_PG_COLS)}) VALUES ({', '.join(['%s'] * len(_PG_COLS))}) "
            "RETURNING id")
_PG_ONE = (f"WITH s AS ({_PG_STEP}), e AS (INSERT INTO step_examples (step_id, scenario_id) "
           "SELECT s.id, unnest(%s::int[]) FROM s) SELECT id FROM s")


_PG_NOW = (f"WITH async_commit AS (SELECT set_config('synchronous_commit', 'off', true)), s AS ({_PG_STEP}), "
           "e AS (INSERT INTO step_examples (step_id, scenario_id) SELECT s.id, unnest(%s::int[]) FROM s) "
           "SELECT id FROM s, async_commit")


def pg_methods(url: str) -> dict:
    """The ways of writing one step's rows measured by --methods, bare psycopg, one transaction
    per step each: 'two statements, sync' is what add_train_step did before (BEGIN, step row,
    its examples, synchronous COMMIT); (a) asynchronous commit for the transaction (SET LOCAL
    synchronous_commit = off); (b) one statement (data-modifying CTEs); (a)+(b) both, and both
    in one round trip (autocommit, set_config in the statement): what add_train_step does now."""
    conn, auto = _pg_connect(url), _pg_connect(url, autocommit=True)

    def write(async_commit: bool, one_statement: bool):
        def step_rows(run_id: int, cycle_id: int, step: int, ids: list[int]) -> None:
            values = [run_id, cycle_id, step, "superseded", *METRICS.values()]
            with conn.cursor() as cur:
                if async_commit:
                    cur.execute("SET LOCAL synchronous_commit = off")
                if one_statement:
                    cur.execute(_PG_ONE, [*values, ids])
                else:
                    cur.execute(_PG_STEP, values)
                    step_id = cur.fetchone()[0]
                    cur.executemany("INSERT INTO step_examples (step_id, scenario_id) VALUES (%s, %s)",
                                    [(step_id, i) for i in ids])
            conn.commit()
        return step_rows

    def one_round_trip(run_id: int, cycle_id: int, step: int, ids: list[int]) -> None:
        auto.execute(_PG_NOW, [run_id, cycle_id, step, "superseded", *METRICS.values(), ids]).fetchone()

    return {"two statements, sync commit (before)": write(False, False),
            "(a) two statements, async commit": write(True, False),
            "(b) one statement, sync commit": write(False, True),
            "(a)+(b) SET LOCAL, one statement, async commit": write(True, True),
            "(a)+(b) in one round trip (now)": one_round_trip}


def plain_pg(url: str):
    """The bare-driver baseline: what add_train_step does on PostgreSQL, with psycopg alone."""
    return pg_methods(url)["(a)+(b) in one round trip (now)"]


def measure(url: str, plain, rounds: int = ROUNDS, steps: int = STEPS_PER_ROUND,
            opened: tuple[Store, int, int, list[int]] | None = None) -> dict[str, list[float]]:
    """Seconds per step of Store.add_train_step ('ours') and of `plain` ('base'), alternated
    round by round, and their ratio per round. `opened`: setup(url) done already."""
    store, run_id, cycle_id, ids = opened or setup(url)
    step = 0
    out: dict[str, list[float]] = {"ours": [], "base": [], "ratio": []}
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(steps):
            store.add_train_step(run_id, cycle_id, step, METRICS, ids)
            step += 1
        a = (time.perf_counter() - t0) / steps
        t0 = time.perf_counter()
        for _ in range(steps):
            plain(run_id, cycle_id, step, ids)
            step += 1
        b = (time.perf_counter() - t0) / steps
        out["ours"].append(a), out["base"].append(b), out["ratio"].append(a / b)
    store.close()
    return out


def print_row(name: str, m: dict[str, list[float]], step_s: float) -> None:
    ours, base, ratios = m["ours"], m["base"], m["ratio"]
    print(f"| {name} | {statistics.median(ours) * 1e6:.0f} | {statistics.median(base) * 1e6:.0f} | "
          f"{statistics.median(ratios):.2f} [{min(ratios):.2f}, {max(ratios):.2f}] | "
          f"{100 * statistics.median(ours) / step_s:.2f}% |")


def store_at(rev: str) -> type[Store]:
    """Store as it was at git revision `rev`: its dreamd/store/record.py loaded beside today's
    package (the rest of the store must not have changed since), for a before/after in one run."""
    import importlib.util
    import subprocess

    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(["git", "show", f"{rev}:dreamd/store/record.py"], cwd=root, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "record_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("record_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Store


def measure_methods(url: str, before: str | None = None, rounds: int = ROUNDS,
                    steps: int = STEPS_PER_ROUND) -> dict[str, list[float]]:
    """Seconds per step of each of pg_methods and of Store.add_train_step (and of the Store at
    git revision `before`), interleaved round by round (one process, one thread: a busy box
    slows all alike)."""
    store, run_id, cycle_id, ids = setup(url)
    methods = {**pg_methods(url), "Store.add_train_step": lambda r, c, s, i: store.add_train_step(r, c, s, METRICS, i)}
    if before:
        old = store_at(before).open(url)
        methods[f"Store.add_train_step at {before}"] = lambda r, c, s, i: old.add_train_step(r, c, s, METRICS, i)
    out: dict[str, list[float]] = {name: [] for name in methods}
    step = 0
    for _ in range(rounds):
        for name, write in methods.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                write(run_id, cycle_id, step, ids)
                step += 1
            out[name].append((time.perf_counter() - t0) / steps)
    store.close()
    return out


def measure_before(url: str, before: str, rounds: int = ROUNDS, steps: int = STEPS_PER_ROUND) -> dict[str, list[float]]:
    """Store.add_train_step now ('ours') against the Store of git revision `before` ('base'),
    alternated round by round on one store."""
    store, run_id, cycle_id, ids = setup(url)
    old = store_at(before).open(url)
    try:
        return measure(url, lambda r, c, s, i: old.add_train_step(r, c, s, METRICS, i), rounds, steps,
                       opened=(store, run_id, cycle_id, ids))
    finally:
        old.close()


def print_methods(m: dict[str, list[float]], step_s: float) -> None:
    before = m["two statements, sync commit (before)"]
    print("| PostgreSQL, one step's rows | us/step | ratio to before, median [min, max] | share of a demo step |")
    print("|---|---:|---:|---:|")
    for name, secs in m.items():
        ratios = [a / b for a, b in zip(secs, before)]
        print(f"| {name} | {statistics.median(secs) * 1e6:.0f} | {statistics.median(ratios):.2f} "
              f"[{min(ratios):.2f}, {max(ratios):.2f}] | {100 * statistics.median(secs) / step_s:.2f}% |")


def demo_training(root: Path, hidden: int = 64, n_batches: int = 8):
    """`dreamd init`'s model (tiny Llama, `hidden`) under `root`, its config, tokenizer and
    `n_batches` batches of template scenarios (batch_size examples each, encoded as the cycle
    encodes them): the work every training row of the benches runs."""
    import random

    from dreamd.config_file import load_config
    from dreamd.dream.templates import TemplateDreamer
    from dreamd.init import init_dir
    from dreamd.models import load_model
    from dreamd.train.examples import encode_scenario

    cfg = load_config(init_dir(root / "demo", arch="llama", hidden=hidden), environ={})
    model, tokenizer = load_model(cfg.model, "cpu")
    dreamer, rng = TemplateDreamer(spec=cfg.spec_text, seed=0), random.Random(0)
    kinds = ("accept", "pushback", "derail", "accept")
    batches = [[encode_scenario(tokenizer, dreamer.dream(kinds[i % 4], rng), cfg.model.max_seq_len)
                for i in range(cfg.train.batch_size)] for _ in range(n_batches)]
    return cfg, model, tokenizer, batches


def demo_step_seconds(steps: int = 20) -> float:
    """Median seconds of one optimizer step of the demo model (`dreamd init`, batch 4, template
    scenarios), the step the store's row is written after: the denominator of the share."""
    from dreamd.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg, model, _, batches = demo_training(Path(tmp))
        trainer = Trainer(model, cfg.train, cfg.optimizer, seed=0)
        times = []
        for i in range(steps + 3):
            t0 = time.perf_counter()
            trainer.train_step(batches[i % len(batches)])
            if i >= 3:  # the first steps build the optimizer state
                times.append(time.perf_counter() - t0)
        return statistics.median(times)


@contextlib.contextmanager
def scratch_database(admin_url: str):
    """A new, empty PostgreSQL database on the server of `admin_url` (yields its URL), dropped after."""
    import uuid

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"dreamd_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def main() -> None:
    import torch

    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg", help="admin URL of a PostgreSQL server (a database is created and dropped)")
    parser.add_argument("--methods", action="store_true",
                        help="with --pg: also time each way of writing the rows (pg_methods)")
    parser.add_argument("--before", metavar="REV",
                        help="also time Store.add_train_step against itself as it was at git revision REV "
                             "(the 'plain driver' column is then that Store)")
    args = parser.parse_args()
    step_s = demo_step_seconds()
    print(f"{STEPS_PER_ROUND} steps x {ROUNDS} rounds, batch {BATCH}, 1 thread; a demo optimizer step "
          f"(dreamd init's model, batch 4): {step_s * 1e3:.1f} ms median\n")
    print("| store | add_train_step us/step | plain driver us/step | ratio median [min, max] | share of a demo step |")
    print("|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.sqlite"
        print_row("SQLite (WAL)", measure(f"sqlite:///{path}", plain_sqlite(path)), step_s)
        if args.before:
            print_row(f"SQLite (WAL): now / at {args.before}", measure_before(f"sqlite:///{path}", args.before), step_s)
    if args.pg:
        with scratch_database(args.pg) as url:
            print_row("PostgreSQL", measure(url, plain_pg(url)), step_s)
            if args.before:
                print_row(f"PostgreSQL: now / at {args.before}", measure_before(url, args.before), step_s)
        if args.methods:
            print()
            with scratch_database(args.pg) as url:
                print_methods(measure_methods(url, args.before), step_s)


if __name__ == "__main__":
    main()
