"""Several runs in one store: the fleet view, `dreamd status --all`, no run reading another's
rows in the loop, and two real daemons on one PostgreSQL database at once. (Two daemons naming
the SAME run on one store: the claim refuses the second, tests/test_daemon.py.)

    DREAMD_TEST_PG_URL=postgresql+psycopg://postgres@127.0.0.1:5432/test .venv/bin/pytest tests/test_fleet.py
"""

from __future__ import annotations

import json
import socket

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from dreamd.store import Store
from tests.daemon_process import DaemonProcess, cli, sqlite_url, store_rows, write_config
from tests.test_store import scenario, step_metrics


def two_runs(store: Store) -> tuple[int, int]:
    """Run 'a': cycle 1 committed (2 steps, evals), cycle 2 running (1 step, no evals).
    Run 'b': nothing but its row, stopped."""
    a = store.start_run("a", "{}", "/models/a", 1)
    store.set_run_process(a, "node-1", 4242)
    c1 = store.start_cycle(a, 1, 1e-5, 0.25, 4)
    sid = store.add_scenario(a, c1, scenario(1), "accepted").id
    store.add_train_step(a, c1, 0, step_metrics(loss=2.0), [sid])
    store.add_train_step(a, c1, 1, step_metrics(loss=1.0), [sid])
    store.add_evals(a, c1, {"forget.perplexity": 12.5, "q1.balanced": 0.5, "margin.mean": 0.25})
    store.finish_cycle(c1, "committed")
    c2 = store.start_cycle(a, 2, 1e-5, 0.25, 4)
    store.add_train_step(a, c2, 2, step_metrics(loss=9.0), [sid])
    b = store.start_run("b", "{}", "/models/b", 2)
    store.set_run_status(b, "stopped")
    return a, b


def test_fleet_view_has_one_row_per_run(store: Store) -> None:
    a, b = two_runs(store)
    assert "fleet" in inspect(store.engine).get_view_names()
    rows = {r["run_id"]: r for r in store.fleet()}
    assert set(rows) == {a, b}
    ra, rb = rows[a], rows[b]
    assert (ra["name"], ra["model_path"], ra["status"], ra["host"], ra["pid"]) == \
        ("a", "/models/a", "running", "node-1", 4242)
    # The last cycle is the attempt started last; the metrics are of the last committed one.
    assert (ra["last_cycle"], ra["last_cycle_status"], ra["last_committed_cycle"]) == (2, "running", 1)
    assert ra["last_cycle_started_at"].tzinfo is not None and ra["last_cycle_finished_at"] is None
    assert (ra["steps"], ra["committed_cycles"]) == (3, 1)
    assert ra["mean_loss"] == pytest.approx(1.5)
    assert (ra["perplexity"], ra["balanced"], ra["margin_mean"], ra["sycophancy"]) == (12.5, 0.5, 0.25, None)
    assert (rb["name"], rb["status"], rb["host"], rb["last_cycle"], rb["steps"], rb["perplexity"]) == \
        ("b", "stopped", None, None, 0, None)
    assert ra["paused"] is False


