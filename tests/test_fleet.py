"""Several runs in one store: the fleet view, `dreamd status --all`, no run reading another's
rows in the loop, and two real daemons on one PostgreSQL database at once. (Two daemons naming
the SAME run on one store: the claim refuses the second, tests/test_daemon.py.)

    DREAMD_TEST_PG_URL=postgresql+psycopg://postgres@127.0.0.1:5432/test .venv/bin/pytest tests/test_fleet.py
"""

from __future__ import annotations

import json

import pytest
from sqlalchemy import inspect

from dreamd.store import Store
from tests.daemon_process import cli, sqlite_url, write_config
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
