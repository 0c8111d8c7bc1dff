"""The SQL store: every scenario, optimizer step, metric, decision, checkpoint and event.

`Store.open(url)` connects (SQLite WAL by default, PostgreSQL by URL), `store.upgrade()`
applies the Alembic migrations in <repo>/migrations, and the `add_*` / `start_*` methods record
a run. The schema and its views are documented for users in docs/sql.md.
"""

from dreamd.store.db import MIGRATIONS_DIR, Database, UpgradeResult, head_revision, redact
from dreamd.store.record import Store, Superseded
from dreamd.store.scenarios import SavedScenario

__all__ = ["MIGRATIONS_DIR", "Database", "SavedScenario", "Store", "Superseded", "UpgradeResult",
           "head_revision", "redact"]
