"""The SQL store on a real SQLite file and (with DREAMD_TEST_PG_URL) a real PostgreSQL server.

    DREAMD_TEST_PG_URL=postgresql+psycopg://postgres@127.0.0.1:5432/test .venv/bin/pytest tests/test_store.py
"""

from __future__ import annotations

import math
import re
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, inspect, select, text
from sqlalchemy.exc import IntegrityError

from dreamd.dream.scenario import Scenario, ScenarioKind
from dreamd.errors import UsageError
from dreamd.store import Store, db, head_revision
from dreamd.store.tables import PIVOTED_METRICS, SCENARIO_KINDS, Base, TrainStep
from dreamd.store.tables import ScenarioRow

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "sql.md"
TABLES = {"runs", "cycles", "scenarios", "train_steps", "step_examples", "evals", "decisions",
          "checkpoints", "events", "phases"}
VIEWS = {"cycle_summary", "metric_trend"}


def scenario(i: int, kind: str = "accept", text_: str | None = None) -> Scenario:
    body = text_ or f"Please rename variable x{i} to count{i} in the loop."
    return Scenario(kind=ScenarioKind(kind), source="template",
                    messages=[{"role": "user", "content": body}], target=f"Done: x{i} -> count{i}.",
                    spec="follow sound directions", meta={"i": i})


def step_metrics(lr: float = 1e-5, loss: float = 2.0, n_behavioral: int = 3, n_general: int = 1,
                 **more: object) -> dict[str, object]:
    return {"lr": lr, "loss": loss, "tokens": 100, "n_behavioral": n_behavioral,
            "n_general": n_general, "wall_ms": 50.0, "tokens_per_s": 2000.0, "grad_norm": 0.5,
            "pad_fraction": 0.1, "peak_mem_bytes": 3 * 2**30, "update_landed": 0.9, **more}


# ---- migrations ------------------------------------------------------------------------------


def test_migrations_from_empty_create_tables_and_views(store_url: str) -> None:
    store = Store.open(store_url)
    assert store.current_revision() is None
    result = store.upgrade()
    assert (result.from_revision, result.to_revision) == (None, head_revision())
    assert result.backup is None
    insp = inspect(store.engine)
    assert TABLES <= set(insp.get_table_names())
    assert VIEWS <= set(insp.get_view_names())
    again = store.upgrade()  # nothing pending: no backup, same revision
    assert (again.from_revision, again.backup) == (head_revision(), None)
    store.close()


def test_models_match_migrations(store: Store) -> None:
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}),
                                Base.metadata)
    assert diff == []


def test_downgrade_upgrade_round_trip(store: Store) -> None:
    run_id = store.start_run("r", "{}", "/m", 0)
    store.downgrade("base")
    assert store.current_revision() is None
    assert not (TABLES | VIEWS) & set(inspect(store.engine).get_table_names())
    assert not VIEWS & set(inspect(store.engine).get_view_names())
    store.upgrade()
    assert store.current_revision() == head_revision()
    assert store.start_run("r", "{}", "/m", 0) == run_id  # fresh tables, ids restart
    assert store.cycle_summary(run_id) == []


def test_concurrent_first_upgrades(store_url: str) -> None:
    # Three daemons starting at once on a new store: one migrates, the others wait for its
    # lock (BEGIN IMMEDIATE on SQLite, an advisory lock on PostgreSQL) and find nothing to do.
    code = "import sys; from dreamd.store import Store; Store.open(sys.argv[1]).upgrade()"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", code, store_url], env=env,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    errors = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    store = Store.open(store_url)
    assert store.current_revision() == head_revision()
    store.close()


def test_scenario_kinds_match_the_check_constraint() -> None:
    assert set(SCENARIO_KINDS) == {k.value for k in ScenarioKind}


