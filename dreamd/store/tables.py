"""The store's tables as SQLAlchemy 2 ORM classes.

The schema is a user interface (people query it with sqlite3 and psql, see docs/sql.md): names
are stable, and it is created and changed ONLY by Alembic migrations in <repo>/migrations. These
classes must match the migrations exactly; tests/test_store.py compares them with Alembic's
autogenerate and fails on any difference.

Status columns are plain strings with named CHECK constraints (portable across SQLite and
PostgreSQL, readable in a shell, and a new value is one migration away). Every timestamp is a
timezone-aware UTC datetime (`UTCDateTime`).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Named constraints from day one: SQLite batch migrations recreate tables and can only drop or
# alter a constraint Alembic can name (alembic docs, "Dealing with Constraints").
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

RUN_STATUSES = ("running", "stopped", "finished", "failed")
CYCLE_STATUSES = ("running", "committed", "stopped", "failed", "rolled_back", "superseded")
SCENARIO_STATUSES = ("accepted", "rejected", "probe")
SCENARIO_KINDS = ("accept", "pushback", "derail", "general", "self")  # = ScenarioKind values
STEP_STATUSES = ("active", "superseded")
CHECKPOINT_STATUSES = ("complete", "deleted", "superseded")

# Eval metrics that the cycle_summary view shows as columns (view column -> evals.metric).
# Other metrics are in `evals` and `metric_trend`. Changing this list needs a migration.
PIVOTED_METRICS = {
    "perplexity": "forget.perplexity",
    "arith_em": "forget.arith_em",
    "listen_rate": "q1.listen_rate",
    "pushback_rate": "q1.pushback_rate",
    "balanced": "q1.balanced",
    "sycophancy": "q1.sycophancy",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python.

    PostgreSQL stores timestamptz. SQLite has no time zones: values are stored as UTC text
    'YYYY-MM-DD HH:MM:SS.ffffff', which sorts and compares with sqlite's datetime('now').
    Naive datetimes are refused: their zone is a guess.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware one "
                             "(datetime.now(timezone.utc))")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


# JSON text on SQLite (json_extract / ->> work on it), JSONB on PostgreSQL (->> works too).
JSONDoc = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSONDoc, Any: JSONDoc}


def created_at_column() -> Mapped[datetime]:
    return mapped_column(UTCDateTime, default=utcnow, server_default=func.now())


class RunRow(Base):
    """One run of the daemon on one model: resumed while unfinished (status running/stopped).
    host and pid: the process that took the run up last (the `fleet` view shows them)."""

    __tablename__ = "runs"
    __table_args__ = (CheckConstraint(_in("status", RUN_STATUSES), name="status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    started_at: Mapped[datetime] = created_at_column()
    finished_at: Mapped[datetime | None]
    config_json: Mapped[Any] = mapped_column(JSONDoc)
    model_path: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="running", server_default="running")
    paused: Mapped[bool] = mapped_column(default=False, server_default=text("false"))
    seed: Mapped[int] = mapped_column(BigInteger)
    dreamd_version: Mapped[str | None] = mapped_column(String(32))
    host: Mapped[str | None] = mapped_column(String(255))
    pid: Mapped[int | None]


class Cycle(Base):
    """One dream-screen-train-evaluate-decide-commit cycle. A cycle re-run after a crash or a
    rollback keeps its number and gets the next attempt; the old attempt is superseded."""

    __tablename__ = "cycles"
    __table_args__ = (
        UniqueConstraint("run_id", "number", "attempt"),
        CheckConstraint(_in("status", CYCLE_STATUSES), name="status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    number: Mapped[int]
    attempt: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    status: Mapped[str] = mapped_column(String(16), default="running", server_default="running")
    started_at: Mapped[datetime] = created_at_column()
    finished_at: Mapped[datetime | None]
    lr: Mapped[float] = mapped_column(Float)
    general_share: Mapped[float] = mapped_column(Float)
    n_examples: Mapped[int]
    temperature: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)


class ScenarioRow(Base):
    """Every dreamed (or replayed) example, accepted or rejected, and the fixed eval probes.

    content_hash is UNIQUE within a run (two runs sharing a store may hold the same scenario;
    one run never repeats its own). An exact duplicate is still stored, as status 'rejected',
    reject_reason 'duplicate: ...', content_hash NULL and duplicate_of set.
    """

    __tablename__ = "scenarios"
    __table_args__ = (
        CheckConstraint(_in("status", SCENARIO_STATUSES), name="status"),
        CheckConstraint(_in("kind", SCENARIO_KINDS), name="kind"),
        Index("ix_scenarios_run_id_status", "run_id", "status"),
        UniqueConstraint("run_id", "content_hash"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    cycle_id: Mapped[int | None] = mapped_column(ForeignKey("cycles.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(32))
    content_hash: Mapped[str | None] = mapped_column(String(64))
    messages_json: Mapped[Any] = mapped_column(JSONDoc)
    target: Mapped[str] = mapped_column(Text)
    spec: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    reject_reason: Mapped[str | None] = mapped_column(Text)
    duplicate_of: Mapped[int | None] = mapped_column(ForeignKey("scenarios.id"))
    meta_json: Mapped[Any] = mapped_column(JSONDoc)
    temperature: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = created_at_column()


class TrainStep(Base):
    """One optimizer step, written as it happens. Steps past the checkpoint a run resumed or
    rolled back from are marked superseded; only active steps must be unique per run."""

    __tablename__ = "train_steps"
    __table_args__ = (
        CheckConstraint(_in("status", STEP_STATUSES), name="status"),
        # Partial unique index: the same WHERE text is valid on SQLite (>= 3.8) and PostgreSQL.
        Index("uq_train_steps_active_step", "run_id", "step", unique=True,
              sqlite_where=text("status = 'active'"), postgresql_where=text("status = 'active'")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    cycle_id: Mapped[int] = mapped_column(ForeignKey("cycles.id"), index=True)
    step: Mapped[int]
    status: Mapped[str] = mapped_column(String(16), default="active", server_default="active")
    loss: Mapped[float | None] = mapped_column(Float)
    grad_norm: Mapped[float | None] = mapped_column(Float)
    lr: Mapped[float] = mapped_column(Float)
    tokens: Mapped[int]
    n_behavioral: Mapped[int]
    n_general: Mapped[int]
    wall_ms: Mapped[float] = mapped_column(Float)
    tokens_per_s: Mapped[float] = mapped_column(Float)
    pad_fraction: Mapped[float | None] = mapped_column(Float)
    peak_mem_bytes: Mapped[int | None] = mapped_column(BigInteger)
    update_landed: Mapped[float | None] = mapped_column(Float)
    skipped: Mapped[bool] = mapped_column(default=False, server_default=text("false"))
    created_at: Mapped[datetime] = created_at_column()


class StepExample(Base):
    """Which scenarios were in which optimizer step."""

    __tablename__ = "step_examples"

    step_id: Mapped[int] = mapped_column(ForeignKey("train_steps.id"), primary_key=True)
    scenario_id: Mapped[int] = mapped_column(ForeignKey("scenarios.id"), primary_key=True,
                                             index=True)


class Eval(Base):
    """One metric value. cycle_id NULL: the baseline measured at run start, before any cycle."""

    __tablename__ = "evals"
    __table_args__ = (Index("ix_evals_run_id_metric", "run_id", "metric"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    cycle_id: Mapped[int | None] = mapped_column(ForeignKey("cycles.id"), index=True)
    metric: Mapped[str] = mapped_column(String(100))
    value: Mapped[float] = mapped_column(Float)
    detail_json: Mapped[Any | None] = mapped_column(JSONDoc)
    created_at: Mapped[datetime] = created_at_column()


class Decision(Base):
    """What the controller did after a cycle's evaluation (keep, raise lr, roll back, ...), why,
    and the settings before and after."""

    __tablename__ = "decisions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    cycle_id: Mapped[int | None] = mapped_column(ForeignKey("cycles.id"), index=True)
    action: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text)
    before_json: Mapped[Any] = mapped_column(JSONDoc)
    after_json: Mapped[Any] = mapped_column(JSONDoc)
    metrics_json: Mapped[Any | None] = mapped_column(JSONDoc)
    created_at: Mapped[datetime] = created_at_column()


class Checkpoint(Base):
    """A checkpoint directory on disk (complete = its marker file exists)."""

    __tablename__ = "checkpoints"
    __table_args__ = (CheckConstraint(_in("status", CHECKPOINT_STATUSES), name="status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    cycle_id: Mapped[int | None] = mapped_column(ForeignKey("cycles.id"))
    step: Mapped[int]
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), default="complete", server_default="complete")
    created_at: Mapped[datetime] = created_at_column()


class Event(Base):
    """Signals, state changes and notable happenings (pause, resume, reload, stop, errors)."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"), index=True)
    ts: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, server_default=func.now(),
                                         index=True)
    kind: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text, default="", server_default="")


class Phase(Base):
    """How long one phase of a cycle took, with free accelerator memory around it."""

    __tablename__ = "phases"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    cycle_id: Mapped[int | None] = mapped_column(ForeignKey("cycles.id"), index=True)
    name: Mapped[str] = mapped_column(String(32))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    seconds: Mapped[float] = mapped_column(Float)
    mem_free_before: Mapped[int | None] = mapped_column(BigInteger)
    mem_free_after: Mapped[int | None] = mapped_column(BigInteger)
    tokens_per_s: Mapped[float | None] = mapped_column(Float)


class MinhashSignature(Base):
    """The MinHash signature of an ACCEPTED scenario (dreamd/dream/neardup.py), so the
    near-duplicate check holds across restarts and runs; the index's LSH bands are computed
    from these in memory when it opens (migration 0006 dropped the stored bands). `scheme` names
    the hashing setup; only signatures of the current scheme are compared. An empty signature
    marks a scenario without words (never a near duplicate of anything)."""

    __tablename__ = "minhash_signatures"

    scenario_id: Mapped[int] = mapped_column(ForeignKey("scenarios.id"), primary_key=True)
    scheme: Mapped[str] = mapped_column(String(64))
    signature: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = created_at_column()

