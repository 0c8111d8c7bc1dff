"""Alembic environment for the dreamd store.

Normally run in code by `Database.upgrade()` (dreamd/store/db.py), which passes an open
connection in `config.attributes["connection"]` and backs up SQLite files first. For developers
the alembic CLI works too, from the repo root with alembic.ini:

    .venv/bin/alembic -x url=sqlite:///state/dreamd.sqlite revision --autogenerate -m "..."

(the URL also comes from DREAMD_STORE__URL). The CLI takes no backup.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import Connection, text

from dreamd.store.db import Database, refuse_foreign_tables, sqlite_foreign_keys_off
from dreamd.store.tables import Base

config = context.config

# Several daemons may share one PostgreSQL store and start at once: the first to take this
# transaction-scoped lock migrates, the others wait and then find nothing pending. (SQLite
# needs no lock: the migration's BEGIN IMMEDIATE already serialises writers.)
PG_MIGRATION_LOCK = 0x647265616D64  # "dreamd"


def run_migrations(connection: Connection) -> None:
    # SQLite cannot ALTER most things: batch mode recreates the table (copy, drop, rename),
    # which needs foreign keys off while it runs.
    with sqlite_foreign_keys_off(connection):
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                connection.execute(text(f"SELECT pg_advisory_xact_lock({PG_MIGRATION_LOCK})"))
            if context.get_context().get_current_revision() is None:
                refuse_foreign_tables(connection)
            context.run_migrations()


def main() -> None:
    if context.is_offline_mode():
        raise SystemExit("offline (--sql) migrations are not supported; run against a store")
    connection = config.attributes.get("connection")
    if connection is not None:
        run_migrations(connection)
        return
    url = (context.get_x_argument(as_dictionary=True).get("url")
           or os.environ.get("DREAMD_STORE__URL")
           or config.get_main_option("sqlalchemy.url"))
    if not url:
        raise SystemExit("no store URL: pass -x url=sqlite:///PATH or set DREAMD_STORE__URL")
    db = Database.open(url)
    try:
        with db.engine.connect() as conn:
            run_migrations(conn)
    finally:
        db.close()


main()
