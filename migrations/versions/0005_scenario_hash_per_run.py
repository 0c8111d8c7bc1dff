"""scenarios.content_hash unique per run: UNIQUE (run_id, content_hash) replaces
UNIQUE (content_hash).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01

Several runs (different models, or machines) may share one store. With the hash unique over
the whole store, a second run that dreamed a scenario the first had already stored got it
rejected as 'duplicate: exact copy of scenario <the other run's id>': the second model never
trained on it, and its probe set was drawn around the other run's history. What must hold is
that ONE run never repeats its own scenario; two models may legitimately train on the same
one (docs/sql.md, "Several runs in one store").

On SQLite a UNIQUE constraint is part of the table, so the table is recreated (batch mode), and
SQLite refuses to rename a table that a view reads: every view is dropped first and created
again from the SQL SQLite kept for it (sqlite_master), whatever revision made it. PostgreSQL
drops and adds the constraint in place. Self-contained (no imports from dreamd).
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None

OLD = "uq_scenarios_content_hash"
NEW = "uq_scenarios_run_id_content_hash"  # the naming convention's name


def _swap(drop: str, add: str, columns: list[str]) -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        op.drop_constraint(drop, "scenarios", type_="unique")
        op.create_unique_constraint(add, "scenarios", columns)
        return
    views = bind.execute(sa.text("SELECT name, sql FROM sqlite_master WHERE type = 'view' "
                                 "ORDER BY rowid")).all()
    for name, _ in reversed(views):
        op.execute(f'DROP VIEW "{name}"')
    with op.batch_alter_table("scenarios") as batch:
        batch.drop_constraint(drop, type_="unique")
        batch.create_unique_constraint(add, columns)
    for _, sql in views:
        op.execute(sql)


def upgrade() -> None:
    _swap(OLD, NEW, ["run_id", "content_hash"])


def downgrade() -> None:
    # Fails (IntegrityError) when two runs already hold the same content: the old rule cannot
    # hold such a store.
    _swap(NEW, OLD, ["content_hash"])