# A second revision in the same style a real one must have: drop the views, batch-alter a table
# they read (SQLite recreates it), recreate the views.
REVISION_0002 = '''
import importlib.util
from pathlib import Path
import sqlalchemy as sa
from alembic import op

revision = "9999"
down_revision = HEAD
branch_labels = None
depends_on = None

first = Path(__file__).with_name("0001_initial_schema.py")
spec = importlib.util.spec_from_file_location("r0001", first)
r0001 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(r0001)


def upgrade():
    op.execute("DROP VIEW metric_trend")
    op.execute("DROP VIEW cycle_summary")
    with op.batch_alter_table("train_steps") as batch:
        batch.add_column(sa.Column("note", sa.Text(), nullable=True))
    op.execute(r0001.CYCLE_SUMMARY)
    op.execute(r0001.METRIC_TREND)


def downgrade():
    with op.batch_alter_table("train_steps") as batch:
        batch.drop_column("note")
'''


def with_extra_revision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str) -> None:
    """Point the store at a copy of the migrations plus `source` as revision 0002."""
    migrations = tmp_path / "migrations"
    shutil.copytree(db.MIGRATIONS_DIR, migrations, ignore=shutil.ignore_patterns("__pycache__"))
    (migrations / "versions" / "9999_extra.py").write_text(source.replace("HEAD", repr(head_revision())))
    monkeypatch.setattr(db, "MIGRATIONS_DIR", migrations)


def test_sqlite_backup_and_batch_migration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'dreamd.sqlite'}"
    store = Store.open(url)
    store.upgrade()
    run_id = store.start_run("r", "{}", "/m", 0)
    cycle_id = store.start_cycle(run_id, 1, 1e-5, 0.25, 4)
    sid, _ = store.add_scenario(run_id, cycle_id, scenario(1), "accepted")
    store.add_train_step(run_id, cycle_id, 1, step_metrics(), [sid])
    head = head_revision()
    with_extra_revision(tmp_path, monkeypatch, REVISION_0002)

    result = store.upgrade()
    assert (result.from_revision, result.to_revision) == (head, "9999")
    assert result.backup == tmp_path / f"dreamd.sqlite.bak-{head}"
    with sqlite3.connect(result.backup) as bak:  # the copy holds the rows (incl. WAL frames)
        assert bak.execute("SELECT version_num FROM alembic_version").fetchall() == [(head,)]
        assert bak.execute("SELECT COUNT(*) FROM step_examples").fetchone() == (1,)
    assert "note" in {c["name"] for c in inspect(store.engine).get_columns("train_steps")}
    assert store.cycle_summary(run_id)[0]["steps"] == 1  # views work on the recreated table
    with store.engine.connect() as conn:  # foreign keys back on after the migration
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    assert store.upgrade().backup is None  # nothing pending, no new copy
    store.close()


def test_failed_migration_leaves_the_store_as_it_was(store: Store, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    head = head_revision()
    with_extra_revision(tmp_path, monkeypatch, REVISION_0002.replace(
        "    op.execute(r0001.CYCLE_SUMMARY)", "    raise RuntimeError('half done')"))
    with pytest.raises(RuntimeError, match="half done"):
        store.upgrade()
    assert store.current_revision() == head
    insp = inspect(store.engine)
    assert "note" not in {c["name"] for c in insp.get_columns("train_steps")}
    assert VIEWS <= set(insp.get_view_names())  # the dropped views are back


def test_upgrade_refuses_a_database_with_foreign_tables(tmp_path: Path) -> None:
    path = tmp_path / "other.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER)")
    store = Store.open(f"sqlite:///{path}")
    with pytest.raises(UsageError, match="has tables \\(invoices\\) but no dreamd schema"):
        store.upgrade()
    store.close()


# ---- connection settings ---------------------------------------------------------------------


def test_sqlite_pragmas(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'new' / 'dir' / 'db.sqlite'}", busy_timeout_ms=1234)
    store.upgrade()
    with store.engine.connect() as conn:
        pragma = {p: conn.exec_driver_sql(f"PRAGMA {p}").scalar()
                  for p in ("journal_mode", "foreign_keys", "synchronous", "busy_timeout")}
    assert pragma == {"journal_mode": "wal", "foreign_keys": 1, "synchronous": 1,
                      "busy_timeout": 1234}
    store.close()


