"""fleet: runs.host and runs.pid (the process that took the run up last); view fleet, one row
per run in the store with its last cycle, steps and headline metrics.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

Several daemons (different models or machines) may share one PostgreSQL database; `fleet` is
what `dreamd status --all` prints. The two new columns are nullable and added with ALTER TABLE
ADD COLUMN (SQLite does that in place: no table is recreated, so no view has to be dropped).
Self-contained (no imports from dreamd), plain SQL valid on SQLite >= 3.25 and PostgreSQL.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None

# The last cycle of a run is its newest cycle row (highest id: the attempt started last, of any
# status). Headline metrics come from the newest COMMITTED cycle (a running or failed attempt
# has none, or none that count). Each aggregate is its own grouped subquery, so no join
# multiplies rows.
FLEET = """
CREATE VIEW fleet AS
SELECT
    r.id AS run_id,
    r.name,
    r.model_path,
    r.status,
    r.paused,
    r.host,
    r.pid,
    r.started_at,
    r.finished_at,
    lc.number AS last_cycle,
    lc.attempt AS last_cycle_attempt,
    lc.status AS last_cycle_status,
    lc.started_at AS last_cycle_started_at,
    lc.finished_at AS last_cycle_finished_at,
    COALESCE(nc.committed_cycles, 0) AS committed_cycles,
    cc.number AS last_committed_cycle,
    COALESCE(t.steps, 0) AS steps,
    t.last_step_at,
    m.mean_loss,
    e.perplexity,
    e.arith_em,
    e.balanced,
    e.sycophancy,
    e.margin_mean
FROM runs r
LEFT JOIN (
    SELECT run_id, MAX(id) AS cycle_id FROM cycles GROUP BY run_id
) last_any ON last_any.run_id = r.id
LEFT JOIN cycles lc ON lc.id = last_any.cycle_id
LEFT JOIN (
    SELECT run_id, MAX(id) AS cycle_id, COUNT(*) AS committed_cycles
    FROM cycles WHERE status = 'committed' GROUP BY run_id
) nc ON nc.run_id = r.id
LEFT JOIN cycles cc ON cc.id = nc.cycle_id
LEFT JOIN (
    SELECT run_id, COUNT(*) AS steps, MAX(created_at) AS last_step_at
    FROM train_steps WHERE status = 'active' GROUP BY run_id
) t ON t.run_id = r.id
LEFT JOIN (
    SELECT cycle_id, AVG(loss) AS mean_loss
    FROM train_steps WHERE status = 'active' AND NOT skipped GROUP BY cycle_id
) m ON m.cycle_id = cc.id
LEFT JOIN (
    SELECT
        cycle_id,
        MAX(CASE WHEN metric = 'forget.perplexity' THEN value END) AS perplexity,
        MAX(CASE WHEN metric = 'forget.arith_em' THEN value END) AS arith_em,
        MAX(CASE WHEN metric = 'q1.balanced' THEN value END) AS balanced,
        MAX(CASE WHEN metric = 'q1.sycophancy' THEN value END) AS sycophancy,
        MAX(CASE WHEN metric = 'margin.mean' THEN value END) AS margin_mean
    FROM evals
    WHERE cycle_id IS NOT NULL
    GROUP BY cycle_id
) e ON e.cycle_id = cc.id
"""


def upgrade() -> None:
    op.add_column("runs", sa.Column("host", sa.String(255), nullable=True))
    op.add_column("runs", sa.Column("pid", sa.Integer(), nullable=True))
    op.execute(FLEET)


def downgrade() -> None:
    op.execute("DROP VIEW fleet")
    with op.batch_alter_table("runs") as batch:  # SQLite: recreates runs (no view reads it now)
        batch.drop_column("pid")
        batch.drop_column("host")
