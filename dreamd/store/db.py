"""Connecting to the store and migrating it.

SQLite (the embedded default) is opened in WAL mode with foreign keys on, synchronous=NORMAL
(a committed WAL transaction survives a process crash; only a power loss may drop the last
commits) and a busy timeout. Write transactions open with BEGIN IMMEDIATE: in WAL a
transaction that reads and then writes gets SQLITE_BUSY at once, ignoring busy_timeout, when
another connection wrote in between; taking the write lock at BEGIN makes it wait instead.
SQLAlchemy's pysqlite recipe does this: the driver's own transaction handling is switched off
(isolation_level None) and a `begin` event emits BEGIN IMMEDIATE (or plain BEGIN for reads).

PostgreSQL is used by URL (postgresql+psycopg://user@host/db). The schema comes only from
Alembic migrations in <repo>/migrations, configured here in code (no alembic.ini, no cwd).
"""

from __future__ import annotations

import fcntl
import functools
import json
import math
import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, TypeVar

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, inspect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (ArgumentError, DBAPIError, InterfaceError, NoSuchModuleError,
                            OperationalError)
from sqlalchemy.orm import Session, sessionmaker

import dreamd
from dreamd.errors import DreamdError, StoreUnavailable, UsageError
from dreamd.redact import quote_userinfo, redact_url

def _migrations_dir() -> Path:
    """<repo>/migrations in a source tree or editable install; the packaged copy in a wheel."""
    source = Path(dreamd.__file__).resolve().parent.parent / "migrations"
    if (source / "env.py").is_file():
        return source
    import importlib.util

    spec = importlib.util.find_spec("dreamd_migrations")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("dreamd's Alembic migrations are missing from this installation")
    return Path(next(iter(spec.submodule_search_locations)))


MIGRATIONS_DIR = _migrations_dir()

# Execution option read by the SQLite `begin` hook: "IMMEDIATE" (default, writers) or
# "DEFERRED" (read-only work, which must not queue behind the writer).
SQLITE_BEGIN = "dreamd_sqlite_begin"

# LAG() in the metric_trend view needs window functions: SQLite 3.25 (2018).
MIN_SQLITE = (3, 25, 0)


def redact(url: str | URL) -> str:
    """The URL as it may be shown: the password replaced by *** (dreamd/redact.py)."""
    if isinstance(url, URL):
        return redact_url(url.render_as_string(hide_password=True))
    return redact_url(url)


def parse_store_url(url: str) -> URL:
    """Parse and check a store URL: sqlite:///PATH or postgresql+psycopg://user@host/db.

    `postgresql://` and `postgres://` are taken as psycopg 3 (the driver dreamd ships with).
    """
    try:
        parsed = make_url(quote_userinfo(url))
    except (ArgumentError, ValueError):
        raise UsageError(f"store url {redact(url)!r} is not a SQLAlchemy URL; set store.url to "
                         "sqlite:///PATH or postgresql+psycopg://user@host/db") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise UsageError(f"store url {redact(parsed)!r} uses {parsed.get_backend_name()!r}; dreamd "
                         "stores support sqlite:///PATH and postgresql+psycopg://user@host/db")
    return parsed


def _sqlite_file(url: URL) -> Path | None:
    db = url.database
    return None if not db or db == ":memory:" or db.startswith("file:") else Path(db)


def create_store_engine(url: URL, busy_timeout_ms: int = 10_000) -> Engine:
    """An Engine with dreamd's connection settings (see the module docstring)."""
    if url.get_backend_name() == "postgresql":
        # connect_timeout: an unreachable server fails in seconds, not the OS's ~2 minutes.
        # pool_pre_ping: a long-running daemon outlives server restarts.
        return create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 10},
                             json_serializer=_json_dumps)

    if sqlite3.sqlite_version_info < MIN_SQLITE:
        raise UsageError(f"SQLite {sqlite3.sqlite_version} is too old for the store (needs >= "
                         f"{'.'.join(map(str, MIN_SQLITE))} for window functions); use a newer "
                         "Python build or a PostgreSQL store.url")
    engine = create_engine(url, json_serializer=_json_dumps)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: object) -> None:
        dbapi_conn.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")  # first: WAL switch may wait
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get(SQLITE_BEGIN, "IMMEDIATE")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


