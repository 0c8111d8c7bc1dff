"""Secrets never reach the store, a checkpoint or a log line, and what the daemon creates is
its user's alone (issue: a PostgreSQL password stored in clear in runs.config_json and every
checkpoint's dreamd.toml, a raw '@' in a password leaking its tail, 0644 files)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from dreamd.config import Config
from dreamd.config_file import load_config, to_toml
from dreamd.redact import quote_userinfo, redact_url
from dreamd.store.db import parse_store_url, redact
from tests.conftest import PG_URL_ENV

SECRET = "s3cr3t-p@ss/word"


@pytest.mark.parametrize("url, shown", [
    ("postgresql+psycopg://dreamd:p@ss@db:5432/runs", "postgresql+psycopg://dreamd:***@db:5432/runs"),
    ("postgresql://dreamd:a/b?c@db/runs", "postgresql://dreamd:***@db/runs"),
    ("postgresql://dreamd@db/runs?password=zz&sslmode=require", "postgresql://dreamd@db/runs?password=***&sslmode=require"),
    ("postgresql://dreamd:p%40ss@db/runs", "postgresql://dreamd:***@db/runs"),
    ("sqlite:////var/lib/dreamd/dreamd.sqlite", "sqlite:////var/lib/dreamd/dreamd.sqlite"),
])
def test_redact_url_hides_the_whole_password(url, shown):
    assert redact_url(url) == shown
    assert redact(url) == shown


def test_a_raw_at_sign_in_a_password_parses_as_the_password():
    parsed = parse_store_url("postgresql://dreamd:p@ss@db:5432/runs")
    assert (parsed.username, parsed.password, parsed.host, parsed.port) == ("dreamd", "p@ss", "db", 5432)
    assert quote_userinfo("postgresql://dreamd:p%40ss@db/runs") == "postgresql://dreamd:p%40ss@db/runs"


def test_config_written_anywhere_has_no_password():
    cfg = Config()
    cfg.store.url = f"postgresql+psycopg://dreamd:{SECRET}@db/runs"
    for written in (cfg.resolved_json(), to_toml(cfg)):
        assert SECRET not in written and "p@ss" not in written and "dreamd:***@db/runs" in written
    assert cfg.store.url.endswith(f"{SECRET}@db/runs")  # the running config keeps it to connect


def test_typo_in_the_port_is_one_line():
    from dreamd.errors import UsageError

    with pytest.raises(UsageError, match="is not a SQLAlchemy URL") as info:
        parse_store_url(f"postgresql://dreamd:{SECRET}@db:54x2/runs")
    assert SECRET not in str(info.value)


@pytest.mark.slow
def test_a_run_on_postgresql_with_a_password_stores_and_writes_none_of_it(setup_dir, tmp_path):
    """A real run with a password in its URL (the server trusts local connections, so any
    password connects): runs.config_json, the checkpoint's dreamd.toml and the log hold no trace
    of it; state dir 0700, checkpoint files and store 0600."""
    admin_url = os.environ.get(PG_URL_ENV)
    if not admin_url:
        pytest.skip(f"{PG_URL_ENV} not set")
    name = f"dreamd_secret_{os.getpid()}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        base = make_url(admin_url).set(database=name)
        url = f"postgresql+psycopg://{base.username}:{SECRET}@{base.host}:{base.port or 5432}/{name}"
        state = tmp_path / "state"
        env = {**os.environ, "DREAMD_STORE__URL": url, "DREAMD_RUN__STATE_DIR": str(state),
               "DREAMD_MIX__EXAMPLES_PER_CYCLE": "8", "DREAMD_EVAL__ARITHMETIC_N": "4",
               "DREAMD_EVAL__PERPLEXITY_MAX_TOKENS": "256", "DREAMD_LOG_FORMAT": "json"}
        proc = subprocess.run([sys.executable, "-m", "dreamd", "once", "--config", str(setup_dir / "dreamd.toml")],
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert SECRET not in proc.stderr and "p@ss" not in proc.stderr
        engine = create_engine(base)
        with engine.connect() as conn:
            stored = conn.execute(text("SELECT config_json FROM runs")).scalars().all()
            events = conn.execute(text("SELECT detail FROM events")).scalars().all()
        engine.dispose()
        assert stored and all(SECRET not in str(c) for c in stored) and all(SECRET not in e for e in events)
        ckpt = next((state / "checkpoints").rglob("ckpt-*"))
        toml = (ckpt / "dreamd.toml").read_text()
        assert SECRET not in toml and "***" in toml
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        assert stat.S_IMODE((ckpt / "dreamd.toml").stat().st_mode) == 0o600
        assert stat.S_IMODE((ckpt / "model.safetensors").stat().st_mode) == 0o600
        loaded = load_config(ckpt / "dreamd.toml", environ={"DREAMD_STORE__URL": url})  # supply it again
        assert loaded.store.url == url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
