"""Recording a run: the rows the cycle writes, and the summaries people read.

Every write is its own short transaction, committed when the call returns, so a crash of the
process loses at most the call in progress (a committed SQLite WAL transaction survives SIGKILL).
One exception, for speed: on PostgreSQL a step's rows (add_train_step) are committed
asynchronously, so a crash of the *server* can lose the steps after the last synchronous commit
(docs/sql.md "train_steps"). Reads use read-only transactions that never wait for the writer.

    store = Store.open(cfg.store_url, cfg.store.busy_timeout_ms, cfg.store.connect_retries)
    store.upgrade()
    run = store.find_resumable_run(cfg.run.name)
    run_id = run.id if run else store.start_run(cfg.run.name, cfg.resolved_json(), path, seed)
    cycle_id = store.start_cycle(run_id, number=1, lr=1e-5, general_share=0.25, n_examples=24)
    sid, duplicate_of = store.add_scenario(run_id, cycle_id, scenario, "accepted")
    store.add_train_step(run_id, cycle_id, step=1, metrics={...}, scenario_ids=[sid, ...])
    store.finish_cycle(cycle_id, "committed")
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from contextlib import suppress
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import Connection, Integer, bindparam, func, insert, literal_column, or_, select, text, true, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import DBAPIError

import dreamd
from dreamd.store.db import retry_transient
from dreamd.store.scenarios import ScenarioRecords, check_value
from dreamd.store.tables import (
    CHECKPOINT_STATUSES,
    CYCLE_STATUSES,
    RUN_STATUSES,
    Checkpoint,
    Cycle,
    Decision,
    Eval,
    Event,
    Phase,
    RunRow,
    StepExample,
    TrainStep,
    UTCDateTime,
    utcnow,
)

# train_steps columns a step's metrics may fill; the first six are required.
STEP_REQUIRED = ("lr", "tokens", "n_behavioral", "n_general", "wall_ms", "tokens_per_s")
STEP_OPTIONAL = ("loss", "grad_norm", "pad_fraction", "peak_mem_bytes", "update_landed", "skipped")


_STEP_INSERT = insert(TrainStep).returning(TrainStep.id)
_EXAMPLE_INSERT = insert(StepExample)


def _pg_step_sql() -> str:
    """PostgreSQL: a step's rows in ONE statement, run as its own transaction (autocommit): the
    train_steps row, its step_examples rows (data-modifying CTEs) and, for that transaction
    only, asynchronous commit (set_config(..., is_local => true)); returns the step id. Built
    with Core from the tables and compiled once to psycopg's SQL text (%(name)s parameters,
    every column bound): add_train_step runs it on the driver connection itself, as SQLAlchemy's
    execution layer cost as much again as the driver. One round trip on the held connection,
    where there were five (the pool's pre-ping, BEGIN, two INSERTs, COMMIT)."""
    from sqlalchemy.dialects.postgresql.psycopg import dialect

    cols = ("run_id", "cycle_id", "step", "status", "created_at", *STEP_REQUIRED, *STEP_OPTIONAL)
    setting = func.set_config(literal_column("'synchronous_commit'"), literal_column("'off'"), true())
    async_commit = select(setting.label("value")).cte("async_commit")
    step = insert(TrainStep).values({c: bindparam(c) for c in cols}).returning(TrainStep.id).cte("step")
    examples = insert(StepExample).from_select(
        ["step_id", "scenario_id"],
        select(step.c.id, func.unnest(bindparam("scenario_ids", type_=ARRAY(Integer))))).cte("examples")
    query = select(step.c.id).select_from(step.join(async_commit, true())).add_cte(examples)
    return str(query.compile(dialect=dialect()))


_PG_STEP_SQL = _pg_step_sql()
STEP_CONNECTION_IDLE_S = 30.0
"""add_train_step keeps its connection while steps come at least this often (_step_connection)."""
_STEP_DEFAULTS = {**dict.fromkeys(STEP_OPTIONAL), "skipped": False, "status": "active"}


def _pg_execute(conn: Connection, params: dict[str, Any]) -> int:
    """_PG_STEP_SQL on `conn`'s psycopg connection; a driver error is raised as SQLAlchemy's
    (OperationalError, IntegrityError, ...), as every other store call raises it, so retries
    and the one-line store failure see no difference."""
    import psycopg

    try:
        return conn.connection.driver_connection.execute(_PG_STEP_SQL, params).fetchone()[0]
    except psycopg.Error as exc:
        raise DBAPIError.instance(_PG_STEP_SQL, params, exc, psycopg.Error) from None


class Superseded(NamedTuple):
    steps: int
    cycles: int
    checkpoints: int


@retry_transient
class Store(ScenarioRecords):
    """The dreamd store: `Database` (connection, migrations), the scenarios' rows
    (store/scenarios.py) and the rest of the recording API."""

    _steps: Connection | None = None
    """add_train_step's own connection (_step_connection), and when it was last used."""
    _steps_used: float = 0.0

    # ---- runs --------------------------------------------------------------------------------
    def start_run(self, name: str, config_json: str | Mapping[str, Any], model_path: str | Path,
                  seed: int) -> int:
        """A new run row (status 'running'); returns its id. `config_json`: the resolved
        config, as JSON text (Config.resolved_json()) or a dict."""
        config = json.loads(config_json) if isinstance(config_json, str) else dict(config_json)
        with self.session() as s:
            run = RunRow(name=name, config_json=config, model_path=str(model_path), seed=seed,
                      dreamd_version=dreamd.__version__)
            s.add(run)
            s.flush()
            return run.id

    def find_resumable_run(self, name: str) -> RunRow | None:
        """The newest run of this name that can go on, or None: 'running' (crashed), 'stopped'
        or 'finished' (its last process did all run.cycles; the next `dreamd run` continues
        the same weights). A 'failed' run is not resumed: change run.name to start afresh."""
        with self.read() as s:
            return s.scalars(select(RunRow)
                             .where(RunRow.name == name, RunRow.status.in_(("running", "stopped", "finished")))
                             .order_by(RunRow.id.desc()).limit(1)).first()

    def get_run(self, run_id: int) -> RunRow | None:
        with self.read() as s:
            return s.get(RunRow, run_id)

    def latest_run(self, name: str | None = None) -> RunRow | None:
        """The newest run of this name, any status (the newest run at all when None), or None."""
        query = select(RunRow).order_by(RunRow.id.desc()).limit(1)
        with self.read() as s:
            return s.scalars(query if name is None else query.where(RunRow.name == name)).first()

    def set_run_process(self, run_id: int, host: str, pid: int) -> None:
        """The process that takes the run up now (start or resume): shown by the fleet view."""
        with self.session() as s:
            s.execute(update(RunRow).where(RunRow.id == run_id).values(host=host, pid=pid))

    def set_run_status(self, run_id: int, status: str) -> None:
        """'finished' and 'failed' stamp finished_at; 'running' (resumed) clears it."""
        check_value(status, RUN_STATUSES, "run status")
        finished = utcnow() if status in ("finished", "failed") else None
        with self.session() as s:
            s.execute(update(RunRow).where(RunRow.id == run_id)
                      .values(status=status, finished_at=finished))

    def run_paused(self, run_id: int) -> bool:
        with self.read() as s:
            return bool(s.scalar(select(RunRow.paused).where(RunRow.id == run_id)))

    def set_paused(self, run_id: int, paused: bool) -> None:
        with self.session() as s:
            s.execute(update(RunRow).where(RunRow.id == run_id).values(paused=paused))

    # ---- cycles ------------------------------------------------------------------------------
    def start_cycle(self, run_id: int, number: int, lr: float, general_share: float,
                    n_examples: int, temperature: float | None = None) -> int:
        """A new cycle row (status 'running'); returns its id. Re-running a number (after a
        crash or rollback) gets the next attempt. A committed attempt must be superseded first."""
        with self.session() as s:
            earlier = s.execute(select(Cycle.id, Cycle.attempt, Cycle.status)
                                .where(Cycle.run_id == run_id, Cycle.number == number)).all()
            committed = [c.id for c in earlier if c.status == "committed"]
            if committed:
                raise ValueError(f"cycle {number} of run {run_id} is already committed (cycle "
                                 f"id {committed[0]}); supersede_after() its steps before "
                                 "re-running it")
            attempt = max((c.attempt for c in earlier), default=-1) + 1
            cycle = Cycle(run_id=run_id, number=number, attempt=attempt, lr=lr,
                          general_share=general_share, n_examples=n_examples,
                          temperature=temperature)
            s.add(cycle)
            s.flush()
            return cycle.id

    def finish_cycle(self, cycle_id: int, status: str, error: str | None = None) -> None:
        """End a cycle: 'committed', 'failed', 'rolled_back' (or 'superseded'); stamps
        finished_at."""
        check_value(status, CYCLE_STATUSES[1:], "final cycle status")
        with self.session() as s:
            s.execute(update(Cycle).where(Cycle.id == cycle_id)
                      .values(status=status, error=error, finished_at=utcnow()))

    def settle_cycle(self, cycle_id: int, status: str, error: str | None = None) -> bool:
        """End a cycle that is still 'running' (its process died after the checkpoint that
        completed it, before finish_cycle); a cycle already ended is left alone. True when it
        changed."""
        check_value(status, CYCLE_STATUSES[1:], "final cycle status")
        with self.session() as s:
            return s.execute(update(Cycle).where(Cycle.id == cycle_id, Cycle.status == "running")
                             .values(status=status, error=error, finished_at=utcnow())).rowcount == 1

    def reopen_cycle(self, cycle_id: int) -> None:
        """A 'stopped' cycle resumes (its remaining batches train now): back to 'running'."""
        with self.session() as s:
            n = s.execute(update(Cycle).where(Cycle.id == cycle_id, Cycle.status == "stopped")
                          .values(status="running", finished_at=None, error=None)).rowcount
            if n != 1:
                raise ValueError(f"cycle {cycle_id} is not 'stopped'; only a stopped cycle resumes")

    def last_cycle_started(self, run_id: int) -> datetime | None:
        """When the run's newest cycle (any status) started: the schedule's grid anchor."""
        with self.read() as s:
            return s.scalar(select(func.max(Cycle.started_at)).where(Cycle.run_id == run_id))

    def last_committed_cycle(self, run_id: int) -> Cycle | None:
        """The committed cycle with the highest number (a detached snapshot), or None."""
        with self.read() as s:
            return s.scalars(select(Cycle)
                             .where(Cycle.run_id == run_id, Cycle.status == "committed")
                             .order_by(Cycle.number.desc(), Cycle.attempt.desc()).limit(1)).first()

    # ---- training ----------------------------------------------------------------------------
    def add_train_step(self, run_id: int, cycle_id: int, step: int, metrics: Mapping[str, Any],
                       scenario_ids: Sequence[int]) -> int:
        """One optimizer step and the scenarios in its batch, in one transaction; returns the
        step row id. `metrics` keys: STEP_REQUIRED, plus any of STEP_OPTIONAL. A non-finite
        loss is stored as given (NULL on SQLite, NaN on PostgreSQL) with skipped=True."""
        unknown = set(metrics) - set(STEP_REQUIRED) - set(STEP_OPTIONAL)
        missing = set(STEP_REQUIRED) - set(metrics)
        if unknown or missing:
            raise ValueError(f"step metrics: unknown {sorted(unknown)}, missing {sorted(missing)}")
        # Once per optimizer step: Core statements built once, on a connection held from step
        # to step (no pool checkout, no pre-ping: each was a round trip's worth), dropped on any
        # error so a retry (retry_transient) takes a fresh one. Still one transaction per step:
        # the step and its examples, or neither. Costs: benchmarks/store_step.py.
        row = {"run_id": run_id, "cycle_id": cycle_id, "step": step, **metrics}
        conn = self._step_connection()
        try:
            if self.dialect == "postgresql":
                # One statement, its own transaction (autocommit), committed asynchronously: the
                # server answers once it has the rows, without waiting for their WAL flush (the
                # fsync wait was up to 73% of the cost). The daemon dying loses nothing; only a server
                # crash can lose the step rows of its last ~0.6 s (3 x wal_writer_delay), and
                # any later synchronous commit makes them durable too (WAL is flushed in order).
                # Every train pass writes its 'train' phases row, synchronously, before a
                # checkpoint can be saved, so the steps a checkpoint holds are on disk before it
                # is (docs/sql.md "train_steps").
                return _pg_execute(conn, {**_STEP_DEFAULTS, **row, "created_at": utcnow(),
                                          "scenario_ids": list(scenario_ids)})
            with conn.begin():
                step_id = conn.execute(_STEP_INSERT, row).scalar_one()
                if scenario_ids:
                    conn.execute(_EXAMPLE_INSERT, [{"step_id": step_id, "scenario_id": sid} for sid in scenario_ids])
                return step_id
        except BaseException:
            self._drop_step_connection()
            raise

    def _step_connection(self) -> Connection:
        """The connection add_train_step writes on, held from step to step (PostgreSQL:
        autocommit, each step is one statement). Idle for STEP_CONNECTION_IDLE_S (the daemon
        slept between cycles) it goes back to the pool, whose checkout pings it: a connection
        a server or firewall dropped meanwhile is replaced without a failed call."""
        now = time.monotonic()
        if self._steps is not None and now - self._steps_used > STEP_CONNECTION_IDLE_S:
            self._steps.close()
            self._steps = None
        if self._steps is None:
            conn = self.engine.connect()
            self._steps = conn.execution_options(isolation_level="AUTOCOMMIT") if self.dialect == "postgresql" else conn
        self._steps_used = now
        return self._steps

    def _drop_step_connection(self) -> None:
        """After an error, and at close(): really close it (after an error it may be broken: a
        server restart, a terminated backend), so the next add_train_step, or its retry, opens
        a fresh one."""
        conn, self._steps = self._steps, None
        if conn is not None:
            with suppress(Exception):
                conn.invalidate()
                conn.close()

    def close(self) -> None:
        self._drop_step_connection()
        super().close()

    def supersede_after(self, run_id: int, step: int) -> Superseded:
        """Take everything after optimizer step `step` out of the run's lineage (resume or
        rollback to the checkpoint that ends with that step): active train_steps with a higher
        step and complete checkpoints holding a later step become 'superseded' (a checkpoint's
        step counts the steps it holds, 0-based steps 0..step-1, so the one resumed from has
        step == `step` + 1 and stays 'complete'); so do the cycles that
        trained those steps and any cycle still 'running' (it was interrupted), unless already
        marked 'failed' or 'rolled_back' (kept: they say why). Returns the counts."""
        with self.session() as s:
            later_cycles = (select(TrainStep.cycle_id)
                            .where(TrainStep.run_id == run_id, TrainStep.step > step,
                                   TrainStep.status == "active").distinct())
            cycles = s.execute(
                update(Cycle)
                .where(Cycle.run_id == run_id, Cycle.status.in_(("running", "committed")),
                       or_(Cycle.id.in_(later_cycles), Cycle.status == "running"))
                .values(status="superseded",
                        finished_at=func.coalesce(Cycle.finished_at, utcnow())))
            steps = s.execute(
                update(TrainStep)
                .where(TrainStep.run_id == run_id, TrainStep.step > step,
                       TrainStep.status == "active")
                .values(status="superseded"))
            checkpoints = s.execute(
                update(Checkpoint)
                .where(Checkpoint.run_id == run_id, Checkpoint.step > step + 1,
                       Checkpoint.status == "complete")
                .values(status="superseded"))
            return Superseded(steps.rowcount, cycles.rowcount, checkpoints.rowcount)

    # ---- evaluation, decisions, checkpoints, events, phases ----------------------------------
    def add_evals(self, run_id: int, cycle_id: int | None, values: Mapping[str, float],
                  details: Mapping[str, Any] | None = None) -> None:
        """One row per metric. cycle_id None: the run's baseline before its first cycle.
        `details` maps a metric to JSON-able detail (per-family numbers, head ranks, ...).

        A NaN or infinite value (a diverged model) gets no evals row: SQLite stores NaN as
        NULL, which evals.value refuses, so the cycle died on IntegrityError. Such metrics are
        listed, with their values as text, in one events row 'nonfinite_metrics' instead."""
        details = details or {}
        orphans = sorted(set(details) - set(values))
        if orphans:
            raise ValueError(f"details for metrics without a value: {orphans}")
        finite = {m: float(v) for m, v in values.items() if math.isfinite(float(v))}
        nonfinite = {m: str(float(v)) for m, v in values.items() if m not in finite}
        with self.session() as s:
            s.add_all(Eval(run_id=run_id, cycle_id=cycle_id, metric=metric, value=value,
                           detail_json=details.get(metric)) for metric, value in finite.items())
            if nonfinite:
                s.add(Event(run_id=run_id, kind="nonfinite_metrics",
                            detail=json.dumps({"cycle_id": cycle_id, "metrics": nonfinite})))

    def add_decision(self, run_id: int, cycle_id: int | None, action: str, reason: str,
                     before: Mapping[str, Any], after: Mapping[str, Any],
                     metrics: Mapping[str, Any] | None = None) -> int:
        """The controller's action ('keep', 'raise_lr', 'rollback', ...), its reason, the
        settings before and after, and the metrics it looked at."""
        with self.session() as s:
            row = Decision(run_id=run_id, cycle_id=cycle_id, action=action, reason=reason,
                           before_json=dict(before), after_json=dict(after),
                           metrics_json=None if metrics is None else dict(metrics))
            s.add(row)
            s.flush()
            return row.id

    def start_metrics(self, run_id: int) -> dict[str, float]:
        """The run's baseline: the first value of every metric stored with cycle_id NULL."""
        out: dict[str, float] = {}
        with self.read() as s:
            for metric, value in s.execute(select(Eval.metric, Eval.value)
                                           .where(Eval.run_id == run_id, Eval.cycle_id.is_(None))
                                           .order_by(Eval.id)):
                out.setdefault(metric, value)
        return out

    def rollbacks_in_a_row(self, run_id: int) -> int:
        """Trailing controller rollbacks of the run with no committed cycle after them."""
        with self.read() as s:
            last_commit = s.scalar(select(Cycle.finished_at)
                                   .where(Cycle.run_id == run_id, Cycle.status == "committed")
                                   .order_by(Cycle.finished_at.desc()).limit(1))
            query = select(Decision.action).where(Decision.run_id == run_id, Decision.action == "rollback",
                                                  Decision.cycle_id.is_not(None))
            if last_commit is not None:
                query = query.where(Decision.created_at > last_commit)
            return len(s.execute(query).all())

    def decisions(self, run_id: int) -> list[dict[str, Any]]:
        """The run's decisions rows, oldest first, with their cycle's number and the last
        optimizer step of that cycle (for the report)."""
        with self.read() as s:
            last_step = dict(s.execute(select(TrainStep.cycle_id, func.max(TrainStep.step))
                                       .where(TrainStep.run_id == run_id).group_by(TrainStep.cycle_id)).all())
            return [{"cycle": number, "step": last_step.get(d.cycle_id), "action": d.action, "reason": d.reason,
                     "before": d.before_json, "after": d.after_json, "created_at": d.created_at}
                    for d, number in s.execute(select(Decision, Cycle.number)
                                               .outerjoin(Cycle, Cycle.id == Decision.cycle_id)
                                               .where(Decision.run_id == run_id).order_by(Decision.id))]

    def add_checkpoint(self, run_id: int, cycle_id: int | None, step: int, path: str | Path,
                       sha256: str, nbytes: int) -> int:
        """A complete checkpoint (its marker file written); returns its id."""
        with self.session() as s:
            row = Checkpoint(run_id=run_id, cycle_id=cycle_id, step=step, path=str(path),
                             sha256=sha256, bytes=nbytes)
            s.add(row)
            s.flush()
            return row.id

    def set_checkpoint_status(self, checkpoint_id: int, status: str) -> None:
        """'deleted' once its directory is removed (keep_last), or 'superseded'."""
        check_value(status, CHECKPOINT_STATUSES, "checkpoint status")
        with self.session() as s:
            s.execute(update(Checkpoint).where(Checkpoint.id == checkpoint_id)
                      .values(status=status))

    def complete_checkpoints(self, run_id: int) -> list[Checkpoint]:
        """The run's complete checkpoints, newest (highest step) first."""
        with self.read() as s:
            return list(s.scalars(select(Checkpoint)
                                  .where(Checkpoint.run_id == run_id,
                                         Checkpoint.status == "complete")
                                  .order_by(Checkpoint.step.desc(), Checkpoint.id.desc())))

    def add_event(self, run_id: int | None, kind: str, detail: Mapping[str, Any]) -> int:
        """A signal or notable happening ('pause', 'resume', 'reload', 'stop', 'error', ...).
        Every kind's detail is a JSON object (docs/sql.md "events"): one format to query."""
        if not isinstance(detail, Mapping):
            raise TypeError(f"events.detail must be a mapping (stored as a JSON object), got "
                            f"{type(detail).__name__} for event {kind!r}")
        with self.session() as s:
            row = Event(run_id=run_id, kind=kind, detail=json.dumps(dict(detail), default=str, ensure_ascii=False))
            s.add(row)
            s.flush()
            return row.id

    def add_phase(self, run_id: int, cycle_id: int | None, name: str, started_at: datetime,
                  seconds: float, mem_free_before: int | None = None,
                  mem_free_after: int | None = None, tokens_per_s: float | None = None) -> int:
        """How long one phase ('dream', 'screen', 'train', 'sleep', ...) took, free accelerator
        memory (bytes) before and after, and its throughput if it has one."""
        if started_at.tzinfo is None:
            raise ValueError(f"naive datetime {started_at!r}: pass datetime.now(timezone.utc)")
        with self.session() as s:
            row = Phase(run_id=run_id, cycle_id=cycle_id, name=name, started_at=started_at,
                        seconds=seconds, mem_free_before=mem_free_before,
                        mem_free_after=mem_free_after, tokens_per_s=tokens_per_s)
            s.add(row)
            s.flush()
            return row.id

    def phase_totals(self, run_id: int) -> dict[str, float]:
        """Seconds per phase name over the run's cycles (the start-of-run baseline excluded)."""
        with self.read() as s:
            return {name: float(total) for name, total in s.execute(
                select(Phase.name, func.sum(Phase.seconds))
                .where(Phase.run_id == run_id, Phase.cycle_id.is_not(None)).group_by(Phase.name))}

    # ---- views -------------------------------------------------------------------------------
    def active_steps(self, run_id: int) -> list[dict[str, Any]]:
        """step, loss, lr, n_general, n_behavioral, cycle_id of every active step, in order."""
        with self.read() as s:
            return [dict(r._mapping) for r in s.execute(
                select(TrainStep.step, TrainStep.loss, TrainStep.lr, TrainStep.n_general, TrainStep.n_behavioral,
                       TrainStep.cycle_id).where(TrainStep.run_id == run_id, TrainStep.status == "active")
                .order_by(TrainStep.step))]

    def metric_names(self, run_id: int) -> list[str]:
        """Every metric name the run has evals of."""
        with self.read() as s:
            return [m for m, in s.execute(select(Eval.metric).where(Eval.run_id == run_id).distinct())]

    def cycle_summary(self, run_id: int) -> list[dict[str, Any]]:
        """Rows of the cycle_summary view for a run (docs/sql.md), by number and attempt."""
        query = (text("SELECT * FROM cycle_summary WHERE run_id = :run_id ORDER BY number, attempt")
                 .columns(started_at=UTCDateTime, finished_at=UTCDateTime))
        with self.read() as s:
            return [dict(r) for r in s.execute(query, {"run_id": run_id}).mappings()]

    def fleet(self) -> list[dict[str, Any]]:
        """Rows of the fleet view (docs/sql.md): one per run in the store, by run id."""
        query = (text("SELECT * FROM fleet ORDER BY run_id")
                 .columns(started_at=UTCDateTime, finished_at=UTCDateTime, last_cycle_started_at=UTCDateTime,
                          last_cycle_finished_at=UTCDateTime, last_step_at=UTCDateTime))
        with self.read() as s:
            return [{**r, "paused": bool(r["paused"])} for r in s.execute(query).mappings()]

    def metric_trend(self, run_id: int, metric: str) -> list[dict[str, Any]]:
        """Rows of the metric_trend view for one metric of a run: baseline first, then cycles."""
        query = (text("SELECT * FROM metric_trend WHERE run_id = :run_id AND metric = :metric "
                      "ORDER BY COALESCE(cycle, -1), created_at")
                 .columns(created_at=UTCDateTime))
        with self.read() as s:
            rows = s.execute(query, {"run_id": run_id, "metric": metric}).mappings()
            return [dict(r) for r in rows]