def test_foreign_keys_are_enforced(store: Store) -> None:
    run_id = store.start_run("r", "{}", "/m", 0)
    with pytest.raises(IntegrityError):
        store.start_cycle(run_id + 99, 1, 1e-5, 0.25, 4)
    cycle_id = store.start_cycle(run_id, 1, 1e-5, 0.25, 4)
    with pytest.raises(IntegrityError):  # unknown scenario: the step row is rolled back with it
        store.add_train_step(run_id, cycle_id, 1, step_metrics(), [12345])
    with store.read() as s:
        assert s.scalar(select(func.count()).select_from(TrainStep)) == 0


def test_read_then_write_waits_instead_of_sqlite_busy(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    store = Store.open(f"sqlite:///{path}", busy_timeout_ms=10_000)
    store.upgrade()
    run_id = store.start_run("r", "{}", "/m", 0)

    # The trap (sqlite.org/isolation.html, SQLITE_BUSY_SNAPSHOT): a deferred transaction reads, another connection commits a write,
    # the first one's write fails at once with SQLITE_BUSY although busy_timeout is 10 s.
    a = sqlite3.connect(path, isolation_level=None, timeout=10)
    b = sqlite3.connect(path, isolation_level=None, timeout=10)
    a.execute("BEGIN")
    a.execute("SELECT COUNT(*) FROM events").fetchone()
    b.execute("INSERT INTO events (run_id, kind, detail) VALUES (?, 'b', '')", (run_id,))
    t0 = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        a.execute("INSERT INTO events (run_id, kind, detail) VALUES (?, 'a', '')", (run_id,))
    assert time.monotonic() - t0 < 1.0  # immediate, not after the 10 s timeout
    a.execute("ROLLBACK")
    a.close()
    b.close()

    # The store's write transactions start with BEGIN IMMEDIATE: the second writer waits for
    # the first to commit, and both read-then-write transactions succeed.
    other = Store.open(f"sqlite:///{path}", busy_timeout_ms=10_000)
    first_has_read = threading.Event()
    waited: list[float] = []

    def second_writer() -> None:
        first_has_read.wait()
        t = time.monotonic()
        other.add_event(run_id, "second", {})
        waited.append(time.monotonic() - t)

    thread = threading.Thread(target=second_writer)
    thread.start()
    with store.session() as s:
        s.execute(text("SELECT COUNT(*) FROM events")).scalar()
        first_has_read.set()
        time.sleep(0.4)  # the other writer is now blocked on the lock
        s.execute(text("INSERT INTO events (run_id, kind, detail) VALUES (:r, 'first', '')"),
                  {"r": run_id})
    thread.join(timeout=15)
    assert waited and 0.3 < waited[0] < 5
    with store.read() as s:
        kinds = s.execute(text("SELECT kind FROM events WHERE kind IN ('first', 'second') "
                               "ORDER BY id")).scalars().all()
    assert kinds == ["first", "second"]
    other.close()
    store.close()


def test_unreachable_postgres_is_one_line_store_unavailable() -> None:
    """Exit 75 (systemd restarts: a server that is down comes back), not 2 (never restarted)."""
    from dreamd.errors import StoreUnavailable

    url = "postgresql+psycopg://dreamd:s3cret@127.0.0.1:1/nowhere"
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable) as err:
        Store.open(url, retries=2, retry_delay_s=0.05)
    elapsed = time.monotonic() - t0
    message = str(err.value)
    assert "\n" not in message and "s3cret" not in message and err.value.exit_code == 75
    redacted = "postgresql+psycopg://dreamd:***@127.0.0.1:1/nowhere"
    assert message.startswith(f"store {redacted} failed to connect: ")
    assert message.endswith("check that the server runs and accepts connections; dreamd resumes when restarted")
    assert 0.15 <= elapsed < 10  # two backoff sleeps: 0.05 + 0.1 s


@pytest.mark.parametrize("url, needle", [
    ("not a url", "is not a SQLAlchemy URL"),
    ("mysql://u@h/db", "uses 'mysql'"),
])
def test_bad_store_urls(url: str, needle: str) -> None:
    with pytest.raises(UsageError, match=re.escape(needle)):
        Store.open(url)


# ---- recording -------------------------------------------------------------------------------


