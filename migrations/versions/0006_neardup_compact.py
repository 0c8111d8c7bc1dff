"""near duplicates, compact: drop minhash_bands (the LSH bands now live in memory, computed from
the signatures when the index opens); signatures keep their values under the scheme name
without the band layout.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01

minhash_bands held 32 rows per accepted scenario and an index on band_key: 85% of a store of
1e6 template scenarios (3.2 GB), and a lookup that grew with the store. The signatures are the
same values as before (same shingles, hashes and seed), so their rows are only renamed to the
new scheme; signatures of any other scheme are left for the index's backfill, which signs those
scenarios again. SQLite keeps the freed pages in the file until `VACUUM`.

Downgrade: minhash_bands comes back empty and the signatures are deleted: the bands cannot be
computed in SQL, and 0003's code indexes every accepted scenario without a signature at its
next start (both tables). Self-contained (no imports from dreamd).
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None

OLD_SCHEME = "w3-crc32-p128-b32r4-s4e445550"
NEW_SCHEME = "w3-crc32-p128-s4e445550"


def upgrade() -> None:
    op.execute(sa.text("UPDATE minhash_signatures SET scheme = :new WHERE scheme = :old")
               .bindparams(new=NEW_SCHEME, old=OLD_SCHEME))
    op.drop_index(op.f("ix_minhash_bands_band_key"), table_name="minhash_bands")
    op.drop_table("minhash_bands")


def downgrade() -> None:
    op.create_table(
        "minhash_bands",
        sa.Column("scenario_id", sa.Integer(), nullable=False),
        sa.Column("band", sa.Integer(), nullable=False),
        sa.Column("band_key", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["scenario_id"], ["scenarios.id"],
                                name=op.f("fk_minhash_bands_scenario_id_scenarios")),
        sa.PrimaryKeyConstraint("scenario_id", "band", name=op.f("pk_minhash_bands")),
    )
    op.create_index(op.f("ix_minhash_bands_band_key"), "minhash_bands", ["band_key"])
    op.execute("DELETE FROM minhash_signatures")