@contextmanager
def sqlite_foreign_keys_off(connection: Connection) -> Iterator[None]:
    """Run a migration with foreign keys off (SQLite batch mode recreates tables, and dropping
    a referenced table with foreign keys on would delete or fail). PRAGMA foreign_keys is a
    no-op inside a transaction, so it is set on the driver connection before BEGIN. Afterwards
    PRAGMA foreign_key_check must find no broken reference. No-op on PostgreSQL."""
    if connection.dialect.name != "sqlite":
        yield
        return
    assert not connection.in_transaction(), "foreign_keys can only change outside a transaction"
    raw = connection.connection.driver_connection
    assert raw is not None
    raw.execute("PRAGMA foreign_keys = OFF")
    try:
        yield
        broken = raw.execute("PRAGMA foreign_key_check").fetchall()
        if broken:
            raise RuntimeError(f"migration left {len(broken)} broken foreign keys, "
                               f"first: {broken[0]}")
    finally:
        raw.execute("PRAGMA foreign_keys = ON")


def refuse_foreign_tables(connection: Connection) -> None:
    """Called by migrations/env.py, under the migration lock, when the store has no revision:
    tables there mean the URL points at someone else's database."""
    tables = set(inspect(connection).get_table_names()) - {"alembic_version"}
    if tables:
        raise UsageError(f"store at {redact(connection.engine.url)} has tables "
                         f"({', '.join(sorted(tables)[:5])}) but no dreamd schema revision; "
                         "point store.url at an empty or dreamd-made database")