def test_run_lifecycle_and_utc_times(store: Store) -> None:
    before = datetime.now(timezone.utc)
    run_id = store.start_run("nightly", '{"train": {"lr": 1e-05}}', Path("/models/x"), 7)
    run = store.find_resumable_run("nightly")
    assert run is not None and run.id == run_id and run.config_json == {"train": {"lr": 1e-05}}
    assert run.started_at.tzinfo == timezone.utc
    slack = timedelta(seconds=5)
    assert before - slack < run.started_at < datetime.now(timezone.utc) + slack
    store.set_paused(run_id, True)
    assert store.find_resumable_run("nightly").paused is True
    store.set_run_status(run_id, "stopped")
    assert store.find_resumable_run("nightly").id == run_id  # stopped runs resume
    store.set_run_status(run_id, "finished")
    assert store.find_resumable_run("nightly").id == run_id  # the next `dreamd run` goes on
    store.set_run_status(run_id, "failed")
    assert store.find_resumable_run("nightly") is None
    with pytest.raises(ValueError, match="naive datetime"):
        store.add_phase(run_id, None, "wake", datetime.now(), 1.0)
    with pytest.raises(ValueError, match="run status"):
        store.set_run_status(run_id, "done")


def test_every_event_detail_is_a_json_object(store: Store) -> None:
    """events.detail mixed prose ('pause requested by SIGUSR1 at ...') and JSON; the store now
    takes a mapping only, so every kind reads back with one JSON parser."""
    import json

    run_id = store.start_run("events", "{}", Path("/models/x"), 0)
    store.add_event(run_id, "pause", {"requested_by": "SIGUSR1", "changed": True})
    with pytest.raises(TypeError, match="events.detail must be a mapping"):
        store.add_event(run_id, "error", "disk full")
    with store.read() as s:
        details = s.execute(text("SELECT detail FROM events WHERE run_id = :r"), {"r": run_id}).scalars().all()
    assert [json.loads(d) for d in details] == [{"requested_by": "SIGUSR1", "changed": True}]


def test_exact_duplicate_rule(store: Store) -> None:
    run_id = store.start_run("r", "{}", "/m", 0)
    cycle_id = store.start_cycle(run_id, 1, 1e-5, 0.25, 4)
    first = store.add_scenario(run_id, cycle_id, scenario(1), "accepted")
    assert first.duplicate_of is None
    assert store.hash_exists(run_id, scenario(1).content_hash) == first.id
    # Same content up to case and whitespace: the same normalised hash.
    copy = scenario(1, text_="please  RENAME variable x1 to count1 in the loop.")
    dup = store.add_scenario(run_id, cycle_id, copy, "accepted", temperature=0.9)
    assert dup.duplicate_of == first.id and dup.id != first.id
    rejected_dup = store.add_scenario(run_id, cycle_id, scenario(1), "rejected", "lint: too short")
    probe = store.add_scenario(run_id, None, scenario(1), "probe")
    with store.read() as s:
        rows = {r.id: r for r in s.scalars(select(ScenarioRow))}
    assert rows[first.id].content_hash == scenario(1).content_hash
    assert (rows[dup.id].status, rows[dup.id].content_hash, rows[dup.id].duplicate_of) == \
        ("rejected", None, first.id)
    assert rows[dup.id].reject_reason == f"duplicate: exact copy of scenario {first.id}"
    assert rows[rejected_dup.id].reject_reason.endswith("(also: lint: too short)")
    assert (rows[probe.id].status, rows[probe.id].duplicate_of) == ("probe", first.id)
    assert rows[dup.id].temperature == 0.9 and rows[dup.id].messages_json == copy.messages
    with pytest.raises(ValueError, match="reject_reason"):
        store.add_scenario(run_id, cycle_id, scenario(2), "rejected")
    assert store.hash_exists(run_id, "0" * 64) is None


