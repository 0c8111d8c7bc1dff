"""initial schema: runs, cycles, scenarios, train_steps, step_examples, evals, decisions,
checkpoints, events, phases; views cycle_summary and metric_trend.

Revision ID: 0001
Revises:
Create Date: 2026-11-21

Self-contained on purpose (no imports from dreamd): a migration describes the schema as it was
at its revision, whatever the models say later. tests/test_store.py checks that the models in
dreamd/store/tables.py still match the result of all migrations.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

TS = sa.DateTime(timezone=True)  # timestamptz on PostgreSQL; UTC text on SQLite
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
NOW = sa.text("CURRENT_TIMESTAMP")
FALSE = sa.text("false")


def _id() -> sa.Column:
    return sa.Column("id", sa.Integer(), nullable=False)


def _created_at(name: str = "created_at") -> sa.Column:
    return sa.Column(name, TS, server_default=NOW, nullable=False)


def _status(default: str | None = None) -> sa.Column:
    return sa.Column("status", sa.String(16), server_default=default, nullable=False)


def _check(table: str, column: str, values: tuple[str, ...]) -> sa.CheckConstraint:
    listed = ", ".join(f"'{v}'" for v in values)
    return sa.CheckConstraint(f"{column} IN ({listed})", name=op.f(f"ck_{table}_{column}"))


def _fk(table: str, column: str, target: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint([column], [f"{target}.id"],
                                   name=op.f(f"fk_{table}_{column}_{target}"))


def _pk(table: str, *columns: str) -> sa.PrimaryKeyConstraint:
    return sa.PrimaryKeyConstraint(*(columns or ("id",)), name=op.f(f"pk_{table}"))


def upgrade() -> None:
    op.create_table(
        "runs",
        _id(),
        sa.Column("name", sa.String(200), nullable=False),
        _created_at("started_at"),
        sa.Column("finished_at", TS, nullable=True),
        sa.Column("config_json", JSON, nullable=False),
        sa.Column("model_path", sa.Text(), nullable=False),
        _status("running"),
        sa.Column("paused", sa.Boolean(), server_default=FALSE, nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("dreamd_version", sa.String(32), nullable=True),
        _check("runs", "status", ("running", "stopped", "finished", "failed")),
        _pk("runs"),
    )
    op.create_index(op.f("ix_runs_name"), "runs", ["name"])

    op.create_table(
        "cycles",
        _id(),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), server_default=sa.text("0"), nullable=False),
        _status("running"),
        _created_at("started_at"),
        sa.Column("finished_at", TS, nullable=True),
        sa.Column("lr", sa.Float(), nullable=False),
        sa.Column("general_share", sa.Float(), nullable=False),
        sa.Column("n_examples", sa.Integer(), nullable=False),
        sa.Column("temperature", sa.Float(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        _check("cycles", "status", ("running", "committed", "stopped", "failed", "rolled_back", "superseded")),
        _fk("cycles", "run_id", "runs"),
        _pk("cycles"),
        sa.UniqueConstraint("run_id", "number", "attempt",
                            name=op.f("uq_cycles_run_id_number_attempt")),
    )

    op.create_table(
        "scenarios",
        _id(),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("cycle_id", sa.Integer(), nullable=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=True),
        sa.Column("messages_json", JSON, nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("spec", sa.Text(), nullable=True),
        _status(),
        sa.Column("reject_reason", sa.Text(), nullable=True),
        sa.Column("duplicate_of", sa.Integer(), nullable=True),
        sa.Column("meta_json", JSON, nullable=False),
        sa.Column("temperature", sa.Float(), nullable=True),
        _created_at(),
        _check("scenarios", "kind", ("accept", "pushback", "derail", "general", "self")),
        _check("scenarios", "status", ("accepted", "rejected", "probe")),
        _fk("scenarios", "cycle_id", "cycles"),
        sa.ForeignKeyConstraint(["duplicate_of"], ["scenarios.id"],
                                name=op.f("fk_scenarios_duplicate_of_scenarios")),
        _fk("scenarios", "run_id", "runs"),
        _pk("scenarios"),
        sa.UniqueConstraint("content_hash", name=op.f("uq_scenarios_content_hash")),
    )
    op.create_index(op.f("ix_scenarios_cycle_id"), "scenarios", ["cycle_id"])
    op.create_index("ix_scenarios_run_id_status", "scenarios", ["run_id", "status"])

    op.create_table(
        "train_steps",
        _id(),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("cycle_id", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        _status("active"),
        sa.Column("loss", sa.Float(), nullable=True),
        sa.Column("grad_norm", sa.Float(), nullable=True),
        sa.Column("lr", sa.Float(), nullable=False),
        sa.Column("tokens", sa.Integer(), nullable=False),
        sa.Column("n_behavioral", sa.Integer(), nullable=False),
        sa.Column("n_general", sa.Integer(), nullable=False),
        sa.Column("wall_ms", sa.Float(), nullable=False),
        sa.Column("tokens_per_s", sa.Float(), nullable=False),
        sa.Column("pad_fraction", sa.Float(), nullable=True),
        sa.Column("peak_mem_bytes", sa.BigInteger(), nullable=True),
        sa.Column("update_landed", sa.Float(), nullable=True),
        sa.Column("skipped", sa.Boolean(), server_default=FALSE, nullable=False),
        _created_at(),
        _check("train_steps", "status", ("active", "superseded")),
        _fk("train_steps", "cycle_id", "cycles"),
        _fk("train_steps", "run_id", "runs"),
        _pk("train_steps"),
    )
    op.create_index(op.f("ix_train_steps_cycle_id"), "train_steps", ["cycle_id"])
    # Only active steps are unique: re-run steps after a resume or rollback coexist with the
    # superseded originals. The WHERE text is valid on SQLite and PostgreSQL alike.
    active = sa.text("status = 'active'")
    op.create_index("uq_train_steps_active_step", "train_steps", ["run_id", "step"], unique=True,
                    sqlite_where=active, postgresql_where=active)

    op.create_table(
        "step_examples",
        sa.Column("step_id", sa.Integer(), nullable=False),
        sa.Column("scenario_id", sa.Integer(), nullable=False),
        _fk("step_examples", "scenario_id", "scenarios"),
        sa.ForeignKeyConstraint(["step_id"], ["train_steps.id"],
                                name=op.f("fk_step_examples_step_id_train_steps")),
        _pk("step_examples", "step_id", "scenario_id"),
    )
    op.create_index(op.f("ix_step_examples_scenario_id"), "step_examples", ["scenario_id"])

    op.create_table(
        "evals",
        _id(),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("cycle_id", sa.Integer(), nullable=True),
        sa.Column("metric", sa.String(100), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("detail_json", JSON, nullable=True),
        _created_at(),
        _fk("evals", "cycle_id", "cycles"),
        _fk("evals", "run_id", "runs"),
        _pk("evals"),
    )
    op.create_index(op.f("ix_evals_cycle_id"), "evals", ["cycle_id"])
    op.create_index("ix_evals_run_id_metric", "evals", ["run_id", "metric"])

    op.create_table(
        "decisions",
        _id(),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("cycle_id", sa.Integer(), nullable=True),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("before_json", JSON, nullable=False),
        sa.Column("after_json", JSON, nullable=False),
        sa.Column("metrics_json", JSON, nullable=True),
        _created_at(),
        _fk("decisions", "cycle_id", "cycles"),
        _fk("decisions", "run_id", "runs"),
        _pk("decisions"),
    )
    op.create_index(op.f("ix_decisions_cycle_id"), "decisions", ["cycle_id"])

    op.create_table(
        "checkpoints",
        _id(),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("cycle_id", sa.Integer(), nullable=True),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        _status("complete"),
        _created_at(),
        _check("checkpoints", "status", ("complete", "deleted", "superseded")),
        _fk("checkpoints", "cycle_id", "cycles"),
        _fk("checkpoints", "run_id", "runs"),
        _pk("checkpoints"),
    )
    op.create_index(op.f("ix_checkpoints_run_id"), "checkpoints", ["run_id"])

    op.create_table(
        "events",
        _id(),
        sa.Column("run_id", sa.Integer(), nullable=True),
        _created_at("ts"),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("detail", sa.Text(), server_default="", nullable=False),
        _fk("events", "run_id", "runs"),
        _pk("events"),
    )
    op.create_index(op.f("ix_events_run_id"), "events", ["run_id"])
    op.create_index(op.f("ix_events_ts"), "events", ["ts"])

    op.create_table(
        "phases",
        _id(),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("cycle_id", sa.Integer(), nullable=True),
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("mem_free_before", sa.BigInteger(), nullable=True),
        sa.Column("mem_free_after", sa.BigInteger(), nullable=True),
        sa.Column("tokens_per_s", sa.Float(), nullable=True),
        _fk("phases", "cycle_id", "cycles"),
        _fk("phases", "run_id", "runs"),
        _pk("phases"),
    )
    op.create_index(op.f("ix_phases_cycle_id"), "phases", ["cycle_id"])

    op.execute(CYCLE_SUMMARY)
    op.execute(METRIC_TREND)


def downgrade() -> None:
    op.execute("DROP VIEW metric_trend")
    op.execute("DROP VIEW cycle_summary")
    for table in ("phases", "events", "checkpoints", "decisions", "evals", "step_examples",
                  "train_steps", "scenarios", "cycles", "runs"):
        op.drop_table(table)  # drops its indexes too


# ---- views: plain SQL valid on SQLite >= 3.25 and PostgreSQL -----------------------------------
# Each aggregate comes from its own grouped subquery, so joins never multiply rows.
# CAST(... AS DOUBLE PRECISION): PostgreSQL would otherwise divide integers; SQLite reads the
# type name as REAL.

CYCLE_SUMMARY = """
CREATE VIEW cycle_summary AS
SELECT
    c.run_id,
    c.id AS cycle_id,
    c.number,
    c.attempt,
    c.status,
    c.started_at,
    c.finished_at,
    COALESCE(t.steps, 0) AS steps,
    COALESCE(t.superseded_steps, 0) AS superseded_steps,
    COALESCE(t.skipped_steps, 0) AS skipped_steps,
    COALESCE(s.n_accept, 0) AS n_accept,
    COALESCE(s.n_pushback, 0) AS n_pushback,
    COALESCE(s.n_derail, 0) AS n_derail,
    COALESCE(s.n_general, 0) AS n_general,
    COALESCE(s.n_self, 0) AS n_self,
    COALESCE(s.n_rejected, 0) AS n_rejected,
    COALESCE(s.n_duplicate, 0) AS n_duplicate,
    t.general_share,
    c.general_share AS planned_general_share,
    t.mean_loss,
    c.lr,
    t.tokens,
    p.seconds,
    e.perplexity,
    e.arith_em,
    e.listen_rate,
    e.pushback_rate,
    e.balanced,
    e.sycophancy
