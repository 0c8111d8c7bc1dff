"""Step rows and crashes: what Store.add_train_step's commit guarantees (docs/sql.md "train_steps").

Every optimizer step's rows (train_steps + step_examples) are one transaction. On PostgreSQL it
is one statement committed asynchronously (synchronous_commit off for that transaction only):
the server has the rows when the call returns, so the daemon dying loses nothing; a server crash
can lose the steps committed after the last synchronous commit, and only those (WAL is flushed
in order). Every train pass writes its 'train' phases row synchronously before a checkpoint can
be saved, so a checkpoint never holds a step whose row a crash could lose.

The server-crash tests run a PostgreSQL of their own (tests/test_faults.py private_pg) with
wal_writer_delay = 10 s and autovacuum off, so an asynchronous commit stays in the server's WAL
buffers (and unflushed) until something else writes or flushes them. `pg_ctl stop -m immediate`
is the crash: no shutdown checkpoint, the WAL buffers dropped. WAL the server already wrote
but did not flush survives that (the OS keeps it), unlike a power loss, so the flush before a
checkpoint is checked by WAL position (test_pg_steps_are_flushed_to_disk_before_...).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from dreamd.store import Store
from dreamd.train.checkpoint import complete_checkpoints, read_manifest
from tests.daemon_process import DaemonProcess, child_env, sqlite_url, store_rows, wait_until, write_config
from tests.test_faults import assert_lineage_consistent, pg_url, private_pg
from tests.test_store import scenario

__all__ = ["daemons", "pg_url", "private_pg", "setup_dir"]

ASYNC_WAL = "-c wal_writer_delay=10000 -c autovacuum=off"
"""Server options: an asynchronous commit is flushed ~10 s later (or by a later synchronous
commit), so a crash right after it loses it."""

METRICS = {"lr": 1e-5, "tokens": 64, "n_behavioral": 3, "n_general": 1, "wall_ms": 5.0, "tokens_per_s": 1e4}
STEPS = "SELECT t.id, t.step, t.status, COUNT(e.scenario_id) AS examples FROM train_steps t " \
        "LEFT JOIN step_examples e ON e.step_id = t.id GROUP BY t.id, t.step, t.status ORDER BY t.id"


def new_run(url: str) -> tuple[Store, int, int, list[int]]:
    store = Store.open(url)
    store.upgrade()
    run_id = store.start_run("durability", {}, "model", 0)
    cycle_id = store.start_cycle(run_id, 1, 1e-5, 0.25, 4)
    ids = [store.add_scenario(run_id, cycle_id, scenario(i), "accepted").id for i in range(4)]
    return store, run_id, cycle_id, ids


def test_pg_step_connection_broken_between_steps_is_replaced(pg_url):
    """add_train_step keeps its connection from step to step (no pool checkout, no pre-ping): a
    backend terminated in between (a failover, pg_terminate_backend) fails that call, which the
    retry repeats on a fresh connection; without retries the call fails and the next one works.
    Every step is stored once, with its examples."""
    store, run_id, cycle_id, ids = new_run(pg_url)
    store.retry_delay_s = 0.01
    killer = create_engine(pg_url, isolation_level="AUTOCOMMIT")

    def terminate_others() -> int:
        with killer.connect() as conn:
            return conn.execute(text("SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE "
                                     "datname = current_database() AND pid != pg_backend_pid()")).scalar()
    try:
        store.add_train_step(run_id, cycle_id, 0, METRICS, ids)
        assert terminate_others() >= 1
        store.transient_retries = 2
        store.add_train_step(run_id, cycle_id, 1, METRICS, ids)          # retried, stored once
        assert terminate_others() >= 1
        store.transient_retries = 0
        with pytest.raises(OperationalError):
            store.add_train_step(run_id, cycle_id, 2, METRICS, ids)
        store.add_train_step(run_id, cycle_id, 2, METRICS, ids)          # a fresh connection
    finally:
        store.close()
        killer.dispose()
    rows = store_rows(pg_url, STEPS)
    assert [(r["step"], r["status"], r["examples"]) for r in rows] == [(s, "active", 4) for s in range(3)], rows


def test_pg_step_connection_idle_between_cycles_is_checked_before_use(pg_url, monkeypatch):
    """Idle longer than STEP_CONNECTION_IDLE_S (the daemon slept between cycles), the step
    connection goes back to the pool, whose checkout pings it: a backend dropped meanwhile costs
    no failed call, even with no retries."""
    from dreamd.store import record

    monkeypatch.setattr(record, "STEP_CONNECTION_IDLE_S", 0.0)
    store, run_id, cycle_id, ids = new_run(pg_url)
    killer = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    try:
        store.add_train_step(run_id, cycle_id, 0, METRICS, ids)
        with killer.connect() as conn:
            assert conn.execute(text("SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE "
                                     "datname = current_database() AND pid != pg_backend_pid()")).scalar() >= 1
        time.sleep(0.01)
        store.add_train_step(run_id, cycle_id, 1, METRICS, ids)          # transient_retries is 0
    finally:
        store.close()
        killer.dispose()
    assert [r["step"] for r in store_rows(pg_url, STEPS)] == [0, 1]


@pytest.mark.parametrize("private_pg", [ASYNC_WAL], indirect=True)
def test_pg_server_crash_loses_only_the_steps_after_the_last_synchronous_commit(private_pg):
    """Steps 0-3, a synchronous commit (a phases row, as every train pass ends with), steps
    4-5, then the server crashes: steps 0-3 are there (the later synchronous commit flushed
    them), step 5 is gone (its commit was asynchronous: the cost saved), and what survives is a
    prefix (0..n-1), each step whole with its examples."""
    url, ctl = private_pg
    store, run_id, cycle_id, ids = new_run(url)
    for step in range(4):
        store.add_train_step(run_id, cycle_id, step, METRICS, ids)
    store.add_phase(run_id, cycle_id, "train", datetime.now(timezone.utc), 1.0)
    for step in range(4, 6):
        store.add_train_step(run_id, cycle_id, step, METRICS, ids)
    ctl("-m", "immediate", "stop")                       # crash: unflushed WAL is lost
    store.close()
    ctl("start")
    rows = store_rows(url, STEPS)
    steps = [r["step"] for r in rows]
    assert steps == list(range(len(steps))) and 4 <= len(steps) <= 5, rows
    assert all(r["status"] == "active" and r["examples"] == 4 for r in rows), rows
    assert store_rows(url, "SELECT name FROM phases") == [{"name": "train"}]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
@pytest.mark.slow
def test_sigkill_mid_train_then_restart_keeps_every_step_up_to_the_checkpoint(setup_dir, tmp_path, daemons,
                                                                              request, backend):
    """SIGKILL while cycle 2 trains (cycle 1 committed and checkpointed), then a restart: every
    step row the checkpoint holds is there once, the same row, still active; the rows written
    after it are superseded and those steps trained and written again; nothing twice."""
    state = tmp_path / "state"
    url = sqlite_url(state) if backend == "sqlite" else request.getfixturevalue("pg_url")
    config = write_config(setup_dir, tmp_path / "dreamd.toml", state, store__url=url,
                          mix__examples_per_cycle=16, checkpoint__keep_last=10)   # 4 steps a cycle
    d = DaemonProcess(config, state, tmp_path / "run.log", args=("--now", "--cycles", "3")).start()
    daemons.append(d)
    d.wait_ready()

    def second_step_of_cycle_2() -> bool:
        assert d.alive(), d.log_tail()
        return bool(store_rows(url, "SELECT id FROM train_steps WHERE step >= 5"))
    wait_until(second_step_of_cycle_2, 300, "cycle 2's second step", every=0.005)
    d.kill()
    before = {r["id"]: r for r in store_rows(url, STEPS)}
    ckpt_root = state / "checkpoints" / "run-1"
    held = read_manifest(complete_checkpoints(ckpt_root)[-1])["loop_state"]["step"]
    assert held == 4, f"killed after the checkpoint of cycle {held // 4}, not while cycle 2 trained"
    assert [r["step"] for r in before.values() if r["step"] < held] == list(range(held))
    assert any(r["step"] >= held for r in before.values())                     # killed mid-train

    again = DaemonProcess(config, state, tmp_path / "again.log", args=("--now", "--cycles", "1")).start()
    daemons.append(again)
    assert again.wait(300) == 0, again.log_tail()
    after = {r["id"]: r for r in store_rows(url, STEPS)}
    for step_id, row in before.items():
        assert after[step_id]["status"] == ("active" if row["step"] < held else "superseded"), (row, after[step_id])
    active = assert_lineage_consistent(url, ckpt_root)
    assert len(active) == 8
    redone = [r for r in active if r["step"] >= held]
    assert redone and all(r["id"] > max(before) for r in redone)                 # written again
    assert all(r["examples"] == 4 for r in after.values())
    per_step = store_rows(url, "SELECT step, COUNT(*) AS n FROM train_steps GROUP BY step")
    assert all(r["n"] == 1 for r in per_step if r["step"] < held), per_step


# Two cycles in a child process on PostgreSQL (the second stopped by SIGTERM's path after its
# first step, so both ways a checkpoint is saved run): after every add_train_step it notes the
# server's WAL insert position (at or past that step's commit), and when CheckpointDir.save
# starts, how far the WAL is flushed to disk. argv: config, store url, output json.
WAL_AT_SAVES = r"""
import json, sys
from sqlalchemy import create_engine, text
from dreamd.config_file import load_config
from dreamd.cycle import run_cycle
from dreamd.log import setup_logging
from dreamd.run import RunHooks, open_run
from dreamd.store.record import Store
from dreamd.train.checkpoint import CheckpointDir