def test_active_steps_unique_superseded_allowed(store: Store) -> None:
    run_id = store.start_run("r", "{}", "/m", 0)
    c1 = store.start_cycle(run_id, 1, 1e-5, 0.25, 4)
    store.add_train_step(run_id, c1, 1, step_metrics(), [])
    store.finish_cycle(c1, "committed")
    store.add_checkpoint(run_id, c1, 1, "/ck/1", "a" * 64, 10)
    c2 = store.start_cycle(run_id, 2, 1e-5, 0.25, 4)
    for step in (2, 3):
        store.add_train_step(run_id, c2, step, step_metrics(), [])
    store.add_checkpoint(run_id, c2, 3, "/ck/3", "b" * 64, 10)
    with pytest.raises(IntegrityError):
        store.add_train_step(run_id, c2, 2, step_metrics(), [])

    # Crash, resume from the checkpoint at step 1: steps 2-3 and cycle 2 leave the lineage.
    assert tuple(store.supersede_after(run_id, 1)) == (2, 1, 1)
    assert store.last_committed_cycle(run_id).id == c1
    c2b = store.start_cycle(run_id, 2, 1e-5, 0.25, 4)
    for step in (2, 3):
        store.add_train_step(run_id, c2b, step, step_metrics(), [])
    with store.read() as s:
        rows = s.execute(select(TrainStep.step, TrainStep.status).order_by(TrainStep.id)).all()
    assert [tuple(r) for r in rows] == [(1, "active"), (2, "superseded"), (3, "superseded"),
                                        (2, "active"), (3, "active")]
    attempts = [(r["number"], r["attempt"], r["status"]) for r in store.cycle_summary(run_id)]
    assert attempts == [(1, 0, "committed"), (2, 0, "superseded"), (2, 1, "running")]
    assert [c.path for c in store.complete_checkpoints(run_id)] == ["/ck/1"]
    with pytest.raises(ValueError, match="already committed"):
        store.start_cycle(run_id, 1, 1e-5, 0.25, 4)
    with pytest.raises(ValueError, match="unknown \\['losss'\\]"):
        store.add_train_step(run_id, c2b, 4, {**step_metrics(), "losss": 1.0}, [])


# ---- views and documented queries --------------------------------------------------------------


@dataclass
class CyclePlan:
    number: int
    attempt: int
    status: str
    lr: float
    kinds: dict[str, int]
    rejected: int
    duplicates: int
    batches: list[tuple[int, int, float, bool]] = field(default_factory=list)
    """(n_behavioral, n_general, loss, skipped) per step."""
    evals: dict[str, float] = field(default_factory=dict)


