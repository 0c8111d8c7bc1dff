"""near duplicates: tables minhash_signatures and minhash_bands; view dream_summary.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22

Only new tables and a new view: no existing table is altered, so the views of 0001 stay as
they are (SQLite refuses to rename a table a view reads; nothing here renames one).
Self-contained on purpose (no imports from dreamd), like 0001.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

TS = sa.DateTime(timezone=True)
NOW = sa.text("CURRENT_TIMESTAMP")


def upgrade() -> None:
    op.create_table(
        "minhash_signatures",
        sa.Column("scenario_id", sa.Integer(), nullable=False),
        sa.Column("scheme", sa.String(64), nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", TS, server_default=NOW, nullable=False),
        sa.ForeignKeyConstraint(["scenario_id"], ["scenarios.id"],
                                name=op.f("fk_minhash_signatures_scenario_id_scenarios")),
        sa.PrimaryKeyConstraint("scenario_id", name=op.f("pk_minhash_signatures")),
    )
    op.create_table(
        "minhash_bands",
        sa.Column("scenario_id", sa.Integer(), nullable=False),
        sa.Column("band", sa.Integer(), nullable=False),
        sa.Column("band_key", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["scenario_id"], ["scenarios.id"],
                                name=op.f("fk_minhash_bands_scenario_id_scenarios")),
        sa.PrimaryKeyConstraint("scenario_id", "band", name=op.f("pk_minhash_bands")),
    )
    # The lookup: `band_key IN (32 keys of the candidate)`.
    op.create_index(op.f("ix_minhash_bands_band_key"), "minhash_bands", ["band_key"])
    op.execute(DREAM_SUMMARY)


def downgrade() -> None:
    op.execute("DROP VIEW dream_summary")
    op.drop_table("minhash_bands")
    op.drop_table("minhash_signatures")


# One row per cycle attempt that dreamed: candidates, acceptance, rejections by screening rule
# (the category before the first colon of reject_reason), the near-duplicate rate and the
# dreaming temperature. Exact duplicates are 'duplicate: ...' whether the screener or the
# store's unique hash caught them. Plain SQL valid on SQLite >= 3.25 and PostgreSQL.
_RULES = ("parse", "check", "format", "kind", "honesty", "forgetting_probe", "judge", "duplicate",
          "near_duplicate", "encode")
DREAM_SUMMARY = f"""
CREATE VIEW dream_summary AS
SELECT
    c.run_id,
    c.id AS cycle_id,
    c.number,
    c.attempt,
    COUNT(*) AS candidates,
    SUM(CASE WHEN s.status = 'accepted' THEN 1 ELSE 0 END) AS accepted,
    SUM(CASE WHEN s.status = 'rejected' THEN 1 ELSE 0 END) AS rejected,
    SUM(CASE WHEN s.source = 'model' THEN 1 ELSE 0 END) AS model_written,
    SUM(CASE WHEN s.source = 'model' AND s.status = 'accepted' THEN 1 ELSE 0 END) AS model_accepted,
{"".join(f"    SUM(CASE WHEN s.reject_reason LIKE '{r}:%' THEN 1 ELSE 0 END) AS n_{r},{chr(10)}"
          for r in _RULES)}\
    CAST(SUM(CASE WHEN s.reject_reason LIKE 'near_duplicate:%' THEN 1 ELSE 0 END) AS DOUBLE PRECISION)
        / COUNT(*) AS near_dup_rate,
    AVG(s.temperature) AS mean_temperature,
    MIN(s.temperature) AS min_temperature,
    MAX(s.temperature) AS max_temperature
FROM cycles c
JOIN scenarios s ON s.cycle_id = c.id
GROUP BY c.run_id, c.id, c.number, c.attempt
"""