config, url, out = sys.argv[1:4]
probe = create_engine(url, isolation_level="AUTOCOMMIT")
seen = {"step": None, "saves": []}

def lsn(which):
    with probe.connect() as conn:
        return conn.execute(text(f"SELECT (pg_current_wal_{which}_lsn() - '0/0')::bigint")).scalar()

add_train_step, save = Store.add_train_step, CheckpointDir.save

def noting(self, *args, **kwargs):
    step_id = add_train_step(self, *args, **kwargs)
    seen["step"] = lsn("insert")
    return step_id

def saving(self, *args, **kwargs):
    seen["saves"].append({"last_step_at": seen["step"], "flushed_to": lsn("flush")})
    return save(self, *args, **kwargs)

Store.add_train_step, CheckpointDir.save = noting, saving
setup_logging()
hooks = RunHooks()
parts, state = open_run(load_config(config), hooks)
run_cycle(parts, state)
hooks.should_stop = lambda: parts.trainer.step >= 3          # cycle 2 stops after one step
run_cycle(parts, state)
json.dump(seen, open(out, "w"))
"""


@pytest.mark.parametrize("private_pg", [ASYNC_WAL], indirect=True)
@pytest.mark.slow
def test_pg_steps_are_flushed_to_disk_before_their_checkpoint_is_saved(setup_dir, tmp_path, private_pg):
    """The guarantee itself: when a checkpoint's save starts (a committed cycle's, and a
    stopped one's), the server's WAL is flushed to disk past the commit of the last step it
    will hold, though each step was committed asynchronously: the synchronous commits between
    (the train pass's phases row) did it. With every commit asynchronous (server-wide
    synchronous_commit = off) this fails: the steps would sit in the OS cache at the save."""
    url, _ = private_pg
    state = tmp_path / "state"
    config = write_config(setup_dir, tmp_path / "dreamd.toml", state, store__url=url)    # 2 steps a cycle
    out = tmp_path / "wal.json"
    done = subprocess.run([sys.executable, "-c", WAL_AT_SAVES, str(config), url, str(out)],
                          env=child_env(), capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    saves = json.loads(out.read_text())["saves"]
    assert len(saves) == 2, saves
    assert all(s["last_step_at"] is not None and s["flushed_to"] >= s["last_step_at"] for s in saves), saves
    steps = store_rows(url, "SELECT t.step, c.status FROM train_steps t JOIN cycles c ON c.id = t.cycle_id "
                            "ORDER BY t.step")
    assert [(r["step"], r["status"]) for r in steps] == [(0, "committed"), (1, "committed"), (2, "stopped")]


# Runs one cycle in a child process that stops inside the named Store call (touching a marker
# file, then sleeping), so the test can crash the server and SIGKILL the child at that point:
# what a host losing power does to both. argv: config, method, marker.
HOLD_INSIDE = r"""
import sys, time
from pathlib import Path
from dreamd.config_file import load_config
from dreamd.cycle import run_cycle
from dreamd.log import setup_logging
from dreamd.run import RunHooks, open_run
from dreamd.store.record import Store