def populate(store: Store) -> tuple[int, list[CyclePlan], dict[str, float]]:
    """A run of four cycle attempts through the public API: cycle 2's first attempt is rolled
    back and re-run; cycle 3 has one skipped (NaN) all-behavioural step. 15 steps per cycle, so
    step 40 is in cycle 3."""
    run_id = store.start_run("demo", '{"train": {"lr": 1e-05}}', "/models/tiny", 0)
    baseline = {"forget.perplexity": 20.0, "forget.arith_em": 0.5, "q1.balanced": 0.4}
    store.add_evals(run_id, None, baseline)
    store.add_event(None, "daemon_start", {"pid": 4242})
    store.add_event(run_id, "start", {"cycles": 0})
    kinds = {"accept": 20, "pushback": 20, "derail": 5, "general": 15}
    plans = [
        CyclePlan(1, 0, "committed", 1e-5, kinds, 3, 1,
                  evals={"forget.perplexity": 20.5, "forget.arith_em": 0.5, "q1.balanced": 0.5,
                         "q1.listen_rate": 0.6, "q1.pushback_rate": 0.4, "q1.sycophancy": 0.1}),
        CyclePlan(2, 0, "rolled_back", 3e-5, kinds, 2, 1,
                  evals={"forget.perplexity": 35.0, "forget.arith_em": 0.2}),
        CyclePlan(2, 1, "committed", 1e-5, kinds, 3, 0,
                  evals={"forget.perplexity": 21.0, "forget.arith_em": 0.55, "q1.balanced": 0.6}),
        CyclePlan(3, 0, "running", 1e-5, {"accept": 20, "pushback": 20, "derail": 3, "self": 3,
                                          "general": 14}, 1, 1,
                  evals={"forget.perplexity": 20.0, "forget.arith_em": 0.6, "q1.balanced": 0.7}),
    ]
    step, serial, first_ids = 0, 0, []
    for plan in plans:
        cycle_id = store.start_cycle(run_id, plan.number, plan.lr, 0.25, 60, temperature=0.9)
        started = datetime.now(timezone.utc)
        store.add_phase(run_id, cycle_id, "dream", started, 2.5, 80 * 2**30, 70 * 2**30)
        behavioural, general = [], []
        for kind, n in plan.kinds.items():
            for _ in range(n):
                serial += 1
                saved = store.add_scenario(run_id, cycle_id, scenario(serial, kind), "accepted")
                (general if kind == "general" else behavioural).append(saved.id)
                first_ids.append(saved.id)
        for r in range(plan.rejected):
            serial += 1
            reason = "lint: narrates an inner state" if r % 2 == 0 else "kind: direction is sound"
            store.add_scenario(run_id, cycle_id, scenario(serial, "pushback"), "rejected", reason)
        for _ in range(plan.duplicates):
            dup = store.add_scenario(run_id, cycle_id, scenario(1), "accepted")
            assert dup.duplicate_of == first_ids[0]
        store.add_phase(run_id, cycle_id, "screen", started, 0.5)
        if plan.number == 2 and plan.attempt == 1:
            step = 15  # resumed from the checkpoint after cycle 1
        while behavioural or general:
            step += 1
            nb, ng = (4, 0) if len(behavioural) > 3 * len(general) else (3, 1)
            batch = [behavioural.pop() for _ in range(nb)] + [general.pop() for _ in range(ng)]
            skipped = plan.number == 3 and nb == 4
            worse = 1.0 if plan.status == "rolled_back" else 0.0
            loss = math.nan if skipped else 3.0 - 0.01 * step + worse
            store.add_train_step(run_id, cycle_id, step,
                                 step_metrics(plan.lr, loss, nb, ng, skipped=skipped), batch)
            plan.batches.append((nb, ng, loss, skipped))
        store.add_phase(run_id, cycle_id, "train", started, 30.0, tokens_per_s=2000.0)
        store.add_evals(run_id, cycle_id, plan.evals, {"forget.arith_em": {"n": 32}})
        if plan.status == "rolled_back":
            store.add_decision(run_id, cycle_id, "rollback", "perplexity rose 75% (> 10%)",
                               {"lr": 3e-5, "general_share": 0.25},
                               {"lr": 1e-5, "general_share": 0.4},
                               {"forget.perplexity": 35.0})
            store.finish_cycle(cycle_id, "rolled_back", error="forgetting: perplexity +75%")
            assert tuple(store.supersede_after(run_id, 15)) == (15, 0, 0)
        elif plan.status == "committed":
            store.add_decision(run_id, cycle_id, "keep", "metrics within bounds",
                               {"lr": plan.lr}, {"lr": plan.lr})
            store.add_checkpoint(run_id, cycle_id, step, f"/ck/{step}", "c" * 64, 5 * 10**9)
            store.finish_cycle(cycle_id, "committed")
    store.set_paused(run_id, True)
    store.add_event(run_id, "pause", {"requested_by": "SIGUSR1"})
    return run_id, plans, baseline


def test_cycle_summary_numbers(store: Store) -> None:
    run_id, plans, _ = populate(store)
    rows = store.cycle_summary(run_id)
    assert [(r["number"], r["attempt"], r["status"]) for r in rows] == \
        [(p.number, p.attempt, p.status) for p in plans]
    for row, plan in zip(rows, plans):
        trained = [b for b in plan.batches if not b[3]]
        active = 0 if plan.status == "rolled_back" else len(plan.batches)
        expected = {
            "steps": active,
            "superseded_steps": len(plan.batches) - active,
            "skipped_steps": sum(b[3] for b in plan.batches),
            **{f"n_{k}": plan.kinds.get(k, 0) for k in SCENARIO_KINDS},
            "n_rejected": plan.rejected + plan.duplicates,
            "n_duplicate": plan.duplicates,
            "lr": plan.lr,
            "planned_general_share": 0.25,
            "tokens": 100 * len(plan.batches),
            "seconds": 33.0,
        }
        assert {k: row[k] for k in expected} == expected
        share = sum(b[1] for b in trained) / sum(b[0] + b[1] for b in trained)
        assert row["general_share"] == pytest.approx(share)
        assert row["mean_loss"] == pytest.approx(sum(b[2] for b in trained) / len(trained))
        for column, metric in PIVOTED_METRICS.items():
            assert row[column] == plan.evals.get(metric), column
        assert row["started_at"].tzinfo == timezone.utc
        assert (row["finished_at"] is None) == (plan.status == "running")
    # Cycle 3's skipped step trained 4 behavioural, 0 general: left out, the share stays 1/4.
    assert rows[3]["general_share"] == pytest.approx(0.25)


