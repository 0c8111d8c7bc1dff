"""One writer per run: a claim on the run's name, held for the life of the process.

    claim = RunClaim.take(store, cfg.run.name)   # UsageError (one line) if another dreamd holds it
    claim.check()                                 # before each cycle: still ours?

Two daemons with different state dirs but the same store and run.name would both resume the
same run: in turn, the second superseded the first's committed cycles; at once, their steps
interleaved. The pidfile covers one state dir only; the store is where the run lives, so the
claim is taken there, with what each backend offers that a crash releases by itself:

  PostgreSQL  a session advisory lock, pg_try_advisory_lock(hashtext('dreamd run'),
              hashtext(name)), on a connection of its own (application_name names the process,
              so a refused start can say who holds it). The server drops it with the connection:
              a killed daemon never leaves it behind. A server restart drops it too, so `check()`
              takes it again before each cycle, or stops if someone else has it now.
  SQLite      an exclusive flock() on `<store file>.run-<sha1(name)[:12]>.lock` beside the
              store; the kernel drops it when the process dies.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import time
from pathlib import Path
from typing import Any

from sqlalchemy import text

from dreamd.errors import UsageError
from dreamd.store.db import TRANSIENT_ERRORS, is_transient

LOCK_SQL = text("SELECT pg_try_advisory_lock(hashtext('dreamd run'), hashtext(:name))")
HOLDER_SQL = text(
    "SELECT a.application_name, a.client_addr::text, a.pid FROM pg_locks l "
    "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
    "AND l.classid = hashtext('dreamd run')::oid AND l.objid = hashtext(:name)::oid AND l.objsubid = 2 "
    "AND a.pid <> pg_backend_pid() LIMIT 1")


class RunClaim:
    def __init__(self, store: Any, name: str) -> None:
        self.store, self.name = store, name
        self.me = f"dreamd pid {os.getpid()} on {socket.gethostname()}"
        self._conn: Any = None
        self._fd: int | None = None

    _held: dict[tuple[str, str], RunClaim] = {}
    """Claims this process holds: one process opening its own run again (a test, a benchmark
    simulating a restart) gets the claim it has; only another process is refused."""

    @classmethod
    def take(cls, store: Any, name: str) -> RunClaim:
        key = (str(store.url), name)
        held = cls._held.get(key)
        if held is not None and (held._conn is not None or held._fd is not None):
            return held
        claim = cls(store, name)
        claim._acquire()
        cls._held[key] = claim
        return claim

    def _refused(self, holder: str | None) -> UsageError:
        who = f" ({holder})" if holder else ""
        return UsageError(f"run {self.name!r} in store {self.store.url} is being trained by another "
                          f"dreamd{who}; stop that one, or give this one another run.name")

    def _acquire(self) -> None:
        if self.store.dialect == "postgresql":
            conn = self.store.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            try:
                conn.execute(text("SELECT set_config('application_name', :me, false)"), {"me": self.me})
                got = conn.execute(LOCK_SQL, {"name": self.name}).scalar()
                holder = None if got else conn.execute(HOLDER_SQL, {"name": self.name}).first()
            except BaseException:
                conn.invalidate()  # a session that may hold the lock must not go back to the pool
                conn.close()
                raise
            if not got:
                conn.close()
                raise self._refused(f"{holder[0]}, server pid {holder[2]}" if holder else None)
            self._conn = conn
            return
        path = self.lock_path()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip()
            os.close(fd)
            raise self._refused(holder or None) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, self.me.encode(), 0)
        self._fd = fd

    def lock_path(self) -> Path:
        from dreamd.store.db import _sqlite_file

        db = _sqlite_file(self.store.engine.url)
        digest = hashlib.sha1(self.name.encode()).hexdigest()[:12]
        return Path(f"{db}.run-{digest}.lock")

    def check(self) -> None:
        """Still ours? A PostgreSQL connection lost with a server restart (or a terminated
        backend) took the lock with it: take it again, or stop with one line if another daemon
        has it now. Transient failures while doing so are retried like every store call."""
        if self.store.dialect != "postgresql":
            return
        attempt = 0
        while True:
            try:
                self._check_once()
                return
            except TRANSIENT_ERRORS as exc:
                if attempt >= self.store.transient_retries or not is_transient(exc):
                    raise
                time.sleep(self.store.retry_delay_s * 2**attempt)
                attempt += 1

    def _check_once(self) -> None:
        if self._conn is not None:
            try:
                self._conn.execute(text("SELECT 1"))
                return
            except Exception:  # noqa: BLE001 - the connection is gone; so is the lock
                try:
                    self._conn.invalidate()
                    self._conn.close()
                except Exception:  # noqa: BLE001
                    pass
                self._conn = None
        self._acquire()

    def release(self) -> None:
        if self._conn is not None:
            # invalidate: really close the session (a pooled one would keep holding the lock)
            self._conn.invalidate()
            self._conn.close()
            self._conn = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