config, method, marker = sys.argv[1:4]

def holding(self, *args, **kwargs):
    Path(marker).touch()
    time.sleep(600)

setattr(Store, method, holding)
setup_logging()
parts, state = open_run(load_config(config), RunHooks())
run_cycle(parts, state)
raise SystemExit("the hold point was never reached")
"""


@pytest.mark.parametrize("private_pg", [ASYNC_WAL], indirect=True)
@pytest.mark.slow
def test_pg_host_crash_after_a_checkpoint_is_saved_keeps_the_steps_it_holds(setup_dir, tmp_path, daemons,
                                                                            private_pg):
    """The server crashes and the daemon dies with it (a host going down) after cycle 1's
    checkpoint is renamed into place, before its row: the steps it holds are there (their flush
    is checked above by WAL position), the checkpoint's row is not. A restart adds the row,
    resumes from the checkpoint and finishes cycle 2: steps 0..3 once each."""
    url, ctl = private_pg
    state = tmp_path / "state"
    config = write_config(setup_dir, tmp_path / "dreamd.toml", state, store__url=url)    # 2 steps a cycle
    marker = tmp_path / "held"
    child = subprocess.Popen([sys.executable, "-c", HOLD_INSIDE, str(config), "add_checkpoint", str(marker)],
                             env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: marker.exists() or child.poll() is not None, 300, "the checkpoint's row", every=0.05)
        assert marker.exists(), child.communicate()[1][-3000:]
        ctl("-m", "immediate", "stop")
        child.send_signal(signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate()
    ckpt_root = state / "checkpoints" / "run-1"
    assert read_manifest(complete_checkpoints(ckpt_root)[-1])["loop_state"]["step"] == 2
    ctl("start")
    time.sleep(0.5)
    assert [r["step"] for r in store_rows(url, "SELECT step FROM train_steps ORDER BY step")] == [0, 1]

    d = DaemonProcess(config, state, tmp_path / "run.log", args=("--now", "--cycles", "1")).start()
    daemons.append(d)
    assert d.wait(300) == 0, d.log_tail()
    assert len(assert_lineage_consistent(url, ckpt_root)) == 4
    cycles = store_rows(url, "SELECT number, status FROM cycles ORDER BY id")
    assert [c["number"] for c in cycles if c["status"] == "committed"] == [1, 2], cycles