def test_metric_trend_follows_the_lineage(store: Store) -> None:
    run_id, plans, baseline = populate(store)
    trend = store.metric_trend(run_id, "forget.perplexity")
    lineage = [(None, baseline["forget.perplexity"])] + \
        [(p.number, p.evals["forget.perplexity"]) for p in plans if p.status != "rolled_back"]
    assert [(r["cycle"], r["value"]) for r in trend] == lineage
    previous = [None] + [v for _, v in lineage[:-1]]
    assert [r["previous"] for r in trend] == previous
    deltas = [b - a for (_, a), (_, b) in zip(lineage, lineage[1:])]
    assert [r["delta"] for r in trend][1:] == pytest.approx(deltas)
    assert trend[0]["delta"] is None
    balanced = store.metric_trend(run_id, "q1.balanced")
    assert [(r["cycle"], r["value"]) for r in balanced] == \
        [(None, 0.4), (1, 0.5), (2, 0.6), (3, 0.7)]


def documented_queries(dialect: str) -> list[str]:
    """The ```sql blocks of docs/sql.md that run on `dialect` (untagged blocks run on both)."""
    blocks = re.findall(r"^```sql([^\n]*)\n(.*?)^```", DOCS.read_text(), flags=re.S | re.M)
    return [body for tag, body in blocks if tag.strip() in ("", dialect)]


def test_docs_have_queries_for_both_backends() -> None:
    sqlite, postgres = documented_queries("sqlite"), documented_queries("postgresql")
    assert len(sqlite) >= 20 and len(sqlite) == len(postgres)
    assert any("step = 40" in q for q in sqlite)


def test_documented_queries_return_rows(store: Store) -> None:
    run_id, _, _ = populate(store)
    assert run_id == 1  # the docs use run 1
    queries = documented_queries(store.dialect)
    with store.read() as s:
        for query in queries:
            rows = s.execute(text(query)).all()
            assert rows, f"no rows from documented query:\n{query}"
        step_40 = s.execute(text(queries[2])).all()
    assert len(step_40) == 4  # a batch of four scenarios


def test_run_claim_survives_its_backend_being_terminated(store_url) -> None:
    """A PostgreSQL restart or pg_terminate_backend drops the advisory lock with the session:
    check() takes it again (retrying like every store call) and others are still refused."""
    if not store_url.startswith("postgresql"):
        pytest.skip("the advisory lock is PostgreSQL's; SQLite's flock cannot be dropped from outside")
    from sqlalchemy import text as sql

    from dreamd.store.claim import RunClaim

    mine, other = Store.open(store_url), Store.open(store_url)
    mine.upgrade()
    mine.transient_retries, mine.retry_delay_s = 3, 0.05
    claim = RunClaim(mine, "claimed")
    claim._acquire()
    backend = claim._conn.execute(sql("SELECT pg_backend_pid()")).scalar()
    with other.engine.connect() as conn:
        conn.execute(sql("SELECT pg_terminate_backend(:p)"), {"p": backend})
        conn.commit()
    from sqlalchemy.exc import OperationalError

    real, failures = RunClaim._acquire, []

    def flaky(self):  # the killer strikes again while the lock is being taken back
        if not failures:
            failures.append(1)
            raise OperationalError("SELECT pg_try_advisory_lock", {}, Exception("server closed the connection"))
        return real(self)

    RunClaim._acquire = flaky
    try:
        claim.check()  # the lock was gone with the session; taken again, after one retry
    finally:
        RunClaim._acquire = real
    assert failures == [1]
    with pytest.raises(UsageError, match="is being trained by another dreamd"):
        RunClaim(other, "claimed")._acquire()
    claim.release()
    RunClaim(other, "claimed")._acquire()  # released: free for the next one
    mine.close(), other.close()