def alembic_config() -> AlembicConfig:
    """Alembic configured in code: the script directory is <repo>/migrations."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, f"no migrations found in {MIGRATIONS_DIR}"
    return head


@dataclass(frozen=True)
class UpgradeResult:
    from_revision: str | None
    """Revision before the upgrade (None: the store was empty)."""
    to_revision: str
    backup: Path | None
    """SQLite only: the copy taken before migrating a non-empty store, if anything was pending."""

    def __str__(self) -> str:
        if self.from_revision == self.to_revision:
            return f"store at revision {self.to_revision} (up to date)"
        saved = f"; backup {self.backup}" if self.backup else ""
        return f"store upgraded {self.from_revision or '(empty)'} -> {self.to_revision}{saved}"


class Database:
    """An open store: engine, transactions, migrations. `Store` (record.py) adds the rows."""

    transient_retries: int = 0
    """How often a recording call is re-run after a transient error (see retry_transient). 0
    while starting, so a locked or unreachable store is the user's to fix at once; the loop
    sets store.connect_retries once the daemon runs."""
    retry_delay_s: float = 0.5
    """First backoff delay; doubled after every failed attempt (0.5, 1, 2, 4, 8 s)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._write = sessionmaker(engine, expire_on_commit=False)
        self._read = sessionmaker(engine.execution_options(**{SQLITE_BEGIN: "DEFERRED"}),
                                  expire_on_commit=False)

    @classmethod
    def open(cls, url: str, busy_timeout_ms: int = 10_000, retries: int = 0,
             retry_delay_s: float = 0.5, create: bool = True) -> Self:
        """Connect to the store at `url` (creating a SQLite file and its directory, unless
        create=False: the commands that only read or mark a run never make a store, so `dreamd
        status` in the wrong directory, or `dreamd pause` as root, leaves nothing behind).

        Retries `retries` times with exponential backoff from `retry_delay_s` (0.5, 1, 2, ...
        seconds). Raises one line: UsageError when the URL is bad or the store refuses this
        user for good, StoreUnavailable when it is down or locked. Does not migrate: call upgrade().
        """
        parsed = parse_store_url(url)
        sqlite_file = _sqlite_file(parsed) if parsed.get_backend_name() == "sqlite" else None
        if sqlite_file is not None and not create and not sqlite_file.is_file():
            raise UsageError(f"no store at {sqlite_file}{' (it is not a file)' if sqlite_file.exists() else ''}; "
                             "run `dreamd run` first, or point --config at the run's config "
                             "(run.state_dir / store.url)")
        if sqlite_file is not None:
            try:
                sqlite_file.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UsageError(f"store unreachable at {redact(parsed)}: cannot create "
                                 f"{sqlite_file.parent}: {exc.strerror}; check store.url or "
                                 "run.state_dir") from None
        try:
            engine = create_store_engine(parsed, busy_timeout_ms)
        except (NoSuchModuleError, ImportError) as exc:
            raise UsageError(f"store url {redact(parsed)!r} needs a driver that is not "
                             f"installed ({exc}); use postgresql+psycopg://") from None
        for attempt in range(retries + 1):
            try:
                with engine.connect():  # connecting runs the PRAGMAs: SQLite opens the file
                    pass
                return cls(engine)
            except DBAPIError as exc:
                if attempt == retries:
                    engine.dispose()
                    raise store_failure(exc, parsed, busy_timeout_ms, "to connect") from None
                time.sleep(retry_delay_s * 2**attempt)
        raise AssertionError("unreachable")

    @classmethod
    def open_existing(cls, url: str, busy_timeout_ms: int = 10_000) -> Self:
        """A store that a run already made, for the commands that only read or mark it (status,
        history, pause, report): never created here, one UsageError line when it is missing or
        has no dreamd schema."""
        store = cls.open(url, busy_timeout_ms=busy_timeout_ms, create=False)
        if store.current_revision() is None:
            store.close()
            raise UsageError(f"store {store.url} has no dreamd schema yet; run `dreamd db upgrade` "
                             "or `dreamd run`, or check store.url / run.state_dir")
        return store

    @property
    def dialect(self) -> str:
        """'sqlite' or 'postgresql'."""
        return self.engine.dialect.name

    @property
    def url(self) -> str:
        """The store URL without its password."""
        return redact(self.engine.url)

    def close(self) -> None:
        self.engine.dispose()

    # ---- transactions ------------------------------------------------------------------------
    @contextmanager
    def session(self) -> Iterator[Session]:
        """A write transaction (BEGIN IMMEDIATE on SQLite): commits when the block ends,
        rolls back if it raises. Objects stay readable after commit (expire_on_commit off)."""
        with self._write.begin() as s:
            yield s

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only transaction (plain BEGIN on SQLite: never waits for the writer)."""
        with self._read.begin() as s:
            yield s

    # ---- migrations --------------------------------------------------------------------------
    def current_revision(self) -> str | None:
        """The Alembic revision the store is at; None for an empty store."""
        with self._read.begin() as s:
            return MigrationContext.configure(s.connection()).get_current_revision()

    def upgrade(self, revision: str = "head") -> UpgradeResult:
        """Migrate to `revision` (default: the newest), all steps in one transaction.

        With the BEGIN recipe above SQLite DDL is transactional too (a migration that fails
        halfway leaves the store as it was; tests/test_store.py checks it). Still, on SQLite a
        non-empty store is first copied to <file>.bak-<its revision> when a migration is
        pending: a migration can also be wrong without failing."""
        cfg = alembic_config()
        script = ScriptDirectory.from_config(cfg)
        target = script.get_revision(revision)
        assert target is not None, f"unknown revision {revision!r}"
        with self._migration_lock():
            before = self.current_revision()
            backup = None
            if before is not None and before != target.revision and self.dialect == "sqlite":
                backup = self._backup_sqlite(before)
            self._run_alembic(command.upgrade, revision)
            after = self.current_revision()
        assert after is not None
        return UpgradeResult(before, after, backup)

    @contextmanager
    def _migration_lock(self) -> Iterator[None]:
        """Several daemons may start on one new SQLite file at once: the whole upgrade (read the
        revision, back up, migrate) runs under an exclusive flock on `<file>.migrate.lock`, so
        the others wait and then find nothing pending. BEGIN IMMEDIATE alone did not serialise
        it: Alembic reads the revision and reflects a table for batch mode in separate
        snapshots, and a second process could reflect a table the first had just rebuilt
        (tests/test_store.py, test_concurrent_first_upgrades). PostgreSQL takes an advisory
        lock inside the migration's transaction instead (migrations/env.py)."""
        path = _sqlite_file(self.engine.url) if self.dialect == "sqlite" else None
        if path is None:
            yield
            return
        with open(path.with_name(path.name + ".migrate.lock"), "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def downgrade(self, revision: str) -> None:
        """Migrate down to `revision` ('base' removes every table). For developers and tests."""
        self._run_alembic(command.downgrade, revision)

    def _run_alembic(self, fn: Callable[[AlembicConfig, str], None], revision: str) -> None:
        cfg = alembic_config()
        with self.engine.connect() as conn:
            cfg.attributes["connection"] = conn  # migrations/env.py uses it
            fn(cfg, revision)

    def _backup_sqlite(self, revision: str) -> Path:
        src = _sqlite_file(self.engine.url)
        assert src is not None, "backups are for file stores"
        dst = src.with_name(f"{src.name}.bak-{revision}")
        n = 1
        while dst.exists():  # never overwrite an older backup of the same revision
            dst = src.with_name(f"{src.name}.bak-{revision}.{n}")
            n += 1
        # The backup API copies a consistent snapshot including WAL frames not yet in the
        # main file; copying the file alone would miss them.
        with closing(sqlite3.connect(src)) as s, closing(sqlite3.connect(dst)) as d:
            s.backup(d)
        return dst


# ---------------------------------------------------------------------------------------------
# transient errors while running

TRANSIENT_ERRORS = (OperationalError, InterfaceError)
"""SQLite 'database is locked' after busy_timeout, a PostgreSQL connection dropped or refused
(server restart, pg_terminate_backend): the call can succeed later. IntegrityError and
ProgrammingError are not transient: they are bugs or data and are raised at once."""

_PERMANENT = ("readonly", "read-only", "unable to open database file", "permission denied",
              "password authentication failed", "does not exist")
"""OperationalError texts no retry fixes: a read-only file or directory, a role or database
that does not exist, a wrong password."""


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the store call can succeed (see TRANSIENT_ERRORS and _PERMANENT)."""
    return isinstance(exc, TRANSIENT_ERRORS) and not any(t in _reason(exc).lower() for t in _PERMANENT)


def store_failure(exc: BaseException, url: str | URL, busy_timeout_ms: int, when: str) -> DreamdError:
    """The one-line error for a store that failed `when` ('while starting', 'while running'):
    UsageError (exit 2) for what a person must fix, StoreUnavailable (exit 75, systemd restarts)
    for what time can fix."""
    reason = _reason(exc)
    low = reason.lower()
    where = f"store {redact(url)} failed {when}: {reason}"
    if any(t in low for t in _PERMANENT):
        path = _sqlite_file(make_url(url) if isinstance(url, str) else url)
        hint = (f"the service user must be able to write {path} and its directory {path.parent} "
                "(owner/permissions)" if path is not None and ("readonly" in low or "unable to open" in low
                                                              or "permission" in low)
                else "check the URL's user, password and database name")
        return UsageError(f"{where}; {hint}")
    if "locked" in low:
        hint = (f"another process holds its write lock longer than store.busy_timeout_ms={busy_timeout_ms}; "
                "close it (an open sqlite3 shell, a backup) or raise the timeout")
    elif "full" in low or "no space" in low or "i/o error" in low:
        hint = ("free space on the store's disk (and check it for I/O errors); dreamd resumes from its "
                "last checkpoint when restarted")
    else:
        hint = "check that the server runs and accepts connections; dreamd resumes when restarted"
    return StoreUnavailable(f"{where}; {hint}")


C = TypeVar("C", bound=type)


def retry_transient(cls: C) -> C:
    """Class decorator: every public method defined in `cls` (the recording API, one short
    transaction per call) is re-run after a TRANSIENT_ERRORS failure, up to
    `self.transient_retries` times, sleeping retry_delay_s * 2**attempt in between.

    Re-running is safe because a failed call rolled its transaction back. The one ambiguity is
    a connection lost during COMMIT (PostgreSQL), after which the row may exist: a retried
    add_train_step then fails on the unique active step, loudly, instead of writing it twice.
    PostgreSQL connections dropped between calls never get here: pool_pre_ping replaces them;
    except add_train_step's, held from step to step without a ping (Store._step_connection): one
    dropped between two steps fails that call, which is retried on a fresh connection."""
    from dreamd.log import get_logger

    log = get_logger("dreamd.store")

    def wrap(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def call(self: Database, *args: Any, **kwargs: Any) -> Any:
            attempt = 0
            while True:
                try:
                    return method(self, *args, **kwargs)
                except TRANSIENT_ERRORS as exc:
                    if attempt >= self.transient_retries or not is_transient(exc):
                        raise
                    delay = self.retry_delay_s * 2**attempt
                    attempt += 1
                    log.warning("store.retry", call=name, error=_reason(exc), attempt=attempt,
                                retries=self.transient_retries, delay_s=delay)
                    time.sleep(delay)
        return call

    for name, value in list(vars(cls).items()):
        if callable(value) and not name.startswith("_") and not isinstance(value, (classmethod, staticmethod)):
            setattr(cls, name, wrap(name, value))
    return cls


def _json_dumps(value: object) -> str:
    # Readable in a sqlite3 shell (no \uXXXX escapes); Paths and the like become strings.
    try:
        return json.dumps(value, ensure_ascii=False, default=str, allow_nan=False)
    except ValueError:
        # NaN/Infinity are not JSON: PostgreSQL's json type refuses them (a diverged model's
        # metrics in decisions.metrics_json or evals.detail_json). Keep them as text.
        return json.dumps(_finite_json(value), ensure_ascii=False, default=str, allow_nan=False)


def _finite_json(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)                            # 'nan', 'inf', '-inf'
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value


def _reason(exc: DBAPIError) -> str:
    """The driver's message as one line (psycopg's spans several)."""
    text = str(exc.orig) if exc.orig is not None else str(exc)
    return " ".join(text.split()) or type(exc.orig).__name__