def test_status_all_prints_every_run_from_the_view(setup_dir, tmp_path) -> None:
    state = tmp_path / "state"
    config = write_config(setup_dir, tmp_path / "dreamd.toml", state)
    state.mkdir()
    store = Store.open(sqlite_url(state))
    store.upgrade()
    a, b = two_runs(store)
    store.close()
    done = cli(config, "status", "--all", "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [(r["run_id"], r["name"], r["last_cycle"], r["steps"]) for r in rows] == [(a, "a", 2, 3), (b, "b", None, 0)]
    done = cli(config, "status", "--all")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("2 runs in store sqlite:///") and "cycle status" in lines[1]
    assert "node-1" in lines[3] and "running" in lines[3] and "12.5" in lines[3] and "/models/a" in lines[3]
    assert lines[4].split()[:3] == [str(b), "b", "stopped"]


def test_runs_sharing_a_store_never_see_each_others_scenarios(store: Store) -> None:
    """Two runs (two models) may train on the same scenario; one run never repeats its own.
    The exact-duplicate rule, the screener's `seen` and the probes' `taken` are per run."""
    a = store.start_run("a", "{}", "/models/a", 1)
    b = store.start_run("b", "{}", "/models/b", 1)
    ca, cb = store.start_cycle(a, 1, 1e-5, 0.25, 4), store.start_cycle(b, 1, 1e-5, 0.25, 4)
    first = store.add_scenario(a, ca, scenario(1), "accepted")
    assert store.hash_exists(a, scenario(1).content_hash) == first.id
    assert store.hash_exists(b, scenario(1).content_hash) is None
    assert store.scenario_status(b, scenario(1).content_hash) is None
    other = store.add_scenario(b, cb, scenario(1), "accepted")  # the other run: its own row
    assert other.duplicate_of is None and store.hash_exists(b, scenario(1).content_hash) == other.id
    again = store.add_scenario(b, cb, scenario(1), "accepted")  # its own repeat: a duplicate of its own
    assert again.duplicate_of == other.id
    probe = store.add_scenario(a, None, scenario(2), "probe")
    assert store.scenario_status(a, scenario(2).content_hash) == "probe"
    assert store.scenario_status(b, scenario(2).content_hash) is None
    assert probe.duplicate_of is None


def test_near_duplicate_lookup_is_per_run(setup_dir, store: Store) -> None:
    """A near copy of ANOTHER run's scenario is not a near duplicate (docs/sql.md, "Several runs
    in one store"): the index each run's dreaming is opened with (dream/routing.open_dreaming)
    answers for that run."""
    from dreamd.config_file import load_config
    from dreamd.dream.routing import open_dreaming

    cfg = load_config(setup_dir / "dreamd.toml", environ={})
    a = store.start_run("a", "{}", "/models/a", 1)
    b = store.start_run("b", "{}", "/models/b", 1)
    _, near_a = open_dreaming(cfg, store, a, None, ())
    _, near_b = open_dreaming(cfg, store, b, None, ())
    sid = store.add_scenario(a, store.start_cycle(a, 1, 1e-5, 0.25, 4), scenario(1), "accepted").id
    assert near_a.add(scenario(1), sid)
    assert near_a.problem(scenario(1)) is not None  # its own copy: a near duplicate
    assert near_b.problem(scenario(1)) is None  # the other run's: not this run's concern


@pytest.mark.slow
def test_two_daemons_on_one_postgresql_database_at_once(setup_dir, tmp_path, daemons, store_url) -> None:
    """Two real `dreamd run` processes, different run names and state dirs, one PostgreSQL
    database, 2 cycles each at the same time: both finish, every row belongs to its run, and
    the fleet view shows both."""
    if not store_url.startswith("postgresql"):
        pytest.skip("the shared store is PostgreSQL (SQLite is one machine's file)")
    procs = {}
    for seed, name in enumerate(("alpha", "beta")):
        config = write_config(setup_dir, tmp_path / f"{name}.toml", tmp_path / f"state-{name}",
                              store__url=store_url, run__name=name, run__cycles=2, run__seed=seed)
        procs[name] = DaemonProcess(config, tmp_path / f"state-{name}", tmp_path / f"{name}.log").start()
        daemons.append(procs[name])
    for name, d in procs.items():
        assert d.wait(600) == 0, f"{name}:\n{d.log_tail()}"

    runs = {r["name"]: r for r in store_rows(store_url, "SELECT id, name, status, host, pid FROM runs")}
    assert set(runs) == {"alpha", "beta"}
    ids = {name: r["id"] for name, r in runs.items()}
    for name, r in runs.items():
        assert (r["status"], r["host"], r["pid"]) == ("finished", socket.gethostname(), procs[name].pid)
    # Both ran at once: each one's cycles overlap the other's in time.
    spans = {r["run_id"]: (r["first"], r["last"]) for r in store_rows(
        store_url, "SELECT run_id, MIN(started_at) AS first, MAX(finished_at) AS last FROM cycles GROUP BY run_id")}
    (a0, a1), (b0, b1) = spans[ids["alpha"]], spans[ids["beta"]]
    assert a0 < b1 and b0 < a1, spans
    # No cross-run rows: every reference stays inside its run.
    cross = {
        "cycles of another run's scenarios": "SELECT COUNT(*) AS n FROM scenarios s JOIN cycles c ON c.id = s.cycle_id WHERE c.run_id <> s.run_id",
        "steps in another run's cycles": "SELECT COUNT(*) AS n FROM train_steps t JOIN cycles c ON c.id = t.cycle_id WHERE c.run_id <> t.run_id",
        "steps training another run's scenarios": "SELECT COUNT(*) AS n FROM step_examples x JOIN train_steps t ON t.id = x.step_id JOIN scenarios s ON s.id = x.scenario_id WHERE s.run_id <> t.run_id",
        "duplicates of another run's scenarios": "SELECT COUNT(*) AS n FROM scenarios s JOIN scenarios o ON o.id = s.duplicate_of WHERE o.run_id <> s.run_id",
        "evals of another run's cycles": "SELECT COUNT(*) AS n FROM evals e JOIN cycles c ON c.id = e.cycle_id WHERE c.run_id <> e.run_id",
        "decisions of another run's cycles": "SELECT COUNT(*) AS n FROM decisions d JOIN cycles c ON c.id = d.cycle_id WHERE c.run_id <> d.run_id",
        "checkpoints of another run's cycles": "SELECT COUNT(*) AS n FROM checkpoints k JOIN cycles c ON c.id = k.cycle_id WHERE c.run_id <> k.run_id",
        "phases of another run's cycles": "SELECT COUNT(*) AS n FROM phases p JOIN cycles c ON c.id = p.cycle_id WHERE c.run_id <> p.run_id",
    }
    for what, sql in cross.items():
        assert store_rows(store_url, sql)[0]["n"] == 0, what
    for name, run_id in ids.items():
        own = store_rows(store_url, "SELECT COUNT(*) AS n FROM scenarios WHERE run_id = :r AND status = 'accepted'", r=run_id)
        assert own[0]["n"] >= 16, name  # 2 cycles of 8
        probes = store_rows(store_url, "SELECT COUNT(*) AS n FROM scenarios WHERE run_id = :r AND status = 'probe'", r=run_id)
        assert probes[0]["n"] > 0, name
    for run_id in ids.values():
        committed = store_rows(store_url, "SELECT number FROM cycles WHERE run_id = :r AND status = 'committed' ORDER BY number", r=run_id)
        assert [c["number"] for c in committed] == [1, 2]
        steps = store_rows(store_url, "SELECT COUNT(*) AS n FROM train_steps WHERE run_id = :r AND status = 'active'", r=run_id)
        assert steps[0]["n"] == 4  # 2 cycles x 2 batches
    # The fleet view, through `dreamd status --all --json` of either daemon's config.
    done = cli(tmp_path / "alpha.toml", "status", "--all", "--json")
    assert done.returncode == 0, done.stderr
    fleet = {r["name"]: r for r in json.loads(done.stdout)}
    assert set(fleet) == {"alpha", "beta"}
    for name, r in fleet.items():
        assert (r["status"], r["last_cycle"], r["last_cycle_status"], r["steps"], r["pid"]) == \
            ("finished", 2, "committed", 4, procs[name].pid)
        assert r["perplexity"] is not None


def test_per_run_hash_migration_keeps_rows_and_views(store: Store) -> None:
    """0005 on a store with rows: SQLite recreates `scenarios` (its views dropped and made
    again), PostgreSQL swaps the constraint in place; rows, references and views survive, and
    the downgrade restores the store-wide rule."""
    store.downgrade("0004")
    a, b = two_runs(store)
    views = set(inspect(store.engine).get_view_names())
    store.upgrade()
    assert set(inspect(store.engine).get_view_names()) == views
    assert [r["steps"] for r in store.cycle_summary(a)] == [2, 1]
    assert store.add_scenario(b, None, scenario(1), "probe").duplicate_of is None  # a's content, b's row
    assert {r["run_id"] for r in store.fleet()} == {a, b}
    with store.read() as s:
        assert s.execute(text("SELECT COUNT(*) FROM step_examples")).scalar() == 3
    with pytest.raises(IntegrityError):  # two runs now hold one hash: the old rule cannot hold
        store.downgrade("0004")
