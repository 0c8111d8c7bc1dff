"""dreaming per kind: dream_summary gains model-written / accepted counts per scenario kind;
new view dream_rejections (rejections per cycle attempt by kind, source and screening rule).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

Views only: dream_summary is dropped and created again with the same columns first (a query
written for 0002 still runs) and the per-kind ones after. Self-contained (no imports from dreamd),
plain SQL valid on SQLite >= 3.25 and PostgreSQL.
"""
from __future__ import annotations

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

_RULES = ("parse", "check", "format", "kind", "honesty", "forgetting_probe", "judge", "duplicate",
          "near_duplicate", "encode")
_KINDS = ("accept", "pushback", "derail", "self", "general")


def _summary(per_kind: bool) -> str:
    rules = "".join(f"    SUM(CASE WHEN s.reject_reason LIKE '{r}:%' THEN 1 ELSE 0 END) AS n_{r},\n"
                    for r in _RULES)
    kinds = "".join(
        f",\n    SUM(CASE WHEN s.source = 'model' AND s.kind = '{k}' THEN 1 ELSE 0 END) AS model_{k}_written"
        f",\n    SUM(CASE WHEN s.source = 'model' AND s.kind = '{k}' AND s.status = 'accepted' THEN 1 ELSE 0 END)"
        f" AS model_{k}_accepted"
        for k in _KINDS) if per_kind else ""
    return f"""
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
{rules}\
    CAST(SUM(CASE WHEN s.reject_reason LIKE 'near_duplicate:%' THEN 1 ELSE 0 END) AS DOUBLE PRECISION)
        / COUNT(*) AS near_dup_rate,
    AVG(s.temperature) AS mean_temperature,
    MIN(s.temperature) AS min_temperature,
    MAX(s.temperature) AS max_temperature{kinds}
FROM cycles c
JOIN scenarios s ON s.cycle_id = c.id
GROUP BY c.run_id, c.id, c.number, c.attempt
"""


_RULE_OF = "CASE " + " ".join(f"WHEN s.reject_reason LIKE '{r}:%' THEN '{r}'" for r in _RULES) + " ELSE 'other' END"
DREAM_REJECTIONS = f"""
CREATE VIEW dream_rejections AS
SELECT
    c.run_id,
    c.id AS cycle_id,
    c.number,
    c.attempt,
    s.kind,
    s.source,
    {_RULE_OF} AS rule,
    COUNT(*) AS n,
    MIN(s.reject_reason) AS example
FROM cycles c
JOIN scenarios s ON s.cycle_id = c.id
WHERE s.status = 'rejected'
GROUP BY c.run_id, c.id, c.number, c.attempt, s.kind, s.source, {_RULE_OF}
"""


def upgrade() -> None:
    op.execute("DROP VIEW dream_summary")
    op.execute(_summary(per_kind=True))
    op.execute(DREAM_REJECTIONS)


def downgrade() -> None:
    op.execute("DROP VIEW dream_rejections")
    op.execute("DROP VIEW dream_summary")
    op.execute(_summary(per_kind=False))