FROM cycles c
LEFT JOIN (
    SELECT
        cycle_id,
        SUM(CASE WHEN status = 'active' THEN 1 ELSE 0 END) AS steps,
        SUM(CASE WHEN status = 'superseded' THEN 1 ELSE 0 END) AS superseded_steps,
        SUM(CASE WHEN skipped THEN 1 ELSE 0 END) AS skipped_steps,
        AVG(CASE WHEN skipped THEN NULL ELSE loss END) AS mean_loss,
        SUM(tokens) AS tokens,
        CAST(SUM(CASE WHEN skipped THEN 0 ELSE n_general END) AS DOUBLE PRECISION)
            / NULLIF(SUM(CASE WHEN skipped THEN 0 ELSE n_behavioral + n_general END), 0)
            AS general_share
    FROM train_steps
    GROUP BY cycle_id
) t ON t.cycle_id = c.id
LEFT JOIN (
    SELECT
        cycle_id,
        SUM(CASE WHEN status = 'accepted' AND kind = 'accept' THEN 1 ELSE 0 END) AS n_accept,
        SUM(CASE WHEN status = 'accepted' AND kind = 'pushback' THEN 1 ELSE 0 END) AS n_pushback,
        SUM(CASE WHEN status = 'accepted' AND kind = 'derail' THEN 1 ELSE 0 END) AS n_derail,
        SUM(CASE WHEN status = 'accepted' AND kind = 'general' THEN 1 ELSE 0 END) AS n_general,
        SUM(CASE WHEN status = 'accepted' AND kind = 'self' THEN 1 ELSE 0 END) AS n_self,
        SUM(CASE WHEN status = 'rejected' THEN 1 ELSE 0 END) AS n_rejected,
        SUM(CASE WHEN duplicate_of IS NOT NULL THEN 1 ELSE 0 END) AS n_duplicate
    FROM scenarios
    WHERE cycle_id IS NOT NULL
    GROUP BY cycle_id
) s ON s.cycle_id = c.id
LEFT JOIN (
    SELECT cycle_id, SUM(seconds) AS seconds
    FROM phases
    WHERE cycle_id IS NOT NULL
    GROUP BY cycle_id
) p ON p.cycle_id = c.id
LEFT JOIN (
    SELECT
        cycle_id,
        MAX(CASE WHEN metric = 'forget.perplexity' THEN value END) AS perplexity,
        MAX(CASE WHEN metric = 'forget.arith_em' THEN value END) AS arith_em,
        MAX(CASE WHEN metric = 'q1.listen_rate' THEN value END) AS listen_rate,
        MAX(CASE WHEN metric = 'q1.pushback_rate' THEN value END) AS pushback_rate,
        MAX(CASE WHEN metric = 'q1.balanced' THEN value END) AS balanced,
        MAX(CASE WHEN metric = 'q1.sycophancy' THEN value END) AS sycophancy
    FROM evals
    WHERE cycle_id IS NOT NULL
    GROUP BY cycle_id
) e ON e.cycle_id = c.id
"""

# The model's lineage only: baseline evals (cycle_id NULL, shown as cycle NULL and ordered
# first) and committed or running cycles. Failed, rolled-back and superseded attempts are left
# out so that delta compares the weights that actually followed each other; the evals table
# still has their values.
METRIC_TREND = """
CREATE VIEW metric_trend AS
SELECT
    e.run_id,
    c.number AS cycle,
    e.cycle_id,
    e.metric,
    e.value,
    LAG(e.value) OVER (PARTITION BY e.run_id, e.metric
                       ORDER BY COALESCE(c.number, -1), e.id) AS previous,
    e.value - LAG(e.value) OVER (PARTITION BY e.run_id, e.metric
                                 ORDER BY COALESCE(c.number, -1), e.id) AS delta,
    e.created_at
FROM evals e
LEFT JOIN cycles c ON c.id = e.cycle_id
WHERE e.cycle_id IS NULL OR c.status IN ('committed', 'running')
"""
